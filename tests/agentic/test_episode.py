"""Episodes: gold replay and model mode, the user simulator's persona and stop signal, failures recorded."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from openk2.agentic.agents import Agent
from openk2.agentic.config import EpisodesSection, TasksSection
from openk2.agentic.episode import run_episode
from openk2.agentic.llm import LLMRequestError
from openk2.agentic.mcp import MCPCallResult
from openk2.agentic.tasks import plan_task, write_task
from openk2.agentic.tools import ToolSpec
from tests.agentic.test_agents_tasks import ALWAYS_OK, FakeLLM, flight_tools, simulators


def _task(tools: dict[str, ToolSpec], complexity: int = 2, seed: int = 11, sims=None):
    agent = Agent("agent-0000", "travel/flight booking", tuple(tools), "You book flights.", "llm")
    sims = sims or simulators(ALWAYS_OK)
    planned = plan_task(agent, tools, sims, TasksSection(), "task-00000", complexity, seed)
    assert planned.kept
    return agent, asyncio.run(write_task(FakeLLM(), planned, tools, TasksSection())), sims


def _ids_tie(messages: list[dict[str, Any]]) -> None:
    made = [c["id"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    answered = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert made == answered == [f"functions.{i.split('.')[1].split(':')[0]}:{n}" for n, i in enumerate(made)]


def test_gold_replays_the_plan_turn_by_turn_and_reaches_the_gold_state() -> None:
    tools = {t.name: t for t in flight_tools()}
    agent, task, sims = _task(tools)
    llm = FakeLLM()
    t = asyncio.run(run_episode(llm, task, agent, tools, sims, EpisodesSection(), "task-00000/ep0", seed=7))
    assert t.status == "ok" and t.stop == "user_stop" and t.mode == "gold"
    assert [m["role"] for m in t.messages[:2]] == ["system", "user"] and t.messages[1]["content"] == task.user_request
    calls = [c for m in t.messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [(c.tool, c.arguments) for c in task.calls]
    turns = [m for m in t.messages if m["role"] == "assistant" and m.get("tool_calls")]
    assert len(turns) == len({c.turn for c in task.calls})
    _ids_tie(t.messages)
    assert t.messages[-1]["role"] == "assistant" and t.messages[-1]["content"].startswith("Done.")
    assert t.final_state == task.gold_state and t.notes == []
    # the final answer is asked with tool calls ruled out; the user simulator never sees tool traffic
    stages = [(s, kw) for s, _, kw in llm.asked]
    assert stages[0][0] == "episodes/assistant" and stages[0][1]["tool_choice"] == "none"
    user_view = next(m for s, m, _ in llm.asked if s == "episodes/user")
    assert t.persona in user_view[0]["content"] and all(m["role"] != "tool" for m in user_view)
    assert [m["role"] for m in user_view[1:]] == ["user", "assistant", "user"]
    assert user_view[2]["content"] == task.user_request


def test_a_user_who_does_not_stop_is_cut_at_max_user_turns_with_one_persona() -> None:
    tools = {t.name: t for t in flight_tools()}
    agent, task, sims = _task(tools)
    chatty = FakeLLM({"episodes/user": lambda m, kw: "And what about tomorrow?"})
    t = asyncio.run(run_episode(chatty, task, agent, tools, sims, EpisodesSection(max_user_turns=3), "e", seed=7))
    assert t.stop == "max_user_turns"
    assert [m["role"] for m in t.messages if m["role"] in ("user",)] == ["user"] * 3
    prompts = [m[0]["content"] for s, m, _ in chatty.asked if s == "episodes/user"]
    assert len(prompts) == 2 and len(set(prompts)) == 1  # the same persona and goal for the whole episode


def test_garbage_from_the_model_falls_back_to_the_template_summary_in_gold_mode() -> None:
    tools = {t.name: t for t in flight_tools()}
    agent, task, sims = _task(tools)
    mute = FakeLLM({"episodes/assistant": lambda m, kw: "<|im_end|>   "})
    t = asyncio.run(run_episode(mute, task, agent, tools, sims, EpisodesSection(), "e", seed=1))
    assert t.status == "ok" and t.messages[-1]["content"].startswith("Here is what I found:")
    assert "final answer from the template summary" in t.notes


def test_model_mode_runs_the_models_calls_parallel_and_bad_json_included() -> None:
    tools = {t.name: t for t in flight_tools()}
    agent, task, sims = _task(tools, complexity=1)

    def assistant(messages, kw):
        if messages[-1]["role"] == "user":
            return {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "search_airports",
                                                                  "arguments": '{"city": "Oslo"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "get_flight", "arguments": "{oops"}}]}
        return "Oslo has one airport."

    llm = FakeLLM({"episodes/assistant": assistant})
    t = asyncio.run(run_episode(llm, task, agent, tools, sims, EpisodesSection(assistant="model"), "e", seed=1))
    assert t.mode == "model" and t.status == "ok"
    _ids_tie(t.messages)
    assert [c["id"] for c in t.calls] == ["functions.search_airports:0", "functions.get_flight:1"]
    assert t.calls[1]["arguments"] is None and t.calls[1]["outcome"] == "invalid_arguments"
    assert llm.asked[0][2]["tools"] == [tools[n].to_openai() for n in agent.tools]
    assert t.messages[-1] == {"role": "assistant", "content": "Oslo has one airport."}


def test_a_silent_model_and_a_dead_endpoint_end_the_episode_with_a_reason() -> None:
    tools = {t.name: t for t in flight_tools()}
    agent, task, sims = _task(tools, complexity=1)
    silent = FakeLLM({"episodes/assistant": lambda m, kw: ""})
    t = asyncio.run(run_episode(silent, task, agent, tools, sims, EpisodesSection(assistant="model"), "e", seed=1))
    assert t.stop == "assistant_silent" and t.messages[-1]["role"] == "user"
    dead = FakeLLM({"episodes/assistant": lambda m, kw: LLMRequestError("connection refused after 5 attempts")})
    t = asyncio.run(run_episode(dead, task, agent, tools, sims, EpisodesSection(), "e", seed=1))
    assert t.status == "failed" and t.reason.startswith("LLM: connection refused")


def test_an_mcp_server_lost_mid_episode_is_an_infrastructure_failure() -> None:
    clock = ToolSpec("get_current_time", "Current time in a zone.",
                     {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
                     source="mcp:time")

    class FakeToolbox:
        def __init__(self):
            self.calls = 0

        def call_tool(self, tool, arguments, timeout_s=None):
            self.calls += 1
            if self.calls > 1:  # up for the gold plan, gone for the episode
                return MCPCallResult("time", tool.name, False, [], error="server lost: EOF", transport_failed=True)
            return MCPCallResult("time", tool.name, True, [{"type": "text", "text": "09:00"}])

    tools = {"get_current_time": clock, **{t.name: t for t in flight_tools()[:1]}}
    sims = simulators(ALWAYS_OK, real=FakeToolbox())
    agent = Agent("agent-0000", "mcp/time", ("get_current_time",), "You tell the time.", "llm")
    planned = plan_task(agent, tools, sims, TasksSection(value_pools={"timezone": ["Asia/Tokyo"]}), "task-0", 1, 3)
    task = asyncio.run(write_task(FakeLLM(), planned, tools, TasksSection()))
    t = asyncio.run(run_episode(FakeLLM(), task, agent, tools, sims, EpisodesSection(), "e", seed=1))
    assert t.status == "failed" and t.reason.startswith("infrastructure: get_current_time: Error: server lost")
