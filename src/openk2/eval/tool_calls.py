"""Tool-call quality of any served model on any tool prompts (issue 7; the K2 Vendor Verifier's checks, paper §4).

A prompt is OpenAI chat `messages` + `tools`, optionally with the calls a correct answer makes. Each is sent once
through an OpenAI-compatible endpoint (native `tools`, `tool_choice="auto"`), and the reply is scored on:

- parse rate: the fraction of replies whose every tool call has arguments that parse as a JSON object, that do not
  show the raw K2 tool-call tokens in the text (the server's parser fell back to prose), and that do make a call
  when the reference says one is required;
- schema accuracy: of the calls whose arguments parsed, the fraction naming a declared tool and valid against its
  `parameters` JSON Schema (jsonschema, Draft 2020-12);
- precision / recall / F1 of the predicted calls against the reference calls, micro-averaged over prompts that have
  references: a call matches a reference call when the names are equal and the arguments are equal as JSON values
  (object key order ignored; numbers compared by value, so 5 equals 5.0; booleans are not numbers). Parallel calls
  are matched as multisets (order ignored, each reference call matched at most once); unparseable calls never match;
- K2-Vendor-Verifier counts: finish reasons, replies whose finish reason disagrees with whether they called a tool,
  calls to undeclared tools, and the trigger precision / recall / F1 (did the model call a tool when the reference
  does).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import openai
from tqdm import tqdm

# the K2 chat template's tool-call section markers (spec §4): in the text of a reply they mean the server's tool
# parser did not recognise a call the model made
_K2_CALL_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>")


@dataclass(frozen=True)
class ToolCallPrompt:
    """One prompt: messages and tools (OpenAI format) and, optionally, the calls a correct reply makes."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    reference_calls: list[dict[str, Any]] | None = None  # [{"name", "arguments": {...}}]; [] = "call nothing"
    id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.messages, list) or not self.messages or not all(
                isinstance(m, dict) and "role" in m for m in self.messages):
            raise ValueError(f"prompt {self.id!r}: messages must be a non-empty list of role messages, "
                             f"got {self.messages!r}")
        if not isinstance(self.tools, list):
            raise ValueError(f"prompt {self.id!r}: tools must be a list of OpenAI tools, got {self.tools!r}")
        for tool in self.tools:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"prompt {self.id!r}: a tool must be {{'type': 'function', 'function': "
                                 f"{{'name': ...}}}}, got {tool!r}")
        if self.reference_calls is not None:
            if not isinstance(self.reference_calls, list):
                raise ValueError(f"prompt {self.id!r}: reference_calls must be a list, got {self.reference_calls!r}")
            for call in self.reference_calls:
                if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                        and isinstance(call.get("arguments"), dict)):
                    raise ValueError(f"prompt {self.id!r}: a reference call must be {{'name': str, 'arguments': "
                                     f"dict}}, got {call!r}")

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ToolCallPrompt:
        """From one JSONL record; reference arguments may be JSON strings, as in OpenAI `tool_calls`."""
        unknown = set(record) - {"messages", "tools", "reference_calls", "id"}
        if unknown:
            raise ValueError(f"prompt {record.get('id')!r}: unknown keys {sorted(unknown)}")
        refs = record.get("reference_calls")
        if refs is not None:
            refs = [_reference_call(c, record.get("id")) for c in refs]
        return cls(messages=record.get("messages"), tools=record.get("tools", []), reference_calls=refs,
                   id=record.get("id"))

    def declared(self) -> dict[str, dict[str, Any]]:
        """Declared tool name -> its parameters JSON Schema."""
        return {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools}


def _reference_call(call: Any, prompt_id: Any) -> Any:
    if isinstance(call, dict) and isinstance(call.get("function"), dict):  # an OpenAI tool_calls entry
        call = call["function"]
    if isinstance(call, dict) and isinstance(call.get("arguments"), str):
        try:
            return {"name": call.get("name"), "arguments": json.loads(call["arguments"])}
        except json.JSONDecodeError as e:
            raise ValueError(f"prompt {prompt_id!r}: reference arguments are not JSON: {call['arguments']!r}") from e
    return call


def load_prompts(path: str | os.PathLike) -> list[ToolCallPrompt]:
    """Read a JSONL file of {"messages", "tools", "reference_calls"?, "id"?} records."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: a record must be a JSON object, got {record!r}")
            record.setdefault("id", f"{Path(path).name}:{n}")
            prompts.append(ToolCallPrompt.from_dict(record))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


# --- asking the endpoint (also used by openk2.eval.bfcl) ---


@dataclass(frozen=True)
class ModelReply:
    """What the server answered: text, tool calls as sent (arguments still a JSON string), finish reason."""

    content: str | None
    tool_calls: list[dict[str, str]]  # [{"name", "arguments"}]
    finish_reason: str | None
    error: str | None = None  # the server refused this request (HTTP status and message); no reply then


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server: its base URL (e.g. http://localhost:8000/v1), key, per-request timeout."""

    url: str
    api_key: str | None = None  # default: $OPENAI_API_KEY, else a placeholder (a local server wants none)
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) base URL such as http://localhost:8000/v1, got {self.url!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")

    def client(self) -> openai.AsyncOpenAI:
        """A new async client; make it inside the event loop that uses it (its connections belong to that loop)."""
        key = self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        return openai.AsyncOpenAI(base_url=self.url, api_key=key, timeout=self.timeout, max_retries=1)


# the endpoint or the model is wrong for every request, not for one: stop with one line instead of scoring errors
_FATAL = (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


async def ask_all(client: openai.AsyncOpenAI, model: str, requests: list[tuple[list[dict], list[dict]]], *,
                  concurrency: int = 4, temperature: float = 0.0, max_tokens: int = 512,
                  desc: str | None = None) -> list[ModelReply]:
    """One chat completion per (messages, tools), at most CONCURRENCY in flight; replies in request order.

    With `desc`, a progress bar of that name counts the replies (a CPU-served eval takes minutes)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc=desc, unit="reply", disable=desc is None, leave=False)

    async def ask(messages: list[dict], tools: list[dict]) -> ModelReply:
        kwargs: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature,
                                  "max_tokens": max_tokens}
        if tools:  # an empty `tools` list is an error for OpenAI-compatible servers
            kwargs.update(tools=tools, tool_choice="auto")
        async with gate:
            try:
                response = await client.chat.completions.create(**kwargs)
            except _FATAL as e:
                cause = f" ({e.__cause__})" if e.__cause__ else ""
                raise ValueError(f"{client.base_url} (model {model!r}): {type(e).__name__}: {e}{cause}") from e
            except openai.APIStatusError as e:  # e.g. a prompt longer than the model's context: this item fails
                return ModelReply(None, [], None, error=e.message)  # "Error code: 400 - ..."
        if not response.choices:
            return ModelReply(None, [], None, error="the response has no choices")
        choice = response.choices[0]
        calls = [{"name": c.function.name, "arguments": c.function.arguments}
                 for c in (choice.message.tool_calls or []) if getattr(c, "function", None) is not None]
        return ModelReply(choice.message.content, calls, choice.finish_reason)

    async def counted(messages: list[dict], tools: list[dict]) -> ModelReply:
        reply = await ask(messages, tools)
        bar.update(1)
        return reply

    try:
        # a TaskGroup cancels and awaits the other requests when one fails for good
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(counted(m, t)) for m, t in requests]
    except ExceptionGroup as eg:
        raise eg.exceptions[0]  # the first failure, with the group as its context
    finally:
        bar.close()
    return [t.result() for t in tasks]


# --- scoring ---


@dataclass
class ItemQuality:
    """The verdicts on one prompt's reply."""

    id: str | None
    parsed: bool  # see the module docstring
    calls: int
    unparseable_calls: int
    schema_errors: list[str]  # one message per call that parsed but violates (or names no) declared schema
    undeclared_calls: list[str]  # names of called tools the prompt did not declare
    matched: int | None  # calls matching a reference call (None: the prompt has no references)
    references: int | None
    reply: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolCallQuality:
    """Aggregate tool-call quality over a prompt set (definitions in the module docstring)."""

    items: int
    parse_rate: float
    schema_accuracy: float | None  # None: no call parsed
    precision: float | None  # None: no prompt has references, or nothing was predicted
    recall: float | None
    f1: float | None
    trigger_precision: float | None
    trigger_recall: float | None
    trigger_f1: float | None
    finish_reasons: dict[str, int]
    finish_mismatches: int  # tool calls without finish_reason "tool_calls", or that reason without calls
    undeclared_calls: int
    request_errors: int
    details: list[ItemQuality]

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "details"}


def score_reply(prompt: ToolCallPrompt, reply: ModelReply) -> ItemQuality:
    """Score one reply against its prompt's declared tools and reference calls."""
    declared = prompt.declared()
    schema_errors, undeclared, predicted, unparseable = [], [], [], 0
    for call in reply.tool_calls:
        args = _json_object(call["arguments"])
        if args is None:
            unparseable += 1
            continue
        predicted.append((call["name"], args))
        if call["name"] not in declared:
            undeclared.append(call["name"])
            schema_errors.append(f"{call['name']}: not a declared tool")
            continue
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(declared[call["name"]]).iter_errors(args))
        if error is not None:
            schema_errors.append(f"{call['name']}: {error.message}")
    refs = prompt.reference_calls
    leaked = any(marker in (reply.content or "") for marker in _K2_CALL_MARKERS)
    parsed = reply.error is None and unparseable == 0 and not leaked and not (refs and not reply.tool_calls)
    return ItemQuality(id=prompt.id, parsed=parsed, calls=len(reply.tool_calls), unparseable_calls=unparseable,
                       schema_errors=schema_errors, undeclared_calls=undeclared,
                       matched=None if refs is None else _multiset_matches(predicted, refs),
                       references=None if refs is None else len(refs), reply=asdict(reply))


def aggregate(prompts: list[ToolCallPrompt], replies: list[ModelReply]) -> ToolCallQuality:
    """Sum per-reply verdicts into the set's rates (micro-averaged)."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    details = [score_reply(p, r) for p, r in zip(prompts, replies)]
    parsed_calls = sum(d.calls - d.unparseable_calls for d in details)
    scored = [(d, r) for d, r in zip(details, replies) if d.references is not None]
    tp = sum(d.matched for d, _ in scored)
    n_pred = sum(d.calls for d, _ in scored)  # unparseable calls were predicted too: they count against precision
    n_ref = sum(d.references for d, _ in scored)
    should = [d.references > 0 for d, _ in scored]
    did = [bool(r.tool_calls) for _, r in scored]
    trig_tp = sum(s and c for s, c in zip(should, did))
    finish = Counter(str(r.finish_reason) for r in replies if r.error is None)
    mismatches = sum(bool(r.tool_calls) != (r.finish_reason == "tool_calls") for r in replies if r.error is None)
    return ToolCallQuality(
        items=len(details), parse_rate=_ratio(sum(d.parsed for d in details), len(details)) or 0.0,
        schema_accuracy=_ratio(parsed_calls - sum(len(d.schema_errors) for d in details), parsed_calls),
        precision=_ratio(tp, n_pred), recall=_ratio(tp, n_ref), f1=_f1(tp, n_pred, n_ref),
        trigger_precision=_ratio(trig_tp, sum(did)), trigger_recall=_ratio(trig_tp, sum(should)),
        trigger_f1=_f1(trig_tp, sum(did), sum(should)), finish_reasons=dict(sorted(finish.items())),
        finish_mismatches=mismatches, undeclared_calls=sum(len(d.undeclared_calls) for d in details),
        request_errors=sum(r.error is not None for r in replies), details=details)


def evaluate_tool_calls(endpoint: Endpoint, model: str, prompts: list[ToolCallPrompt], *, concurrency: int = 4,
                        temperature: float = 0.0, max_tokens: int = 512) -> ToolCallQuality:
    """Ask MODEL every prompt at ENDPOINT and score the replies (call it outside a running event loop)."""
    if not prompts:
        raise ValueError("no prompts to evaluate")

    async def run() -> list[ModelReply]:
        async with endpoint.client() as client:
            return await ask_all(client, model, [(p.messages, p.tools) for p in prompts], concurrency=concurrency,
                                 temperature=temperature, max_tokens=max_tokens, desc="tool-calls")

    return aggregate(prompts, asyncio.run(run()))


def write_report(quality: ToolCallQuality, out_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    """OUT_DIR/results.jsonl (one line per prompt) and summary.json (the rates and the run's settings)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for d in quality.details:
            f.write(json.dumps(asdict(d), ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps({"config": config, **quality.summary()}, indent=2) + "\n")
    return out


def format_summary(quality: ToolCallQuality) -> str:
    """A few aligned lines for the terminal."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    return "\n".join([
        f"prompts           {quality.items}  (request errors {quality.request_errors})",
        f"parse rate        {pct(quality.parse_rate)}",
        f"schema accuracy   {pct(quality.schema_accuracy)}",
        f"calls P / R / F1  {pct(quality.precision)} / {pct(quality.recall)} / {pct(quality.f1)}",
        f"trigger P / R / F1 {pct(quality.trigger_precision)} / {pct(quality.trigger_recall)} / "
        f"{pct(quality.trigger_f1)}",
        f"finish reasons    {quality.finish_reasons}  (disagreeing with the calls: {quality.finish_mismatches})",
        f"undeclared calls  {quality.undeclared_calls}",
    ])


def _json_object(text: Any) -> dict[str, Any] | None:
    """The call's arguments as a JSON object, or None when they are not one (OpenAI sends them as a string)."""
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _same(a: Any, b: Any) -> bool:
    """JSON value equality: key order ignored, numbers by value, booleans distinct from numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _multiset_matches(predicted: list[tuple[str, dict]], references: list[dict[str, Any]]) -> int:
    """Predicted calls that pair off with distinct equal reference calls (greedy is exact: equality is transitive)."""
    left = list(references)
    matched = 0
    for name, args in predicted:
        for i, ref in enumerate(left):
            if ref["name"] == name and _same(ref["arguments"], args):
                del left[i]
                matched += 1
                break
    return matched


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _f1(tp: int, n_pred: int, n_ref: int) -> float | None:
    return 2 * tp / (n_pred + n_ref) if n_pred + n_ref else None
