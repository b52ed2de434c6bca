"""`openk2 chat`: a terminal chat with a model loaded in-process, tools declared from a JSON file (spec §4).

The conversation is kept as OpenAI messages. When the model calls a tool the call is shown and the user
types the tool's result (or it is read from a mock file `{"NAME": {"result": ...}}`); the model then
continues with the result in its context. `/reset` starts over, `/quit`, Ctrl-C or end of input exit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from pydantic import TypeAdapter, ValidationError

from openk2.serve.loading import ServedModel
from openk2.serve.protocol import Tool
from openk2.serve.sampling import SamplingParams
from openk2.serve.scheduler import Scheduler

MAX_TOOL_ROUNDS = 8  # model turns after one user message before the chat hands back (ours): stops call loops


def load_tools(path: str | os.PathLike) -> list[dict]:
    """A JSON file holding a list of OpenAI tools (or {"tools": [...]}), each checked as the server checks it."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    try:
        tools = TypeAdapter(list[Tool]).validate_python(data)
    except ValidationError as e:
        raise ValueError(f"{path}: not a list of OpenAI tools: {e.errors(include_url=False)[0]['msg']}") from None
    return [t.model_dump(exclude_none=True) for t in tools]


def load_mock_results(path: str | os.PathLike) -> dict[str, Any]:
    """{"NAME": {"result": ...}} -> NAME -> result."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "result" in v for v in data.values()):
        raise ValueError(f"{path}: expected {{\"tool name\": {{\"result\": ...}}}}")
    return {name: v["result"] for name, v in data.items()}


def run_chat(served: ServedModel, *, tools: list[dict] | None = None, system: str | None = None,
             temperature: float = 0.0, max_tokens: int = 256, mock_results: dict[str, Any] | None = None,
             tool_choice: str = "auto", stdin: TextIO, stdout: TextIO) -> int:
    """The REPL; returns the exit status (0 on /quit, end of input or Ctrl-C).

    tool_choice ("auto", "required" or a tool's name) applies to the model's first turn after each user
    message; the turns that follow tool results are "auto"."""
    if tools and tool_choice not in ("auto", "required", "none"):
        if tool_choice not in [t["function"]["name"] for t in tools]:
            raise ValueError(f"tool_choice {tool_choice!r} is not one of the declared tools")
        tool_choice = {"type": "function", "function": {"name": tool_choice}}
    scheduler = served.new_scheduler().start()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    say = _printer(stdout)
    say(f"chatting with {served.name} ({len(tools or [])} tools); /reset starts over, /quit exits")
    try:
        while True:
            line = _ask(stdin, stdout, "you> ")
            if line is None or line.strip() == "/quit":
                return 0
            if line.strip() == "/reset":
                messages = list(start)
                say("(conversation reset)")
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            for turn in range(MAX_TOOL_ROUNDS):
                choice = ("auto" if turn else tool_choice) if tools else "none"
                reply = _answer(served, scheduler, messages, tools, choice, temperature, max_tokens)
                messages.append(reply)
                if reply.get("content"):
                    say(f"assistant> {reply['content']}")
                if not reply.get("tool_calls"):
                    break
                for call in reply["tool_calls"]:
                    name, arguments = call["function"]["name"], call["function"]["arguments"]
                    say(f"tool call> {name}({arguments})  [id {call['id']}]")
                    if mock_results is not None and name in mock_results:
                        result = mock_results[name]
                        result = result if isinstance(result, str) else json.dumps(result)
                        say(f"tool result (mock)> {result}")
                    else:
                        result = _ask(stdin, stdout, f"result of {name}> ")
                        if result is None:
                            return 0
                    messages.append({"role": "tool", "tool_call_id": call["id"], "content": result.rstrip("\n")})
    except KeyboardInterrupt:
        say("")
        return 0
    finally:
        scheduler.shutdown()


def _answer(served: ServedModel, scheduler: Scheduler, messages: list[dict], tools: list[dict] | None,
            tool_choice: str | dict, temperature: float, max_tokens: int) -> dict:
    """One assistant message (content and tool calls) for the conversation so far."""
    prompt = served.chat_prompt(messages, tools, tool_choice)
    room = served.max_seq_len - len(prompt.ids)
    if room < 1:
        raise ValueError(f"the conversation has {len(prompt.ids)} tokens, the context {served.max_seq_len}; /reset")
    out = scheduler.generate(prompt.ids, SamplingParams(max_new_tokens=min(max_tokens, room),
                                                        temperature=temperature))
    if out.error is not None:
        raise RuntimeError(f"generation failed: {out.error}")
    content, calls = served.parse(out.text, prompt)
    reply: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        reply["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in calls]
    return reply


def _ask(stdin: TextIO, stdout: TextIO, prompt: str) -> str | None:
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    return None if line == "" else line


def _printer(stdout: TextIO):
    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    return say
