"""The OpenAI wire format the server speaks: strict request models, response models, error bodies (spec §4).

Requests are validated strictly, as OpenAI's own API does: wrong types are not coerced ("5" is not an
integer), unknown fields are rejected, tools must carry a valid JSON Schema. Every failure becomes an
`APIError`, rendered as `{"error": {"message", "type", "param", "code"}}` with a 4xx status.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

# largest accepted values of a few fields (ours): a bound keeps hostile requests from allocating
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """An error the client caused (or a server failure, status 500), in OpenAI's error-body shape."""

    def __init__(self, message: str, status: int = 400, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as one OpenAI error: the message names the field and the bad value."""
    err = e.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    msg = err["msg"].removeprefix("Value error, ")
    if param is None:  # a whole-request check: its message names the values
        return APIError(msg, 400, code="invalid_value")
    value = repr(err.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    return APIError(f"{param}: {msg} (got {value})", 400, param=param, code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ----------------------------------------------------------------------------- requests
class FunctionDef(_Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_.\-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        try:
            Draft202012Validator.check_schema(value)
        except SchemaError as e:
            raise ValueError(f"not a valid JSON Schema: {e.message}") from None
        if value.get("type", "object") != "object":
            raise ValueError(f"a function's parameters must be an object schema, got type {value.get('type')!r}")
        return value


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr


class ToolCallIn(_Strict):
    id: StrictStr
    type: Literal["function"]
    function: FunctionCall


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None

    @model_validator(mode="after")
    def _by_role(self) -> Message:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        if self.role != "assistant" and self.tool_calls is not None:
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role!r}")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The OpenAI-format dict the chat template reads; text parts joined, developer read as system."""
        d: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        d["content"] = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls is not None:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


class StreamOptions(_Strict):
    include_usage: StrictBool = False


Number = StrictFloat  # strict floats take JSON integers too, never strings


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None  # not OpenAI's; vLLM's extension, 0 = off
    ignore_eos: StrictBool = False  # vLLM's extension: no stop token ends the sequence (benchmarks, RL budgets)
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1  # one choice per request (ours)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                                Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    presence_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None  # accepted at 0 only: not implemented
    frequency_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None
    user: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if isinstance(value, str):
            if not value:
                raise ValueError("a stop string must not be empty")
            return [value]
        return value


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=0)] | None = None  # alternatives are not reported

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not in tools {names}")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: StrictStr | Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
    logprobs: Annotated[StrictInt, Field(ge=0, le=1)] | None = None  # 1 = the sampled token's logprob only
    echo: Annotated[StrictBool, Field(description="accepted as false only")] = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, str) and not value:
            raise ValueError("the prompt is empty")
        return value

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class LoadWeightsRequest(_Strict):
    path: Annotated[StrictStr, Field(min_length=1)]


# ----------------------------------------------------------------------------- responses
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class TokenLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChoiceLogprobs(_Out):
    content: list[TokenLogprob] | None


class FunctionCallOut(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Out):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(_Out):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Out):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class TextCompletion(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "openk2"
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse(model: BaseModel) -> str:
    """One server-sent event; fields that are None are left out (OpenAI's chunks omit them too)."""
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
