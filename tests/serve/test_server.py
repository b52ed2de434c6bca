"""The OpenAI-compatible server, driven with the real `openai` client over HTTP."""

import json
import shutil
import threading

import httpx
import openai
import pytest

from openk2.serve import SamplingParams

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "what is the weather in paris"}]
GREEDY = {"temperature": 0, "seed": 0}


def stream_chat(client, **kwargs):
    """Assemble a streamed chat completion: content, tool calls (by index), finish reason, usage."""
    content, calls, finish, usage = "", {}, None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += (tc.function.name or "") if tc.function else ""
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, usage


def test_health_and_models(k2_server, client):
    assert httpx.get(k2_server.base_url + "/health").json() == {"status": "ok"}
    [model] = client.models.list().data
    assert model.id == "tiny-k2" and model.max_model_len == 1024


def test_plain_chat_and_usage(k2_server, client):
    out = client.chat.completions.create(model="tiny-k2", messages=ASK, max_tokens=8, **GREEDY)
    served = k2_server.app.state.served
    prompt = served.chat_prompt(ASK, None, "none")
    expected = k2_server.scheduler.generate(prompt.ids, SamplingParams(max_new_tokens=8, temperature=0.0))
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.choices[0].message.tool_calls is None
    assert out.usage.prompt_tokens == len(prompt.ids)
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.model == "tiny-k2" and out.id.startswith("chatcmpl-")


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny-k2", messages=ASK, max_tokens=12, stop=["weather"], **GREEDY)
    whole = client.chat.completions.create(**kwargs)
    content, calls, finish, usage = stream_chat(client, **kwargs)
    assert content == whole.choices[0].message.content and not calls
    assert finish == whole.choices[0].finish_reason
    assert usage.model_dump() == whole.usage.model_dump()


def test_logprobs(k2_server, client):
    out = client.chat.completions.create(model="tiny-k2", messages=ASK, max_tokens=5, logprobs=True, **GREEDY)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    assert all(e.logprob <= 0 for e in entries)
    prompt = k2_server.app.state.served.chat_prompt(ASK, None, "none")
    expected = k2_server.scheduler.generate(prompt.ids, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert [e.logprob for e in entries] == pytest.approx(expected.logprobs, abs=1e-5)
    assert [e.token for e in entries] == [k2_server.app.state.served.tokenizer.decode([t]) for t in expected.token_ids]


def test_completions(k2_server, client):
    out = client.completions.create(model="tiny-k2", prompt="the weather in", max_tokens=6, **GREEDY)
    ids = k2_server.app.state.served.tokenizer.encode("the weather in")
    again = client.completions.create(model="tiny-k2", prompt=ids, max_tokens=6, **GREEDY)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-k2", prompt="the weather in", max_tokens=6, stream=True, **GREEDY) if c.choices)
    assert out.choices[0].text == again.choices[0].text == streamed
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 6
    assert out.choices[0].finish_reason == "length"
    # vLLM's ignore_eos: no stop token ends it, so exactly max_tokens come back (benchmarks rely on this)
    fixed = client.completions.create(model="tiny-k2", prompt=ids, max_tokens=40, extra_body={"ignore_eos": True},
                                      **GREEDY)
    assert fixed.usage.completion_tokens == 40 and fixed.choices[0].finish_reason == "length"


def test_tool_call_round_trip_k2(client):
    """Force a call (a random model never calls by itself), answer it, get an answer."""
    first = client.chat.completions.create(model="tiny-k2", messages=ASK, tools=[WEATHER, TIME], max_tokens=12,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id == "functions.get_weather:0" and call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str)  # random weights: may not be JSON, still returned raw
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})}]
    answer = client.chat.completions.create(model="tiny-k2", messages=history, tools=[WEATHER, TIME],
                                            tool_choice="none", max_tokens=6, **GREEDY)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens
    # the second forced call is numbered after the first
    second = client.chat.completions.create(model="tiny-k2", messages=history, tools=[WEATHER, TIME], max_tokens=4,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}},
                                            **GREEDY)
    assert second.choices[0].message.tool_calls[0].id == "functions.get_time:1"


def test_streamed_tool_call_equals_whole(client):
    kwargs = dict(model="tiny-k2", messages=ASK, tools=[WEATHER], max_tokens=10,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, **GREEDY)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish, _ = stream_chat(client, **kwargs)
    assert finish == "tool_calls" == whole.finish_reason
    assert (content or None) == whole.message.content
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [
        (c.id, c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_required_tool_choice_calls_a_tool(client):
    out = client.chat.completions.create(model="tiny-k2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                         max_tokens=8, **GREEDY)
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.tool_calls


def test_concurrent_requests_are_batched(k2_server, client):
    prompts = [f"the weather in {city}" for city in ("paris", "tokyo", "rome", "oslo", "lima", "kyiv")]
    alone = [client.completions.create(model="tiny-k2", prompt=q, max_tokens=16, **GREEDY).choices[0].text
             for q in prompts]
    before = k2_server.scheduler.steps
    results = [None] * len(prompts)

    def ask(i):
        results[i] = client.completions.create(model="tiny-k2", prompt=prompts[i], max_tokens=16, **GREEDY)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.choices[0].text for r in results] == alone
    assert k2_server.scheduler.max_running_seen >= 2
    assert k2_server.scheduler.steps - before < 16 * len(prompts)  # decode steps were shared


def test_client_disconnect_frees_the_slot(k2_server):
    body = {"model": "tiny-k2", "messages": ASK, "max_tokens": 500, "stream": True, **GREEDY}
    before = k2_server.scheduler.steps
    with httpx.stream("POST", k2_server.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data: ") for line in got)
    assert k2_server.wait_idle()["running"] == 0
    assert k2_server.scheduler.stats()["free_slots"] == 4
    assert k2_server.scheduler.steps - before < 250  # cancelled, not generated to its 500 tokens


@pytest.mark.parametrize("kwargs, error, status", [
    ({"model": "nope"}, openai.NotFoundError, 404),
    ({"max_tokens": 100_000}, openai.BadRequestError, 400),
    ({"n": 2}, openai.BadRequestError, 400),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
     openai.BadRequestError, 400),
    ({"messages": []}, openai.BadRequestError, 400),
])
def test_bad_requests_get_openai_errors(client, kwargs, error, status):
    args = {"model": "tiny-k2", "messages": ASK, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == status
    body = e.value.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


def test_max_tokens_error_names_the_context(k2_server):
    r = httpx.post(k2_server.base_url + "/v1/chat/completions",
                   json={"model": "tiny-k2", "messages": ASK, "max_tokens": 100_000})
    assert r.status_code == 400
    assert "context is 1024" in r.json()["error"]["message"] and r.json()["error"]["param"] == "max_tokens"


def test_load_weights_in_place(k2_server, client, k2_dir, k2_dir_other, tmp_path):
    url = k2_server.base_url + "/admin/load_weights"
    kwargs = dict(model="tiny-k2", prompt="the weather in", max_tokens=8, **GREEDY)
    before = client.completions.create(**kwargs).choices[0].text
    try:
        r = httpx.post(url, json={"path": str(k2_dir_other)}, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["seconds"] >= 0
        assert client.completions.create(**kwargs).choices[0].text != before
    finally:
        assert httpx.post(url, json={"path": str(k2_dir)}, timeout=60).status_code == 200
    assert client.completions.create(**kwargs).choices[0].text == before

    assert httpx.post(url, json={"path": str(tmp_path / "missing")}).status_code == 400
    wrong = tmp_path / "wrong"
    shutil.copytree(k2_dir_other, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"hidden_size": 32}))
    r = httpx.post(url, json={"path": str(wrong)}, timeout=60)
    assert r.status_code == 400 and "error" in r.json()
    assert client.completions.create(**kwargs).choices[0].text == before  # still serving the old weights


# ----------------------------------------------------------------------------- the terminal chat
def test_terminal_chat_with_a_forced_tool_call(k2_dir, tmp_path):
    import io

    from openk2.serve.chat_cli import load_mock_results, load_tools, run_chat
    from openk2.serve.loading import load_served_model

    (tmp_path / "tools.json").write_text(json.dumps([WEATHER, TIME]))
    (tmp_path / "mock.json").write_text(json.dumps({"get_weather": {"result": {"temp_c": 21}}}))
    served = load_served_model(k2_dir, max_batch=1, max_seq_len=1024)
    stdin = io.StringIO("what is the weather in paris\n/reset\nand in tokyo\n/quit\n")
    stdout = io.StringIO()
    status = run_chat(served, tools=load_tools(tmp_path / "tools.json"), max_tokens=6, tool_choice="get_weather",
                      mock_results=load_mock_results(tmp_path / "mock.json"), stdin=stdin, stdout=stdout)
    transcript = stdout.getvalue()
    assert status == 0
    assert transcript.count("tool call> get_weather(") == 2  # once per user message
    assert "[id functions.get_weather:0]" in transcript  # the reset forgot the first call
    assert transcript.count('tool result (mock)> {"temp_c": 21}') == 2
    assert "(conversation reset)" in transcript

    stdout = io.StringIO()  # no mock: the user types the result; end of input exits cleanly
    assert run_chat(served, tools=[WEATHER], max_tokens=4, tool_choice="required",
                    stdin=io.StringIO("hi\n"), stdout=stdout) == 0
    assert "result of " in stdout.getvalue()


@pytest.mark.slow  # two interpreters start
def test_chat_and_serve_commands(k2_dir, tmp_path):
    import subprocess
    import sys

    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "openk2", "chat", "--model", str(k2_dir), "--max-tokens", "4",
                          "--system", "be brief"], input="hello\n/quit\n", capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "you> " in run.stdout and "chatting with" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "openk2", "serve", "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing" in bad.stderr


# ----------------------------------------------------------------------------- SmolLM2 (a transformers model)
@pytest.fixture(scope="module")
def smol_server(smollm2_dir):
    from openk2.serve.app import create_app
    from openk2.serve.loading import load_served_model

    from .conftest import ServerThread

    served = load_served_model(smollm2_dir, max_batch=2, max_seq_len=1024, served_name="smollm2")
    with ServerThread(create_app(served)) as server:
        yield server


@pytest.mark.slow
def test_smollm2_chat_stream_and_tool_round_trip(smol_server):
    import openai

    client = openai.OpenAI(base_url=smol_server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "Say hello in one word."}], max_tokens=8,
                  **GREEDY)
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.content and whole.usage.completion_tokens <= 8
    content, calls, finish, usage = stream_chat(client, **kwargs)
    assert content == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    # without tools, "auto" renders SmolLM2's own template (the one it was tuned on), so it answers sensibly
    assert smol_server.app.state.served.plain_template is not None
    capital = client.chat.completions.create(model="smollm2", max_tokens=16, **GREEDY, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in capital.choices[0].message.content

    first = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], max_tokens=16,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           **GREEDY)
    [call] = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], max_tokens=12,
                                            **GREEDY)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens
