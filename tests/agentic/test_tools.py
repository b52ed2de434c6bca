import json

import pytest

from openk2.agentic.tools import ToolSpec

NESTED = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "description": "what to find"},
        "filters": {"type": "array", "items": {"type": "object", "properties": {"field": {"type": "string"},
                                                                                  "values": {"type": "array"}}}},
    },
    "required": ["query"],
}


def test_mcp_entry_keeps_its_wire_json_and_round_trips():
    wire = {"name": "search", "description": "Search things", "inputSchema": NESTED, "annotations": {"x": 1}}
    spec = ToolSpec.from_mcp(wire, server="demo")
    assert spec.source == "mcp:demo" and spec.input_schema == NESTED and spec.raw == wire
    line = spec.to_json()
    again = ToolSpec.from_json(line)
    assert again == spec and again.to_json() == line
    assert json.loads(line)["raw"] == wire


def test_openai_form_declares_the_input_schema():
    spec = ToolSpec("lookup", "Look up", NESTED)
    assert spec.to_openai() == {"type": "function",
                                "function": {"name": "lookup", "description": "Look up", "parameters": NESTED}}


@pytest.mark.parametrize("name, schema, message", [
    ("", NESTED, "non-empty"),
    ("t", {"type": "nope"}, "not a valid JSON Schema"),
    ("t", "string", "must be a JSON Schema object"),
])
def test_bad_specs_are_named_errors(name, schema, message):
    with pytest.raises(ValueError, match=message):
        ToolSpec(name, "d", schema)
