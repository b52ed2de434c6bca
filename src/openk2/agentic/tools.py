"""Tool specs (paper §3.1.1, spec §4.1): one record for a real MCP tool or a synthetic one, stored losslessly.

A spec keeps the tool's definition exactly as its source gave it (`raw`: an MCP `tools/list` entry, or the
synthetic generator's JSON), so nothing of a nested JSON Schema is lost; the typed fields are views of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema


@dataclass(frozen=True)
class ToolSpec:
    """A callable tool: name, description, JSON Schema of its input (and of its output, when it declares one)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None = None
    source: str = "synthetic"  # "mcp:<server>" for a real MCP tool, "synthetic:<category>/<domain>" for an evolved one
    raw: dict[str, Any] = field(default_factory=dict)  # the definition exactly as the source gave it

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tool name must be a non-empty string, got {self.name!r}")
        for what, schema in (("input_schema", self.input_schema), ("output_schema", self.output_schema)):
            if schema is None and what == "output_schema":
                continue
            if not isinstance(schema, dict):
                raise ValueError(f"tool {self.name!r}: {what} must be a JSON Schema object, got {schema!r}")
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise ValueError(f"tool {self.name!r}: {what} is not a valid JSON Schema: {e.message}") from e

    @classmethod
    def from_mcp(cls, tool: dict[str, Any], server: str) -> ToolSpec:
        """From one entry of an MCP `tools/list` result (camelCase keys, as on the wire)."""
        return cls(name=tool["name"], description=tool.get("description") or "",
                   input_schema=tool.get("inputSchema") or {"type": "object", "properties": {}},
                   output_schema=tool.get("outputSchema"), source=f"mcp:{server}", raw=tool)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tools` entry (what the chat template declares to the model)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.input_schema}}

    def to_json(self) -> str:
        """One JSONL line; `from_json(to_json())` gives back an equal spec and the same `raw` bytes."""
        # Key order is kept, not sorted: it is part of what the source sent (a schema's property order is the
        # order the chat template declares the arguments in).
        return json.dumps({"name": self.name, "description": self.description, "input_schema": self.input_schema,
                           "output_schema": self.output_schema, "source": self.source, "raw": self.raw},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> ToolSpec:
        return cls(**json.loads(line))
