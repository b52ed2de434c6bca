"""BFCL through an OpenAI-compatible endpoint: tool conversion, decoding, bfcl-eval's checker, the CLI, gold replay."""

import json

import pytest

from openk2.cli import main
from openk2.eval._bfcl_import import load_bfcl
from openk2.eval.bfcl import CATEGORIES, check_reply, evaluate_bfcl, load_category, to_openai_tools
from openk2.eval.tool_calls import Endpoint, ModelReply
from tests.eval import FakeOpenAIServer

AST_CATEGORIES = CATEGORIES[:4]  # every category but irrelevance has possible answers


@pytest.fixture(scope="module")
def package():
    return load_bfcl()


def gold_calls(item):
    """The item's first acceptable answer as OpenAI tool calls ("" among the options = the argument may be left out)."""
    functions = {f["name"]: f for f in item.functions}
    calls = []
    for answer in item.possible_answer:
        ((name, args),) = answer.items()
        params = functions[name]["parameters"]
        value = _gold_object(args, params.get("properties", {}), params.get("required", []))
        calls.append({"name": name.replace(".", "_"), "arguments": json.dumps(value)})
    return calls


def _gold_object(answer, properties, required):
    return {k: _gold_value(options, properties.get(k, {})) for k, options in answer.items()
            if not ("" in options and k not in required)}


def _gold_value(options, prop):
    value = next(o for o in options if o != "")
    items = prop.get("items", {})
    if prop.get("type") == "dict" and isinstance(value, dict):  # nested dicts hold lists of options again
        return _gold_object(value, prop.get("properties", {}), [])
    if prop.get("type") == "array" and items.get("type") == "dict" and isinstance(value, list):
        return [_gold_object(d, items.get("properties", {}), []) for d in value]
    return value


def _question(messages, tools):
    """What the fake server looks an item up by: the question text and the declared tool names."""
    return json.dumps([m["content"] for m in messages]), tuple(sorted(t["function"]["name"] for t in tools))


def test_tools_follow_bfcl_openai_conversion(package):
    functions = [{"name": "geo.distance", "description": "Distance.", "parameters": {"type": "dict", "properties": {
        "points": {"type": "array", "items": {"type": "tuple", "items": {"type": "float"}}, "description": "pts"},
        "scale": {"type": "float", "description": "Scale."},
        "options": {"type": "dict", "properties": {"mode": {"type": "any", "description": "m"}}, "description": "o"},
        "note": {"description": "no type given"}}, "required": ["points"]}}]
    tools, names = to_openai_tools(functions, package)
    assert names == {"geo_distance": "geo.distance"}
    fn = tools[0]["function"]
    assert fn["name"] == "geo_distance" and tools[0]["type"] == "function"
    props = fn["parameters"]["properties"]
    assert fn["parameters"]["type"] == "object" and fn["parameters"]["required"] == ["points"]
    assert props["points"]["type"] == "array" and props["points"]["items"]["type"] == "array"
    assert props["points"]["items"]["items"] == {"type": "number"}  # no float note inside items, as bfcl-eval
    assert props["scale"] == {"type": "number", "format": "float", "description": "Scale. This is a float type value."}
    assert props["options"]["type"] == "object" and props["options"]["properties"]["mode"]["type"] == "string"
    assert props["note"]["type"] == "string"
    assert functions[0]["parameters"]["type"] == "dict"  # the BFCL docs the checker reads are untouched


def test_categories_load_with_answers(package):
    sizes = {c: len(load_category(c, package=package)) for c in CATEGORIES}
    assert sizes == {"simple_python": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200,
                     "irrelevance": 240}
    item = load_category("simple_python", 1, package)[0]
    assert item.messages[0]["role"] == "user" and item.possible_answer
    assert item.functions[0]["description"].endswith("Note that the provided function is in Python 3 syntax.")
    with pytest.raises(ValueError, match="live_simple"):
        load_category("live_simple")


def test_gold_answers_pass_the_checker_without_http(package):
    for category in AST_CATEGORIES:
        items = load_category(category, package=package)
        failed = [item.id for item in items
                  if not check_reply(item, ModelReply(None, gold_calls(item), "tool_calls"),
                                     to_openai_tools(item.functions, package)[1], package).valid]
        assert failed == [], f"{category}: gold answers rejected: {failed}"


def test_checker_verdicts_and_error_types(package):
    item = load_category("simple_python", 1, package)[0]  # calculate_triangle_area(base=10, height=5)
    names = to_openai_tools(item.functions, package)[1]

    def verdict(calls=(), content=None, error=None):
        return check_reply(item, ModelReply(content, list(calls), "tool_calls", error), names, package)

    good = {"name": "calculate_triangle_area", "arguments": '{"base": 10, "height": 5}'}
    assert verdict([good]).valid
    assert verdict([{**good, "arguments": '{"base": 10, "height": 5, "unit": "units"}'}]).valid
    cases = {
        "simple_function_checker:wrong_func_name": [{**good, "name": "area"}],
        "simple_function_checker:missing_required": [{**good, "arguments": '{"base": 10}'}],
        "value_error:others": [{**good, "arguments": '{"base": 11, "height": 5}'}],
        "type_error:simple": [{**good, "arguments": '{"base": "10", "height": 5}'}],
        "simple_function_checker:unexpected_param": [{**good, "arguments": '{"base": 10, "height": 5, "x": 1}'}],
        "simple_function_checker:wrong_count": [good, good],
        "ast_decoder:decoder_failed": [{**good, "arguments": '{"base": 10,'}],
        "ast_decoder:decoder_wrong_output_format": [{**good, "arguments": "[10, 5]"}],
    }
    for error_type, calls in cases.items():
        v = verdict(calls)
        assert not v.valid and v.error_type == error_type, (error_type, v)
    text = verdict(content="The area is 25.")
    assert not text.valid and text.error_type == "ast_decoder:decoder_failed"
    refused = verdict(error="Error code: 400 - too long")
    assert not refused.valid and refused.error_type == "request_error"

    irrelevant = load_category("irrelevance", 1, package)[0]
    names = to_openai_tools(irrelevant.functions, package)[1]
    sent = next(iter(names))
    assert check_reply(irrelevant, ModelReply("I cannot help with that.", [], "stop"), names, package).valid
    call = {"name": sent, "arguments": "{}"}
    called = check_reply(irrelevant, ModelReply(None, [call], "tool_calls"), names, package)
    assert not called.valid and called.error_type == "irrelevance_error:decoder_success"
    assert called.decoded == [{names[sent]: {}}]  # decoded under BFCL's own name


def _gold_server(package, categories=CATEGORIES):
    """A FakeOpenAIServer that answers every BFCL item with its gold calls (irrelevance: with text)."""
    answers = {}
    for category in categories:
        for item in load_category(category, package=package):
            key = _question(item.messages, to_openai_tools(item.functions, package)[0])
            reply = {"content": "None of these tools fits."} if item.possible_answer is None else {
                "content": None, "tool_calls": gold_calls(item)}
            assert answers.setdefault(key, reply) == reply, f"two answers for one question: {item.id}"
    return FakeOpenAIServer(lambda body: answers[_question(body["messages"], body["tools"])])


@pytest.mark.slow
def test_gold_replay_through_the_server_scores_at_least_97_percent(package):
    with _gold_server(package) as server:
        report = evaluate_bfcl(Endpoint(server.url), "gold", CATEGORIES, concurrency=8)
    accuracy = {s.category: s.accuracy for s in report.scores}
    assert {s.category: s.items for s in report.scores} == {"simple_python": 400, "multiple": 200, "parallel": 200,
                                                            "parallel_multiple": 200, "irrelevance": 240}
    assert all(a >= 0.97 for a in accuracy.values()), accuracy
    assert accuracy == dict.fromkeys(CATEGORIES, 1.0), [v for v in report.verdicts if not v.valid][:5]
    body = server.requests[0]
    assert body["temperature"] == 0 and body["tool_choice"] == "auto" and body["model"] == "gold"
    assert all("." not in t["function"]["name"] for b in server.requests for t in b["tools"])


def test_cli_writes_results_summary_and_plots(package, tmp_path, capsys):
    with _gold_server(package, ("simple_python", "irrelevance")) as server:
        rc = main(["eval", "bfcl", "--endpoint", server.url, "--model", "gold", "--limit", "3",
                   "--categories", "simple_python", "irrelevance", "--out", str(tmp_path / "run")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "simple_python" in table and "100.0%" in table
    run = tmp_path / "run"
    lines = (run / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["valid"] for line in lines)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mean_accuracy"] == 1.0 and summary["config"]["limit"] == 3
    assert (run / "plots" / "accuracy.png").stat().st_size > 0 and (run / "plots" / "error_types.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--endpoint", "http://127.0.0.1:9/v1"], "APIConnectionError"),
    (["--endpoint", "localhost:8000"], "http(s) base URL"),
    (["--endpoint", "http://127.0.0.1:9/v1", "--categories", "java"], "unknown BFCL category 'java'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    rc = main(["eval", "bfcl", "--model", "m", "--limit", "1", "--out", str(tmp_path / "run"), "--timeout", "5",
               *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
