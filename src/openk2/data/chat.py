"""Chat templates (spec §4): OpenAI-format messages and tools -> the K2 chat text a model reads and writes.

K2's format, as Kimi-K2-Instruct's chat template renders it: an optional tool declaration turn
`<|im_system|>tool_declare<|im_middle|>[tools as compact JSON]<|im_end|>`, a default system prompt when the
conversation does not start with one, then one turn per message `<|im_user|>user<|im_middle|>...<|im_end|>` (the
header names `message["name"]` when given, else the role; system and tool turns use `<|im_system|>`). An assistant
turn carries its text, then its calls in one section
`<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>
...<|tool_calls_section_end|>`, and a tool turn answers with `## Return of ID\\n` plus the result. The generation
prompt is `<|im_assistant|>assistant<|im_middle|>`; the model ends its turn with `<|im_end|>`.

Tool-call ids. K2 generates `functions.NAME:IDX`, IDX counting the calls of the whole conversation from 0, and
reads its own ids back in the history. Kimi's template renders whatever id a client sends, and ids from other
APIs (`call_abc...`) are known to derail K2 (vLLM's Kimi-K2 accuracy study), so we render a call's id as given
only when it already reads `functions.<its function name>:<digits>`; any other id, or none, is rendered as
`functions.NAME:K` with K the call's position among all calls of the conversation, and the tool turns that
answer it (by the id the client gave) show that same rendered id.

`ChatTemplate` is what serving and SFT use: `ChatTemplate.k2()` renders K2's format in Python (and can split the
text into trainable segments for SFT's loss mask); `K2_CHAT_TEMPLATE` is the same format as Jinja, the string
`Tokenizer.save` writes into tokenizer_config.json so transformers and vLLM render our checkpoints alike; any
other model's own Jinja template is rendered with transformers' chat-template machinery.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
)
TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END = (
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
)
# Every marker the K2 format writes; a tokenizer for K2 chat must hold each as one token.
K2_CHAT_TOKENS = (
    IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE, TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END,
    TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END,
)
K2_DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
K2_GENERATION_PROMPT = f"{IM_ASSISTANT}assistant{IM_MIDDLE}"
ROLES = ("system", "user", "assistant", "tool")
# config.json model types whose checkpoints speak K2's chat format (our presets write deepseek_v3).
K2_MODEL_TYPES = ("kimi_k2", "deepseek_v3", "deepseek_v2")
# End-of-turn strings of common templates, used as stop strings of a Jinja template that contains them.
KNOWN_TURN_ENDS = (IM_END, "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
_K2_ID = re.compile(r"functions\.(.+):([0-9]+)", re.DOTALL)

# The K2 format as Jinja, for tokenizer_config.json. Every tag trims the whitespace around it, so the text is
# exactly what `ChatTemplate.k2().render` writes (tests/data/test_chat.py renders both). `tojson` is transformers'
# filter (json.dumps, ensure_ascii=False); `call_id` is the id rule of the module docstring.
K2_CHAT_TEMPLATE = """\
{%- macro render_content(msg) -%}
  {%- if msg.content is string -%}{{- msg.content -}}
  {%- elif msg.content is iterable -%}{%- for part in msg.content -%}{{- part.text -}}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- macro call_id(tc, k) -%}
  {%- set prefix = 'functions.' ~ tc.function.name ~ ':' -%}
  {%- set idx = tc.id[(prefix | length):] if tc.id is string else '' -%}
  {%- if tc.id is string and tc.id.startswith(prefix) and idx.isascii() and idx.isdigit() -%}{{- tc.id -}}
  {%- else -%}{{- prefix ~ k -}}
  {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(calls=0, found='', k=0) -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{- tools | tojson(separators=(',', ':')) -}}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and message.role != 'system' -%}
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {%- endif -%}
  {%- if message.role == 'user' -%}<|im_user|>
  {%- elif message.role == 'assistant' -%}<|im_assistant|>
  {%- else -%}<|im_system|>
  {%- endif -%}
  {{- message.name or message.role -}}<|im_middle|>
  {%- if message.role == 'assistant' and message.tool_calls -%}
    {{- render_content(message) -}}<|tool_calls_section_begin|>
    {%- for tc in message.tool_calls -%}
      <|tool_call_begin|>{{- call_id(tc, ns.calls) -}}<|tool_call_argument_begin|>
      {%- if tc.function.arguments is string -%}{{- tc.function.arguments -}}
      {%- else -%}{{- tc.function.arguments | tojson -}}
      {%- endif -%}
      <|tool_call_end|>
      {%- set ns.calls = ns.calls + 1 -%}
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message.role == 'tool' -%}
    {%- set ns.found = message.tool_call_id -%}
    {%- set ns.k = 0 -%}
    {%- for earlier in messages[:loop.index0] -%}
      {%- if earlier.role == 'assistant' and earlier.tool_calls -%}
        {%- for tc in earlier.tool_calls -%}
          {%- if tc.id is string and tc.id == message.tool_call_id -%}
            {%- set ns.found = call_id(tc, ns.k) -%}
          {%- endif -%}
          {%- set ns.k = ns.k + 1 -%}
        {%- endfor -%}
      {%- endif -%}
    {%- endfor -%}
    ## Return of {{ ns.found }}{{- '\\n' -}}{{- render_content(message) -}}
  {%- else -%}
    {{- render_content(message) -}}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""


@dataclass(frozen=True)
class Segment:
    """A piece of rendered chat text; trainable marks what the assistant generates (SFT computes loss on it)."""

    text: str
    role: str
    trainable: bool


# ---------------------------------------------------------------- validation


def _content_text(content: Any, where: str) -> str:
    """The text of a message content: a string, None, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: content part {j} must be {{'type': 'text', 'text': str}}, got {part!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise TypeError(f"{where}: content must be a string, None or a list of text parts, got {type(content).__name__}")


def validate_tools(tools: Any) -> list[dict]:
    """Tools as OpenAI sends them: a list of {"type": "function", "function": {"name": str, ...}} dicts."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} dicts, got {tools!r}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not (isinstance(tool, Mapping) and tool.get("type") == "function" and isinstance(function, Mapping)):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}, got {tool!r}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}]: function has no name: {function!r}")
    return tools


def _tool_calls(message: Mapping, where: str) -> list[Mapping]:
    """An assistant message's tool calls, each checked to have a function name and string or dict arguments."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ValueError(f"{where}: tool_calls must be a list, got {calls!r}")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise ValueError(f"{where}: tool_calls[{j}] has no function: {call!r}")
        if call.get("type", "function") != "function":
            raise ValueError(f"{where}: tool_calls[{j}] has type {call['type']!r}, expected 'function'")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{where}: tool_calls[{j}] has no function name: {call!r}")
        if not isinstance(function.get("arguments"), str | Mapping):
            raise ValueError(f"{where}: tool_calls[{j}] arguments must be a JSON string or an object, "
                             f"got {function.get('arguments')!r}")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ValueError(f"{where}: tool_calls[{j}] id must be a string, got {call['id']!r}")
    return calls


def k2_call_id(call: Mapping, position: int) -> str:
    """The id K2 sees for a call: its own id if already `functions.<name>:<digits>`, else one made from position."""
    name, given = call["function"]["name"], call.get("id")
    match = _K2_ID.fullmatch(given) if isinstance(given, str) else None
    if match and match.group(1) == name:
        return given
    return f"functions.{name}:{position}"


def _arguments_text(arguments: str | Mapping) -> str:
    # a dict is written as transformers' `tojson` writes it, so the Jinja template renders the same text
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


# ---------------------------------------------------------------- the K2 renderer


def k2_segments(messages: Sequence[Mapping], tools: list | None = None,
                add_generation_prompt: bool = False) -> list[Segment]:
    """K2's chat text of a conversation as segments (spec §4); see the module docstring for the format."""
    tools = validate_tools(tools)
    segments: list[Segment] = []
    if tools:
        declared = json.dumps(tools, ensure_ascii=False, separators=(",", ":"))
        segments.append(Segment(f"{IM_SYSTEM}tool_declare{IM_MIDDLE}{declared}{IM_END}", "tools", False))
    given_to_rendered: dict[str, str] = {}  # the client's id of each call so far -> the id K2 saw (latest wins)
    rendered_ids: set[str] = set()
    position = 0  # calls rendered so far in the conversation
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
        if i == 0 and role != "system":
            segments.append(Segment(f"{IM_SYSTEM}system{IM_MIDDLE}{K2_DEFAULT_SYSTEM_PROMPT}{IM_END}", "system", False))
        marker = {"user": IM_USER, "assistant": IM_ASSISTANT}.get(role, IM_SYSTEM)
        segments.append(Segment(f"{marker}{message.get('name') or role}{IM_MIDDLE}", role, False))
        text = _content_text(message.get("content"), where)
        calls = _tool_calls(message, where) if role == "assistant" else []
        if calls:
            pieces = [text, TOOL_CALLS_SECTION_BEGIN]
            for call in calls:
                call_id = k2_call_id(call, position)
                if call.get("id") is not None:
                    given_to_rendered[call["id"]] = call_id
                rendered_ids.add(call_id)
                position += 1
                pieces += [TOOL_CALL_BEGIN, call_id, TOOL_CALL_ARGUMENT_BEGIN,
                           _arguments_text(call["function"]["arguments"]), TOOL_CALL_END]
            text = "".join(pieces) + TOOL_CALLS_SECTION_END
        elif role == "tool":
            answered = message.get("tool_call_id")
            if answered in given_to_rendered:
                answered = given_to_rendered[answered]
            elif answered not in rendered_ids:
                raise ValueError(f"{where}: tool_call_id {message.get('tool_call_id')!r} matches no earlier tool call")
            text = f"## Return of {answered}\n{text}"
        # what the assistant generates is trainable: its text, its calls and the <|im_end|> that ends its turn
        segments.append(Segment(text + IM_END, role, role == "assistant"))
    if add_generation_prompt:
        segments.append(Segment(K2_GENERATION_PROMPT, "assistant", False))
    return [s for s in segments if s.text]


# ---------------------------------------------------------------- ChatTemplate


def _drop_none(messages: Sequence[Mapping]) -> list[dict]:
    # as transformers' apply_chat_template does: templates handle a missing key, many mishandle a None value
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping) else m for m in messages]


def _mentions_tools(source: str) -> bool:
    return re.search(r"\btools\b", source) is not None


class ChatTemplate:
    """Renders OpenAI-format conversations to a model's prompt text: K2's format, or a Jinja template."""

    def __init__(self, name: str, source: str, *, native_k2: bool = False, stop_strings: Sequence[str] = (),
                 variables: Mapping[str, Any] | None = None):
        self.name = name
        self.source = source  # Jinja text (for K2, K2_CHAT_TEMPLATE; rendering uses the Python renderer)
        self.native_k2 = native_k2
        self.stop_strings: tuple[str, ...] = tuple(stop_strings)
        self.variables = dict(variables or {})  # extra template variables, e.g. bos_token / eos_token

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, supports_tools={self.supports_tools}, stop={self.stop_strings})"

    @property
    def supports_tools(self) -> bool:
        return self.native_k2 or _mentions_tools(self.source)

    # ------------------------------------------------------------ constructors

    @classmethod
    def k2(cls) -> ChatTemplate:
        return cls("k2", K2_CHAT_TEMPLATE, native_k2=True, stop_strings=(IM_END,))

    @classmethod
    def from_jinja(cls, source: str, name: str = "jinja", *, stop_strings: Sequence[str] | None = None,
                   variables: Mapping[str, Any] | None = None) -> ChatTemplate:
        """A Jinja chat template; stop_strings default to the known end-of-turn markers found in its text."""
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"chat template {name!r} is empty")
        if stop_strings is None:
            stop_strings = tuple(t for t in KNOWN_TURN_ENDS if t in source)
        return cls(name, source, stop_strings=stop_strings, variables=variables)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> ChatTemplate:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file does not exist: {path}")
        return cls.from_jinja(path.read_text(encoding="utf-8"), name=path.name, **kwargs)

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike, choice: str = "auto") -> ChatTemplate:
        """The template to serve model_dir with: choice "k2", "model" (its own), a .jinja path, or "auto".

        "auto" is K2's format for K2-family models (config.json model_type in K2_MODEL_TYPES) and for models
        whose own template has no tool support (it never mentions `tools`) or that have none; else their own."""
        model_dir = Path(model_dir)
        if choice == "k2":
            return cls.k2()
        if choice not in ("auto", "model"):
            if not choice.endswith(".jinja") and not Path(choice).is_file():
                raise ValueError(f"chat template choice {choice!r} is not 'auto', 'k2', 'model' or a .jinja file")
            return cls.from_file(choice)
        own = _model_template(model_dir)
        if own is not None and own.source == K2_CHAT_TEMPLATE:  # saved by openk2 (e.g. a model fine-tuned by SFT)
            own = cls.k2()
        if choice == "model":
            if own is None:
                raise ValueError(f"{model_dir} has no chat template (no chat_template.jinja, no chat_template "
                                 "in tokenizer_config.json); use choice='k2' or a .jinja file")
            return own
        config_path = model_dir / "config.json"
        model_type = json.loads(config_path.read_text()).get("model_type") if config_path.exists() else None
        if model_type in K2_MODEL_TYPES or own is None or not own.supports_tools:
            return cls.k2()
        return own

    # ------------------------------------------------------------ rendering

    def render(self, messages: Sequence[Mapping], tools: list | None = None,
               add_generation_prompt: bool = False) -> str:
        """The prompt text of messages (OpenAI format) and tools; add_generation_prompt opens the assistant turn."""
        if self.native_k2:
            return "".join(s.text for s in k2_segments(messages, tools, add_generation_prompt))
        return self._render_jinja(messages, tools, add_generation_prompt)

    def segments(self, messages: Sequence[Mapping], tools: list | None = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """render() split into segments, trainable exactly for the assistant's own text (SFT's loss mask).

        A Jinja template is split by rendering growing prefixes of the conversation: the header of an assistant
        turn is what the generation prompt adds, the rest of its turn (including the turn-end text the template
        writes after it, e.g. ChatML's "<|im_end|>\\n") is trainable. A template whose prefixes do not render as
        prefixes of the whole (one that rewrites earlier turns) raises ValueError."""
        if self.native_k2:
            return k2_segments(messages, tools, add_generation_prompt)
        full = self._render_jinja(messages, tools, add_generation_prompt)
        segments: list[Segment] = []

        def cut(prefix: str, role: str, trainable: bool, what: str) -> None:
            done = sum(len(s.text) for s in segments)
            if len(prefix) < done or not full.startswith(prefix):
                raise ValueError(f"chat template {self.name!r} is not prefix-stable at {what}: the conversation up "
                                 "to there does not render as a prefix of the whole, so it cannot be segmented")
            segments.append(Segment(full[done:len(prefix)], role, trainable))

        for i, message in enumerate(messages):
            role = message["role"]  # _render_jinja checked every role
            if role == "assistant":
                cut(self._render_jinja(messages[:i], tools, True), role, False, f"the header of messages[{i}]")
            cut(self._render_jinja(messages[: i + 1], tools, False), role, role == "assistant", f"messages[{i}]")
        cut(full, "assistant" if add_generation_prompt else "", False, "the generation prompt")
        return [s for s in segments if s.text]

    def _render_jinja(self, messages: Sequence[Mapping], tools: list | None, add_generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template  # heavy import, only when used

        if tools is not None:
            validate_tools(tools)
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
            if message.get("role") not in ROLES:
                raise ValueError(f"messages[{i}]: unknown role {message.get('role')!r}; expected one of {ROLES}")
        try:
            rendered, _ = render_jinja_template(
                conversations=[_drop_none(messages)], tools=tools or None, chat_template=self.source,
                add_generation_prompt=add_generation_prompt, **self.variables)
        except Exception as e:  # jinja2's TemplateError, or any error the template's own code raises
            raise ValueError(f"chat template {self.name!r} failed to render: {e}") from e
        return rendered[0]


def _model_template(model_dir: Path) -> ChatTemplate | None:
    """A model folder's own chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`
    (a string, or a list of {name, template} where "default" wins, else the first)."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    variables = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, Mapping) else value
        if isinstance(value, str):
            variables[key] = value
    stop = [variables["eos_token"]] if "eos_token" in variables else []
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        source, name = jinja_file.read_text(encoding="utf-8"), f"{model_dir.name}/chat_template.jinja"
    else:
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            source = named.get("default", next(iter(named.values()), None))
        if not source:
            return None
        name = f"{model_dir.name}/tokenizer_config.json"
    stop = tuple(dict.fromkeys([*(t for t in KNOWN_TURN_ENDS if t in source), *stop]))
    return ChatTemplate.from_jinja(source, name=name, stop_strings=stop, variables=variables)
