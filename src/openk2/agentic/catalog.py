"""The built-in catalog of synthetic tools, and requests written from templates (paper §3.1.1, programmatic stages).

The paper evolves synthetic tools with an LLM (category -> domain -> tools, `evolve.py`). A small local model writes
poor tools and poorer requests, so openk2 also ships a catalog made the same way by hand: about 300 tools over ~50
domains in `catalog_tools.jsonl`, each with a JSON Schema of its input and output and a few user requests with
`{param}` placeholders ("asks"); `catalog_values.json` gives realistic values for every placeholder (a list, or a
numeric range). With it, a synthesis run needs no LLM at all (`llm.enabled = false`): the plan draws an ask and fills
it, so the request names exactly the values of the gold call.

Ask syntax: `{param}` is replaced by the value (a list reads "3, 5 and 7"); `{flag?some words}` shows the words and
sends `flag: true`. A param the chosen ask does not mention is left out of the call (only optional ones can be).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from openk2.agentic.tools import ToolSpec

CATALOG_DIR = Path(__file__).parent
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\?[^{}]*)?\}")
# an article right before a placeholder; not "a {a} b {b}", where a is a coefficient's name
_ARTICLED = re.compile(r"\b([Aa])n? (?!\{a[}?])(?=" + _PLACEHOLDER.pattern + ")")


def load_catalog(path: str | Path | None = None, values_path: str | Path | None = None) -> list[ToolSpec]:
    """The catalog's tools, `source` "synthetic:<category>/<domain>".

    `raw` keeps the whole entry plus "values": each param's value source resolved ("tool.param" before "param"), so
    a tools.jsonl written from these specs is self-contained. A param without values must have an enum.
    """
    path = Path(path) if path else CATALOG_DIR / "catalog_tools.jsonl"
    values_path = Path(values_path) if values_path else path.with_name("catalog_values.json")
    values = json.loads(values_path.read_text())
    tools = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            schema = {"type": "object", "properties": entry["params"], "required": entry.get("required", [])}
            sources = {p: values.get(f"{entry['name']}.{p}", values.get(p)) for p in entry["params"]}
            tool = ToolSpec(entry["name"], entry["description"], schema, entry.get("returns"),
                            source=f"synthetic:{entry['domain']}", raw={**entry, "values": sources})
            for ask in entry.get("asks", []):
                for param, _ in placeholders(ask):
                    if param not in entry["params"]:
                        raise ValueError(f"ask {ask!r} names {param!r}, not a parameter")
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}:{number}: bad catalog entry: {e}") from e
        tools.append(tool)
    return tools


def placeholders(ask: str) -> list[tuple[str, bool]]:
    """(param, is_flag) for each placeholder of an ask, in order."""
    return [(m.group(1), m.group(2) is not None) for m in _PLACEHOLDER.finditer(ask)]


def asks(tool: ToolSpec) -> list[str]:
    return list(tool.raw.get("asks") or [])


def draw_value(tool: ToolSpec, param: str, rng: random.Random) -> Any:
    """A realistic value for `param` of `tool`: the catalog's values, else the schema's enum; None when neither."""
    schema = tool.input_schema["properties"][param]
    source = tool.raw.get("values", {}).get(param)
    if schema.get("type") == "array":
        n = rng.randint(2, 5)
        if source is None and "enum" in schema.get("items", {}):
            return rng.sample(schema["items"]["enum"], min(n, len(schema["items"]["enum"])))
        if source is None:
            return None
        out: list[Any] = []
        for _ in range(n * 4):
            value = _one(source, schema.get("items", {}), rng)
            if value not in out:
                out.append(value)
            if len(out) == n:
                break
        return out
    if "enum" in schema:
        return rng.choice(schema["enum"])
    return None if source is None else _one(source, schema, rng)


def _one(source: Any, schema: dict[str, Any], rng: random.Random) -> Any:
    if isinstance(source, list):
        return rng.choice(source)
    lo, hi, decimals = source["min"], source["max"], int(source.get("decimals", 0))
    if decimals == 0 or schema.get("type") == "integer":
        return rng.randint(int(lo), int(hi))
    return round(rng.uniform(lo, hi), decimals)


def draw_arguments(tool: ToolSpec, rng: random.Random, known: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Arguments for a catalog tool: an ask drawn, then a value for each of its placeholders.

    `known` values (a value pool of the config, or one an earlier call sent) win over the catalog's. None when the
    tool has no asks.
    """
    options = asks(tool)
    if not options:
        return None
    ask = rng.choice(options)
    props = tool.input_schema["properties"]
    arguments: dict[str, Any] = {}
    for param, is_flag in placeholders(ask):
        if is_flag:
            arguments[param] = True
        elif known and param in known:
            arguments[param] = known[param]
        else:
            value = draw_value(tool, param, rng)
            if value is None:
                raise ValueError(f"catalog tool {tool.name!r}: no values for parameter {param!r}")
            arguments[param] = value
    return {k: arguments[k] for k in props if k in arguments}  # the schema's order, as a model writes it


def say(value: Any) -> str:
    """A value as a user says it: strings bare, lists as "a, b and c", numbers as JSON writes them."""
    if isinstance(value, list):
        items = [say(v) for v in value]
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def indefinite_article(words: str) -> str:
    """ "a" or "an" for what follows, by its first sound (roughly: "an 8 kg", "a unit", "an exotic")."""
    w = words.lower()
    if w[:1] in ("a", "e", "i", "o", "u"):
        return "a" if w.startswith(("uni", "use", "usu", "eu", "one", "once")) else "an"
    return "an" if w.startswith("8") or re.match(r"1[18](?![\d,])", w) else "a"


def render_ask(tool: ToolSpec, arguments: dict[str, Any], rng: random.Random) -> str | None:
    """The tool's request for exactly these arguments: an ask whose placeholders are the argument names, filled.

    An "a"/"an" right before a placeholder agrees with the value that fills it ("an {animal_type} vet": a cat vet).
    """
    matching = [a for a in asks(tool) if {p for p, _ in placeholders(a)} == set(arguments)]
    if not matching:
        return None
    ask = rng.choice(matching)

    def value(m: re.Match) -> str:
        return m.group(2)[1:] if m.group(2) else say(arguments[m.group(1)])

    def article(m: re.Match) -> str:
        said = indefinite_article(value(_PLACEHOLDER.match(ask, m.end())))
        return (said.capitalize() if m.group(1) == "A" else said) + " "

    return _PLACEHOLDER.sub(value, _ARTICLED.sub(article, ask))
