"""The tool simulator (spec §4.3): persistent per-episode state, schema-valid outputs, rates held at every n."""

from __future__ import annotations

import collections
import datetime as dt
import random
from pathlib import Path

import jsonschema
import pytest

from openk2.agentic.mcp import MCPClient, MCPServerSpec, MCPToolbox, time_server
from openk2.agentic.sandbox import SandboxLimits, python_tool_spec
from openk2.agentic.simulate import OutcomeSchedule, SchemaSampler, SimulatorConfig, ToolSimulator, tool_effect
from openk2.agentic.tools import ToolSpec

ALWAYS = SimulatorConfig(success_rate=1.0, partial_failure_rate=0.0, edge_case_rate=0.0)

EVENT = {"type": "object", "properties": {
    "event_id": {"type": "string"}, "title": {"type": "string", "minLength": 1},
    "start": {"type": "string", "format": "date-time"},
    "attendees": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 10},
    "priority": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["event_id", "title", "start"]}

TOOLS = [
    ToolSpec("create_event", "Create a calendar event", {
        "type": "object", "properties": {"title": {"type": "string"}, "start": {"type": "string"},
                                         "priority": {"type": "integer"}},
        "required": ["title", "start"], "additionalProperties": False}, output_schema=EVENT),
    ToolSpec("get_event", "Get one event", {"type": "object", "properties": {"event_id": {"type": "string"}},
                                            "required": ["event_id"]}, output_schema=EVENT),
    ToolSpec("list_events", "List events", {"type": "object", "properties": {"query": {"type": "string"},
                                                                             "limit": {"type": "integer"}}},
             output_schema={"type": "object", "properties": {
                 "events": {"type": "array", "items": {"$ref": "#/$defs/event"}},
                 "total": {"type": "integer", "minimum": 0}},
                 "required": ["events", "total"], "$defs": {"event": EVENT}}),
    ToolSpec("update_event", "Change an event", {"type": "object", "properties": {
        "event_id": {"type": "string"}, "title": {"type": "string"}}, "required": ["event_id"]}),
    ToolSpec("delete_event", "Delete an event", {"type": "object", "properties": {"event_id": {"type": "string"}},
                                                 "required": ["event_id"]}),
    ToolSpec("send_email", "Send an email", {"type": "object", "properties": {
        "to": {"type": "string"}, "subject": {"type": "string"}}, "required": ["to", "subject"]}),
    ToolSpec("search_emails", "Search sent emails", {"type": "object", "properties": {"query": {"type": "string"}}}),
]


def test_tool_names_map_to_operations_and_entities() -> None:
    assert tool_effect("create_event") == ("create", "event")
    assert tool_effect("list_calendar_events") == ("read", "calendar_event")
    assert tool_effect("getUserById") == ("read", "user")
    assert tool_effect("add_item_to_cart") == ("create", "item")
    assert tool_effect("cancelBookings") == ("delete", "booking")
    assert tool_effect("git_status") == ("action", "git_status")


def test_a_write_is_visible_to_later_reads_and_only_in_its_episode() -> None:
    sim = ToolSimulator(TOOLS, ALWAYS, seed=0)
    ep = sim.new_episode(seed=1)
    made = ep.call("create_event", {"title": "Design review", "start": "2025-07-02T10:00:00Z", "priority": 2})
    assert made.outcome == "success" and made.state_changes[0].op == "create"
    event_id = made.content["event_id"]
    got = ep.call("get_event", {"event_id": event_id})
    assert got.content["title"] == "Design review" and got.content["priority"] == 2
    ep.call("update_event", {"event_id": event_id, "title": "Design review (moved)"})
    assert ep.call("get_event", {"event_id": event_id}).content["title"] == "Design review (moved)"
    listed = ep.call("list_events", {"query": "moved"})
    assert [e["event_id"] for e in listed.content["events"]] == [event_id]
    ep.call("send_email", {"to": "ana@example.com", "subject": "Agenda"})
    assert ep.call("search_emails", {"query": "agenda"}).content["count"] == 1
    ep.call("delete_event", {"event_id": event_id})
    gone = ep.call("get_event", {"event_id": event_id})
    assert gone.is_error and "no event" in gone.content

    other = sim.new_episode(seed=2)
    assert other.call("list_events", {}).content["events"] == []
    assert other.call("search_emails", {}).content == {"results": [], "count": 0}


def test_outputs_are_valid_against_the_output_schema_in_every_outcome() -> None:
    sim = ToolSimulator(TOOLS, SimulatorConfig(success_rate=0.4, partial_failure_rate=0.2, edge_case_rate=0.4), 3)
    seen = collections.Counter()
    for episode in range(30):
        ep = sim.new_episode(seed=episode)
        for i in range(4):
            ep.call("create_event", {"title": f"t{i}", "start": "2025-07-03T08:00:00Z"})
            for name, args in (("list_events", {}), ("get_event", {"event_id": "event_1"})):
                result = ep.call(name, args)
                seen[result.outcome] += 1
                if not result.is_error:
                    assert result.schema_valid
                    jsonschema.validate(result.content, sim.tools[name].output_schema)
    assert seen["success"] and seen["edge_case"] and seen["partial_failure"]


def test_invented_fields_are_stored_so_reads_agree() -> None:
    sim = ToolSimulator(TOOLS, ALWAYS, seed=0)
    ep = sim.new_episode(seed=4)
    event_id = ep.call("create_event", {"title": "Sync", "start": "2025-07-02T10:00:00Z"}).content["event_id"]
    reads = [ep.call("get_event", {"event_id": event_id}).content for _ in range(5)]
    listed = ep.call("list_events", {}).content
    assert all(r == reads[0] for r in reads) and listed["events"] == [reads[0]] and listed["total"] == 1


SCHEMAS = [
    {"type": "object", "properties": {
        "status": {"enum": ["open", "closed"]}, "kind": {"const": "ticket"},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "step": {"type": "integer", "minimum": 10, "maximum": 100, "multipleOf": 5},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 4}, "minItems": 1,
                 "uniqueItems": True},
        "owner": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/person"}]},
        "note": {"type": ["string", "null"]},
        "when": {"type": "string", "format": "date"}, "id": {"type": "string", "format": "uuid"},
        "meta": {"type": "object", "additionalProperties": {"type": "integer"}},
        "both": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                           {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}},
     "required": ["status", "kind", "score", "step", "tags", "owner", "when", "id", "both"],
     "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"},
                                                          "emails": {"type": "array", "items": {
                                                              "type": "string", "format": "email"}}},
                          "required": ["name", "emails"]}}},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
     "maxItems": 3},
    {"properties": {"timezone": {"title": "Timezone", "type": "string"}, "is_dst": {"type": "boolean"}},
     "required": ["timezone", "is_dst"], "type": "object", "title": "TimeResult"},  # mcp-server-time's
]


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("edge", [False, True])
def test_sampled_values_are_valid_against_their_schema(schema: dict, edge: bool) -> None:
    sampler = SchemaSampler(random.Random(0), dt.datetime(2025, 7, 1, tzinfo=dt.UTC), max_items=4)
    for _ in range(100):
        jsonschema.validate(sampler.sample(schema, schema, edge=edge), schema,
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_invalid_arguments_and_unknown_tools_are_reported_and_not_counted() -> None:
    sim = ToolSimulator(TOOLS, seed=0)
    ep = sim.new_episode(seed=0)
    bad = ep.call("create_event", {"title": 3})
    assert bad.outcome == "invalid_arguments" and bad.is_error and "start" in bad.content
    assert ep.call("create_event", {"title": "x", "start": "s", "color": "red"}).outcome == "invalid_arguments"
    assert ep.call("fly_to_moon", {}).outcome == "unknown_tool"
    assert sim.schedule.calls == 0 and ep.state() == {}


@pytest.mark.parametrize("rates", [(0.8, 0.1, 0.1), (0.6, 0.25, 0.15), (0.73, 0.17, 0.10), (0.5, 0.0, 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outcome_rates_hold_at_every_call_count(rates: tuple[float, float, float], seed: int) -> None:
    config = SimulatorConfig(*rates)
    schedule = OutcomeSchedule(config.rates, seed, config.max_drift)
    counts = collections.Counter()
    worst = 0.0
    for n in range(1, 10_001):
        counts[schedule.next()] += 1
        if n >= 100:
            worst = max(worst, *(abs(counts[k] / n - p) for k, p in config.rates.items()))
        if n in (100, 1_000, 10_000):
            for outcome, rate in config.rates.items():
                assert abs(counts[outcome] / n - rate) <= 0.03, (n, outcome, counts)
    assert worst <= 0.02  # the bound: (3 - 1) * max_drift calls out of n >= 100


def test_rates_hold_through_the_simulator_across_episodes() -> None:
    config = SimulatorConfig(0.7, 0.2, 0.1)
    sim = ToolSimulator(TOOLS, config, seed=11)
    counts = collections.Counter()
    for episode in range(2_500):  # 10,000 calls in short episodes
        ep = sim.new_episode(seed=episode)
        for _ in range(4):
            counts[ep.call("search_emails", {}).outcome] += 1
    for outcome, rate in config.rates.items():
        assert abs(counts[outcome] / 10_000 - rate) <= 0.03


def test_outcomes_are_random_not_a_fixed_cycle() -> None:
    def run(seed: int) -> list[str]:
        schedule = OutcomeSchedule(SimulatorConfig().rates, seed)
        return [schedule.next() for _ in range(400)]

    first, second = run(0), run(1)
    assert first != second and first == run(0)  # seeded: reproducible, different per seed
    positions = [i for i, o in enumerate(first) if o == "edge_case"]
    gaps = {b - a for a, b in zip(positions, positions[1:])}
    assert len(gaps) > 3  # edge cases do not recur at one fixed period


def test_failed_outcomes_leave_the_world_unchanged() -> None:
    sim = ToolSimulator(TOOLS, SimulatorConfig(0.0, 0.5, 0.5), seed=0)
    ep = sim.new_episode(seed=0)
    for _ in range(20):
        result = ep.call("create_event", {"title": "x", "start": "2025-07-02T10:00:00Z"})
        assert result.is_error and result.outcome in ("partial_failure", "edge_case") and not result.state_changes
    assert ep.state() == {}


def test_code_tool_runs_in_the_sandbox() -> None:
    sim = ToolSimulator([python_tool_spec()], SimulatorConfig(sandbox=SandboxLimits(cpu_s=1, wall_s=3)), seed=0)
    ep = sim.new_episode(seed=0)
    ran = ep.call("run_python", {"code": "print(sum(range(10)))"})
    assert ran.source == "sandbox" and ran.outcome == "success" and ran.content["stdout"] == "45\n"
    crashed = ep.call("run_python", {"code": "1/0"})
    assert crashed.outcome == "tool_error" and "ZeroDivisionError" in crashed.content["stderr"]
    assert sim.schedule.calls == 0


def test_mcp_tools_are_called_for_real(tmp_path: Path) -> None:
    with MCPToolbox([time_server()]) as box:
        tools = box.harvest()
        sim = ToolSimulator(tools, ALWAYS, seed=0, real=box)
        ep = sim.new_episode(seed=0)
        now = ep.call("get_current_time", {"timezone": "America/New_York"})
        assert now.source == "mcp:time" and now.outcome == "success" and now.schema_valid
        assert now.content["timezone"] == "America/New_York"
        bad = ep.call("get_current_time", {"timezone": "Mars/Olympus_Mons"})
        assert bad.outcome == "tool_error" and bad.is_error
        assert ep.call("get_current_time", {}).outcome == "invalid_arguments"  # checked before the server is asked
        box.clients["time"].close()  # the server is replaced by one that can no longer start: it is lost
        box.clients["time"] = MCPClient(MCPServerSpec("time", [str(tmp_path / "gone")]))
        lost = ep.call("get_current_time", {"timezone": "UTC"})
        assert lost.outcome == "infrastructure_error" and ep.infrastructure_failed
        assert sim.schedule.calls == 0


def test_bad_configs_are_named_errors() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        SimulatorConfig(0.8, 0.1, 0.2)
    with pytest.raises(ValueError, match="max_drift"):
        SimulatorConfig(max_drift=0.5)
    with pytest.raises(ValueError, match="'create_event'"):
        ToolSimulator([TOOLS[0], TOOLS[0]])
