"""A scripted OpenAI-compatible chat server for the eval tests: a tiny FastAPI app on a background uvicorn thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

# script(request body) -> {"content": str | None, "tool_calls": [{"name", "arguments": str}], "finish_reason"?}
# or {"status": int, "message": str} to answer with an HTTP error
Script = Callable[[dict[str, Any]], dict[str, Any]]


class FakeOpenAIServer:
    """Answers POST /v1/chat/completions with what SCRIPT returns for the request; records every request body."""

    def __init__(self, script: Script):
        self.script = script
        self.requests: list[dict[str, Any]] = []
        app = FastAPI()
        app.post("/v1/chat/completions")(self._chat)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        answer = self.script(body)
        if "status" in answer:
            return JSONResponse({"error": {"message": answer["message"], "type": "invalid_request_error"}},
                                status_code=answer["status"])
        calls = [{"id": f"call_{i}", "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for i, c in enumerate(answer.get("tool_calls") or [])]
        finish = answer.get("finish_reason") or ("tool_calls" if calls else "stop")
        message = {"role": "assistant", "content": answer.get("content"), "tool_calls": calls or None}
        return JSONResponse({"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                             "model": body.get("model", ""),
                             "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
