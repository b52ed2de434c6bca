"""Judge and filter trajectories: programmatic checks, then an LLM verdict against the rubric (paper §3.1.1, spec §4.3).

Programmatic checks come first and cost nothing; a trajectory failing one is rejected without asking the LLM:

    episode_ok        the episode ran to its end (no infrastructure or endpoint failure)
    arguments_valid   every call's arguments are a JSON object valid against its tool's input schema
    agent_tools_only  every call names one of the agent's tools
    required_calls    the rubric's expected calls were made (as a subsequence when order matters, else as a set)
    end_state         the simulated world at the end equals the gold plan's end state
    answered          the conversation ends with a non-empty assistant answer

Then one LLM verdict, `{"verdict": "pass" | "fail", "reasons": ...}` validated by schema and re-asked on invalid
output, at most `attempts` (<= 3) LLM calls. What an unusable verdict means (`on_unusable`) and whether a "fail"
rejects (`must_pass`) are config choices of ours; kept and rejected trajectories both carry every check's result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import jsonschema

from openk2.agentic.agents import Agent
from openk2.agentic.config import JudgeSection
from openk2.agentic.episode import Trajectory
from openk2.agentic.llm import LLMOutputError, LLMRequestError
from openk2.agentic.tasks import Task
from openk2.agentic.tools import ToolSpec

VERDICT_SCHEMA = {"type": "object", "required": ["verdict"],
                  "properties": {"verdict": {"type": "string", "enum": ["pass", "fail"]},
                                 "reasons": {"anyOf": [{"type": "string"},
                                                       {"type": "array", "items": {"type": "string"}}]}}}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class Verdict:
    """Whether a trajectory is kept, and why: each check, the LLM's verdict and reasons."""

    episode_id: str
    kept: bool
    reasons: list[str]  # why it was kept or rejected, in words
    checks: list[Check] = field(default_factory=list)
    llm_verdict: str | None = None  # "pass", "fail", None (not asked, or no valid answer)
    llm_reasons: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(**{**data, "checks": [Check(**c) for c in data["checks"]]})


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def _required_calls(made: list[dict[str, Any]], expected: list[dict[str, Any]], ordered: bool) -> tuple[bool, str]:
    have = [(c["tool"], _normal(c["arguments"])) for c in made if c["arguments"] is not None]
    want = [(c["tool"], _normal(c["arguments"])) for c in expected]
    if ordered:
        position = 0
        for call in want:
            while position < len(have) and have[position] != call:
                position += 1
            if position == len(have):
                return False, f"expected call {call[0]}({json.dumps(call[1])[:120]}) not made in order"
            position += 1
        return True, ""
    for call in want:
        if call not in have:
            return False, f"expected call {call[0]}({json.dumps(call[1])[:120]}) not made"
    return True, ""


def programmatic_checks(trajectory: Trajectory, task: Task, agent: Agent, tools: dict[str, ToolSpec]) -> list[Check]:
    """The checks above, every one evaluated (so a rejection lists all that failed)."""
    checks = [Check("episode_ok", trajectory.status == "ok", trajectory.reason)]
    bad_args = []
    for call in trajectory.calls:
        tool = tools.get(call["tool"])
        if call["arguments"] is None:
            bad_args.append(f"{call['id']}: not a JSON object")
        elif tool is not None:
            errors = list(jsonschema.Draft202012Validator(tool.input_schema).iter_errors(call["arguments"]))
            if errors:
                bad_args.append(f"{call['id']}: {errors[0].message[:120]}")
    checks.append(Check("arguments_valid", not bad_args, "; ".join(bad_args)))
    foreign = sorted({c["tool"] for c in trajectory.calls if c["tool"] not in agent.tools})
    checks.append(Check("agent_tools_only", not foreign, f"not the agent's: {', '.join(foreign)}" if foreign else ""))
    assert task.rubric is not None
    ok, detail = _required_calls(trajectory.calls, task.rubric.expected_calls, task.rubric.order_matters)
    checks.append(Check("required_calls", ok, detail))
    same = _normal(trajectory.final_state) == _normal(task.gold_state)
    checks.append(Check("end_state", same, "" if same else "the world at the end differs from the gold end state"))
    last = trajectory.messages[-1] if trajectory.messages else {}
    answered = last.get("role") == "assistant" and bool((last.get("content") or "").strip()) and \
        not last.get("tool_calls")
    checks.append(Check("answered", answered, "" if answered else "no final assistant answer"))
    return checks


def _transcript(trajectory: Trajectory, limit: int = 400) -> str:
    lines = []
    for message in trajectory.messages:
        role = message["role"]
        if role == "tool":
            lines.append(f"[tool result {message['tool_call_id']}] {message['content'][:limit]}")
            continue
        if message.get("content"):
            lines.append(f"[{role}] {message['content'][:limit * 2]}")
        for call in message.get("tool_calls") or []:
            lines.append(f"[assistant calls {call['id']}] {call['function']['arguments'][:limit]}")
    return "\n".join(lines)


def _judge_prompt(trajectory: Trajectory, task: Task) -> list[dict[str, str]]:
    assert task.rubric is not None
    rubric = ("Success criteria:\n" + "\n".join(f"- {c}" for c in task.rubric.success_criteria) +
              "\nExpected tool calls" + (" (in this order)" if task.rubric.order_matters else "") + ":\n" +
              "\n".join(f"- {c['tool']}({json.dumps(c['arguments'], ensure_ascii=False)[:200]})"
                        for c in task.rubric.expected_calls) +
              "\nCheckpoints:\n" + "\n".join(f"- {c}" for c in task.rubric.checkpoints))
    return [{"role": "system", "content": "You are a strict judge of AI assistant conversations."},
            {"role": "user", "content": f"Judge whether the assistant met this rubric.\n{rubric}\n\nConversation:\n"
                                        f"{_transcript(trajectory)}\n\nAnswer like this example: "
                                        '{"verdict": "pass", "reasons": "The assistant made the expected calls and '
                                        'reported the results."} Use "fail" if any criterion is not met.'}]


async def llm_verdict(llm: Any, trajectory: Trajectory, task: Task, config: JudgeSection) -> tuple[str | None, str]:
    """("pass" | "fail", reasons) or (None, why there is no verdict); at most `config.attempts` LLM calls."""
    try:
        reply = await llm.json(_judge_prompt(trajectory, task), VERDICT_SCHEMA, stage="judge",
                               max_attempts=config.attempts, max_tokens=config.max_tokens, seed=trajectory.seed,
                               schema_in_prompt=False)
    except (LLMOutputError, LLMRequestError) as e:
        return None, f"no usable verdict: {str(e)[:300]}"
    reasons = reply.get("reasons", "")
    return reply["verdict"], " ".join(reasons) if isinstance(reasons, list) else str(reasons)


async def judge(llm: Any, trajectory: Trajectory, task: Task, agent: Agent, tools: dict[str, ToolSpec],
                config: JudgeSection) -> Verdict:
    """Checks, then (when they all pass and the config asks) the LLM verdict; the decision and its reasons."""
    checks = programmatic_checks(trajectory, task, agent, tools)
    failed = [f"{c.name}: {c.detail}" if c.detail else c.name for c in checks if not c.passed]
    if failed:
        return Verdict(trajectory.episode_id, False, [f"failed check {f}" for f in failed], checks)
    if not config.llm:
        return Verdict(trajectory.episode_id, True, ["all programmatic checks passed (LLM judge off)"], checks)
    verdict, why = await llm_verdict(llm, trajectory, task, config)
    if verdict is None:
        kept = config.on_unusable == "programmatic"
        return Verdict(trajectory.episode_id, kept, [f"checks passed; {why}; on_unusable = {config.on_unusable}"],
                       checks, None, why)
    if verdict == "pass":
        return Verdict(trajectory.episode_id, True, [f"checks passed; LLM judge: pass: {why}"], checks, verdict, why)
    kept = not config.must_pass
    note = "recorded only (must_pass = false)" if kept else "rejected"
    return Verdict(trajectory.episode_id, kept, [f"checks passed; LLM judge: fail ({note}): {why}"], checks, verdict,
                   why)
