"""Synthetic tools evolved category -> domain -> tools by an LLM, validated and deduplicated (paper §3.1.1, spec §4.1).

K2 evolves 20,000+ synthetic tools hierarchically: key categories, then application domains within each, then tools
with clear interfaces for each domain. Here the work is split by what a small model can do well:

    the LLM writes language   domain names; per tool a snake_case name, a one-sentence description and a flat list
                              of parameters (name, type word, description, required, optional enum values)
    the code writes schemas   the JSON Schema of every tool is built from that flat list (type words mapped, e.g.
                              "int" -> integer and "date" -> string with format date; required list; enums checked
                              against their type; additionalProperties false), then validated

so a 135M model on CPU yields usable tools, and a large model simply fails less. Models that write a JSON Schema
anyway (`{"properties": ...}`) are read too. Every candidate then passes `check_tool` (object-type parameters,
snake_case name, non-empty description, every `required` key defined) or is rejected with its reason.

Duplicates, in this order:
    near duplicates  character-trigram cosine of "name words + description + parameter names" (hashed into
                     2,048 dims, no ML dependency); a candidate whose similarity to an earlier kept tool reaches
                     `near_duplicate_threshold` is dropped. Trigrams catch re-wordings ("get_current_weather" vs
                     "get_weather") that word-set Jaccard misses, and cost one matrix product per block of tools.
    equal names      a tool whose name is taken by a different (not near-duplicate) tool is renamed
                     "<domain>_<name>"; when that is taken too, it is rejected as a duplicate name.

Everything the paper leaves open (counts per level, the threshold, rounds, token caps) is ours and in EvolveConfig.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from openk2.agentic.llm import LLMClient, LLMOutputError, LLMRequestError, usage_delta
from openk2.agentic.tools import ToolSpec

log = logging.getLogger(__name__)

DEFAULT_CATEGORIES = (
    "finance", "travel", "healthcare", "software development", "e-commerce", "education", "real estate",
    "logistics and shipping", "weather and environment", "media and entertainment", "social networking",
    "food and dining", "sports and fitness", "human resources", "legal and compliance", "customer support",
    "marketing and advertising", "smart home and IoT", "government services", "office productivity",
    "science and research", "telecommunications", "energy and utilities", "automotive",
)


@dataclass
class EvolveConfig:
    """How many domains and tools to evolve and how strictly to deduplicate; every number is ours."""

    categories: list[str] | None = None  # None: DEFAULT_CATEGORIES
    domains_per_category: int = 5
    tools_per_domain: int = 6
    near_duplicate_threshold: float = 0.85  # trigram cosine; 1.0 drops exact repeats only
    seed: int = 0  # goes into every request's seed, so a rerun hits the cache and another seed gives new tools
    max_rounds: int = 3  # when the LLM lists fewer than asked, ask again (naming what it gave) up to this often
    max_tokens: int = 1024  # per request; a truncated list is repaired by the client, losing only its last tool
    json_attempts: int = 3

    def __post_init__(self) -> None:
        if self.categories is None:
            self.categories = list(DEFAULT_CATEGORIES)
        if not self.categories or not all(isinstance(c, str) and c.strip() for c in self.categories):
            raise ValueError(f"categories must be non-empty strings, got {self.categories!r}")
        if len({c.strip().lower() for c in self.categories}) != len(self.categories):
            raise ValueError(f"categories repeat: {self.categories!r}")
        for name in ("domains_per_category", "tools_per_domain", "max_rounds", "max_tokens", "json_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.near_duplicate_threshold <= 1.0:
            raise ValueError(f"near_duplicate_threshold must be in (0, 1], got {self.near_duplicate_threshold}")


@dataclass(frozen=True)
class Candidate:
    """One tool as the LLM proposed it, with where in the hierarchy it was asked for."""

    category: str
    domain: str
    raw: Any  # the LLM's entry, untouched (usually a dict in the flat format)


@dataclass
class EvolveStats:
    """Counts for the run's report; `usage` is the LLM spend of the evolve stages during this run."""

    categories: int = 0
    domains: int = 0
    candidates: int = 0
    accepted: int = 0
    renamed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by kind: "invalid name", "near duplicate", ...
    failed_calls: list[str] = field(default_factory=list)  # LLM calls given up on; the run went on without them
    usage: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class EvolutionResult:
    tools: list[ToolSpec]
    rejected: list[tuple[Candidate, str]]  # reason = "<kind>: <detail>"
    hierarchy: dict[str, list[str]]  # category -> its evolved domains
    stats: EvolveStats


# ----------------------------------------------------------------------------------------------------------------
# asking the LLM

# Each prompt is shown once worked through, as an earlier user/assistant exchange: a 135M model follows a
# demonstrated turn where it ignores instructions (it repeats a system prompt back), and large models lose nothing.
DOMAINS_SCHEMA = {"type": "object", "required": ["domains"],
                  "properties": {"domains": {"type": "array", "minItems": 1}}}
# Only the shape: a bad tool or domain is dropped on its own (with a reason), not paid for with a re-ask of the list.
TOOLS_SCHEMA = {"type": "object", "required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}
_DOMAIN_EXAMPLE = ("travel", '{"domains": ["flight booking", "hotel reservations", "car rental"]}')
_TOOL_EXAMPLE = ("travel", "flight booking",
                 '{"tools": [{"name": "search_flights", "description": "Search one-way flights between two airports '
                 'on a date.", "parameters": [{"name": "origin", "type": "string", "description": "departure airport '
                 'code", "required": true}, {"name": "date", "type": "date", "description": "day of departure", '
                 '"required": true}, {"name": "cabin", "type": "string", "description": "cabin class", "required": '
                 'false, "enum": ["economy", "business"]}], "outputs": [{"name": "flights", "type": "array", '
                 '"description": "matching flights"}]}]}')


def _domains_ask(category: str, n: int, known: list[str]) -> str:
    text = (f"Category: {category}\nList {n} specific application domains in this category where an assistant "
            'would call software tools, as {"domains": [...]}.')
    return text + (f"\nAlready listed, do not repeat: {', '.join(known)}" if known else "")


def _tools_ask(category: str, domain: str, n: int, known: list[str]) -> str:
    text = (f"Category: {category}\nDomain: {domain}\nInvent {n} different tools (API functions) for this domain. "
            "Each tool has a snake_case name, a one-sentence description, and parameters, each with a name, a type "
            "(string, integer, number, boolean, date, array or object), a description, required (true or false) "
            'and optional enum values. Answer as {"tools": [...]}.')
    return text + (f"\nAlready listed, do not repeat: {', '.join(known)}" if known else "")


def _domains_prompt(category: str, n: int, known: list[str]) -> list[dict[str, str]]:
    example_category, example_answer = _DOMAIN_EXAMPLE
    return [{"role": "user", "content": _domains_ask(example_category, 3, [])},
            {"role": "assistant", "content": example_answer},
            {"role": "user", "content": _domains_ask(category, n, known)}]


def _tools_prompt(category: str, domain: str, n: int, known: list[str]) -> list[dict[str, str]]:
    example_category, example_domain, example_answer = _TOOL_EXAMPLE
    return [{"role": "user", "content": _tools_ask(example_category, example_domain, 1, [])},
            {"role": "assistant", "content": example_answer},
            {"role": "user", "content": _tools_ask(category, domain, n, known)}]


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


async def _ask(llm: LLMClient, messages: list[dict[str, str]], schema: dict[str, Any], stage: str, seed: int,
               config: EvolveConfig, what: str, failed: list[str]) -> dict[str, Any] | None:
    try:
        return await llm.json(messages, schema, stage=stage, seed=seed, max_tokens=config.max_tokens,
                              max_attempts=config.json_attempts, schema_in_prompt=False)
    except (LLMOutputError, LLMRequestError) as e:
        failed.append(f"{what}: {e}")
        return None


async def _propose_domains(llm: LLMClient, category: str, config: EvolveConfig, failed: list[str]) -> list[str]:
    found: list[str] = []
    for round_ in range(config.max_rounds):
        want = config.domains_per_category - len(found)
        reply = await _ask(llm, _domains_prompt(category, want, found), DOMAINS_SCHEMA, "evolve/domains",
                           _seed(config.seed, category, round_), config, f"domains of {category!r}", failed)
        if reply is None:
            break
        known = {d.lower() for d in found}
        new = [d for d in dict.fromkeys(filter(None, map(_clean_domain, reply["domains"]))) if d not in known]
        found += new[:want]
        if not new or len(found) >= config.domains_per_category:
            break
    return found


async def _propose_tools(llm: LLMClient, category: str, domain: str, config: EvolveConfig,
                         failed: list[str]) -> list[Candidate]:
    found: list[Any] = []
    for round_ in range(config.max_rounds):
        want = config.tools_per_domain - len(found)
        known = [e["name"] for e in found if isinstance(e, dict) and isinstance(e.get("name"), str)]
        reply = await _ask(llm, _tools_prompt(category, domain, want, known), TOOLS_SCHEMA, "evolve/tools",
                           _seed(config.seed, category, domain, round_), config,
                           f"tools of {category!r}/{domain!r}", failed)
        if reply is None:
            break
        found += reply["tools"][:want]
        if len(reply["tools"]) < want and len(found) < config.tools_per_domain:
            continue
        break
    return [Candidate(category, domain, raw) for raw in found]


def _clean_domain(text: Any) -> str | None:
    if isinstance(text, dict):  # small models often write {"name": ..., "description": ...} per domain
        text = text.get("name")
    if not isinstance(text, str):
        return None
    text = re.sub(r"\s+", " ", text.replace("/", " and ")).strip(" .,;:-*\"'").lower()
    return text if 0 < len(text) <= 60 else None  # longer is a sentence, not a domain name


# ----------------------------------------------------------------------------------------------------------------
# from the flat format to a validated ToolSpec

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TYPES: dict[str, dict[str, str]] = {
    **dict.fromkeys(("string", "str", "text"), {"type": "string"}),
    **dict.fromkeys(("integer", "int"), {"type": "integer"}),
    **dict.fromkeys(("number", "float", "double", "decimal"), {"type": "number"}),
    **dict.fromkeys(("boolean", "bool"), {"type": "boolean"}),
    **dict.fromkeys(("array", "list"), {"type": "array"}),
    **dict.fromkeys(("object", "dict"), {"type": "object"}),
    "date": {"type": "string", "format": "date"},
    **dict.fromkeys(("datetime", "date-time"), {"type": "string", "format": "date-time"}),
}


def snake_case(text: Any, what: str = "name") -> str:
    """`text` as a snake_case identifier ("getStockQuote", "Get stock-quote" -> "get_stock_quote"), or ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"invalid {what}: {text!r} is not a string")
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text.strip())
    name = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid {what}: {text!r} is not a snake_case identifier of at most 64 characters")
    return name


def check_tool(spec: ToolSpec) -> None:
    """The contract every tool in the repository meets; ValueError naming what breaks it."""
    if not _NAME.fullmatch(spec.name):
        raise ValueError(f"invalid name: {spec.name!r} is not snake_case")
    if not spec.description.strip():
        raise ValueError(f"invalid description: tool {spec.name!r} has none")
    schema = spec.input_schema
    if schema.get("type") != "object" or not isinstance(schema.get("properties", {}), dict):
        raise ValueError(f"invalid schema: parameters of {spec.name!r} are not an object with properties")
    missing = [k for k in schema.get("required", []) if k not in schema.get("properties", {})]
    if missing:
        raise ValueError(f"invalid schema: required keys {missing} of {spec.name!r} are not parameters")


def build_tool(candidate: Candidate) -> ToolSpec:
    """The ToolSpec for one flat-format candidate, its JSON Schema built here; ValueError "<kind>: <detail>"."""
    raw = candidate.raw
    if not isinstance(raw, dict):
        raise ValueError(f"not an object: {str(raw)[:80]!r}")
    name = snake_case(raw.get("name"))
    description = raw.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"invalid description: {description!r}")
    properties, required = _properties(raw.get("parameters"), raw.get("required"), "parameter")
    input_schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    input_schema["additionalProperties"] = False  # the tool simulator may then reject invented arguments
    output_schema = None
    if raw.get("outputs"):
        output_schema = {"type": "object", "properties": _properties(raw["outputs"], None, "output")[0]}
    try:
        spec = ToolSpec(name=name, description=" ".join(description.split()), input_schema=input_schema,
                        output_schema=output_schema, source=f"synthetic:{candidate.category}/{candidate.domain}",
                        raw=raw)
    except ValueError as e:
        raise ValueError(f"invalid schema: {e}") from e
    check_tool(spec)
    return spec


def _properties(params: Any, required_keys: Any, what: str) -> tuple[dict[str, Any], list[str]]:
    entries, required_keys = _entries(params, required_keys, what)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"invalid schema: {what} {str(entry)[:60]!r} is not an object")
        key = snake_case(entry.get("name"), f"schema: {what} name")
        if key in properties:
            raise ValueError(f"invalid schema: {what} {key!r} given twice")
        properties[key] = _property(key, entry, what)
        if entry.get("required") is True or str(entry.get("required")).lower() == "true":
            required.append(key)
    for key in required_keys:
        name = snake_case(key, f"schema: required {what}") if isinstance(key, str) else key
        if name not in properties:
            raise ValueError(f"invalid schema: required key {key!r} is not a {what}")
        required += [name] if name not in required else []
    return properties, required


def _entries(params: Any, required_keys: Any, what: str) -> tuple[list[Any], list[Any]]:
    # The flat list we ask for, or the dict forms models write anyway: a JSON Schema, or {name: spec or type word}.
    required_keys = required_keys or []
    if not isinstance(required_keys, list):
        raise ValueError(f"invalid schema: required must be a list, got {required_keys!r}")
    if params is None:
        return [], required_keys
    if isinstance(params, list):
        return params, required_keys
    if isinstance(params, dict):
        if isinstance(params.get("properties"), dict):
            extra = params.get("required") or []
            if not isinstance(extra, list):
                raise ValueError(f"invalid schema: required must be a list, got {extra!r}")
            required_keys, params = required_keys + extra, params["properties"]
        return [{"name": k, **v} if isinstance(v, dict) else {"name": k, "type": v} for k, v in params.items()], \
            required_keys
    raise ValueError(f"invalid schema: {what}s must be a list, got {str(params)[:80]!r}")


def _property(key: str, entry: dict[str, Any], what: str) -> dict[str, Any]:
    kind = entry.get("type")
    if not isinstance(kind, str) or kind.strip().lower() not in _TYPES:
        raise ValueError(f"invalid schema: {what} {key!r} has unknown type {kind!r}")
    prop = dict(_TYPES[kind.strip().lower()])
    if isinstance(entry.get("description"), str) and entry["description"].strip():
        prop["description"] = " ".join(entry["description"].split())
    items = entry.get("items")
    if prop["type"] == "array" and items:
        item_kind = items.get("type") if isinstance(items, dict) else items
        if not isinstance(item_kind, str) or item_kind.strip().lower() not in _TYPES:
            raise ValueError(f"invalid schema: items of {what} {key!r} have unknown type {item_kind!r}")
        prop["items"] = dict(_TYPES[item_kind.strip().lower()])
    enum = entry.get("enum")
    if enum not in (None, []):
        type_check = jsonschema.Draft202012Validator({"type": prop["type"]})
        if not isinstance(enum, list) or not all(type_check.is_valid(v) for v in enum):
            raise ValueError(f"invalid schema: enum {enum!r} of {what} {key!r} does not match its type {kind!r}")
        prop["enum"] = list(dict.fromkeys(enum))
    return prop


# ----------------------------------------------------------------------------------------------------------------
# near duplicates

_DIM = 2048  # hashed trigram dims: collisions add noise far below a 0.85 threshold; 20k tools take 160 MB


def signature(spec: ToolSpec) -> str:
    """What near-duplicate detection compares: name words, description, parameter names."""
    params = " ".join(spec.input_schema.get("properties", {}) or {})
    return f"{spec.name} {spec.description} {params}"


def _trigrams(text: str) -> np.ndarray:
    text = " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "
    vector = np.zeros(_DIM, dtype=np.float32)
    for i in range(len(text) - 2):
        vector[zlib.crc32(text[i:i + 3].encode()) % _DIM] += 1.0
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def similarity(a: str, b: str) -> float:
    """Cosine of the character-trigram counts of two texts (case and punctuation ignored)."""
    return float(_trigrams(a) @ _trigrams(b))


def near_duplicates(texts: Sequence[str], threshold: float, protected: int = 0,
                    block: int = 512) -> dict[int, tuple[int, float]]:
    """{index: (earlier kept index, similarity)} for every text that nearly repeats a kept one, greedily in order.

    The first `protected` texts (an existing repository) are always kept. Rows are compared in blocks, so memory
    is (block, n) floats beside the (n, 2048) vectors.
    """
    n = len(texts)
    if n == 0:
        return {}
    vectors = np.stack([_trigrams(t) for t in texts])  # (n, D)
    removed: dict[int, tuple[int, float]] = {}
    for start in range(0, n, block):
        sims = vectors[start:start + block] @ vectors[start:].T  # (b, n - start): row i against i and later
        for r in range(sims.shape[0]):
            i = start + r
            if i in removed:
                continue
            for j in np.nonzero(sims[r, r + 1:] >= threshold)[0] + i + 1:
                if j >= protected and j not in removed:
                    removed[int(j)] = (i, float(sims[r, j - start]))
    return removed


# ----------------------------------------------------------------------------------------------------------------
# the whole evolution


async def evolve_tools(llm: LLMClient, config: EvolveConfig | None = None, *,
                       existing: Sequence[ToolSpec] = ()) -> EvolutionResult:
    """Evolve tools category -> domain -> tools; `existing` tools (a repository so far) keep their names and win."""
    config = config or EvolveConfig()
    before = {stage: dict(u) for stage, u in getattr(llm, "usage", {}).items()}
    stats = EvolveStats(categories=len(config.categories))
    failed_per_category = [[] for _ in config.categories]
    domain_lists = await asyncio.gather(*(_propose_domains(llm, c, config, f)
                                          for c, f in zip(config.categories, failed_per_category)))
    hierarchy = dict(zip(config.categories, domain_lists))
    pairs = [(c, d) for c, domains in hierarchy.items() for d in domains]
    failed_per_domain = [[] for _ in pairs]
    proposals = await asyncio.gather(*(_propose_tools(llm, c, d, config, f)
                                       for (c, d), f in zip(pairs, failed_per_domain)))
    stats.failed_calls = [m for f in failed_per_category + failed_per_domain for m in f]
    stats.domains = len(pairs)

    rejected: list[tuple[Candidate, str]] = []
    built: list[tuple[Candidate, ToolSpec]] = []
    for candidate in (c for batch in proposals for c in batch):  # in category, domain, LLM order: deterministic
        try:
            built.append((candidate, build_tool(candidate)))
        except ValueError as e:
            rejected.append((candidate, str(e)))
    stats.candidates = len(built) + len(rejected)

    texts = [signature(t) for t in existing] + [signature(spec) for _, spec in built]
    repeats = near_duplicates(texts, config.near_duplicate_threshold, protected=len(existing))
    names = [t.name for t in existing] + [spec.name for _, spec in built]
    taken = {t.name for t in existing}
    tools: list[ToolSpec] = []
    for k, (candidate, spec) in enumerate(built, start=len(existing)):
        if k in repeats:
            kept, sim = repeats[k]
            rejected.append((candidate, f"near duplicate: of {names[kept]!r} (similarity {sim:.2f})"))
            continue
        if spec.name in taken:
            prefixed = snake_case(f"{candidate.domain} {spec.name}")[:64]  # _clean_domain capped it at 60
            if prefixed in taken:
                rejected.append((candidate, f"duplicate name: {spec.name!r} and {prefixed!r} are taken"))
                continue
            spec = replace(spec, name=prefixed)  # raw keeps the name the LLM gave
            stats.renamed += 1
        taken.add(spec.name)
        tools.append(spec)

    stats.accepted = len(tools)
    stats.rejected = dict(Counter(reason.split(":", 1)[0] for _, reason in rejected))
    stats.usage = {s: u for s, u in usage_delta(before, getattr(llm, "usage", {})).items()
                   if s.startswith("evolve/")}
    log.info("evolved %d tools from %d candidates in %d domains (%d rejected, %d LLM calls failed)",
             len(tools), stats.candidates, stats.domains, len(rejected), len(stats.failed_calls))
    return EvolutionResult(tools=tools, rejected=rejected, hierarchy=hierarchy, stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# the repository on disk


def save_tools(tools: Sequence[ToolSpec], path: str | Path) -> None:
    """Write tools as JSONL (one `ToolSpec.to_json` per line), atomically: a crash leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for tool in tools:
            f.write(tool.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tools(path: str | Path) -> list[ToolSpec]:
    """Read a JSONL tool repository; ValueError naming the file and line of a bad record."""
    tools = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                tools.append(ToolSpec.from_json(line))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{number}: not a tool spec: {e}") from e
    return tools
