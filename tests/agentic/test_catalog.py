"""The built-in tool catalog and the LLM-free synthesis run it makes possible (paper §3.1.1, programmatic stages)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import jsonschema
import pytest

from openk2.agentic.agents import Agent, tool_domain
from openk2.agentic.catalog import draw_arguments, indefinite_article, load_catalog, placeholders, render_ask, say
from openk2.agentic.config import load_synth_config
from openk2.agentic.episode import REFUSALS
from openk2.agentic.evolve import save_tools
from openk2.agentic.pipeline import run_synth
from openk2.agentic.simulate import ToolSimulator
from openk2.agentic.tasks import _lower_first, out_of_scope_task

DATA = Path(__file__).parent / "data"


def test_the_shipped_catalog_is_complete_and_every_ask_can_be_filled() -> None:
    tools = load_catalog()
    assert len(tools) >= 200
    assert len({t.name for t in tools}) == len(tools)
    assert len({t.source for t in tools}) >= 30  # domains
    rng = random.Random(0)
    for tool in tools:
        required = set(tool.input_schema["required"])
        for ask in tool.raw["asks"]:
            named = {p for p, _ in placeholders(ask)}
            assert required <= named, (tool.name, ask)
        for _ in range(3):
            arguments = draw_arguments(tool, rng)
            jsonschema.validate(arguments, tool.input_schema)
            assert render_ask(tool, arguments, rng)


def test_a_request_names_exactly_the_values_of_its_call() -> None:
    tools = {t.name: t for t in load_catalog(DATA / "catalog_tools.jsonl")}
    rng = random.Random(1)
    seen_flag = seen_without_unit = False
    for _ in range(200):
        tool = tools[rng.choice(sorted(tools))]
        arguments = draw_arguments(tool, rng)
        text = render_ask(tool, arguments, rng)
        assert "{" not in text and "}" not in text
        for name, value in arguments.items():
            if value is True:  # a flag shows its words instead of a value
                seen_flag = True
                assert "breakfast included" in text
            else:
                assert say(value) in text, (text, name, value)
        seen_without_unit |= tool.name == "circle_area" and "unit" not in arguments
    assert seen_flag and seen_without_unit  # optional params come and go with the ask that names them
    assert say([3, 5, 7]) == "3, 5 and 7" and say(2.5) == "2.5" and say("Oslo") == "Oslo"


def test_a_catalog_entry_naming_an_unknown_parameter_is_reported_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "catalog_tools.jsonl"
    lines = (DATA / "catalog_tools.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace("Average {numbers}", "Average {values}")
    bad.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"catalog_tools.jsonl:2: .*'values'"):
        load_catalog(bad, DATA / "catalog_values.json")


def test_catalog_tools_live_in_an_open_world() -> None:
    """A catalog user names records the service holds (a booking reference): found, not "no booking matches"."""
    tools = {t.name: t for t in load_catalog(DATA / "catalog_tools.jsonl")}
    result = ToolSimulator(list(tools.values()), seed=0).new_episode(0).call("cancel_booking", {"booking_id": "BK-1"})
    assert not result.is_error or result.outcome != "success"


def _offline_config(run_dir: Path, tools_path: Path, *overrides: str):
    return load_synth_config("configs/synth_calls.toml", [
        f"run_dir={json.dumps(str(run_dir))}", f"tools.path={json.dumps(str(tools_path))}", "tools.catalog=false",
        "agents.count=6", "tasks.count=60", "tasks.out_of_scope_rate=0.25", "episodes.system_prompt_rate=0.5",
        *overrides])


def test_a_run_without_an_llm_makes_single_parallel_and_out_of_scope_trajectories(tmp_path: Path) -> None:
    tools_path = tmp_path / "tools.jsonl"
    save_tools(load_catalog(DATA / "catalog_tools.jsonl"), tools_path)
    stats = asyncio.run(run_synth(_offline_config(tmp_path / "run", tools_path), progress=False, log=lambda s: None))
    assert stats["llm_usage"] == {}
    assert stats["output"]["sft"] >= 50
    records = [json.loads(line) for line in (tmp_path / "run" / "sft.jsonl").read_text().splitlines()]
    first_calls = []
    for record in records:
        messages = record["messages"]
        user = next(m for m in messages if m["role"] == "user")
        assert "{" not in user["content"]
        assistant = messages[messages.index(user) + 1]
        first_calls.append(assistant.get("tool_calls") or [])
        declared = {t["function"]["name"] for t in record["tools"]}
        for call in first_calls[-1]:
            assert call["function"]["name"] in declared
            for value in json.loads(call["function"]["arguments"]).values():
                assert value is True or say(value) in user["content"]  # the user said every value
    assert any(not calls for calls in first_calls)  # out of scope: answered in words
    assert any(len(calls) > 1 and len({c["function"]["name"] for c in calls}) == 1 for calls in first_calls)
    assert any(len({c["function"]["name"] for c in calls}) > 1 for calls in first_calls)
    assert any(r["messages"][0]["role"] == "system" for r in records)
    assert any(r["messages"][0]["role"] == "user" for r in records)
    refusals = [r for r, calls in zip(records, first_calls, strict=True) if not calls]
    openings = tuple(text.split("{", 1)[0] for text in REFUSALS)
    assert all(r["messages"][-1]["content"].startswith(openings) for r in refusals)


def test_out_of_scope_requests_are_near_misses_at_near_miss_rate() -> None:
    """A near miss asks what a tool of the agent's own category that it lacks does; the rest another category's."""
    tools = {t.name: t for t in load_catalog()}
    geometry = sorted(n for n, t in tools.items() if tool_domain(t) == "math/geometry")
    agent = Agent("agent-0", "math/geometry", tuple(geometry[:2]), "You do geometry.", "fallback")
    factory = lambda own, seed: ToolSimulator(own, seed=seed)  # noqa: E731

    def asked_domains(rate: float) -> set[str]:
        domains = set()
        for seed in range(40):
            task = out_of_scope_task(agent, tools, factory, f"t{seed}", seed, random.Random(seed), rate)
            assert task is not None and task.calls == [] and task.user_request
            asked = task.note.removeprefix("out of scope: asks what ").removesuffix(" does")
            assert asked not in agent.tools
            domains.add(tool_domain(tools[asked]))
        return domains

    near = asked_domains(1.0)
    # its own domain's other tools (geometry[2:]) are the nearest misses; its own tools are never asked
    assert "math/geometry" in near and len(near) > 1 and all(d.startswith("math/") for d in near)
    assert not any(d.startswith("math/") for d in asked_domains(0.0))


def test_no_llm_needs_every_stage_programmatic(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="judge.llm = false"):
        load_synth_config("configs/synth_calls.toml", ["judge.llm=true"])
    with pytest.raises(ValueError, match="tools.synthetic = false"):
        load_synth_config("configs/synth_calls.toml", ["tools.synthetic=true"])


def test_a_joined_request_keeps_the_capitals_of_acronyms_and_I():
    assert _lower_first("What's the weather?") == "what's the weather?"
    assert _lower_first("QR code for https://example.com") == "QR code for https://example.com"
    assert _lower_first("I need a vet.") == "I need a vet."
    assert _lower_first("I'd like a table.") == "I'd like a table."
    assert _lower_first("Is it open?") == "is it open?"


def test_an_article_before_a_value_agrees_with_it():
    tools = {t.name: t for t in load_catalog()}

    def rendered(tool: str, arguments: dict, needle: str) -> str:  # the ask that has `needle`, whatever the draw
        texts = {render_ask(tools[tool], arguments, random.Random(s)) for s in range(20)}
        return next(t for t in texts if needle in t)

    assert rendered("find_vet", {"animal_type": "cat", "location": "Oslo"}, "vet in") == "I need a cat vet in Oslo."
    assert rendered("find_vet", {"animal_type": "exotic", "location": "Oslo"}, "vet in") == \
        "I need an exotic vet in Oslo."
    assert "a 8 b 3 c 1" in rendered("solve_quadratic", {"a": 8, "b": 3, "c": 1}, "a 8")  # a coefficient, not "an"
    assert [indefinite_article(w) for w in ("8 kg", "18.5", "11 m", "110 m", "1,800", "user", "apple", "12")] == \
        ["an", "an", "an", "a", "a", "a", "an", "a"]
