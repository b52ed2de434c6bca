"""Tool-call quality metrics against a scripted server: good, unparseable, schema-violating, extra and missing calls."""

import json

import pytest

from openk2.cli import main
from openk2.eval.tool_calls import (
    Endpoint,
    ModelReply,
    ToolCallPrompt,
    aggregate,
    evaluate_tool_calls,
    load_prompts,
)
from tests.eval import FakeOpenAIServer

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone.", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
]


def call(name, **arguments):
    return {"name": name, "arguments": json.dumps(arguments)}


def ref(name, **arguments):
    return {"name": name, "arguments": arguments}


# id -> (reference calls, what the server answers)
CASES = {
    "good": ([ref("get_weather", city="Paris")], {"tool_calls": [call("get_weather", city="Paris")]}),
    "parallel": ([ref("get_weather", city="Paris", unit="c"), ref("get_time", tz="Europe/Paris")],  # any order
                 {"tool_calls": [call("get_time", tz="Europe/Paris"),
                                 {"name": "get_weather", "arguments": '{"unit": "c", "city": "Paris"}'}]}),
    "unparseable": ([ref("get_weather", city="Oslo")],
                    {"tool_calls": [{"name": "get_weather", "arguments": '{"city": "Oslo"'}]}),
    "schema": ([ref("get_weather", city="Rome")], {"tool_calls": [call("get_weather", city=42)]}),
    "extra": ([ref("get_weather", city="Lima")],
              {"tool_calls": [call("get_weather", city="Lima"), call("get_time", tz="UTC")]}),
    "missing": ([ref("get_weather", city="Kyiv"), ref("get_time", tz="Europe/Kyiv")],
                {"tool_calls": [call("get_weather", city="Kyiv")]}),
    "prose-when-required": ([ref("get_weather", city="Cairo")], {"content": "It is sunny in Cairo."}),
    "no-call-needed": ([], {"content": "Hello!"}),
    "undeclared": ([], {"tool_calls": [call("search_web", q="news")]}),
    "leaked-k2-tokens": (None, {"content": "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:0"
                                           "<|tool_call_argument_begin|>{\"tz\": \"UTC\"}<|tool_call_end|>"}),
    "refused": ([ref("get_weather", city="Bern")], {"status": 400, "message": "prompt too long"}),
    "finish-mismatch": (None, {"tool_calls": [call("get_time", tz="UTC")], "finish_reason": "stop"}),
}


def prompts():
    return [ToolCallPrompt(messages=[{"role": "user", "content": key}], tools=TOOLS, reference_calls=refs, id=key)
            for key, (refs, _) in CASES.items()]


def scripted_server():
    return FakeOpenAIServer(lambda body: CASES[body["messages"][-1]["content"]][1])


def test_quality_on_scripted_replies():
    with scripted_server() as server:
        quality = evaluate_tool_calls(Endpoint(server.url), "fake", prompts(), concurrency=3)
    assert all(b["tool_choice"] == "auto" and b["temperature"] == 0 and len(b["tools"]) == 2 for b in server.requests)
    by_id = {d.id: d for d in quality.details}
    assert [k for k, d in by_id.items() if not d.parsed] == [
        "unparseable", "prose-when-required", "leaked-k2-tokens", "refused"]
    assert quality.items == 12 and quality.parse_rate == pytest.approx(8 / 12)
    # 10 calls, 1 unparseable; of the 9 parsed, "schema" (city: 42) and "undeclared" (search_web) fail
    assert by_id["schema"].schema_errors == ["get_weather: 42 is not of type 'string'"]
    assert by_id["undeclared"].undeclared_calls == ["search_web"]
    assert quality.schema_accuracy == pytest.approx(7 / 9)
    # prompts with references: 9 calls predicted, 10 expected, 5 matched (good 1, parallel 2, extra 1, missing 1)
    assert (by_id["parallel"].matched, by_id["extra"].matched, by_id["missing"].matched) == (2, 1, 1)
    assert by_id["schema"].matched == 0 and by_id["unparseable"].matched == 0
    assert (quality.precision, quality.recall, quality.f1) == pytest.approx((5 / 9, 5 / 10, 10 / 19))
    # triggering (K2 Vendor Verifier): 8 prompts need a call, 7 replies made one, 6 of those needed it
    assert (quality.trigger_precision, quality.trigger_recall, quality.trigger_f1) == pytest.approx(
        (6 / 7, 6 / 8, 12 / 15))
    assert quality.finish_reasons == {"stop": 4, "tool_calls": 7}
    assert quality.finish_mismatches == 1 and quality.undeclared_calls == 1 and quality.request_errors == 1
    assert by_id["refused"].reply["error"] == "Error code: 400 - prompt too long"


def test_argument_equality_is_json_value_equality():
    prompt = ToolCallPrompt(messages=[{"role": "user", "content": "x"}], tools=[], id="eq",
                            reference_calls=[ref("f", n=5, flag=True, xs=[1, {"a": 1, "b": 2}])])

    def matched(arguments):
        return aggregate([prompt], [ModelReply(None, [{"name": "f", "arguments": arguments}], "tool_calls")]).recall

    assert matched('{"xs": [1, {"b": 2, "a": 1}], "flag": true, "n": 5.0}') == 1.0  # key order, 5 == 5.0
    assert matched('{"xs": [1, {"b": 2, "a": 1}], "flag": 1, "n": 5}') == 0.0  # true is not 1
    assert matched('{"xs": [{"b": 2, "a": 1}, 1], "flag": true, "n": 5}') == 0.0  # list order matters
    assert matched('{"xs": [1, {"b": 2, "a": 1}], "flag": true, "n": 5, "extra": 0}') == 0.0


def test_prompts_file_and_bad_records(tmp_path):
    path = tmp_path / "p.jsonl"
    openai_style = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "t"}], "tools": TOOLS,
                                "reference_calls": [openai_style]}) + "\n\n")
    (prompt,) = load_prompts(path)
    assert prompt.reference_calls == [ref("get_time", tz="UTC")] and prompt.id == "p.jsonl:1"
    for record, message in [({"messages": [], "tools": []}, "messages must be"),
                            ({"messages": [{"role": "user", "content": "t"}], "tool": []}, "unknown keys"),
                            ({"messages": [{"role": "user", "content": "t"}], "tools": [{"name": "x"}]}, "a tool"),
                            ({"messages": [{"role": "user", "content": "t"}], "tools": [],
                              "reference_calls": [{"name": "f", "arguments": "{oops"}]}, "not JSON")]:
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=message):
            load_prompts(path)


def test_cli_tool_calls(tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "messages": p.messages, "tools": p.tools,
                                        "reference_calls": p.reference_calls}) + "\n" for p in prompts()))
    with scripted_server() as server:
        rc = main(["eval", "tool-calls", "--endpoint", server.url, "--model", "fake", "--prompts", str(path),
                   "--out", str(tmp_path / "run")])
    assert rc == 0
    assert "parse rate        66.7%" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == pytest.approx(5 / 9) and summary["config"]["model"] == "fake"
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 12

    path.write_text('{"messages": "hi"}\n')
    assert main(["eval", "tool-calls", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m",
                 "--prompts", str(path)]) == 2
    assert "messages must be" in capsys.readouterr().err
