"""LLMClient against a real local HTTP server whose replies each test scripts: retries, repair, re-ask, cache."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from openk2.agentic.llm import (
    LLMClient,
    LLMConfig,
    LLMOutputError,
    LLMRequestError,
    ResponseCache,
    extract_json_object,
    usage_delta,
)

# ----------------------------------------------------------------------------------------------------------------
# the scripted server (also used by tests/agentic/test_evolve.py)


@dataclass
class FakeReply:
    """What the fake server answers to one request."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    status: int = 200
    delay_s: float = 0.0
    finish_reason: str = "stop"
    headers: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 10
    completion_tokens: int = 5


class FakeOpenAIServer:
    """A real uvicorn server speaking POST /v1/chat/completions; replies come from a script or a responder."""

    def __init__(self, responder: Callable[[dict[str, Any]], FakeReply] | None = None):
        self.responder = responder
        self.replies: collections.deque[FakeReply] = collections.deque()
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        app = FastAPI()
        app.post("/v1/chat/completions")(self._complete)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def script(self, *replies: FakeReply) -> None:
        self.replies.extend(replies)

    def reset(self) -> None:
        self.responder = None
        self.replies.clear()
        self.requests.clear()
        self.in_flight = self.max_in_flight = 0

    async def _complete(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = self.replies.popleft() if self.replies else (self.responder(body) if self.responder else None)
            if reply is None:
                return JSONResponse({"error": {"message": "script exhausted"}}, status_code=500)
            await asyncio.sleep(reply.delay_s)
            if reply.status != 200:
                return JSONResponse({"error": {"message": f"scripted {reply.status}"}}, status_code=reply.status,
                                    headers=reply.headers)
            message: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            return JSONResponse({
                "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens}})
        finally:
            self.in_flight -= 1

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("FakeOpenAIServer did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer() as s:
        yield s


@pytest.fixture
def fake(server):
    server.reset()
    return server


def client_for(server: FakeOpenAIServer, **overrides: Any) -> LLMClient:
    settings = {"base_url": server.url, "model": "fake-model", "backoff_s": 0.01, "timeout_s": 5.0} | overrides
    return LLMClient(LLMConfig(**settings))


def run(llm: LLMClient, coro: Any) -> Any:
    """asyncio.run(coro), then close the client's HTTP pool inside the same loop."""

    async def main():
        try:
            return await coro
        finally:
            await llm.aclose()

    return asyncio.run(main())


USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "required": ["city", "days"],
          "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}}}


# ----------------------------------------------------------------------------------------------------------------
# chat


def test_chat_returns_the_message_and_counts_tokens(fake):
    fake.script(FakeReply("hello", prompt_tokens=7, completion_tokens=3))
    llm = client_for(fake)
    result = run(llm, llm.chat(USER, temperature=0.2, max_tokens=20, seed=5, stage="greet"))
    assert result.message == {"role": "assistant", "content": "hello"}
    assert (result.finish_reason, result.cached, result.usage) == ("stop", False, {"prompt_tokens": 7,
                                                                                    "completion_tokens": 3})
    sent = fake.requests[0]
    assert (sent["model"], sent["temperature"], sent["max_tokens"], sent["seed"]) == ("fake-model", 0.2, 20, 5)
    assert llm.usage == {"greet": {"prompt_tokens": 7, "completion_tokens": 3, "calls": 1, "cached_calls": 0,
                                   "failures": 0, "retries": 0}}


def test_chat_keeps_tool_calls_and_sends_tools(fake):
    call = {"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
    fake.script(FakeReply(None, tool_calls=[call], finish_reason="tool_calls"))
    tools = [{"type": "function", "function": {"name": "get_time", "description": "now",
                                               "parameters": {"type": "object", "properties": {}}}}]
    llm = client_for(fake)
    result = run(llm, llm.chat(USER, tools=tools, tool_choice="auto", stage="s"))
    assert result.message["tool_calls"] == [call]
    assert result.message["content"] is None and result.finish_reason == "tool_calls"
    assert fake.requests[0]["tools"] == tools and fake.requests[0]["tool_choice"] == "auto"


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_statuses_are_retried(fake, status):
    fake.script(FakeReply(status=status), FakeReply(status=status), FakeReply("ok"))
    llm = client_for(fake)
    assert run(llm, llm.chat(USER, stage="s")).content == "ok"
    assert len(fake.requests) == 3
    assert llm.usage["s"]["retries"] == 2 and llm.usage["s"]["calls"] == 1 and llm.usage["s"]["failures"] == 0


def test_retry_after_is_honoured(fake):
    fake.script(FakeReply(status=429, headers={"retry-after-ms": "300"}), FakeReply("ok"))
    start = time.monotonic()
    llm = client_for(fake)
    assert run(llm, llm.chat(USER, stage="s")).content == "ok"
    assert time.monotonic() - start >= 0.3


def test_gives_up_after_max_retries(fake):
    fake.script(*[FakeReply(status=500)] * 3)
    llm = client_for(fake, max_retries=2)
    with pytest.raises(LLMRequestError, match="after 3 attempt"):
        run(llm, llm.chat(USER, stage="s"))
    assert len(fake.requests) == 3
    assert llm.usage["s"]["failures"] == 1 and llm.usage["s"]["retries"] == 2 and llm.usage["s"]["calls"] == 0


def test_client_errors_are_not_retried(fake):
    fake.script(FakeReply(status=400), FakeReply("never sent"))
    llm = client_for(fake)
    with pytest.raises(LLMRequestError, match="BadRequestError"):
        run(llm, llm.chat(USER, stage="s"))
    assert len(fake.requests) == 1


def test_a_slow_reply_times_out_and_is_retried(fake):
    fake.script(FakeReply("late", delay_s=1.0), FakeReply("on time"))
    llm = client_for(fake, timeout_s=0.25)
    assert run(llm, llm.chat(USER, stage="s")).content == "on time"
    assert llm.usage["s"]["retries"] == 1


def test_concurrency_is_bounded(fake):
    fake.responder = lambda body: FakeReply("x", delay_s=0.1)
    llm = client_for(fake, max_concurrency=3)

    async def many():
        return await asyncio.gather(*(llm.chat([{"role": "user", "content": f"q{i}"}], stage="s")
                                      for i in range(12)))

    assert len(run(llm, many())) == 12
    assert fake.max_in_flight == 3


def test_the_client_survives_several_event_loops(fake):
    fake.responder = lambda body: FakeReply("x")
    llm = client_for(fake)
    for i in range(2):
        assert run(llm, llm.chat([{"role": "user", "content": str(i)}], stage="s")).content == "x"


# ----------------------------------------------------------------------------------------------------------------
# json


@pytest.mark.parametrize("reply, expected", [
    ('Sure! Here it is:\n```json\n{"a": 1, "b": [1, 2]}\n```\nAnything else?', {"a": 1, "b": [1, 2]}),
    ("{'a': 'say \"hi\"', 'b': True, 'c': None,}", {"a": 'say "hi"', "b": True, "c": None}),
    ('{"a": 1, "b": [1, 2,], }', {"a": 1, "b": [1, 2]}),
    ('{"a": "line\nbreak", "b": "don\'t"}', {"a": "line\nbreak", "b": "don't"}),
    ('Use {name} here. Answer: {"ok": true} then {"no": 1}', {"ok": True}),
    ('```json\n{"t": [{"n": "x", "d": "y"}, {"n": "z", "d": "w', {"t": [{"n": "x", "d": "y"}, {"n": "z", "d": "w"}]}),
    ('{"t": [{"n": "x", "d": "y"}, {"n": "z", "d":', {"t": [{"n": "x", "d": "y"}, {"n": "z"}]}),
])
def test_extract_json_object_repairs_what_is_cheap(reply, expected):
    assert extract_json_object(reply) == expected


@pytest.mark.parametrize("reply", ["no json here", "[1, 2]", '{"a": ]'])
def test_extract_json_object_says_why_there_is_none(reply):
    with pytest.raises(ValueError, match="JSON"):
        extract_json_object(reply)


def test_json_from_fenced_prose_in_one_call(fake):
    fake.script(FakeReply('Here you go:\n```json\n{"city": "Oslo", "days": 3}\n```'))
    llm = client_for(fake)
    assert run(llm, llm.json([{"role": "user", "content": "plan a trip"}], SCHEMA, stage="plan")) == \
        {"city": "Oslo", "days": 3}
    prompt = fake.requests[0]["messages"][-1]["content"]
    assert prompt.startswith("plan a trip") and "JSON Schema" in prompt and '"days"' in prompt
    assert len(fake.requests) == 1


def test_json_repairs_a_truncated_reply_without_asking_again(fake):
    fake.script(FakeReply("{'city': 'Oslo', 'days': 3, 'notes': ['bring a coat',", finish_reason="length"))
    llm = client_for(fake)
    assert run(llm, llm.json(USER, SCHEMA, stage="s")) == {"city": "Oslo", "days": 3, "notes": ["bring a coat"]}
    assert len(fake.requests) == 1


def test_json_reasks_with_the_validation_error(fake):
    fake.script(FakeReply('{"city": "Oslo", "days": 0}'), FakeReply('{"city": "Oslo", "days": 2}'))
    llm = client_for(fake)
    assert run(llm, llm.json(USER, SCHEMA, stage="s")) == {"city": "Oslo", "days": 2}
    reask = fake.requests[1]["messages"]
    assert reask[-2] == {"role": "assistant", "content": '{"city": "Oslo", "days": 0}'}
    assert "at days: 0 is less than the minimum of 1" in reask[-1]["content"]
    assert llm.usage["s"]["calls"] == 2 and llm.usage["s"]["failures"] == 0


def test_json_gives_up_with_the_last_raw_text(fake):
    fake.script(FakeReply("I cannot do that."), FakeReply('{"city": 5}'), FakeReply("still no"))
    llm = client_for(fake)
    with pytest.raises(LLMOutputError) as info:
        run(llm, llm.json(USER, SCHEMA, stage="s", max_attempts=3))
    assert info.value.raw == "still no" and len(info.value.errors) == 3
    assert "no JSON object" in info.value.errors[0] and "'days' is a required property" in info.value.errors[1]
    assert llm.usage["s"]["failures"] == 1 and llm.usage["s"]["calls"] == 3


def test_json_rejects_an_invalid_schema(fake):
    llm = client_for(fake)
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        run(llm, llm.json(USER, {"type": "wibble"}, stage="s"))
    assert fake.requests == []


def test_json_mode_asks_the_server_for_json(fake):
    fake.script(FakeReply('{"city": "Oslo", "days": 1}'))
    llm = client_for(fake, json_mode=True)
    run(llm, llm.json(USER, SCHEMA, stage="s", schema_in_prompt=False))
    assert fake.requests[0]["response_format"] == {"type": "json_object"}
    assert "JSON Schema" not in fake.requests[0]["messages"][-1]["content"]


# ----------------------------------------------------------------------------------------------------------------
# the cache and accounting


def test_cache_answers_a_rerun_from_another_client(fake, tmp_path):
    fake.responder = lambda body: FakeReply("fresh", prompt_tokens=4, completion_tokens=2)
    first = client_for(fake, cache_dir=str(tmp_path))
    assert not run(first, first.chat(USER, seed=1, stage="s")).cached
    second = client_for(fake, cache_dir=str(tmp_path))
    again = run(second, second.chat(USER, seed=1, stage="s"))
    assert again.cached and again.content == "fresh" and again.usage == {"prompt_tokens": 4, "completion_tokens": 2}
    assert len(fake.requests) == 1
    assert second.usage["s"] == {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "cached_calls": 1,
                                 "failures": 0, "retries": 0}
    assert not run(second, second.chat(USER, seed=2, stage="s")).cached  # another seed is another request
    assert not run(second, second.chat(USER, seed=1, temperature=0.0, stage="s")).cached
    assert len(fake.requests) == 3


def test_failed_requests_are_not_cached(fake, tmp_path):
    fake.script(FakeReply(status=400))
    llm = client_for(fake, cache_dir=str(tmp_path))
    with pytest.raises(LLMRequestError):
        run(llm, llm.chat(USER, stage="s"))
    assert len(llm.cache) == 0


def test_a_killed_run_keeps_every_response_it_received(fake, tmp_path):
    fake.responder = lambda body: FakeReply(f"answer to {body['messages'][0]['content']}")
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from openk2.agentic.llm import LLMClient, LLMConfig
        llm = LLMClient(LLMConfig(base_url={fake.url!r}, model="fake-model", cache_dir={str(tmp_path)!r}))
        for q in ("a", "b"):
            asyncio.run(llm.chat([{{"role": "user", "content": q}}], stage="s"))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    llm = client_for(fake, cache_dir=str(tmp_path))
    results = [run(llm, llm.chat([{"role": "user", "content": q}], stage="s")) for q in ("a", "b")]
    assert [(r.cached, r.content) for r in results] == [(True, "answer to a"), (True, "answer to b")]
    assert len(fake.requests) == 2


def test_cache_key_covers_the_whole_request(tmp_path):
    base = {"model": "m", "messages": USER, "temperature": 0.7, "max_tokens": 8}
    keys = {ResponseCache.key(base), ResponseCache.key(base | {"seed": 1}), ResponseCache.key(base | {"model": "n"}),
            ResponseCache.key(base | {"tools": []}), ResponseCache.key(dict(reversed(base.items())))}
    assert len(keys) == 4  # key order does not matter, everything else does


def test_usage_is_kept_per_stage_and_deltas_subtract(fake):
    fake.responder = lambda body: FakeReply("x", prompt_tokens=3, completion_tokens=1)
    llm = client_for(fake)

    async def spend():
        await llm.chat(USER, stage="a")
        before = llm.usage
        await asyncio.gather(llm.chat([{"role": "user", "content": "1"}], stage="a"),
                             llm.chat([{"role": "user", "content": "2"}], stage="b"))
        return before, llm.usage

    before, after = run(llm, spend())
    assert after["a"]["calls"] == 2 and after["a"]["prompt_tokens"] == 6 and after["b"]["completion_tokens"] == 1
    assert usage_delta(before, after) == {
        "a": {"prompt_tokens": 3, "completion_tokens": 1, "calls": 1, "cached_calls": 0, "failures": 0, "retries": 0},
        "b": {"prompt_tokens": 3, "completion_tokens": 1, "calls": 1, "cached_calls": 0, "failures": 0, "retries": 0}}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_concurrency"):
        LLMConfig(base_url="http://x/v1", model="m", max_concurrency=0)
    with pytest.raises(ValueError, match="base_url and model"):
        LLMConfig(base_url="", model="m")


def test_stage_must_be_named(fake):
    llm = client_for(fake)
    with pytest.raises(ValueError, match="stage"):
        run(llm, llm.chat(USER, stage=""))
