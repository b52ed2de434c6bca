"""Agents (tool subsets + prompts) and tasks (gold plans run on the simulator, requests, rubrics), with a FakeLLM."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from openk2.agentic.agents import Agent, draft_agents, tool_domain, write_agent
from openk2.agentic.config import AgentsSection, TasksSection
from openk2.agentic.llm import ChatResult, LLMOutputError, extract_json_object
from openk2.agentic.simulate import SimulatorConfig, ToolSimulator, tool_effect
from openk2.agentic.tasks import OP_ORDER, draw_plan, plan_rubric, plan_task, run_plan, user_values, write_task
from openk2.agentic.tools import ToolSpec


class FakeKill(BaseException):
    """Stands for the process being killed: nothing in the pipeline may catch it."""


def _values_asked(text: str) -> list[str]:
    found = re.search(r"must contain these exact values: (.*?)\. Also", text, re.S)
    return [] if not found or found.group(1) == "(none)" else json.loads(f"[{found.group(1)}]")


def _tools_for(domain: str) -> list[dict[str, Any]]:
    if "flight" in domain:
        return [
            {"name": "book_flight", "description": "Book a flight between two airports on a date.",
             "parameters": [{"name": "origin", "type": "string", "description": "from", "required": True},
                            {"name": "destination", "type": "string", "description": "to", "required": True},
                            {"name": "date", "type": "date", "description": "day", "required": True}]},
            {"name": "get_flight", "description": "Get a booked flight by its id.",
             "parameters": [{"name": "flight_id", "type": "string", "description": "id", "required": True}]},
            {"name": "cancel_flight", "description": "Cancel a booked flight.",
             "parameters": [{"name": "flight_id", "type": "string", "description": "id", "required": True}]},
            {"name": "search_airports", "description": "Search airports by city name.",
             "parameters": [{"name": "city", "type": "string", "description": "city", "required": True}]},
        ]
    return [
        {"name": "add_expense", "description": "Record an expense with an amount and a category.",
         "parameters": [{"name": "amount", "type": "number", "description": "in euros", "required": True},
                        {"name": "category", "type": "string", "description": "kind", "required": True,
                         "enum": ["food", "travel", "office"]}]},
        {"name": "list_expenses", "description": "List recorded expenses of a category.",
         "parameters": [{"name": "category", "type": "string", "description": "kind", "required": True,
                         "enum": ["food", "travel", "office"]}]},
        {"name": "get_exchange_rate", "description": "Exchange rate between two currencies.",
         "parameters": [{"name": "base", "type": "string", "description": "ISO code", "required": True},
                        {"name": "quote", "type": "string", "description": "ISO code", "required": True}]},
    ]


def _default_script() -> dict[str, Callable[[list[dict[str, Any]], Any], Any]]:
    def domains(messages, tools):
        category = re.search(r"^Category: (.+)$", messages[-1]["content"], re.M).group(1)
        return json.dumps({"domains": ["flight booking" if category == "travel" else "expense tracking"]})

    def evolved(messages, tools):
        domain = re.search(r"^Domain: (.+)$", messages[-1]["content"], re.M).group(1)
        return json.dumps({"tools": _tools_for(domain)})

    def agent_prompt(messages, tools):
        domain = re.search(r"helps users with (.+?)\. It can", messages[-1]["content"]).group(1)
        return f"You are a dependable assistant for {domain}. You use your tools carefully and answer briefly."

    def request(messages, tools):
        values = _values_asked(messages[-1]["content"])
        text = "Please help me with " + ", ".join(values) if values else "Please check this for me."
        return "Sure!\n```json\n" + json.dumps({"request": text, "success_criteria": ["It is done."]}) + "\n```"

    def assistant(messages, tools):
        last = [m for m in messages if m["role"] == "tool"][-1:]
        return "Done. " + (last[0]["content"][:80] if last else "Anything else?")

    return {"evolve/domains": domains, "evolve/tools": evolved, "agents": agent_prompt, "tasks": request,
            "episodes/assistant": assistant, "episodes/user": lambda messages, tools: "Thanks! ###STOP###",
            "judge": lambda messages, tools: '{"verdict": "pass", "reasons": "the rubric is met"}'}


class FakeLLM:
    """A scripted stand-in for LLMClient (same chat / json / usage): each stage answers from a function."""

    def __init__(self, script: dict[str, Callable[..., Any]] | None = None, kill_after: int | None = None):
        self.script = {**_default_script(), **(script or {})}
        self.kill_after = kill_after
        self.asked: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = []
        self.usage: dict[str, dict[str, int]] = {}

    def calls(self, stage: str) -> int:
        return sum(1 for s, _, _ in self.asked if s == stage)

    async def chat(self, messages: list[dict[str, Any]], *, stage: str, tools: Any = None, **kwargs: Any
                   ) -> ChatResult:
        if self.kill_after is not None and len(self.asked) >= self.kill_after:
            raise FakeKill(f"killed after {self.kill_after} LLM calls")
        self.asked.append((stage, json.loads(json.dumps(messages)), {"tools": tools, **kwargs}))
        row = self.usage.setdefault(stage, {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0,
                                            "cached_calls": 0, "failures": 0, "retries": 0})
        row["calls"] += 1
        row["prompt_tokens"] += 10
        row["completion_tokens"] += 5
        await asyncio.sleep(0)
        answer = self.script[stage](messages, {"tools": tools, **kwargs})
        if isinstance(answer, Exception):
            raise answer
        message = answer if isinstance(answer, dict) else {"role": "assistant", "content": answer}
        return ChatResult(message=message, finish_reason="stop", usage={"prompt_tokens": 10, "completion_tokens": 5},
                          cached=False)

    async def json(self, messages: list[dict[str, Any]], schema: dict[str, Any], *, stage: str,
                   max_attempts: int = 3, **kwargs: Any) -> dict[str, Any]:
        errors, raw = [], ""
        for _ in range(max_attempts):
            raw = (await self.chat(messages, stage=stage)).content
            try:
                value = extract_json_object(raw)
                jsonschema.validate(value, schema)
                return value
            except (ValueError, jsonschema.ValidationError) as e:
                errors.append(str(e)[:200])
        self.usage[stage]["failures"] += 1
        raise LLMOutputError(stage, raw, errors)


def flight_tools() -> list[ToolSpec]:
    from openk2.agentic.evolve import Candidate, build_tool

    return [build_tool(Candidate("travel", "flight booking", raw)) for raw in _tools_for("flight booking")]


def expense_tools() -> list[ToolSpec]:
    from openk2.agentic.evolve import Candidate, build_tool

    return [build_tool(Candidate("finance", "expense tracking", raw)) for raw in _tools_for("expense")]


def simulators(config: SimulatorConfig | None = None, real: Any = None):
    return lambda tools, seed: ToolSimulator(tools, config or SimulatorConfig(), seed, real=real)


ALWAYS_OK = SimulatorConfig(success_rate=1.0, partial_failure_rate=0.0, edge_case_rate=0.0)


# ----------------------------------------------------------------------------------------------------------------
# agents


def test_agents_take_tools_of_their_domain_round_robin_within_bounds() -> None:
    tools = flight_tools() + expense_tools()
    drafts = draft_agents(tools, AgentsSection(count=6, min_tools=2, max_tools=3, code_tool_fraction=0.0), seed=1)
    assert [d.agent_id for d in drafts] == [f"agent-{i:04d}" for i in range(6)]
    assert [d.domain for d in drafts] == ["finance/expense tracking", "travel/flight booking"] * 3
    by_name = {t.name: t for t in tools}
    for d in drafts:
        assert 2 <= len(d.tools) <= 3
        assert {tool_domain(by_name[n]) for n in d.tools} == {d.domain}
    assert drafts == draft_agents(tools, AgentsSection(count=6, min_tools=2, max_tools=3, code_tool_fraction=0.0),
                                  seed=1)


def test_a_small_domain_is_padded_and_the_code_tool_added() -> None:
    from openk2.agentic.sandbox import python_tool_spec

    single = ToolSpec("get_weather", "Weather in a city.",
                      {"type": "object", "properties": {"city": {"type": "string"}}},
                      source="synthetic:weather/forecast")
    tools = [single, *flight_tools(), python_tool_spec()]
    drafts = draft_agents(tools, AgentsSection(count=2, min_tools=3, max_tools=3, code_tool_fraction=1.0), seed=0)
    weather = next(d for d in drafts if d.domain == "weather/forecast")
    assert "get_weather" in weather.tools and "run_python" in weather.tools and len(weather.tools) == 4
    with pytest.raises(ValueError, match="fewer than agents.min_tools"):
        draft_agents([single], AgentsSection(min_tools=2), seed=0)


def test_the_llm_writes_the_prompt_and_an_unusable_one_falls_back_with_the_reason() -> None:
    tools = {t.name: t for t in flight_tools()}
    draft = draft_agents(list(tools.values()), AgentsSection(count=1, code_tool_fraction=0.0), seed=0)[0]
    good = asyncio.run(write_agent(FakeLLM(), draft, tools, AgentsSection(), seed=0))
    assert good.prompt_source == "llm" and good.system_prompt.startswith("You are a dependable assistant")
    garbage = FakeLLM({"agents": lambda m, t: "<|im_end|>{}"})
    bad = asyncio.run(write_agent(garbage, draft, tools, AgentsSection(), seed=0))
    assert bad.prompt_source == "fallback" and "unusable" in bad.note
    assert all(name in bad.system_prompt for name in draft.tools)
    assert Agent.from_dict(json.loads(json.dumps(bad.to_dict()))) == bad


# ----------------------------------------------------------------------------------------------------------------
# gold plans


def test_a_plan_chains_ids_writes_before_reads_and_reaches_a_known_state() -> None:
    tools = flight_tools()
    by_name = {t.name: t for t in tools}
    chosen = [by_name["get_flight"], by_name["book_flight"]]
    sim = ToolSimulator(tools, ALWAYS_OK, seed=3)
    calls, state, problem = run_plan(sorted(chosen, key=lambda t: t.name != "book_flight"), sim, 3,
                                     TasksSection(), random.Random(0))
    assert problem == ""
    booked, fetched = calls
    flight_id = booked.output["flight"]["id"]
    assert fetched.arguments == {"flight_id": flight_id}  # the id the simulator made, reused
    assert fetched.output["flight_id"] == flight_id and fetched.turn == booked.turn + 1
    assert state == {"flight": {flight_id: booked.output["flight"]}}
    assert user_values(calls) == [booked.arguments[k] for k in ("origin", "destination", "date")]
    rubric = plan_rubric(calls)
    assert rubric.order_matters and [c["tool"] for c in rubric.expected_calls] == ["book_flight", "get_flight"]
    assert len(rubric.checkpoints) == 2 and "create flight/" in rubric.checkpoints[0]
    for seed in range(10):
        ranks = [OP_ORDER[tool_effect(t.name)[0]] for t in draw_plan(tools, 3, random.Random(seed))]
        assert len(ranks) == 3 and ranks == sorted(ranks)  # creates first, deletes last


def test_transient_failures_are_retried_inside_the_plan_in_a_new_turn() -> None:
    tools = expense_tools()
    flaky = SimulatorConfig(success_rate=0.5, partial_failure_rate=0.5, edge_case_rate=0.0)
    for seed in range(20):
        sim = ToolSimulator(tools, flaky, seed)
        calls, _, problem = run_plan([tools[2]], sim, seed, TasksSection(transient_retries=3), random.Random(seed))
        if calls[0].outcome == "partial_failure":
            break
    assert problem == "" and len(calls) >= 2
    assert [c.step for c in calls] == [0] * len(calls)
    assert [c.turn for c in calls] == list(range(len(calls)))
    assert calls[-1].arguments == calls[0].arguments


def test_value_pools_and_the_plan_is_dropped_when_a_real_tool_errors() -> None:
    from openk2.agentic.mcp import MCPCallResult

    zone = ToolSpec("get_current_time", "Current time in a zone.",
                    {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
                    source="mcp:time")

    class FakeToolbox:
        def call_tool(self, tool, arguments, timeout_s=None):
            ok = "/" in arguments["timezone"]
            return MCPCallResult("time", tool.name, ok, [{"type": "text", "text": "12:00" if ok else "bad zone"}],
                                 error=None if ok else "bad zone")

    agent = Agent("agent-0000", "mcp/time", ("get_current_time",), "You tell the time.", "llm")
    pooled = TasksSection(value_pools={"timezone": ["Asia/Tokyo"]})
    task = plan_task(agent, {"get_current_time": zone}, simulators(real=FakeToolbox()), pooled, "task-0", 1, 5)
    assert task.kept and task.calls[0].arguments == {"timezone": "Asia/Tokyo"} and task.calls[0].output == "12:00"
    dropped = plan_task(agent, {"get_current_time": zone}, simulators(real=FakeToolbox()),
                        TasksSection(value_pools={}, plan_attempts=2), "task-1", 1, 5)
    assert not dropped.kept and dropped.reason.startswith("no clean gold plan in 2 draws; last: tool_error")


def test_the_request_must_name_the_values_else_reask_then_template() -> None:
    tools = {t.name: t for t in flight_tools()}
    agent = Agent("agent-0000", "travel/flight booking", tuple(tools), "You book flights.", "llm")
    planned = plan_task(agent, tools, simulators(ALWAYS_OK), TasksSection(), "task-0", 2, seed=11)
    assert planned.kept and planned.user_values

    task = asyncio.run(write_task(FakeLLM(), planned, tools, TasksSection()))
    assert task.request_source == "llm" and all(v in task.user_request for v in planned.user_values)
    assert task.rubric.criteria_source == "llm" and task.rubric.success_criteria[0] == "It is done."

    forgetful = FakeLLM({"tasks": lambda m, t: json.dumps({"request": "Book me something nice please."})})
    task = asyncio.run(write_task(forgetful, planned, tools, TasksSection(request_attempts=1)))
    assert forgetful.calls("tasks") == 2  # asked, then re-asked naming the missing values
    assert "left out" in forgetful.asked[1][1][-1]["content"]
    assert task.request_source == "template" and "left out" in task.note
    assert all(v in task.user_request for v in planned.user_values)
    assert task.rubric.criteria_source == "plan"

    garbage = FakeLLM({"tasks": lambda m, t: "no idea {{{"})
    task = asyncio.run(write_task(garbage, planned, tools, TasksSection(request_attempts=2)))
    assert garbage.calls("tasks") == 2 and task.request_source == "template" and "unusable" in task.note
