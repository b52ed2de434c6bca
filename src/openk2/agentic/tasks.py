"""Tasks with a rubric and a gold action plan run on the tool simulator first (paper §3.1.1, spec §4.2; APIGen-MT).

A task is made programmatic-first, so a small model cannot spoil it:

    plan      1..k tool calls of the agent's tools (k = the task's complexity level), later calls preferring tools
              that share an entity or a parameter name with earlier ones; writes are ordered before reads
    values    sampled from each tool's input schema (`SchemaSampler`), drawn from the config's value pools where
              one names the parameter, and chained: a parameter named like a value an earlier call sent or got
              back (an id the simulator created, a date) reuses that value
    run       the plan runs on a fresh simulator episode seeded by the task, so its tool outputs and its end state
              are known; a transient failure is retried inside the plan (the assistant will see it and retry); a
              plan with an invalid argument, an unknown tool, a tool error or a record not found is redrawn, and
              after `plan_attempts` draws the task is dropped with the reason
    language  the LLM writes the user's request (which must name every value the user supplies: checked, re-asked
              once, else a template request) and success criteria; the expected calls and the checkpoints of the
              rubric come from the plan

The same seed gives the same simulator outcomes, so replaying the gold calls in an episode reaches the same state.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from openk2.agentic.agents import Agent, tool_domain
from openk2.agentic.catalog import asks, draw_arguments, render_ask
from openk2.agentic.config import TasksSection
from openk2.agentic.llm import LLMOutputError, LLMRequestError
from openk2.agentic.simulate import SchemaSampler, ToolSimulator, open_world, tool_effect
from openk2.agentic.tools import ToolSpec

SimulatorFactory = Callable[[list[ToolSpec], int], ToolSimulator]  # (the agent's tools, seed) -> a fresh simulator
OP_ORDER = {"create": 0, "action": 1, "update": 2, "read": 3, "delete": 4}  # writes before the reads that see them
BAD_OUTCOMES = ("invalid_arguments", "unknown_tool", "tool_error", "infrastructure_error")


@dataclass(frozen=True)
class PlanCall:
    """One executed call of a gold plan; a retry after a transient failure has the same `step` and a new `turn`."""

    tool: str
    arguments: dict[str, Any]
    outcome: str
    output: Any  # ToolResult.content
    is_error: bool
    step: int
    turn: int  # the assistant turn it belongs to: independent calls share one turn (parallel calls)
    state_changes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Rubric:
    """What a good trajectory does: success criteria (prose), the expected calls, checkpoints along the way."""

    success_criteria: list[str]
    expected_calls: list[dict[str, Any]]  # {"tool", "arguments"} per plan step
    order_matters: bool  # a later call depends on an earlier one (a value it returned, or a record it wrote)
    checkpoints: list[str]
    criteria_source: str = "plan"  # "llm" or "plan"


@dataclass(frozen=True)
class Task:
    """A user request with its rubric and its executed gold plan; `kept` is False (with `reason`) for a dropped one."""

    task_id: str
    agent_id: str
    domain: str
    complexity: int
    seed: int
    kept: bool
    reason: str
    calls: list[PlanCall]
    gold_state: dict[str, Any]
    user_request: str = ""
    request_source: str = ""  # "llm" or "template"
    note: str = ""  # why a fallback was used
    rubric: Rubric | None = None
    user_values: list[str] = field(default_factory=list)  # values the request must mention

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        data = dict(data)
        data["calls"] = [PlanCall(**c) for c in data["calls"]]
        data["rubric"] = Rubric(**data["rubric"]) if data.get("rubric") else None
        return cls(**data)


# ----------------------------------------------------------------------------------------------------------------
# the gold plan


def _params(tool: ToolSpec) -> set[str]:
    return set(tool.input_schema.get("properties", {}) or {})


def draw_plan(tools: list[ToolSpec], complexity: int, rng: random.Random, repeat_rate: float = 0.0
              ) -> list[ToolSpec]:
    """`complexity` tools to call, related ones preferred, writes ordered before reads (stable otherwise).

    With probability `repeat_rate` a later call repeats the tool before it (the same tool with other values: the
    parallel calls of one function that a request like "the weather in Paris and in Oslo" needs).
    """
    seq = [rng.choice(tools)]
    while len(seq) < complexity:
        if rng.random() < repeat_rate:
            seq.append(seq[-1])
            continue
        rest = [t for t in tools if t not in seq] or list(tools)
        entities = {tool_effect(t.name)[1] for t in seq}
        names = set().union(*(_params(t) for t in seq))
        related = [t for t in rest if tool_effect(t.name)[1] in entities or names & _params(t)]
        seq.append(rng.choice(related if related and rng.random() < 0.8 else rest))
    return sorted(seq, key=lambda t: OP_ORDER[tool_effect(t.name)[0]])


def _scalars(value: Any, depth: int = 0) -> list[tuple[str, Any]]:
    """(name, value) of the scalar fields in a value, outer fields first; in a list, only its first element."""
    out: list[tuple[str, Any]] = []
    if depth > 4:
        return out
    if isinstance(value, dict):
        nested = []
        for key, item in value.items():
            if isinstance(item, (str, int, float)) and not isinstance(item, bool):
                out.append((key, item))
            elif isinstance(item, (dict, list)):
                nested.append(item)
        for item in nested:
            out += [(k, v) for k, v in _scalars(item, depth + 1) if k not in dict(out)]
    elif isinstance(value, list) and value:
        out += _scalars(value[0], depth + 1)
    return out


def _pool_value(pools: dict[str, list[Any]], tool: str, param: str, rng: random.Random) -> Any:
    pool = pools.get(f"{tool}.{param}", pools.get(param))
    return rng.choice(pool) if pool else None


def run_plan(tools: list[ToolSpec], simulator: ToolSimulator, seed: int, config: TasksSection,
             rng: random.Random) -> tuple[list[PlanCall], dict[str, Any], str]:
    """Sample and run the calls of `tools` in order on a fresh episode: (calls, end state, problem or "")."""
    episode = simulator.new_episode(seed)
    sim_config = simulator.config
    sampler = SchemaSampler(rng, dt.datetime.fromisoformat(sim_config.start_time), sim_config.max_list_items)
    known: dict[str, Any] = {}  # every value sent or returned so far, by field name (latest wins)
    returned: set[str] = set()  # values first seen in an output (JSON text), i.e. ones the user cannot know
    turn, turn_outputs, turn_writes = 0, set(), set()
    calls: list[PlanCall] = []
    for step, tool in enumerate(tools):
        ctx = {p: v for p in _params(tool) if (v := _pool_value(config.value_pools, tool.name, p, rng)) is not None}
        # A catalog tool's values come from its ask (the request must name them all), so none is chained in; a
        # repeated tool gets other values (the same call twice would be one call).
        arguments = draw_arguments(tool, rng, ctx)
        for _ in range(8):
            if arguments is None or all(c.arguments != arguments for c in calls if c.tool == tool.name):
                break
            arguments = draw_arguments(tool, rng)
        if arguments is None:
            ctx.update({k: v for k, v in known.items() if k in _params(tool)})
            arguments = sampler.sample(tool.input_schema, tool.input_schema, ctx)
        used = {json.dumps(v) for _, v in _scalars(arguments)}
        op, entity = tool_effect(tool.name)
        if calls and (used & turn_outputs or entity in turn_writes):
            turn, turn_outputs, turn_writes = turn + 1, set(), set()
        for attempt in range(config.transient_retries + 1):
            if attempt:
                turn, turn_outputs, turn_writes = turn + 1, set(), set()  # the retry follows the error it saw
            result = episode.call(tool.name, arguments)
            calls.append(PlanCall(tool.name, arguments, result.outcome, result.content, result.is_error, step, turn,
                                  [asdict(c) for c in result.state_changes]))
            if result.outcome != "partial_failure":
                break
        if result.outcome in BAD_OUTCOMES:
            return calls, episode.state(), f"{result.outcome} from {tool.name}: {result.to_content()[:200]}"
        if result.is_error and result.outcome == "success":
            return calls, episode.state(), f"not found from {tool.name}: {result.to_content()[:200]}"
        for key, value in _scalars(arguments):
            known[key] = value
        if not result.is_error:
            for key, value in _scalars(result.content):
                text = json.dumps(value)
                if text not in used:
                    returned.add(text)
                    turn_outputs.add(text)
                known[key] = value
        if op in ("create", "update", "delete") and not open_world(tool):  # open world: each call its own record
            turn_writes.add(entity)
    state = json.loads(json.dumps(episode.state()))
    return calls, state, ""


def user_values(calls: list[PlanCall]) -> list[str]:
    """The argument values the user has to supply (not ones returned by an earlier call), as text."""
    returned: set[str] = set()
    values: list[str] = []
    for call in calls:
        for _, value in _scalars(call.arguments):
            text = json.dumps(value)
            shown = value if isinstance(value, str) else text
            if text not in returned and shown not in values and 0 < len(shown) <= 200:
                values.append(shown)
        if not call.is_error:
            returned |= {json.dumps(v) for _, v in _scalars(call.output)} - {json.dumps(v) for _, v in
                                                                              _scalars(call.arguments)}
    return values


# ----------------------------------------------------------------------------------------------------------------
# the rubric and the request


def _steps(calls: list[PlanCall]) -> list[PlanCall]:
    """The last attempt of each plan step."""
    last: dict[int, PlanCall] = {}
    for call in calls:
        last[call.step] = call
    return [last[s] for s in sorted(last)]


def plan_rubric(calls: list[PlanCall]) -> Rubric:
    """Success criteria, expected calls and checkpoints derived from the executed plan alone."""
    criteria, checkpoints = [], []
    for call in _steps(calls):
        op, entity = tool_effect(call.tool)
        args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in call.arguments.items())
        if call.outcome == "partial_failure":
            criteria.append(f"After retrying, the assistant tells the user that {call.tool} is temporarily "
                            "unavailable.")
        elif call.is_error:
            criteria.append(f"The assistant tells the user that {call.tool} refused the request and why.")
        elif op in ("create", "update", "delete"):
            criteria.append(f"The {entity.replace('_', ' ')} is {op}d with {args or 'no arguments'}.")
        else:
            criteria.append(f"The assistant reports what {call.tool} returned for {args or 'the request'}.")
        changes = "; ".join(f"{c['op']} {c['collection']}/{c['key']}" for c in call.state_changes) or "no change"
        checkpoints.append(f"after {call.tool}({args}): outcome {call.outcome}, state: {changes}")
    criteria.append("The final answer summarises the results for the user without inventing values.")
    turns = {c.turn for c in calls}
    order_matters = len(turns) > 1
    expected = [{"tool": c.tool, "arguments": c.arguments} for c in _steps(calls)]
    return Rubric(criteria, expected, order_matters, checkpoints, "plan")


_THEN = (" Also, ", " Then ", " And ", " After that, ", " Next, ", " ")


def _lower_first(sentence: str) -> str:
    """A sentence continued mid-line: "Then what's ...", but "Then I need ..." and "Then QR code ..." stay."""
    first = sentence.split(" ", 1)[0]
    if first == "I" or first.startswith("I'") or first[1:2].isupper():
        return sentence
    return sentence[0].lower() + sentence[1:]


def template_request(calls: list[PlanCall], tools: dict[str, ToolSpec], seed: int = 0) -> str:
    """A request naming every value the user supplies: the catalog tools' own asks, filled; else a plain one.

    Used when there is no LLM, or when the LLM's request misses a value.
    """
    rng = random.Random(seed)
    steps = _steps(calls)
    rendered = [render_ask(tools[c.tool], c.arguments, rng) if asks(tools[c.tool]) else None for c in steps]
    if steps and all(rendered):
        text = rendered[0]
        for part in rendered[1:]:
            joint = rng.choice(_THEN)
            text += joint + (_lower_first(part) if joint.strip() else part)
        return text
    parts = []
    returned: set[str] = set()
    for call in steps:
        own = [(k, v) for k, v in call.arguments.items() if json.dumps(v) not in returned]
        said = ", ".join(f"{k.replace('_', ' ')} {v if isinstance(v, str) else json.dumps(v)}" for k, v in own)
        what = call.tool.replace("_", " ")
        parts.append(f"{what} with {said}" if said else what)
        if not call.is_error:
            returned |= {json.dumps(v) for _, v in _scalars(call.output)}
    return "Hi, could you please " + "; then ".join(parts) + "? Thanks."


REQUEST_SCHEMA = {"type": "object", "required": ["request"],
                  "properties": {"request": {"type": "string", "minLength": 10},
                                 "success_criteria": {"type": "array", "items": {"type": "string"}}}}


def _request_prompt(calls: list[PlanCall], tools: dict[str, ToolSpec], values: list[str],
                    missing: list[str]) -> list[dict[str, str]]:
    lines = []
    for i, call in enumerate(_steps(calls), start=1):
        args = ", ".join(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in call.arguments.items())
        lines.append(f"{i}. {tools[call.tool].description.strip()[:160]} ({args or 'no arguments'})")
    text = ("A user asks an AI assistant for help. The assistant will do this for them:\n" + "\n".join(lines) +
            "\nWrite the user's message, in their own words, without naming any tool. It must contain these exact "
            f"values: {', '.join(json.dumps(v, ensure_ascii=False) for v in values) or '(none)'}. Also give one to "
            'three success criteria. Answer like this example: {"request": "What time is it in Tokyo '
            '(Asia/Tokyo) right now?", "success_criteria": ["The assistant gives the current time in Asia/Tokyo."]}')
    if missing:
        text += f"\nYour last message left out {', '.join(json.dumps(v) for v in missing)}: include them."
    return [{"role": "system", "content": "You write realistic messages that users send to AI assistants."},
            {"role": "user", "content": text}]


async def write_request(llm: Any, calls: list[PlanCall], tools: dict[str, ToolSpec], config: TasksSection,
                        seed: int) -> tuple[str, str, list[str], str]:
    """(request, "llm" | "template", LLM success criteria, note): asked, checked for the values, re-asked once."""
    if llm is None:
        return template_request(calls, tools, seed), "template", [], "no LLM (llm.enabled = false)"
    values = user_values(calls)
    missing: list[str] = []
    note = ""
    for _ in range(2):
        try:
            reply = await llm.json(_request_prompt(calls, tools, values, missing), REQUEST_SCHEMA, stage="tasks",
                                   max_attempts=config.request_attempts, max_tokens=config.max_tokens, seed=seed,
                                   schema_in_prompt=False)
        except (LLMOutputError, LLMRequestError) as e:
            note = f"LLM request unusable: {str(e)[:200]}"
            break
        request = " ".join(reply["request"].split())
        missing = [v for v in values if v.casefold() not in request.casefold()]
        if not missing:
            criteria = [" ".join(c.split()) for c in reply.get("success_criteria", []) if c.strip()][:5]
            return request, "llm", criteria, ""
        note = f"LLM request left out {', '.join(json.dumps(v) for v in missing)[:200]}"
    return template_request(calls, tools, seed), "template", [], note


# ----------------------------------------------------------------------------------------------------------------
# a whole task


def plan_task(agent: Agent, tools: dict[str, ToolSpec], simulators: SimulatorFactory, config: TasksSection,
              task_id: str, complexity: int, seed: int) -> Task:
    """Draw and run gold plans until one runs cleanly (synchronous: real tools block); the task without language."""
    own = [tools[name] for name in agent.tools]
    rng = random.Random(seed)
    if rng.random() < config.out_of_scope_rate:
        task = out_of_scope_task(agent, tools, simulators, task_id, seed, rng, config.near_miss_rate)
        if task is not None:
            return task
    problems = []
    for attempt in range(config.plan_attempts):
        plan_seed = seed * 1000 + attempt
        chosen = draw_plan(own, complexity, rng, config.repeat_rate)
        calls, state, problem = run_plan(chosen, simulators(own, plan_seed), plan_seed, config, rng)
        if not problem:
            return Task(task_id, agent.agent_id, agent.domain, complexity, plan_seed, True, "", calls, state,
                        user_values=user_values(calls))
        problems.append(problem)
    return Task(task_id, agent.agent_id, agent.domain, complexity, seed, False,
                f"no clean gold plan in {config.plan_attempts} draws; last: {problems[-1]}", calls, state)


def out_of_scope_task(agent: Agent, tools: dict[str, ToolSpec], simulators: SimulatorFactory, task_id: str,
                      seed: int, rng: random.Random, near_miss_rate: float = 0.0) -> Task | None:
    """A task whose request only a catalog tool the agent lacks could serve: the gold answer makes no call, says so.

    With probability `near_miss_rate` the request is a near miss: it comes from the agent's own category, a tool of
    its own domain that it was not given (a triangle's area for an agent with `circle_area`) or of a sibling domain
    (math/algebra for a math/geometry agent): the same field, the wrong function. Else it comes from another
    category; the other pool when the chosen one is empty. The request is that tool's ask; None when no tool
    qualifies (then a plan is drawn).
    """
    category = agent.domain.split("/", 1)[0]
    near, foreign = [], []
    for name, t in tools.items():
        domain = tool_domain(t)
        if not asks(t) or name in agent.tools:
            continue
        (near if domain.split("/", 1)[0] == category else foreign).append(t)
    pools = [near, foreign] if rng.random() < near_miss_rate else [foreign, near]
    pool = pools[0] or pools[1]
    if not pool:
        return None
    tool = rng.choice(pool)
    arguments = draw_arguments(tool, rng)
    request = render_ask(tool, arguments or {}, rng)
    if request is None:
        return None
    own = [tools[name] for name in agent.tools]
    state = json.loads(json.dumps(simulators(own, seed).new_episode(seed).state()))
    rubric = plan_rubric([])
    rubric = Rubric([f"The assistant makes no tool call and tells the user that none of its tools can do this "
                     f"(it would take a tool like {tool.name}).", *rubric.success_criteria], [], False, [], "plan")
    return Task(task_id, agent.agent_id, agent.domain, 0, seed, True, "", [], state, request, "template",
                f"out of scope: asks what {tool.name} does", rubric)


async def write_task(llm: Any, task: Task, tools: dict[str, ToolSpec], config: TasksSection) -> Task:
    """Add the request and the rubric to a planned task (an out-of-scope task has both already)."""
    if task.rubric is not None:
        return task
    request, source, criteria, note = await write_request(llm, task.calls, tools, config, task.seed)
    rubric = plan_rubric(task.calls)
    if criteria:  # the LLM's criteria lead; the plan's stay, they are the precise ones
        rubric = Rubric(criteria + rubric.success_criteria, rubric.expected_calls, rubric.order_matters,
                        rubric.checkpoints, "llm")
    return Task(**{**task.__dict__, "user_request": request, "request_source": source, "note": note,
                   "rubric": rubric})
