"""A small built-in chat set for SFT smoke runs (paper §3.1): tool-use conversations made from templates.

Our own data, written here (no benchmark-derived text): four tools, user requests filled with random
values, the assistant's call, the tool's result and a final answer that uses it, plus plain chat turns.
`sample_conversations(n, seed)` is deterministic; `write_sample_jsonl` writes the OpenAI-messages JSONL
that `openk2 sft` reads when `data.train` is empty.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path


def _tool(name: str, description: str, properties: dict[str, dict], required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = [
    _tool("get_weather", "Current weather of a city", {"city": {"type": "string"}}, ["city"]),
    _tool("add", "Sum of two integers", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
    _tool("convert_currency", "Convert an amount between currencies",
          {"amount": {"type": "number"}, "source": {"type": "string"}, "target": {"type": "string"}},
          ["amount", "source", "target"]),
    _tool("count_words", "Number of words in a text", {"text": {"type": "string"}}, ["text"]),
]
CITIES = ("Paris", "Lagos", "Lima", "Osaka", "Oslo", "Pune", "Quito", "Perth")
SKIES = ("sunny", "cloudy", "rainy", "windy", "snowy")
CURRENCIES = ("EUR", "USD", "JPY", "GBP", "INR")
PHRASES = ("the cat sat on the mat", "open source models", "a quick brown fox jumps", "hello world")
CHAT = [
    ("Say hello.", "Hello! How can I help you today?"),
    ("What is a tool call?", "A tool call is a structured request the assistant makes to a function, whose result "
                             "comes back in the conversation."),
    ("Thanks!", "You're welcome."),
]


def _call(rng: random.Random) -> tuple[str, str, dict, str, str]:
    """(user request, tool name, arguments, tool result, final answer) for one random task."""
    kind = rng.randrange(4)
    if kind == 0:
        city, sky, temp = rng.choice(CITIES), rng.choice(SKIES), rng.randint(-5, 35)
        return (f"What's the weather in {city}?", "get_weather", {"city": city},
                json.dumps({"sky": sky, "celsius": temp}), f"It is {sky} in {city}, {temp} °C.")
    if kind == 1:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"What is {a} plus {b}?", "add", {"a": a, "b": b}, json.dumps({"sum": a + b}), f"{a} + {b} = {a + b}."
    if kind == 2:
        amount, source, target = rng.randint(1, 500), *rng.sample(CURRENCIES, 2)
        rate = round(rng.uniform(0.2, 5.0), 2)
        return (f"Convert {amount} {source} to {target}.", "convert_currency",
                {"amount": amount, "source": source, "target": target},
                json.dumps({"result": round(amount * rate, 2)}), f"{amount} {source} is {round(amount * rate, 2)} "
                                                                 f"{target}.")
    phrase = rng.choice(PHRASES)
    return (f'How many words are in "{phrase}"?', "count_words", {"text": phrase},
            json.dumps({"words": len(phrase.split())}), f"It has {len(phrase.split())} words.")


def sample_conversations(n: int = 64, seed: int = 0) -> list[dict]:
    """n conversations ({"messages", "tools"}); about one in six is plain chat without tools."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < 1 / 6:
            user, answer = rng.choice(CHAT)
            out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
            continue
        request, name, arguments, result, answer = _call(rng)
        call_id = f"functions.{name}:0"
        out.append({"tools": TOOLS, "messages": [
            {"role": "system", "content": "You are a helpful assistant that uses tools when they help."},
            {"role": "user", "content": request},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": result},
            {"role": "assistant", "content": answer},
        ]})
    return out


def write_sample_jsonl(path: str | os.PathLike, n: int = 64, seed: int = 0) -> Path:
    """Write `sample_conversations(n, seed)` as JSONL at path (atomically) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in sample_conversations(n, seed)))
    os.replace(tmp, path)
    return path
