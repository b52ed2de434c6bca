"""Hostile traffic: 1,000 malformed requests, then 64 streaming clients of which half hang up early."""

import json
import random
import threading

import httpx

OK_MESSAGES = [{"role": "user", "content": "the weather in paris"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def chat(**changes):
    body = {"model": "tiny-k2", "messages": OK_MESSAGES, "max_tokens": 4}
    body.update(changes)
    return "/v1/chat/completions", json.dumps(body).encode()


def completion(**changes):
    body = {"model": "tiny-k2", "prompt": "the weather", "max_tokens": 4}
    body.update(changes)
    return "/v1/completions", json.dumps(body).encode()


def bad_json(rng):
    good = chat()[1]
    return "/v1/chat/completions", rng.choice([
        good[: rng.randrange(1, len(good))],  # cut anywhere
        b"",
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),
        b"\xff\xfe" + good,
        good.replace(b'"', b"'", 1),
        b"[" * 100_000 + b"]" * 100_000,  # nested deeper than any parser's recursion limit
        b"[1, 2, 3]",
        b'"just a string"',
        b"null",
        good + b"}",
    ])


def wrong_types(rng):
    field, value = rng.choice([
        ("model", 5), ("messages", "hi"), ("messages", {"role": "user"}), ("temperature", "hot"),
        ("temperature", -1), ("temperature", 9.5), ("max_tokens", 1.5), ("max_tokens", "8"), ("max_tokens", 0),
        ("max_tokens", -3), ("stream", "yes"), ("stop", 5), ("stop", [1, 2]), ("stop", [""]), ("top_p", 0),
        ("top_p", 2), ("seed", -1), ("seed", 2**70), ("n", 2), ("n", 0), ("logprobs", "x"), ("top_k", -1),
        ("messages", [{"role": "wizard", "content": "x"}]), ("messages", [{"role": "user", "content": 7}]),
        ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
        ("messages", [{"role": "tool", "content": "x"}]), ("presence_penalty", 1.0), ("bogus_field", 1),
        ("stream_options", {"include_usage": "yes"}), ("top_logprobs", 5), ("stop", ["x"] * 100),
    ])
    return chat(**{field: value})


def huge_max_tokens(rng):
    value = rng.choice([10**5, 10**9, 2**63, 10**30, 2**31 - 1])
    return (chat if rng.random() < 0.5 else completion)(max_tokens=value)


def unknown_model(rng):
    name = "".join(rng.choice("abcdefgh-/.:") for _ in range(rng.randrange(1, 30)))
    return (chat if rng.random() < 0.5 else completion)(model=name)


def empty_messages(rng):
    return chat(messages=rng.choice([[], [{}], [{"role": "user"}], [{"role": "assistant"}], [None], [[]]]))


def invalid_tools(rng):
    return chat(**rng.choice([
        {"tools": "get_weather"},
        {"tools": [{"type": "retrieval"}]},
        {"tools": [{"type": "function", "function": {"name": "has spaces"}}]},
        {"tools": [{"type": "function", "function": {"name": ""}}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": 3}}}]},
        {"tools": [WEATHER, WEATHER]},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
        {"tools": [WEATHER], "tool_choice": "sometimes"},
        {"tool_choice": "required"},
        {"messages": OK_MESSAGES + [{"role": "tool", "tool_call_id": "functions.nope:3", "content": "x"}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                            "function": {"name": "f", "arguments": {}}}]}]},
    ]))


def bad_completion(rng):
    return completion(**rng.choice([
        {"prompt": []}, {"prompt": ""}, {"prompt": [-1]}, {"prompt": [10**9]}, {"prompt": [1.5]},
        {"prompt": {"text": "x"}}, {"echo": True}, {"logprobs": 5}, {"prompt": None},
    ]))


CATEGORIES = [bad_json, wrong_types, huge_max_tokens, unknown_model, empty_messages, invalid_tools, bad_completion]


def test_hostile_requests_then_disconnecting_streams(k2_server):
    rng = random.Random(0)
    seen = set()
    with httpx.Client(base_url=k2_server.base_url, timeout=30) as http:
        for i in range(1000):
            category = CATEGORIES[i % len(CATEGORIES)] if i < len(CATEGORIES) else rng.choice(CATEGORIES)
            path, body = category(rng)
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (category.__name__, body[:200], r.status_code, r.text[:300])
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            seen.add((category.__name__, r.status_code))
    assert {"unknown_model"} == {name for name, status in seen if status == 404}

    finished, hung_up, failures = [], [], []

    def stream_client(i: int) -> None:
        leave_early = i % 2 == 1
        body = {"model": "tiny-k2", "messages": [{"role": "user", "content": f"client {i} asks"}],
                "max_tokens": 200 if leave_early else 12, "stream": True, "temperature": 0.8, "seed": i}
        try:
            with httpx.stream("POST", k2_server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
                assert r.status_code == 200
                if leave_early:  # read a few events, then hang up mid-stream
                    lines = []
                    for line in r.iter_lines():
                        lines.append(line)
                        if len(lines) >= 5:
                            break
                    hung_up.append(i)
                    return
                lines = [line for line in r.iter_lines() if line]
                assert lines[-1] == "data: [DONE]"
                finish = json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"]
                assert finish in ("stop", "length")
                finished.append(i)
        except Exception as e:  # collected, so the assertion below names it
            failures.append((i, repr(e)))

    threads = [threading.Thread(target=stream_client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures[:3]
    assert len(finished) == 32 and len(hung_up) == 32

    stats = k2_server.wait_idle(timeout=30)
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["free_slots"] == 4, stats
    assert httpx.get(k2_server.base_url + "/health").json() == {"status": "ok"}
    r = httpx.post(k2_server.base_url + "/v1/chat/completions", json={
        "model": "tiny-k2", "messages": OK_MESSAGES, "max_tokens": 3, "temperature": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
