"""The judge: programmatic checks first (schema, agent's tools, required calls, end state), then <= 3 LLM calls."""

from __future__ import annotations

import asyncio
import copy

from openk2.agentic.config import EpisodesSection, JudgeSection
from openk2.agentic.episode import run_episode, tool_call
from openk2.agentic.judge import Verdict, judge
from tests.agentic.test_agents_tasks import FakeLLM, flight_tools
from tests.agentic.test_episode import _task


def _gold():
    tools = {t.name: t for t in flight_tools()}
    agent, task, sims = _task(tools)
    trajectory = asyncio.run(run_episode(FakeLLM(), task, agent, tools, sims, EpisodesSection(), "e", seed=7))
    return tools, agent, task, trajectory


def _checks(verdict: Verdict) -> dict[str, bool]:
    return {c.name: c.passed for c in verdict.checks}


def test_a_gold_trajectory_passes_every_check_and_the_llm_verdict() -> None:
    tools, agent, task, trajectory = _gold()
    llm = FakeLLM()
    verdict = asyncio.run(judge(llm, trajectory, task, agent, tools, JudgeSection()))
    assert verdict.kept and verdict.llm_verdict == "pass" and all(_checks(verdict).values())
    assert set(_checks(verdict)) == {"episode_ok", "arguments_valid", "agent_tools_only", "required_calls",
                                     "end_state", "answered"}
    assert llm.calls("judge") == 1 and "the rubric is met" in verdict.reasons[0]
    prompt = llm.asked[0][1][-1]["content"]
    assert all(c in prompt for c in task.rubric.success_criteria) and task.rubric.checkpoints[0] in prompt
    assert Verdict.from_dict(verdict.to_dict()) == verdict


def test_failed_checks_reject_without_asking_the_llm_and_say_which() -> None:
    tools, agent, task, trajectory = _gold()
    bad = copy.deepcopy(trajectory)
    bad.final_state = {}
    bad.calls.append({"id": "functions.delete_everything:9", "tool": "delete_everything", "arguments": {},
                      "outcome": "unknown_tool", "is_error": True, "source": "simulated"})
    bad.calls[0]["arguments"] = {**bad.calls[0]["arguments"], "surprise": 1}
    llm = FakeLLM()
    verdict = asyncio.run(judge(llm, bad, task, agent, tools, JudgeSection()))
    assert not verdict.kept and llm.calls("judge") == 0
    assert {k for k, ok in _checks(verdict).items() if not ok} == {"arguments_valid", "agent_tools_only",
                                                                  "end_state", "required_calls"}
    assert any("delete_everything" in r for r in verdict.reasons)


def test_required_calls_respect_order_when_it_matters() -> None:
    tools, agent, task, trajectory = _gold()
    assert task.rubric.order_matters
    swapped = copy.deepcopy(trajectory)
    swapped.calls.reverse()
    verdict = asyncio.run(judge(FakeLLM(), swapped, task, agent, tools, JudgeSection(llm=False)))
    assert not _checks(verdict)["required_calls"] and "not made in order" in verdict.reasons[0]


def test_an_unanswered_trajectory_fails_the_answered_check() -> None:
    tools, agent, task, trajectory = _gold()
    cut = copy.deepcopy(trajectory)
    cut.messages = cut.messages[:-1] + [{"role": "assistant", "content": None,
                                         "tool_calls": [tool_call("get_flight", {}, 5)]}]
    verdict = asyncio.run(judge(FakeLLM(), cut, task, agent, tools, JudgeSection()))
    assert not verdict.kept and not _checks(verdict)["answered"]


def test_garbage_verdicts_stop_after_three_calls_and_follow_on_unusable() -> None:
    tools, agent, task, trajectory = _gold()
    garbage = FakeLLM({"judge": lambda m, kw: "I think it is fine!!"})
    verdict = asyncio.run(judge(garbage, trajectory, task, agent, tools, JudgeSection(attempts=3)))
    assert garbage.calls("judge") == 3 and not verdict.kept and verdict.llm_verdict is None
    assert "no usable verdict" in verdict.reasons[0]
    lenient = asyncio.run(judge(FakeLLM({"judge": lambda m, kw: "??"}), trajectory, task, agent, tools,
                                JudgeSection(on_unusable="programmatic")))
    assert lenient.kept and "on_unusable = programmatic" in lenient.reasons[0]


def test_a_failing_verdict_rejects_unless_must_pass_is_off() -> None:
    tools, agent, task, trajectory = _gold()
    harsh = {"judge": lambda m, kw: '{"verdict": "fail", "reasons": ["did not confirm the date"]}'}
    verdict = asyncio.run(judge(FakeLLM(harsh), trajectory, task, agent, tools, JudgeSection()))
    assert not verdict.kept and verdict.llm_verdict == "fail" and "did not confirm the date" in verdict.reasons[0]
    recorded = asyncio.run(judge(FakeLLM(harsh), trajectory, task, agent, tools, JudgeSection(must_pass=False)))
    assert recorded.kept and recorded.llm_verdict == "fail" and "recorded only" in recorded.reasons[0]
