"""A model folder -> what the server serves: engine, tokenizer, chat template, tool parser, stop ids (spec §4).

PATH is a hub-layout folder (config.json + safetensors + tokenizer) or an openk2 run folder, served from
its newest checkpoint (`checkpoints/latest` -> `checkpoints/<step>/model`). K2-family models
(model_type kimi_k2 / deepseek_v3) run on openk2's own Engine (absorbed-MLA latent cache); any other
causal LM on the transformers-backed HFEngine. fp32 on CPU, bf16 on GPU unless `dtype` says otherwise.

`ServedModel.chat_prompt` turns an OpenAI conversation into prompt ids, forcing a tool call for
tool_choice "required" or a named function by ending the prompt with the start of K2's call syntax;
`ServedModel.parse` turns the generated text (with that forced start) back into content and tool calls.

Chat template "auto" on a model whose own template has no tool support (SmolLM2) renders requests that
declare tools in K2's format, the one our tool parser reads, and requests without tools in the model's own
format, the one it was tuned on: a small instruct model does not follow a format it has never seen.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from openk2.data.chat import (
    K2_MODEL_TYPES,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALLS_SECTION_BEGIN,
    ChatTemplate,
)
from openk2.data.tokenizer import Tokenizer, load_tokenizer
from openk2.serve.scheduler import Scheduler, StepEngine
from openk2.serve.tool_parser import ToolParser, get_tool_parser

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Context served when the caller gives none (ours): the config's own limit, capped so the cache fits a laptop.
DEFAULT_MAX_SEQ_LEN = 8192
# The parser for K2's tool-call syntax; templates rendering K2's format are read with it.
K2_TOOL_PARSER = "kimi_k2"


@dataclass
class ChatPrompt:
    """A conversation ready to generate from: ids, and the text forced at the start of the answer."""

    ids: list[int]
    forced: str  # already in the prompt; the answer's text is forced + what the model generates
    parse_tools: bool  # whether the answer is read for tool calls


@dataclass
class ServedModel:
    name: str
    engine: StepEngine
    tokenizer: Tokenizer
    template: ChatTemplate
    tool_parser: ToolParser | None  # reads the template's tool-call format; None when it has none
    stop_token_ids: tuple[int, ...]
    path: Path | None = None
    plain_template: ChatTemplate | None = None  # for requests without tools, when set (see the module docstring)

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def new_scheduler(self) -> Scheduler:
        """A scheduler (not started) over this model's engine, detokenizer and stop ids."""
        return Scheduler(self.engine, self.tokenizer.decode, default_stop_ids=self.stop_token_ids)

    def chat_prompt(self, messages: Sequence[Mapping], tools: list[dict] | None = None,
                    tool_choice: str | Mapping = "auto") -> ChatPrompt:
        """Render and encode; tool_choice "none" | "auto" | "required" | {"type": "function", "function": {"name"}}."""
        forced = ""
        if tool_choice not in ("none", "auto"):
            if self.tool_parser is None or not self.template.native_k2:
                raise ValueError(f"tool_choice {tool_choice!r} needs K2's tool-call format; this server renders "
                                 f"chat with template {self.template.name!r}")
            forced = TOOL_CALLS_SECTION_BEGIN + TOOL_CALL_BEGIN + "functions."
            if isinstance(tool_choice, Mapping):  # a named function: the whole call header up to its arguments
                calls = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
                forced += f"{tool_choice['function']['name']}:{calls}{TOOL_CALL_ARGUMENT_BEGIN}"
        template = self.plain_template if self.plain_template is not None and not tools else self.template
        text = template.render(messages, tools or None, add_generation_prompt=True) + forced
        parse = tool_choice != "none" and self.tool_parser is not None and bool(tools)
        return ChatPrompt(self.tokenizer.encode(text, allow_special=True), forced, parse)

    def parse(self, text: str, prompt: ChatPrompt) -> tuple[str | None, list]:
        """Generated text -> (content, tool calls); a call whose arguments do not parse keeps them raw, logged."""
        if not prompt.parse_tools:
            return text, []
        parsed = self.tool_parser.parse(prompt.forced + text)
        for call in parsed.tool_calls:
            if call.error is not None:
                log.warning("tool call %s (%s) did not parse: %s", call.id, call.name, call.error)
        return parsed.content, parsed.tool_calls


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A hub-layout folder itself, or a run folder's newest checkpoint's `model/` folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path is not a folder: {path}")
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        path = path / "checkpoints" / latest.read_text().strip() / "model"
    elif (path / "model" / "config.json").is_file():  # one checkpoint folder, checkpoints/step_N
        path = path / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: not a hub-layout model folder or an openk2 run folder")
    return path


def _stop_token_ids(tokenizer: Tokenizer, templates: Sequence[ChatTemplate], config: dict) -> tuple[int, ...]:
    """EOS ids (tokenizer and config) plus the templates' stop strings that are single tokens."""
    eos = config.get("eos_token_id")
    ids = [tokenizer.eos_id] + (eos if isinstance(eos, list) else [] if eos is None else [eos])
    for s in (s for template in templates for s in template.stop_strings):
        encoded = tokenizer.encode(s, allow_special=True)
        if len(encoded) == 1:
            ids.append(encoded[0])
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= int(i) < tokenizer.vocab_size))


def load_served_model(path: str | os.PathLike, *, max_batch: int = 16, max_seq_len: int | None = None,
                      dtype: str | torch.dtype | None = None, chat_template: str = "auto",
                      served_name: str | None = None, device: str | torch.device | None = None) -> ServedModel:
    """Load PATH for serving (see the module docstring)."""
    model_dir = resolve_model_dir(path)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tiktoken.model")):
        raise FileNotFoundError(f"no tokenizer in {model_dir}: expected tokenizer.json (with tokenizer_config.json) "
                                "or tiktoken.model beside config.json")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = json.loads((model_dir / "config.json").read_text())
    limit = int(config.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LEN)
    max_seq_len = max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN)
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    tokenizer = load_tokenizer(model_dir)
    template = ChatTemplate.for_model(model_dir, chat_template)
    plain = None
    if chat_template == "auto" and template.native_k2 and config.get("model_type") not in K2_MODEL_TYPES:
        try:
            plain = ChatTemplate.for_model(model_dir, "model")
        except ValueError:  # the model has no template of its own: K2's for everything
            plain = None
        plain = None if plain is None or plain.native_k2 else plain
    if config.get("model_type") in K2_MODEL_TYPES:
        from openk2.model import K2ForCausalLM
        from openk2.serve.engine import Engine

        model = K2ForCausalLM.from_pretrained(model_dir, dtype=dtype, device=device)
        engine = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len)
    else:
        from openk2.serve.hf_engine import HFEngine  # imports transformers: only for the models that need it

        engine = HFEngine.from_pretrained(model_dir, max_batch=max_batch, max_seq_len=max_seq_len, dtype=dtype,
                                          device=device)
    parser = get_tool_parser(K2_TOOL_PARSER) if template.native_k2 else None
    name = served_name or Path(path).resolve().name
    templates = [template] if plain is None else [template, plain]
    return ServedModel(name=name, engine=engine, tokenizer=tokenizer, template=template, tool_parser=parser,
                       stop_token_ids=_stop_token_ids(tokenizer, templates, config), path=model_dir,
                       plain_template=plain)
