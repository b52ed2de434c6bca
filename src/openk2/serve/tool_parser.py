"""Tool-call parsers (spec §4): a model's generated text -> OpenAI `content` and `tool_calls`, whole or streamed.

Parsers live in a registry by name, as vLLM's `--tool-call-parser`. "kimi_k2" reads K2's format
`text<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}
<|tool_call_end|>...<|tool_calls_section_end|>`. Parsing never raises: a call it cannot fully read (arguments
that are not a JSON object, a generation cut off inside the call) is returned with `ToolCall.error` saying why
and its raw arguments text, so the server reports it instead of failing the request.

Streaming re-parses the whole accumulated text on every step and sends what lies past an "already sent" cursor
(vLLM's lesson with Kimi-K2: incremental state machines broke on markers split across tokens). Text that could be
the start of a marker is held back until the next step tells, so no partial marker leaks into `content`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from openk2.data.chat import (
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END,
)

# vLLM also accepts the singular spelling some K2 generations use.
SECTION_BEGINS = (TOOL_CALLS_SECTION_BEGIN, "<|tool_call_section_begin|>")
SECTION_ENDS = (TOOL_CALLS_SECTION_END, "<|tool_call_section_end|>")
K2_MARKERS = (*SECTION_BEGINS, *SECTION_ENDS, TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; error is None when complete and its arguments are a JSON object."""

    id: str
    name: str
    arguments: str
    error: str | None = None


@dataclass(frozen=True)
class ParsedMessage:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class StreamDelta:
    """A piece of an OpenAI streaming delta: content text, or a piece of the tool call at tool_call_index."""

    content: str | None = None
    tool_call_index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str):
    """Class decorator: make a ToolParser available as get_tool_parser(name)."""

    def register(cls: type[ToolParser]) -> type[ToolParser]:
        if name in TOOL_PARSERS:
            raise ValueError(f"tool parser {name!r} is already registered ({TOOL_PARSERS[name].__name__})")
        TOOL_PARSERS[name] = cls
        return cls

    return register


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; known: {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


@dataclass(frozen=True)
class RawCall:
    """A call as a scanner finds it in the text, before the JSON check; parse() and streaming share it."""

    id: str
    name: str
    header_done: bool  # the id is complete (a marker after it was seen)
    arguments: str  # raw text so far, whitespace around it included
    problem: str | None  # a structural error: a missing marker, a cut-off generation


class ToolParser(ABC):
    """A format's scanner; parse() and streaming are built on it and never raise on any text."""

    markers: tuple[str, ...] = ()  # strings whose partial start is held back while streaming

    @abstractmethod
    def scan(self, text: str) -> tuple[str, list[RawCall]]:
        """The content text and the raw calls of text."""

    def parse(self, text: str) -> ParsedMessage:
        """Content (None when empty) and tool calls; arguments are stripped and checked to be a JSON object."""
        content, raw_calls = self.scan(text)
        calls = []
        for raw in raw_calls:
            arguments = raw.arguments.strip()
            error = raw.problem or _arguments_error(arguments)
            if not raw.name and error is None:
                error = f"call id {raw.id!r} names no function"
            calls.append(ToolCall(raw.id, raw.name, arguments, error))
        return ParsedMessage(content or None, calls)

    def streamer(self) -> ToolCallStreamer:
        return ToolCallStreamer(self)


def _arguments_error(arguments: str) -> str | None:
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError) as e:
        return f"arguments are not valid JSON ({e})"
    if not isinstance(value, dict):
        return f"arguments are JSON but not an object (a {type(value).__name__})"
    return None


# ---------------------------------------------------------------- kimi_k2


def _find_first(text: str, needles: tuple[str, ...], start: int = 0) -> tuple[int, str]:
    """Position and text of the earliest of needles in text[start:], or (-1, "")."""
    best, found = -1, ""
    for needle in needles:
        i = text.find(needle, start)
        if i >= 0 and (best < 0 or i < best):
            best, found = i, needle
    return best, found


def _name_of(call_id: str) -> str:
    """The function name inside a K2 call id `functions.NAME:IDX` (either part may be missing)."""
    name = call_id.removeprefix("functions.")
    head, colon, idx = name.rpartition(":")
    return head if colon and idx.isascii() and idx.isdigit() else name


def _scan_k2(text: str) -> tuple[str, list[RawCall]]:
    """Content text and the raw calls of K2-format text; the single pass both parse() and streaming use."""
    begin, _ = _find_first(text, SECTION_BEGINS)
    first_call = text.find(TOOL_CALL_BEGIN)
    if begin < 0 or (0 <= first_call < begin):  # a call without a section marker still starts the calls
        begin = first_call
    if begin < 0:
        return text, []
    content = text[:begin]
    calls: list[RawCall] = []
    pos = begin
    stops = (TOOL_CALL_BEGIN, *SECTION_ENDS)
    while True:
        call_at = text.find(TOOL_CALL_BEGIN, pos)
        end_at, end_marker = _find_first(text, SECTION_ENDS, pos)
        if call_at < 0 or (0 <= end_at < call_at):
            if end_at >= 0:
                trailing = text[end_at + len(end_marker):]
                if trailing.strip():  # text after the section (K2 writes none) is kept as content
                    content += trailing
            return content, calls
        pos = call_at + len(TOOL_CALL_BEGIN)
        arg_at = text.find(TOOL_CALL_ARGUMENT_BEGIN, pos)
        stop_at, _ = _find_first(text, (*stops, TOOL_CALL_END), pos)
        if arg_at < 0 or (0 <= stop_at < arg_at):
            header_end = len(text) if stop_at < 0 else stop_at
            problem = (f"no {TOOL_CALL_ARGUMENT_BEGIN} after the call id" if stop_at >= 0
                       else "generation ended inside the call id")
            call_id = text[pos:header_end].strip()
            calls.append(RawCall(call_id, _name_of(call_id), stop_at >= 0, "", problem))
            if stop_at >= 0 and text.startswith(TOOL_CALL_END, stop_at):
                stop_at += len(TOOL_CALL_END)
            pos = header_end if stop_at < 0 else stop_at
            continue
        call_id = text[pos:arg_at].strip()
        pos = arg_at + len(TOOL_CALL_ARGUMENT_BEGIN)
        close_at = text.find(TOOL_CALL_END, pos)
        stop_at, _ = _find_first(text, stops, pos)
        if close_at >= 0 and (stop_at < 0 or close_at < stop_at):
            end, after, problem = close_at, close_at + len(TOOL_CALL_END), None
        elif stop_at >= 0:  # the next call or the section's end came first
            end, after, problem = stop_at, stop_at, f"no {TOOL_CALL_END} after the arguments"
        else:  # the generation was cut off inside the arguments
            end, after, problem = len(text), len(text), f"generation ended before {TOOL_CALL_END}"
        calls.append(RawCall(call_id, _name_of(call_id), True, text[pos:end], problem))
        pos = after


@register_tool_parser("kimi_k2")
class KimiK2ToolParser(ToolParser):
    """K2's tool-call format (spec §4); ids stay as generated, names come from `functions.NAME:IDX`."""

    markers = K2_MARKERS

    def scan(self, text: str) -> tuple[str, list[RawCall]]:
        return _scan_k2(text)


# ---------------------------------------------------------------- streaming


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of text that is a proper start of a marker (it may become one)."""
    longest = max((len(m) for m in markers), default=1) - 1
    for n in range(min(longest, len(text)), 0, -1):
        tail = text[-n:]
        if any(m.startswith(tail) and m != tail for m in markers):
            return n
    return 0


class ToolCallStreamer:
    """OpenAI streaming deltas of one generation: feed() the accumulated text each step, finish() at the end.

    Each step scans the text minus a possible partial marker at its end and sends what is past the cursor:
    new content, a call's id and name once its header is complete, then its arguments as they grow (trailing
    whitespace held back, as parse() strips it). finish() sends what remains so that, concatenated, the deltas
    give exactly parse(text): content, and each call's id, name and arguments."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.content_sent = 0
        self.calls_announced = 0
        self.arguments_sent: list[int] = []

    def feed(self, accumulated_text: str) -> list[StreamDelta]:
        safe = accumulated_text[: len(accumulated_text) - held_back(accumulated_text, self.parser.markers)]
        content, calls = self.parser.scan(safe)
        deltas = self._content_delta(content)
        for index, raw in enumerate(calls):
            if not raw.header_done:
                break
            # the arguments grow at their end; stripped, a prefix of them is a prefix of what parse() returns
            deltas += self._call_deltas(index, raw.id, raw.name, raw.arguments.strip())
        return deltas

    def finish(self, accumulated_text: str) -> list[StreamDelta]:
        parsed = self.parser.parse(accumulated_text)
        deltas = self._content_delta(parsed.content or "")
        for index, call in enumerate(parsed.tool_calls):
            deltas += self._call_deltas(index, call.id, call.name, call.arguments)
        return deltas

    def _content_delta(self, content: str) -> list[StreamDelta]:
        if len(content) <= self.content_sent:
            return []
        piece, self.content_sent = content[self.content_sent:], len(content)
        return [StreamDelta(content=piece)]

    def _call_deltas(self, index: int, call_id: str, name: str, arguments: str) -> list[StreamDelta]:
        deltas = []
        if index >= self.calls_announced:  # calls are announced in order, each once
            deltas.append(StreamDelta(tool_call_index=index, id=call_id, name=name))
            self.calls_announced = index + 1
            self.arguments_sent.append(0)
        sent = self.arguments_sent[index]
        if len(arguments) > sent:
            deltas.append(StreamDelta(tool_call_index=index, arguments=arguments[sent:]))
            self.arguments_sent[index] = len(arguments)
        return deltas
