"""BFCL's non-live AST categories on a served model, scored by bfcl-eval's own AST checker (issue 7; paper §4).

The Berkeley Function Calling Leaderboard items ship inside the bfcl-eval package. Each item's function docs become
OpenAI `tools` the way bfcl-eval's OpenAI function-calling handler makes them (BFCL types such as dict, float, tuple
and any mapped to JSON Schema by BFCL's own table, floats flagged in the description, dots in names turned into
underscores because OpenAI's name pattern has none); the model is asked with native `tools` through an
OpenAI-compatible endpoint; the returned `tool_calls` are decoded into BFCL's format `[{name: {arg: value}}]`
(names mapped back to BFCL's) and judged by the package's `ast_checker`. Irrelevance items are correct when the
reply makes no call, as BFCL scores them. Replies are decoded and judged as bfcl-eval's eval runner does for
function-calling models, error types included.

BFCL is for measuring, never for training: its items stay inside `openk2.eval` (see `_bfcl_import`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from openk2.eval._bfcl_import import CHECKER_MODEL_NAME, BfclPackage, load_bfcl
from openk2.eval.tool_calls import Endpoint, ModelReply, ask_all

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
# bfcl-eval adds this to every Python-category function description before asking any model
_PYTHON_HINT = " Note that the provided function is in Python 3 syntax."
_FLOAT_HINT = " This is a float type value."


@dataclass(frozen=True)
class BfclItem:
    """One single-turn BFCL item: the question's messages, BFCL function docs, acceptable answers."""

    id: str
    category: str
    messages: list[dict[str, Any]]
    functions: list[dict[str, Any]]  # BFCL's own schema dialect: what the checker reads
    possible_answer: list[dict[str, Any]] | None  # [{name: {arg: [acceptable values]}}]; None for irrelevance


def load_category(category: str, limit: int | None = None, package: BfclPackage | None = None) -> list[BfclItem]:
    """The first LIMIT items (all when None) of a BFCL category, with their possible answers."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; choose from {', '.join(CATEGORIES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    package = package or load_bfcl()
    entries = _read_jsonl(package.data_dir / f"BFCL_v4_{category}.json")[:limit]
    answers: dict[str, Any] = {}
    if category != "irrelevance":
        answers = {a["id"]: a["ground_truth"]
                   for a in _read_jsonl(package.data_dir / "possible_answer" / f"BFCL_v4_{category}.json")}
    items = []
    for entry in entries:
        functions = copy.deepcopy(entry["function"])
        for f in functions:
            f["description"] = f.get("description", "") + _PYTHON_HINT
        if category != "irrelevance" and entry["id"] not in answers:
            raise ValueError(f"BFCL item {entry['id']!r} has no possible answer in the package")
        # these categories are single-turn: question[0] is the one turn's messages
        items.append(BfclItem(id=entry["id"], category=category, messages=entry["question"][0], functions=functions,
                              possible_answer=answers.get(entry["id"])))
    return items


def to_openai_tools(functions: list[dict[str, Any]], package: BfclPackage | None = None,
                    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """BFCL function docs -> (OpenAI tools, {name sent: BFCL name})."""
    type_map = (package or load_bfcl()).gorilla_to_openapi
    tools, names = [], {}
    for f in functions:
        sent = f["name"].replace(".", "_")
        if sent in names:
            raise ValueError(f"BFCL functions {names[sent]!r} and {f['name']!r} both become {sent!r}")
        names[sent] = f["name"]
        parameters = copy.deepcopy(f.get("parameters") or {})
        parameters["type"] = "object"  # BFCL writes "dict"
        parameters["properties"] = {k: _json_schema(v, type_map) for k, v in parameters.get("properties", {}).items()}
        tools.append({"type": "function",
                      "function": {"name": sent, "description": f.get("description", ""), "parameters": parameters}})
    return tools, names


def _json_schema(prop: dict[str, Any], type_map: dict[str, str], in_items: bool = False) -> dict[str, Any]:
    """One BFCL property as JSON Schema: unknown or missing types become string, as in bfcl-eval's converter."""
    out = dict(prop)
    bfcl_type = prop.get("type")
    out["type"] = type_map.get(bfcl_type, "string")
    if bfcl_type == "float" and not in_items:  # bfcl-eval flags floats on properties, not on array items
        out["format"] = "float"
        out["description"] = prop.get("description", "") + _FLOAT_HINT
    if isinstance(prop.get("properties"), dict):
        out["properties"] = {k: _json_schema(v, type_map) for k, v in prop["properties"].items()}
    if isinstance(prop.get("items"), dict):
        out["items"] = _json_schema(prop["items"], type_map, in_items=True)
    return out


@dataclass
class BfclVerdict:
    """The checker's verdict on one item's reply."""

    id: str
    category: str
    valid: bool
    error_type: str | None  # bfcl-eval's error_type, e.g. "simple_function_checker:wrong_func_name"
    error: Any  # bfcl-eval's error messages
    decoded: list[dict[str, Any]] | None  # [{name: {arg: value}}], None when the reply did not decode
    reply: dict[str, Any]


def decode_reply(reply: ModelReply, names: dict[str, str]) -> tuple[list[dict[str, Any]] | None, str | None, str]:
    """A reply's tool calls -> (BFCL's decoded calls, error type, error), as bfcl-eval decodes FC models."""
    if reply.error is not None:
        return None, "request_error", reply.error
    if not reply.tool_calls:
        if reply.content:  # bfcl-eval's decoder fails on text where it expects calls
            return None, "ast_decoder:decoder_failed", "the reply has no tool calls, only text"
        return [], None, ""
    decoded = []
    for call in reply.tool_calls:
        try:
            arguments = json.loads(call["arguments"])
        except (json.JSONDecodeError, TypeError) as e:
            return None, "ast_decoder:decoder_failed", f"arguments of {call['name']!r} are not JSON: {e}"
        decoded.append({names.get(call["name"], call["name"]): arguments})
    if not all(isinstance(next(iter(d.values())), dict) for d in decoded):
        return decoded, "ast_decoder:decoder_wrong_output_format", "arguments must be JSON objects"
    return decoded, None, ""


def check_reply(item: BfclItem, reply: ModelReply, names: dict[str, str],
                package: BfclPackage | None = None) -> BfclVerdict:
    """Judge one reply with bfcl-eval's AST checker (irrelevance: correct when no call decodes)."""
    decoded, error_type, error = decode_reply(reply, names)
    verdict = BfclVerdict(id=item.id, category=item.category, valid=False, error_type=error_type, error=error,
                          decoded=decoded, reply=asdict(reply))
    if item.category == "irrelevance":
        if error_type == "request_error":
            return verdict
        made_call = error_type is None and bool(decoded) and decoded != [{}]
        verdict.valid = not made_call
        verdict.error_type, verdict.error = (None, "") if verdict.valid else (
            "irrelevance_error:decoder_success", "Valid syntax. Successfully decode AST when it should not.")
        return verdict
    if error_type is not None:
        return verdict
    package = package or load_bfcl()
    try:
        result = package.ast_checker(item.functions, decoded, item.possible_answer, package.python, item.category,
                                     CHECKER_MODEL_NAME)
    except Exception as e:  # the checker indexes model output freely; one odd reply must not end a long run
        verdict.error_type, verdict.error = f"checker_exception:{type(e).__name__}", str(e)
        return verdict
    verdict.valid = bool(result["valid"])
    if not verdict.valid:
        verdict.error_type, verdict.error = result.get("error_type"), result.get("error")
    return verdict


@dataclass
class CategoryScore:
    """Accuracy of one category and how its failures split over error types."""

    category: str
    items: int
    correct: int
    accuracy: float
    error_types: dict[str, int]  # most frequent first


@dataclass
class BfclReport:
    """Per-category scores and every item's verdict."""

    scores: list[CategoryScore]
    verdicts: list[BfclVerdict]

    @property
    def mean_accuracy(self) -> float:
        """Unweighted mean over categories, as BFCL summarises a group of categories."""
        return sum(s.accuracy for s in self.scores) / len(self.scores)


async def _evaluate(endpoint: Endpoint, model: str, items: list[BfclItem], package: BfclPackage,
                    **ask: Any) -> list[BfclVerdict]:
    converted = [to_openai_tools(item.functions, package) for item in items]
    async with endpoint.client() as client:
        replies = await ask_all(client, model, [(item.messages, tools) for item, (tools, _) in zip(items, converted)],
                                **ask)
    return [check_reply(item, reply, names, package) for item, reply, (_, names) in zip(items, replies, converted)]


def evaluate_bfcl(endpoint: Endpoint, model: str, categories: tuple[str, ...] | list[str] = CATEGORIES,
                  limit: int | None = None, *, concurrency: int = 4, temperature: float = 0.0,
                  max_tokens: int = 512, on_category: Callable[[BfclReport], None] | None = None) -> BfclReport:
    """Ask MODEL at ENDPOINT every item of CATEGORIES (the first LIMIT of each); score with BFCL's checker.

    Categories run one after the other; `on_category` gets the report so far after each (the CLI writes it, so a
    run stopped early keeps the categories it finished).
    """
    if not categories:
        raise ValueError("no BFCL categories given")
    package = load_bfcl()
    scores: list[CategoryScore] = []
    verdicts: list[BfclVerdict] = []
    for c in categories:
        mine = asyncio.run(_evaluate(endpoint, model, load_category(c, limit, package), package,
                                     concurrency=concurrency, temperature=temperature, max_tokens=max_tokens,
                                     desc=c))
        correct = sum(v.valid for v in mine)
        errors = Counter(v.error_type for v in mine if not v.valid)
        scores.append(CategoryScore(category=c, items=len(mine), correct=correct, accuracy=correct / len(mine),
                                    error_types=dict(errors.most_common())))
        verdicts += mine
        if on_category is not None:
            on_category(BfclReport(scores=list(scores), verdicts=list(verdicts)))
    return BfclReport(scores=scores, verdicts=verdicts)


def format_table(report: BfclReport, top: int = 3) -> str:
    """category | items | accuracy | top error types, one line each, then the mean."""
    lines = [f"{'category':<18} {'items':>5} {'accuracy':>8}  top error types"]
    for s in report.scores:
        errors = ", ".join(f"{k} x{n}" for k, n in list(s.error_types.items())[:top]) or "-"
        lines.append(f"{s.category:<18} {s.items:>5} {100 * s.accuracy:>7.1f}%  {errors}")
    lines.append(f"{'mean':<18} {sum(s.items for s in report.scores):>5} {100 * report.mean_accuracy:>7.1f}%")
    return "\n".join(lines)


def write_report(report: BfclReport, out_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    """OUT_DIR/results.jsonl (every verdict with the raw reply), summary.json, plots/{accuracy,error_types}.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for v in report.verdicts:
            f.write(json.dumps(asdict(v), ensure_ascii=False, default=repr) + "\n")
    summary = {"config": config, "mean_accuracy": report.mean_accuracy,
               "categories": [asdict(s) for s in report.scores]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar([s.category for s in report.scores], [100 * s.accuracy for s in report.scores], color="tab:blue")
    ax.bar_label(bars, labels=[f"{100 * s.accuracy:.1f}% of {s.items}" for s in report.scores], fontsize=8)
    ax.set(ylabel="accuracy (%)", ylim=(0, 110), title=f"BFCL non-live AST — {config.get('model', '')}")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(out / "plots" / "accuracy.png", dpi=120)
    plt.close(fig)

    errors = [(f"{s.category}: {k}", n) for s in report.scores for k, n in s.error_types.items()]
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.3 * len(errors) + 1)))
    if errors:
        ax.barh([k for k, _ in errors][::-1], [n for _, n in errors][::-1], color="tab:red")
    else:
        ax.text(0.5, 0.5, "no errors", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="items", title="BFCL error types per category")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "plots" / "error_types.png", dpi=120)
    plt.close(fig)
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the bfcl-eval package")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
