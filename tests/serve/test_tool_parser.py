import json
import random

import pytest

from openk2.serve.tool_parser import (
    K2_MARKERS,
    TOOL_PARSERS,
    KimiK2ToolParser,
    ParsedMessage,
    StreamDelta,
    ToolCall,
    get_tool_parser,
    held_back,
    register_tool_parser,
)

B, E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, CA, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(call_id: str, arguments: str) -> str:
    return f"{CB}{call_id}{CA}{arguments}{CE}"


SEVERAL = ("I'll check both cities, then search.\n" + B
           + call("functions.get_weather:0", '{"city": "Beijing"}')
           + call("functions.get_weather:1", '{"city": "上海", "note": "say \\"hi\\"\\n"}')
           + call("functions.web.search-v2:2", '{"q": {"terms": ["a", "b"], "n": 3}}') + E)


@pytest.fixture
def parser() -> KimiK2ToolParser:
    return get_tool_parser("kimi_k2")


def test_registry():
    assert TOOL_PARSERS["kimi_k2"] is KimiK2ToolParser
    assert isinstance(get_tool_parser("kimi_k2"), KimiK2ToolParser)
    with pytest.raises(ValueError, match=r"unknown tool parser 'hermes'; known: \['kimi_k2'"):
        get_tool_parser("hermes")
    with pytest.raises(ValueError, match="'kimi_k2' is already registered"):
        register_tool_parser("kimi_k2")(KimiK2ToolParser)


def test_several_calls(parser):
    parsed = parser.parse(SEVERAL)
    assert parsed.content == "I'll check both cities, then search.\n"
    assert parsed.tool_calls == [
        ToolCall("functions.get_weather:0", "get_weather", '{"city": "Beijing"}'),
        ToolCall("functions.get_weather:1", "get_weather", '{"city": "上海", "note": "say \\"hi\\"\\n"}'),
        ToolCall("functions.web.search-v2:2", "web.search-v2", '{"q": {"terms": ["a", "b"], "n": 3}}'),
    ]
    assert parser.parse("just text, no calls") == ParsedMessage("just text, no calls", [])
    assert parser.parse("") == ParsedMessage(None, [])


def test_whitespace_and_loose_ids(parser):
    text = (f"{B}\n {CB} functions.f:0 {CA} \n{{}}\n {CE}\n{CB}g{CA}{{}}{CE}{CB}functions.h{CA}{{}}{CE}"
            f"{CB}k:12{CA}{{}}{CE}\n{E}")
    parsed = parser.parse(text)
    assert parsed.content is None
    assert [(c.id, c.name, c.arguments, c.error) for c in parsed.tool_calls] == [
        ("functions.f:0", "f", "{}", None), ("g", "g", "{}", None), ("functions.h", "h", "{}", None),
        ("k:12", "k", "{}", None)]
    # a call without the section marker, the singular section spelling, and text after the section
    assert parser.parse(f"hi {CB}functions.f:0{CA}{{}}{CE}").tool_calls == [ToolCall("functions.f:0", "f", "{}")]
    singular = parser.parse(f"<|tool_call_section_begin|>{call('functions.f:0', '{}')}<|tool_call_section_end|>")
    assert singular == ParsedMessage(None, [ToolCall("functions.f:0", "f", "{}")])
    assert parser.parse(f"a{B}{call('functions.f:0', '{}')}{E} and more").content == "a and more"


def test_truncated_generation_keeps_the_complete_calls(parser):
    no_section_end = SEVERAL[: -len(E)]
    assert parser.parse(no_section_end) == parser.parse(SEVERAL)
    cut = SEVERAL[: SEVERAL.index('"Beijing"}') + 5]  # inside the first call's arguments
    parsed = parser.parse(cut)
    assert len(parsed.tool_calls) == 1
    assert parsed.tool_calls[0].arguments == '{"city": "Beij'
    assert "generation ended before <|tool_call_end|>" in parsed.tool_calls[0].error
    two = parser.parse(SEVERAL[: SEVERAL.index("functions.get_weather:1") + 12])  # inside the second call's id
    assert two.tool_calls[0].error is None
    assert two.tool_calls[1].error == "generation ended inside the call id"
    missing_end = parser.parse(f"{B}{CB}functions.f:0{CA}{{\"a\": 1}}{CB}functions.g:1{CA}{{}}{CE}{E}")
    assert missing_end.tool_calls[0] == ToolCall("functions.f:0", "f", '{"a": 1}',
                                                 "no <|tool_call_end|> after the arguments")
    assert missing_end.tool_calls[1] == ToolCall("functions.g:1", "g", "{}")
    no_arguments = parser.parse(f"{B}{CB}functions.f:0{CE}{E}")
    assert no_arguments.tool_calls == [ToolCall("functions.f:0", "f", "", "no <|tool_call_argument_begin|> after "
                                                                           "the call id")]


def test_bad_arguments_are_reported_on_the_call(parser):
    text = B + call("functions.f:0", "{'single': quotes}") + call("functions.g:1", "[1, 2]") + call(
        "functions.h:2", '{"ok": true}') + call(":3", "{}") + E
    f, g, h, nameless = parser.parse(text).tool_calls
    assert f.arguments == "{'single': quotes}" and f.error.startswith("arguments are not valid JSON")
    assert g.arguments == "[1, 2]" and g.error == "arguments are JSON but not an object (a list)"
    assert h.error is None and json.loads(h.arguments) == {"ok": True}
    assert nameless.error == "call id ':3' names no function"


def test_parse_never_raises_on_marker_soup(parser):
    rng = random.Random(0)
    pieces = [*K2_MARKERS, "functions.f:0", "g", ":", "1", '{"a": 1}', "{", "}", '"', " ", "\n", "<|", "|>", "<",
              "text", "é模", "[1]", "\\"]
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        parsed = parser.parse(text)
        assert isinstance(parsed, ParsedMessage)
        assert all(isinstance(c.arguments, str) and isinstance(c.name, str) for c in parsed.tool_calls)
    for _ in range(150):  # streaming agrees with parse even on nonsense, fed in random chunks
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        assert collect(stream(parser, text, rng)) == expected(parser.parse(text))
    deep = "[" * 100_000
    assert parser.parse(f"{B}{call('functions.f:0', deep)}{E}").tool_calls[0].error.startswith("arguments are not")


# ---------------------------------------------------------------- streaming


def stream(parser, text: str, rng: random.Random | None = None) -> list[StreamDelta]:
    """Feed text one character at a time (or in random chunks of 1..8 characters), then finish."""
    streamer, deltas, end = parser.streamer(), [], 0
    while end < len(text):
        end += 1 if rng is None else rng.randint(1, 8)
        deltas += streamer.feed(text[:end])
    return deltas + streamer.finish(text)


def collect(deltas: list[StreamDelta]) -> tuple[str, list[dict]]:
    """What an OpenAI client assembles from the deltas: content, and each call's id, name and arguments."""
    content, calls = "", []
    for d in deltas:
        if d.content is not None:
            assert d.tool_call_index is None
            content += d.content
            continue
        if d.id is not None:
            assert d.tool_call_index == len(calls) and d.name is not None  # announced once, in order
            calls.append({"id": d.id, "name": d.name, "arguments": ""})
        if d.arguments is not None:
            calls[d.tool_call_index]["arguments"] += d.arguments
    return content, calls


def expected(parsed: ParsedMessage) -> tuple[str, list[dict]]:
    return parsed.content or "", [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]


@pytest.mark.parametrize("text", [
    SEVERAL,
    SEVERAL[: -len(E)],
    SEVERAL[: SEVERAL.index('"Beijing"}') + 5],
    "Plain answer with a < sign and <|im not a marker|> and a trailing <|",
    f"{B}\n {CB} functions.f:0 {CA} \n{{ \"x\": \"<|tool\" }}\n {CE}\n{E}",
])
def test_streaming_one_character_at_a_time_equals_parse(parser, text):
    final = parser.parse(text)
    streamer, deltas, content = parser.streamer(), [], ""
    for end in range(1, len(text) + 1):
        step = streamer.feed(text[:end])
        deltas += step
        content += "".join(d.content for d in step if d.content is not None)
        assert (final.content or "").startswith(content)  # nothing sent is ever taken back: no marker leaks
    deltas += streamer.finish(text)
    assert collect(deltas) == expected(final)
    assert all("<|tool" not in (d.content or "") for d in deltas)


def test_streaming_sends_calls_as_they_complete(parser):
    streamer = parser.streamer()
    head = SEVERAL[: SEVERAL.index(CA) + len(CA)]
    deltas = streamer.feed(head)
    assert deltas[-1] == StreamDelta(tool_call_index=0, id="functions.get_weather:0", name="get_weather")
    assert streamer.feed(head + '{"ci') == [StreamDelta(tool_call_index=0, arguments='{"ci')]
    assert streamer.feed(head + '{"ci') == []  # the same text again sends nothing
    assert streamer.feed(head + '{"city": 1}  <|tool_call_e') == [StreamDelta(tool_call_index=0, arguments='ty": 1}')]


def test_random_chunks_equal_parse(parser):
    rng = random.Random(1)
    for _ in range(20):
        assert collect(stream(parser, SEVERAL, rng)) == expected(parser.parse(SEVERAL))


def test_held_back():
    assert held_back("text <|tool_call", K2_MARKERS) == len("<|tool_call")
    assert held_back("text <", K2_MARKERS) == 1
    assert held_back("text <|tool_call_end|>", K2_MARKERS) == 0  # a whole marker is not held
    assert held_back("text", K2_MARKERS) == 0
