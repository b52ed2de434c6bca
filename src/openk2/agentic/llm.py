"""LLM access for agentic synthesis through any OpenAI-compatible endpoint (paper §3.1.1, spec §4; issue 6 item 1).

Every synthesis stage (domains, tools, agents, tasks, user and tool simulation, judging) talks to a model through
one `LLMClient`: ours, vLLM or a hosted API, all reached with the official `openai` client. What it adds:

    concurrency  an asyncio.Semaphore bounds the requests in flight (held during the request, not the backoff)
    retries      connection errors, timeouts, 408/409/429/5xx and malformed bodies are retried with exponential
                 backoff and jitter, honouring Retry-After; the openai client's own retries are off so the
                 count (and the `retries` usage field) is ours
    cache        responses are stored in SQLite (stdlib) keyed by a hash of (model, messages, tools, params, seed);
                 each response is committed on arrival (WAL journal), so a killed run loses nothing and a rerun
                 is answered from disk
    json         `json()` extracts the first JSON object from a reply (prose, ```json fences), repairs what is
                 cheap to repair, validates it against a JSON Schema and re-asks with the error when invalid
    usage        tokens, calls, cache hits, retries and failures per named stage (`client.usage`)

The defaults (8 in flight, 4 retries, 0.5 s base backoff capped at 30 s, 3 JSON attempts) are ours: the paper
gives no numbers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import jsonschema
import openai


@dataclass
class LLMConfig:
    """Where the model is and how to call it; every default is ours (the paper gives none)."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1 for `openk2 serve` or vLLM
    model: str
    api_key: str = "none"  # local servers ignore it; the openai client requires one
    max_concurrency: int = 8
    max_retries: int = 4  # retries after the first attempt, so at most max_retries + 1 requests per call
    backoff_s: float = 0.5  # first retry waits about this long, doubling each time
    max_backoff_s: float = 30.0
    timeout_s: float = 120.0  # per request; a 135M model on CPU needs seconds, not minutes
    temperature: float = 0.7
    max_tokens: int = 512
    cache_dir: str | None = None  # None: no cache
    json_mode: bool = False  # also send response_format={"type": "json_object"} (vLLM and hosted APIs honour it)

    def __post_init__(self) -> None:
        if not self.base_url or not self.model:
            raise ValueError(f"LLMConfig needs base_url and model, got {self.base_url!r} and {self.model!r}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"backoff_s, max_backoff_s must be >= 0 and timeout_s > 0, got "
                             f"{self.backoff_s}, {self.max_backoff_s}, {self.timeout_s}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class ChatResult:
    """One assistant turn: the OpenAI-format message (tool_calls kept), why it stopped, tokens, whether cached."""

    message: dict[str, Any]
    finish_reason: str | None
    usage: dict[str, int]  # prompt_tokens, completion_tokens as the server reported them
    cached: bool

    @property
    def content(self) -> str:
        return self.message.get("content") or ""


@dataclass
class StageUsage:
    """What one stage spent: tokens the server counted, answered calls, cache hits, retries, calls given up."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0  # answered by the endpoint (cache hits are not calls: they spend no tokens)
    cached_calls: int = 0
    failures: int = 0  # chat calls out of retries, json calls out of attempts
    retries: int = 0


class LLMRequestError(RuntimeError):
    """The endpoint did not answer: retries exhausted, or a status that retrying cannot fix (400, 401, 404)."""


class LLMOutputError(ValueError):
    """The model's replies never became a valid JSON object; `raw` is the last reply, `errors` one per attempt."""

    def __init__(self, stage: str, raw: str, errors: list[str]):
        super().__init__(f"stage {stage!r}: no valid JSON after {len(errors)} attempt(s); last error: {errors[-1]}; "
                         f"last reply: {raw[:200]!r}")
        self.stage = stage
        self.raw = raw
        self.errors = errors


# ----------------------------------------------------------------------------------------------------------------
# JSON out of model text


def extract_json_object(text: str) -> dict[str, Any]:
    """The first JSON object in a model's reply, repaired if cheap; ValueError saying why there is none."""
    if not isinstance(text, str):
        raise TypeError(f"reply must be a string, got {type(text).__name__}")
    fenced = re.search(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)(?:```|$)", text, re.DOTALL)
    body = fenced.group(1) if fenced and "{" in fenced.group(1) else text
    starts = [m.start() for m in re.finditer(r"\{", body)][:8]  # prose may hold stray braces before the object
    if not starts:
        raise ValueError("no JSON object in the reply")
    decoder = json.JSONDecoder()
    first_error = ""
    for start in starts:  # repair before moving on: an object cut short still holds complete objects inside it
        try:
            value = decoder.raw_decode(body, start)[0]
        except json.JSONDecodeError:
            try:
                value = repair_json(body[start:])
            except ValueError as e:
                first_error = first_error or str(e)
                continue
        if isinstance(value, dict):
            return value
    raise ValueError(f"the reply's JSON does not parse, even repaired: {first_error}")


def repair_json(text: str) -> Any:
    """Parse JSON after the fixes small models need: single quotes, Python literals, trailing commas, truncation.

    One pass tracks strings and the bracket stack; the first complete top-level value ends the scan (prose after
    it is ignored). A reply cut off by max_tokens is closed as it stands, or else at its last comma (the element
    being written when it was cut is dropped).
    """
    out: list[str] = []
    closers: list[str] = []
    cuts: list[tuple[int, list[str]]] = []  # (len(out), closers) at each comma outside strings
    quote: str | None = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote is not None:
            if c == "\\" and i + 1 < n:
                out.append("'" if (quote == "'" and text[i + 1] == "'") else c + text[i + 1])
                i += 2
                continue
            if c == quote:
                out.append('"')
                quote = None
            elif c == '"':
                out.append('\\"')  # a double quote inside a single-quoted string
            elif c == "\n":
                out.append("\\n")  # JSON strings may not hold raw newlines; models write them anyway
            elif c == "\t":
                out.append("\\t")
            else:
                out.append(c)
            i += 1
            continue
        if c in "\"'":
            quote = c
            out.append('"')
        elif c in "{[":
            closers.append("}" if c == "{" else "]")
            out.append(c)
        elif c in "}]":
            _drop_trailing_comma(out)
            if not closers or closers[-1] != c:
                raise ValueError(f"unbalanced {c!r} at offset {i}")
            closers.pop()
            out.append(c)
            if not closers:
                break
        elif c == ",":
            cuts.append((len(out), list(closers)))
            out.append(c)
        elif c.isalpha():
            word = re.match(r"[A-Za-z_]+", text[i:]).group(0)
            out.append({"True": "true", "False": "false", "None": "null"}.get(word, word))
            i += len(word)
            continue
        else:
            out.append(c)
        i += 1
    if quote is not None:
        out.append('"')
    attempts = [(len(out), closers)] + list(reversed(cuts[-4:]))  # as it stands, then back to the last commas
    error: json.JSONDecodeError | None = None
    for end, stack in attempts:
        head = out[:end]
        _drop_trailing_comma(head)
        try:
            return json.loads("".join(head) + "".join(reversed(stack)))
        except json.JSONDecodeError as e:
            error = error or e
    raise ValueError(f"unrepairable JSON: {error}")


def _drop_trailing_comma(out: list[str]) -> None:
    j = len(out) - 1
    while j >= 0 and out[j].isspace():
        j -= 1
    if j >= 0 and out[j] == ",":
        del out[j]


def _schema_errors(validator: jsonschema.protocols.Validator, value: Any) -> str | None:
    errors = sorted(validator.iter_errors(value), key=jsonschema.exceptions.relevance)
    if not errors:
        return None
    return "; ".join(f"at {'/'.join(map(str, e.absolute_path)) or 'top level'}: {e.message}" for e in errors[:3])


# ----------------------------------------------------------------------------------------------------------------
# the response cache


class ResponseCache:
    """Responses on disk in SQLite: one committed row per response, so a killed run keeps all it received."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used from whichever thread runs the event loop; the lock keeps that safe.
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers and several writer processes share the file
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a killed process; a power cut may lose the tail
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._lock = threading.Lock()

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ----------------------------------------------------------------------------------------------------------------
# the client

_RETRY_STATUSES = {408, 409, 429}  # and every 5xx: what the openai client itself would retry


def _retryable(error: Exception) -> bool:
    if isinstance(error, (openai.APIConnectionError, openai.APIResponseValidationError, _EmptyReply)):
        return True  # APITimeoutError is an APIConnectionError
    return isinstance(error, openai.APIStatusError) and (error.status_code in _RETRY_STATUSES
                                                         or error.status_code >= 500)


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    if response is None:
        return None
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(response.headers[header]) * scale
        except (KeyError, ValueError):
            continue
    return None


class _EmptyReply(Exception):
    """A 200 whose body holds no choices."""


class LLMClient:
    """Async chat and validated JSON through an OpenAI-compatible endpoint, with retries, a cache and accounting."""

    def __init__(self, config: LLMConfig):
        self.config = config
        self.cache = ResponseCache(Path(config.cache_dir) / "responses.sqlite") if config.cache_dir else None
        self._stages: dict[str, StageUsage] = {}
        self._jitter = random.Random()  # only spreads retries in time; no result depends on it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._stale: list[openai.AsyncOpenAI] = []

    @property
    def usage(self) -> dict[str, dict[str, int]]:
        """{stage: {prompt_tokens, completion_tokens, calls, cached_calls, failures, retries}}."""
        return {stage: asdict(u) for stage, u in self._stages.items()}

    def stage_usage(self, stage: str) -> StageUsage:
        if not isinstance(stage, str) or not stage:
            raise ValueError(f"stage must be a non-empty string, got {stage!r}")
        return self._stages.setdefault(stage, StageUsage())

    async def chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                   tool_choice: str | dict[str, Any] | None = None, temperature: float | None = None,
                   max_tokens: int | None = None, seed: int | None = None,
                   response_format: dict[str, Any] | None = None, stage: str) -> ChatResult:
        """One assistant turn for `messages` (OpenAI format), from the cache when this exact request was answered."""
        usage = self.stage_usage(stage)
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"messages must be a non-empty list of OpenAI messages, got {messages!r}")
        request: dict[str, Any] = {
            "model": self.config.model, "messages": messages,
            "temperature": self.config.temperature if temperature is None else temperature,
            "max_tokens": self.config.max_tokens if max_tokens is None else max_tokens,
        }
        for name, value in (("tools", tools), ("tool_choice", tool_choice), ("seed", seed),
                            ("response_format", response_format)):
            if value is not None:
                request[name] = value
        key = ResponseCache.key(request) if self.cache is not None else ""
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            usage.cached_calls += 1
            return ChatResult(cached=True, **hit)
        completion = await self._send(request, usage, stage)
        choice = completion.choices[0]
        message = choice.message.model_dump(exclude_none=True)
        message.setdefault("content", None)  # an assistant turn with only tool calls still has content: null
        tokens = {"prompt_tokens": 0, "completion_tokens": 0}
        if completion.usage is not None:
            tokens = {"prompt_tokens": completion.usage.prompt_tokens or 0,
                      "completion_tokens": completion.usage.completion_tokens or 0}
        usage.calls += 1
        usage.prompt_tokens += tokens["prompt_tokens"]
        usage.completion_tokens += tokens["completion_tokens"]
        result = {"message": message, "finish_reason": choice.finish_reason, "usage": tokens}
        if self.cache is not None:
            self.cache.put(key, result)
        return ChatResult(cached=False, **result)

    async def json(self, messages: list[dict[str, Any]], schema: dict[str, Any], *, stage: str, max_attempts: int = 3,
                   temperature: float | None = None, max_tokens: int | None = None, seed: int | None = None,
                   schema_in_prompt: bool = True) -> dict[str, Any]:
        """A JSON object valid under `schema`: extracted, repaired if cheap, else re-asked with the error.

        The instruction to answer in JSON (with the schema, unless `schema_in_prompt` is False because the
        prompt already shows an example) is appended to the last user turn, where every chat template puts it.
        """
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as e:
            raise ValueError(f"schema for stage {stage!r} is not a valid JSON Schema: {e.message}") from e
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        validator = jsonschema.Draft202012Validator(schema)
        instruction = "Reply with one JSON object and nothing else."
        if schema_in_prompt:
            instruction += f" It must validate against this JSON Schema: {json.dumps(schema, separators=(',', ':'))}"
        convo = _with_instruction(messages, instruction)
        response_format = {"type": "json_object"} if self.config.json_mode else None
        errors: list[str] = []
        raw = ""
        for _ in range(max_attempts):
            result = await self.chat(convo, temperature=temperature, max_tokens=max_tokens, seed=seed,
                                     response_format=response_format, stage=stage)
            raw = result.content
            try:
                value = extract_json_object(raw)
                problem = _schema_errors(validator, value)
            except ValueError as e:
                problem = str(e)
            if problem is None:
                return value
            errors.append(problem)
            convo = convo + [{"role": "assistant", "content": raw},
                             {"role": "user", "content": f"That reply is not valid: {problem}. "
                                                         "Reply again with only the corrected JSON object."}]
        self.stage_usage(stage).failures += 1
        raise LLMOutputError(stage, raw, errors)

    async def _send(self, request: dict[str, Any], usage: StageUsage, stage: str) -> Any:
        client, semaphore = self._bound()
        for attempt in range(self.config.max_retries + 1):
            try:
                async with semaphore:
                    completion = await client.chat.completions.create(**request)
                if not getattr(completion, "choices", None):
                    raise _EmptyReply(f"reply without choices: {str(completion)[:200]!r}")
                return completion
            except (openai.APIError, _EmptyReply) as e:
                if not _retryable(e) or attempt == self.config.max_retries:
                    usage.failures += 1
                    raise LLMRequestError(f"stage {stage!r}: {self.config.base_url} failed after {attempt + 1} "
                                          f"attempt(s): {type(e).__name__}: {e}") from e
                usage.retries += 1
                await asyncio.sleep(self._backoff(attempt, e))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, error: Exception) -> float:
        # Equal jitter: between half and all of the exponential delay, so concurrent retries spread out.
        delay = min(self.config.backoff_s * 2**attempt, self.config.max_backoff_s)
        delay *= 0.5 + 0.5 * self._jitter.random()
        retry_after = _retry_after(error)
        return delay if retry_after is None else min(max(delay, retry_after), self.config.max_backoff_s)

    def _bound(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        # The HTTP pool and the semaphore belong to one event loop; a later asyncio.run() gets fresh ones.
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._client is not None:
                # Freed inside this loop, openai would schedule the old pool's close here, on the wrong loop;
                # kept, it is freed with this client. Call aclose() before a loop ends to avoid both.
                self._stale.append(self._client)
            self._loop = loop
            self._client = openai.AsyncOpenAI(base_url=self.config.base_url, api_key=self.config.api_key,
                                              timeout=self.config.timeout_s, max_retries=0)
            self._semaphore = asyncio.Semaphore(self.config.max_concurrency)
        return self._client, self._semaphore

    async def aclose(self) -> None:
        """Close the HTTP pool (the cache stays usable; each response was committed when it arrived)."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._client = self._loop = self._semaphore = None

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _with_instruction(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    messages = [dict(m) for m in messages]
    last = messages[-1] if messages else None
    if last is not None and last.get("role") == "user" and isinstance(last.get("content"), str):
        last["content"] = f"{last['content']}\n\n{instruction}"
    else:
        messages.append({"role": "user", "content": instruction})
    return messages


def usage_delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """What each stage spent between two `client.usage` snapshots (stages untouched in between are left out)."""
    names = [f.name for f in fields(StageUsage)]
    delta = {}
    for stage, now in after.items():
        then = before.get(stage, {})
        spent = {k: now.get(k, 0) - then.get(k, 0) for k in names}
        if any(spent.values()):
            delta[stage] = spent
    return delta
