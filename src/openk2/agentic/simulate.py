"""The tool simulator, a world model (paper §3.1.1 "tool simulator", spec §4.3).

An `Episode` answers tool calls the way a consistent world would:
- **State.** Each episode owns a key-value world: collections of records keyed by entity. Which collection a tool
  touches and how comes from its name (our heuristic, the paper gives none): the first token that is a known verb
  decides the operation (create_/add_/send_/book_... create a record, update_/set_/edit_... change one,
  delete_/remove_/cancel_... drop one, get_/list_/search_/read_... read) and the tokens after it, cut at a
  preposition and singularised, name the entity (`list_calendar_events` -> "calendar_event", `get_user_by_id` ->
  "user"). A write is visible to later reads of the same episode and to nothing else.
- **Outputs.** A tool with an output schema gets a value valid against it, sampled from the schema (types, enums,
  const, required, nested objects and arrays, bounds, common string formats; `pattern` is not synthesised) with
  fields filled from the stored records and the call's arguments wherever a name matches and the value fits.
  Fields an output invents for a record are stored with it, so the next read shows the same values.
- **Controlled stochasticity.** Each simulated call with valid arguments is dealt one outcome: "success",
  "partial_failure" (a transient, retryable error; nothing changes) or "edge_case" (reads answer with schema-edge
  values for every field the world does not fix; writes are refused for a permanent domain reason). Outcomes come
  from `OutcomeSchedule`, which draws at random but never lets any outcome's count stray more than
  `(outcomes - 1) * max_drift` calls from `rate * calls`, so the configured rates hold at every call count.
- **Real tools.** Calls to tools whose source is `mcp:<server>` go to the real server through the given caller,
  and code-execution tools (source "sandbox", or a name like `run_python`) run in the code sandbox; neither
  consumes the schedule.
Arguments are validated against the input schema first ("invalid_arguments"); an unknown name is "unknown_tool".
A call naming a record the world does not hold answers "not found" (`is_error`), whatever outcome it was dealt.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import random
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import jsonschema
import referencing.exceptions

from openk2.agentic.mcp import MCPCallResult
from openk2.agentic.sandbox import Sandbox, SandboxLimits
from openk2.agentic.tools import ToolSpec

Outcome = Literal["success", "partial_failure", "edge_case", "invalid_arguments", "unknown_tool", "tool_error",
                  "infrastructure_error"]
SCHEDULED: tuple[str, ...] = ("success", "partial_failure", "edge_case")

CREATE_VERBS = frozenset("create add insert new register book send post upload schedule make submit open place "
                         "reserve enroll subscribe invite assign".split())
UPDATE_VERBS = frozenset("update set edit modify change rename patch put move mark toggle replace".split())
DELETE_VERBS = frozenset("delete remove cancel drop clear unsubscribe archive revoke close".split())
READ_VERBS = frozenset("get list search find read fetch query lookup show view describe check retrieve count browse "
                       "load".split())
PREPOSITIONS = frozenset("by to from for in on of with at into via".split())
ID_KEYS = ("id", "key", "uuid", "name")  # after "<entity>_id": how a call names the record it means
QUERY_KEYS = frozenset("query q keyword keywords text search term".split())
LIMIT_KEYS = frozenset("limit max_results top_k page_size max_items".split())
COUNT_KEYS = ("count", "total", "total_count", "total_results", "num_results", "result_count")
CODE_TOOL_NAMES = frozenset("run_python execute_python python code_interpreter run_code execute_code".split())

_TRANSIENT_ERRORS = ("503 Service Unavailable: the backend is temporarily overloaded, try again",
                     "429 Too Many Requests: rate limit exceeded, retry after 2 seconds",
                     "504 Gateway Timeout: the upstream service did not answer in time",
                     "Connection reset while writing the response; the request may be retried")
_PERMANENT_ERRORS = ("403 Forbidden: the current account lacks permission for this operation",
                     "409 Conflict: the resource was modified concurrently",
                     "422 Unprocessable: quota exceeded for this resource type",
                     "423 Locked: the resource is read-only")


@dataclass(frozen=True)
class SimulatorConfig:
    """Outcome rates and sampling bounds. Every default is ours: the paper publishes no rates."""

    success_rate: float = 0.8
    partial_failure_rate: float = 0.1
    edge_case_rate: float = 0.1
    max_drift: float = 1.0  # calls an outcome may run ahead of its rate; counts stay within (3-1)*max_drift of it
    max_list_items: int = 5  # items in a sampled array when the world does not fix them
    real_call_timeout_s: float = 30.0  # one real MCP call
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    start_time: str = "2025-07-01T09:00:00+00:00"  # the simulated clock dates are sampled around

    def __post_init__(self) -> None:
        rates = self.rates
        if any(not 0.0 <= r <= 1.0 for r in rates.values()) or abs(sum(rates.values()) - 1.0) > 1e-9:
            raise ValueError(f"outcome rates must lie in [0, 1] and sum to 1, got {rates!r}")
        if not self.max_drift >= 1.0:
            raise ValueError(f"max_drift must be >= 1 call, got {self.max_drift!r}")
        if self.max_list_items < 1:
            raise ValueError(f"max_list_items must be >= 1, got {self.max_list_items!r}")
        dt.datetime.fromisoformat(self.start_time)

    @property
    def rates(self) -> dict[str, float]:
        return {"success": self.success_rate, "partial_failure": self.partial_failure_rate,
                "edge_case": self.edge_case_rate}


class OutcomeSchedule:
    """Random outcomes whose running counts stay within `(m-1)*max_drift` of `rate * n` at every n (thread-safe).

    Each call draws an outcome with the configured probabilities, except that an outcome may not run more than
    `max_drift` ahead of its target count (the draw is then replaced by the outcome furthest behind) and one that
    has fallen `max_drift` behind is dealt at once. Since the deviations sum to zero, none can fall further behind
    than the others are ahead. I.i.d. draws would drift like sqrt(n); these never do.
    """

    def __init__(self, rates: dict[str, float], seed: int, max_drift: float = 1.0) -> None:
        self.names = list(rates)
        self.rates = [rates[name] for name in self.names]
        self.max_drift = max_drift
        self.counts = [0] * len(self.names)
        self.calls = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            n = self.calls + 1
            deficits = [p * n - c for p, c in zip(self.rates, self.counts, strict=True)]
            behind = max(range(len(deficits)), key=deficits.__getitem__)
            if deficits[behind] >= self.max_drift:
                pick = behind
            else:
                pick = self._rng.choices(range(len(self.rates)), weights=self.rates)[0]
                if self.counts[pick] + 1 - self.rates[pick] * n > self.max_drift:
                    pick = behind
            self.counts[pick] += 1
            self.calls = n
            return self.names[pick]


def _tokens(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)  # camelCase -> camel_Case
    return [t for t in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if t]


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def tool_effect(name: str) -> tuple[str, str]:
    """(operation, entity) of a tool from its name: operation is create/update/delete/read/action (see module doc)."""
    tokens = _tokens(name)
    for i, token in enumerate(tokens):
        for op, verbs in (("create", CREATE_VERBS), ("update", UPDATE_VERBS), ("delete", DELETE_VERBS),
                          ("read", READ_VERBS)):
            if token in verbs:
                rest = tokens[i + 1:]
                cut = next((j for j, t in enumerate(rest) if t in PREPOSITIONS), len(rest))
                entity_tokens = rest[:cut] or tokens[:i] or ["item"]
                return op, "_".join([*entity_tokens[:-1], _singular(entity_tokens[-1])])
    return "action", "_".join(tokens) or "item"


class SchemaSampler:
    """Draws JSON values valid against a JSON Schema, filling fields from a context of known values."""

    def __init__(self, rng: random.Random, start: dt.datetime, max_items: int) -> None:
        self.rng, self.start, self.max_items = rng, start, max_items

    def sample(self, schema: Any, root: dict[str, Any], ctx: dict[str, Any] | None = None,
               items: list[dict[str, Any]] | None = None, edge: bool = False, name: str = "", depth: int = 0) -> Any:
        if schema is True or schema == {}:
            return self._string({}, name, edge)
        if not isinstance(schema, dict):
            raise ValueError(f"cannot sample from schema {schema!r}")
        if "$ref" in schema:
            return self.sample(self._resolve(schema["$ref"], root), root, ctx, items, edge, name, depth + 1)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        if "enum" in schema:
            return copy.deepcopy(schema["enum"][0] if edge else self.rng.choice(schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = [b for b in schema[key] if not (isinstance(b, dict) and b.get("type") == "null")]
                branch = (branches or schema[key])[0 if edge else self.rng.randrange(len(branches or schema[key]))]
                return self.sample(branch, root, ctx, items, edge, name, depth + 1)
        if "allOf" in schema:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part["$ref"], root) if "$ref" in part else part
                merged.setdefault("properties", {}).update(part.get("properties", {}))
                merged["required"] = [*merged.get("required", []), *part.get("required", [])]
                merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
            return self.sample(merged, root, ctx, items, edge, name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"] or kind
            kind = kinds[0] if edge else self.rng.choice(kinds)
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        if kind == "object":
            return self._object(schema, root, ctx or {}, items, edge, depth)
        if kind == "array":
            return self._array(schema, root, ctx or {}, items, edge, name, depth)
        if kind == "string":
            return self._string(schema, name, edge)
        if kind in ("integer", "number"):
            return self._number(schema, kind, edge)
        if kind == "boolean":
            return False if edge else self.rng.random() < 0.5
        if kind == "null":
            return None
        raise ValueError(f"cannot sample JSON Schema type {kind!r}")

    @staticmethod
    def _resolve(ref: str, root: dict[str, Any]) -> Any:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref can be sampled, got {ref!r}")
        node: Any = root
        for part in ref.lstrip("#/").split("/") if ref != "#" else []:
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def _object(self, schema: dict[str, Any], root: dict[str, Any], ctx: dict[str, Any],
                items: list[dict[str, Any]] | None, edge: bool, depth: int) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", []))
        out: dict[str, Any] = {}
        for key, sub in props.items():
            known = key in ctx and _fits(ctx[key], sub, root)
            # Optional fields: present when the world knows them; edge cases leave the others out. A stored record
            # (ctx has an id) gets them all on first sight, so the values stored then are all later reads show.
            if key not in required and not known and (edge or depth > 6 or ("id" not in ctx and
                                                                            self.rng.random() < 0.5)):
                continue
            if known:
                out[key] = copy.deepcopy(ctx[key])
            else:
                nested = ctx[key] if isinstance(ctx.get(key), dict) else ctx
                nested_items = ctx[key] if _is_records(ctx.get(key)) else items
                out[key] = self.sample(sub, root, nested, nested_items, edge, key, depth + 1)
        extra = schema.get("additionalProperties")
        if not props and isinstance(extra, dict) and not edge:
            for i in range(self.rng.randint(1, 2)):
                out[f"key_{i}"] = self.sample(extra, root, ctx, None, edge, "value", depth + 1)
        return out

    def _array(self, schema: dict[str, Any], root: dict[str, Any], ctx: dict[str, Any],
               items: list[dict[str, Any]] | None, edge: bool, name: str, depth: int) -> list[Any]:
        lo = int(schema.get("minItems", 0))
        hi = int(schema.get("maxItems", max(lo, self.max_items)))
        sub = schema.get("items", {})
        sub_kind = self._resolve(sub["$ref"], root) if isinstance(sub, dict) and "$ref" in sub else sub
        if items is not None and isinstance(sub_kind, dict) and sub_kind.get("type", "object") == "object":
            chosen = items[:hi]  # the world fixes the list: its records, as many as the schema allows
            return [self.sample(sub, root, record, None, edge, name, depth + 1) for record in chosen] + [
                self.sample(sub, root, {}, None, edge, name, depth + 1) for _ in range(lo - len(chosen))]
        count = lo if edge else self.rng.randint(lo, max(lo, min(hi, lo + self.max_items)))
        out: list[Any] = []
        for _ in range(count * 4):  # extra draws make room for uniqueItems
            if len(out) == count:
                break
            value = self.sample(sub, root, ctx, None, edge and not out, name, depth + 1)
            if not schema.get("uniqueItems") or value not in out:
                out.append(value)
        return out

    def _string(self, schema: dict[str, Any], name: str, edge: bool) -> str:
        fmt = schema.get("format")
        offset = dt.timedelta(minutes=self.rng.randint(-60 * 24 * 30, 60 * 24 * 30))
        when = self.start if edge else self.start + offset
        if fmt == "date-time":
            return when.isoformat()
        if fmt == "date":
            return when.date().isoformat()
        if fmt == "time":
            return when.time().isoformat() + "Z"
        if fmt == "email":
            return f"user{self.rng.randrange(1000)}@example.com"
        if fmt in ("uri", "url", "iri"):
            return f"https://example.com/{name or 'item'}/{self.rng.randrange(10_000)}"
        if fmt == "uuid":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        if fmt == "ipv4":
            return ".".join(str(self.rng.randrange(1, 255)) for _ in range(4))
        if fmt == "hostname":
            return f"host{self.rng.randrange(100)}.example.com"
        lo, hi = int(schema.get("minLength", 0)), int(schema.get("maxLength", 10**6))
        text = "" if edge and lo == 0 else f"{name or 'value'}-{self.rng.randrange(16**6):06x}"
        text = text.ljust(lo, "x")[:hi]
        return text

    def _number(self, schema: dict[str, Any], kind: str, edge: bool) -> int | float:
        def bound(key: str) -> float | None:
            value = schema.get(key)
            return value if isinstance(value, int | float) and not isinstance(value, bool) else None

        tiny = 1 if kind == "integer" else 1e-6
        lo = bound("minimum") if bound("minimum") is not None else (
            bound("exclusiveMinimum") + tiny if bound("exclusiveMinimum") is not None else None)
        hi = bound("maximum") if bound("maximum") is not None else (
            bound("exclusiveMaximum") - tiny if bound("exclusiveMaximum") is not None else None)
        lo = lo if lo is not None else (0 if edge or hi is None else hi - 1000)
        hi = hi if hi is not None else lo + 1000
        step = bound("multipleOf")
        if step:
            k_lo, k_hi = math.ceil(lo / step), math.floor(hi / step)
            k = k_lo if edge else self.rng.randint(k_lo, max(k_lo, k_hi))
            return int(k * step) if kind == "integer" else k * step
        if kind == "integer":
            lo_i, hi_i = math.ceil(lo), math.floor(hi)
            return lo_i if edge else self.rng.randint(lo_i, max(lo_i, hi_i))
        if edge:
            return float(lo)
        value = self.rng.uniform(lo, hi)
        return round(value, 2) if lo <= round(value, 2) <= hi else value


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _fits(value: Any, schema: Any, root: dict[str, Any]) -> bool:
    if isinstance(schema, dict) and "$ref" in schema:
        schema = {**schema, "$defs": root.get("$defs", {}), "definitions": root.get("definitions", {})}
    try:
        return jsonschema.Draft202012Validator(schema).is_valid(value)
    except (referencing.exceptions.Unresolvable, jsonschema.SchemaError, LookupError):
        return False


@dataclass(frozen=True)
class StateChange:
    """One write to the episode's world."""

    op: Literal["create", "update", "delete"]
    collection: str
    key: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass(frozen=True)
class ToolResult:
    """What one tool call returned and how the world changed."""

    outcome: Outcome
    content: dict[str, Any] | list[Any] | str
    is_error: bool = False
    state_changes: tuple[StateChange, ...] = ()
    source: str = "simulated"  # "simulated", "mcp:<server>" or "sandbox"
    schema_valid: bool | None = None  # against the tool's output schema, when it has one and the call succeeded

    def to_content(self) -> str:
        """The text of the `tool` turn answering this call."""
        return self.content if isinstance(self.content, str) else json.dumps(self.content, ensure_ascii=False)


class RealToolCaller(Protocol):
    """Calls a real MCP tool (e.g. `openk2.agentic.mcp.MCPToolbox`)."""

    def call_tool(self, tool: ToolSpec, arguments: dict[str, Any], timeout_s: float | None = None
                  ) -> MCPCallResult: ...


def open_world(tool: ToolSpec) -> bool:
    """Whether a record the call names exists even when this episode never wrote it: true for the catalog's tools,
    whose users name records of a service that holds more than the episode (an order id, a booking reference)."""
    return bool(tool.raw.get("asks"))


def is_code_tool(tool: ToolSpec) -> bool:
    return tool.source == "sandbox" or tool.name in CODE_TOOL_NAMES


class ToolSimulator:
    """The world model of one synthesis run: tools, outcome schedule, real-tool and sandbox routes."""

    def __init__(self, tools: list[ToolSpec], config: SimulatorConfig | None = None, seed: int = 0,
                 real: RealToolCaller | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.tools: dict[str, ToolSpec] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool
        self.real = real
        self.schedule = OutcomeSchedule(self.config.rates, seed, self.config.max_drift)
        self.sandbox = Sandbox(self.config.sandbox) if any(is_code_tool(t) for t in tools) else None
        self._validators = {t.name: jsonschema.Draft202012Validator(t.input_schema) for t in tools}

    def new_episode(self, seed: int) -> Episode:
        return Episode(self, seed)


class Episode:
    """One trajectory's world: its own records, answering calls in order."""

    def __init__(self, simulator: ToolSimulator, seed: int) -> None:
        self.sim = simulator
        self.rng = random.Random(seed)
        self.sampler = SchemaSampler(self.rng, dt.datetime.fromisoformat(simulator.config.start_time),
                                     simulator.config.max_list_items)
        self.world: dict[str, dict[str, dict[str, Any]]] = {}
        self.history: list[tuple[str, dict[str, Any], ToolResult]] = []
        self._next_id = 0

    @property
    def infrastructure_failed(self) -> bool:
        """A real server crashed past its retry or timed out: the pipeline records the episode as failed."""
        return any(result.outcome == "infrastructure_error" for _, _, result in self.history)

    def state(self) -> dict[str, dict[str, dict[str, Any]]]:
        """A copy of the world: collection -> record id -> record."""
        return copy.deepcopy(self.world)

    def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        result = self._call(name, arguments)
        self.history.append((name, copy.deepcopy(arguments), result))
        return result

    def _call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        tool = self.sim.tools.get(name)
        if tool is None:
            return ToolResult("unknown_tool", f"Error: no tool named {name!r}; available: "
                              f"{', '.join(sorted(self.sim.tools))}", is_error=True)
        if not isinstance(arguments, dict):
            return ToolResult("invalid_arguments", f"Error: arguments must be a JSON object, got {arguments!r}",
                              is_error=True)
        errors = sorted(self.sim._validators[name].iter_errors(arguments), key=lambda e: list(e.path))
        if errors:
            detail = "; ".join(f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:5])
            return ToolResult("invalid_arguments", f"Error: invalid arguments for {name}: {detail}", is_error=True)
        if tool.source.startswith("mcp:") and self.sim.real is not None:
            return self._real(tool, arguments)
        if is_code_tool(tool):
            return self._code(tool, arguments)
        return self._simulated(tool, arguments, self.sim.schedule.next())

    def _real(self, tool: ToolSpec, arguments: dict[str, Any]) -> ToolResult:
        assert self.sim.real is not None
        got = self.sim.real.call_tool(tool, arguments, self.sim.config.real_call_timeout_s)
        if got.transport_failed:
            return ToolResult("infrastructure_error", f"Error: {got.error}", is_error=True, source=tool.source)
        content: dict[str, Any] | str = got.structured if got.structured is not None else got.text()
        valid = _fits(got.structured, tool.output_schema, tool.output_schema) if (
            got.ok and tool.output_schema is not None) else None
        return ToolResult("success" if got.ok else "tool_error", content, is_error=not got.ok, source=tool.source,
                          schema_valid=valid)

    def _code(self, tool: ToolSpec, arguments: dict[str, Any]) -> ToolResult:
        assert self.sim.sandbox is not None
        code = arguments.get("code")
        if not isinstance(code, str):
            code = next((v for v in arguments.values() if isinstance(v, str)), "")
        ran = self.sim.sandbox.run(code, arguments.get("language", "python"))
        return ToolResult("success" if ran.ok else "tool_error", ran.to_content(), is_error=not ran.ok,
                          source="sandbox")

    def _simulated(self, tool: ToolSpec, arguments: dict[str, Any], outcome: str) -> ToolResult:
        op, entity = tool_effect(tool.name)
        if outcome == "partial_failure":
            return ToolResult("partial_failure", f"Error: {self.rng.choice(_TRANSIENT_ERRORS)}", is_error=True)
        if outcome == "edge_case" and op != "read":
            return ToolResult("edge_case", f"Error: {self.rng.choice(_PERMANENT_ERRORS)}", is_error=True)
        records = self.world.setdefault(entity, {})
        changes: list[StateChange] = []
        items: list[dict[str, Any]] | None = None
        if op == "create":
            key = self._key(entity, arguments) or self._new_id(entity)
            record = {**copy.deepcopy(arguments), "id": key, f"{entity}_id": key}
            changes.append(StateChange("create", entity, key, copy.deepcopy(records.get(key)), copy.deepcopy(record)))
            records[key] = record
            plain: Any = {"status": "created", entity: record}
        elif op in ("update", "delete"):
            key = self._find(entity, arguments)
            if key is None and (op == "update" and tool_effect_verb(tool.name) == "set" or open_world(tool)):
                key = self._key(entity, arguments) or self._new_id(entity)  # set_ upserts
                records[key] = {"id": key, f"{entity}_id": key}
            if key is None:
                return ToolResult(outcome, f"Error: no {entity} matches {json.dumps(arguments)}", is_error=True)
            before = copy.deepcopy(records[key])
            if op == "update":
                records[key] = {**records[key], **copy.deepcopy(arguments), "id": key}
                record = records[key]
                plain = {"status": "updated", entity: record}
            else:
                record = records.pop(key)
                plain = {"status": "deleted", "id": key}
            changes.append(StateChange(op, entity, key, before, copy.deepcopy(records.get(key))))
        elif op == "read":
            items = self._select(entity, arguments)
            single = tool_effect_verb(tool.name) in ("get", "read", "fetch", "retrieve", "describe", "show", "view",
                                                     "lookup", "load") and self._lookup_key(entity, arguments)
            if single:
                if not items and open_world(tool):
                    key = self._key(entity, arguments) or str(arguments[single])
                    records[key] = {**copy.deepcopy(arguments), "id": key, f"{entity}_id": key}
                    items = [records[key]]
                if not items:
                    return ToolResult(outcome, f"Error: no {entity} matches {json.dumps(arguments)}", is_error=True)
                record, items = items[0], None
                plain = record
            else:
                record = {}
                plain = {"results": items, "count": len(items)}
        else:
            record = {}
            plain = {"status": "ok", "tool": tool.name, "arguments": arguments}
        if tool.output_schema is None:
            return ToolResult(outcome, copy.deepcopy(plain), state_changes=tuple(changes))
        ctx = {**arguments, **record}
        if items is not None:  # a listing's count fields say how many it holds
            ctx.update(dict.fromkeys(COUNT_KEYS, len(items)))
        value, valid = self._output(tool.output_schema, ctx, items, outcome == "edge_case")
        if valid:
            self._materialise(value, entity, record.get("id") if op != "delete" else None)
        return ToolResult(outcome, value, state_changes=tuple(changes), schema_valid=valid)

    def _materialise(self, value: Any, entity: str, target: str | None) -> None:
        """Store the fields an output invented for a record, so that later reads show the same values."""
        records = self.world.get(entity, {})
        matched = False

        def walk(node: Any, depth: int) -> None:
            nonlocal matched
            if depth > 4:
                return
            if isinstance(node, dict):
                rid = node.get(f"{entity}_id", node.get("id"))
                if isinstance(rid, str | int) and str(rid) in records:
                    matched = True
                    for key, field_value in node.items():
                        records[str(rid)].setdefault(key, copy.deepcopy(field_value))
                for child in node.values():
                    walk(child, depth + 1)
            elif isinstance(node, list):
                for child in node:
                    walk(child, depth + 1)

        walk(value, 0)
        if not matched and target is not None and target in records and isinstance(value, dict):
            for key, field_value in value.items():
                records[target].setdefault(key, copy.deepcopy(field_value))

    def _output(self, schema: dict[str, Any], ctx: dict[str, Any], items: list[dict[str, Any]] | None,
                edge: bool) -> tuple[Any, bool]:
        validator = jsonschema.Draft202012Validator(schema)
        value: Any = None
        for attempt in range(8):  # a fill that broke a constraint is dropped on the next attempt
            value = self.sampler.sample(schema, schema, ctx if attempt < 4 else {}, items if attempt < 4 else None,
                                        edge)
            if validator.is_valid(value):
                return value, True
        return value, False

    def _new_id(self, entity: str) -> str:
        self._next_id += 1
        return f"{entity}_{self._next_id}"

    def _lookup_key(self, entity: str, arguments: dict[str, Any]) -> str | None:
        return next((k for k in (f"{entity}_id", *ID_KEYS) if k in arguments), None)

    def _key(self, entity: str, arguments: dict[str, Any]) -> str | None:
        key = next((k for k in (f"{entity}_id", "id", "key", "uuid") if k in arguments), None)
        return str(arguments[key]) if key is not None else None

    def _find(self, entity: str, arguments: dict[str, Any]) -> str | None:
        """The id of the record the call names (by id, key or name), or None."""
        by = self._lookup_key(entity, arguments)
        found = self._select(entity, {by: arguments[by]}) if by is not None else []
        return found[0]["id"] if found else None

    def _select(self, entity: str, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        """Records of `entity` matching the call's filters (ids, equal fields, free-text queries), up to a limit."""
        out = []
        for record in self.world.get(entity, {}).values():
            keep = True
            for key, want in arguments.items():
                if key in LIMIT_KEYS:
                    continue
                if key in QUERY_KEYS and isinstance(want, str):
                    keep = want.lower() in json.dumps(record, ensure_ascii=False).lower()
                elif key in (f"{entity}_id", "id", "uuid", "key"):
                    keep = str(want) in (str(record.get(key)), str(record["id"]))
                elif key in record:
                    keep = _same(record[key], want)
                if not keep:
                    break
            if keep:
                out.append(copy.deepcopy(record))
        limit = next((arguments[k] for k in LIMIT_KEYS if isinstance(arguments.get(k), int)), None)
        return out[:limit] if limit is not None and limit >= 0 else out


def tool_effect_verb(name: str) -> str | None:
    """The verb token `tool_effect` keyed on, or None for an action."""
    verbs = CREATE_VERBS | UPDATE_VERBS | DELETE_VERBS | READ_VERBS
    return next((t for t in _tokens(name) if t in verbs), None)


def _same(have: Any, want: Any) -> bool:
    if isinstance(have, str) and isinstance(want, str):
        return have.casefold() == want.casefold()
    return have == want
