"""SFT data (paper §3.1, spec §4): chat JSONL -> token ids with an assistant-only loss mask, packed into rows.

Input: JSONL, one conversation per line, `{"messages": [...], "tools": [...]?}` in OpenAI format (the synthesis
output, or any OpenAI-messages file); other keys (`provenance`, ids) are ignored, whitespace-only lines hold nothing.
A conversation is rendered by a `ChatTemplate` (K2's format by default) into segments, and a token carries loss
exactly where the assistant generates: its text, its tool calls and the end of its turn. System, user and tool
turns, the tool declaration and every turn header carry none.

Tokenisation matches what a served model sees: the text is tokenised in pieces cut wherever the loss mask changes,
so the prompt before each assistant turn is tokenised on its own, as a server tokenises it before generating, and the
assistant's text starts at a token boundary, as generated text does. Tokenising the whole text at once could merge the
end of the prompt with the start of the reply (with K2's markers as plain text, SmolLM2's BPE writes `<|im_middle|>`
+ `<|tool_calls_section_begin|>` with a `|><` token) and teach a first token that never follows a real prompt: a
model trained so answered every BFCL item in prose (benchmarks/RESULTS.md). Byte-level BPE, the field's default, adds
nothing at the start of a piece; a tokenizer that prepends a space to every text would need a different cut.

Every line that cannot be trained on is reported as `path:line: reason` (malformed JSON, a schema error, a tool
call naming an undeclared tool, a tool result answering no call, more tokens than `seq_len`, nothing to train on):
`on_bad_example = "fail"` raises at the first, "skip" keeps every report for the caller to log and count.

Packing: examples go whole into rows of `seq_len` tokens (first fit, longest first); each token keeps its example's
positions (restarting at 0) and a document id, so attention never crosses an example (`K2ForCausalLM(...,
document_ids=)`; transformers models detect the restarts in `position_ids`). The first token of each example and
all padding carry no loss, so a packed row's loss is the token-weighted mean of its examples' losses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from openk2.data.chat import ROLES, ChatTemplate, k2_call_id, validate_tools
from openk2.data.tokenizer import Tokenizer

IGNORE = -100  # the label of a token without loss (torch's and transformers' ignore_index)


class BadExampleError(ValueError):
    """A chat JSONL line that cannot be trained on, with `on_bad_example = "fail"`."""


@dataclass(frozen=True)
class BadExample:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line, "reason": self.reason}


@dataclass
class Example:
    """One conversation: its token ids and which of them carry loss."""

    ids: list[int]
    loss_mask: list[bool]  # loss_mask[t]: token t is a training target (predicted from tokens < t)
    source: str  # path:line

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


# ---------------------------------------------------------------- validation


def check_conversation(record: Any) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of one JSONL record, or ValueError saying what is wrong with it."""
    if not isinstance(record, Mapping):
        raise ValueError(f"a line must be a JSON object with 'messages', got {type(record).__name__}")
    messages, tools = record.get("messages"), record.get("tools")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list, got {messages!r:.80}")
    validate_tools(tools)
    declared = {t["function"]["name"] for t in tools or []}
    calls_so_far: set[str] = set()  # ids a tool result may answer: the client's and the K2-rendered ones
    position = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
        if message.get("tool_calls") and role != "assistant":
            raise ValueError(f"{where}: only assistant messages make tool calls, this one has role {role!r}")
        for j, call in enumerate(message.get("tool_calls") or [] if role == "assistant" else []):
            function = call.get("function") if isinstance(call, Mapping) else None
            name = function.get("name") if isinstance(function, Mapping) else None
            if not isinstance(name, str):
                raise ValueError(f"{where}: tool_calls[{j}] has no function name: {call!r:.80}")
            if name not in declared:
                raise ValueError(f"{where}: tool call names undeclared tool {name!r} "
                                 f"(declared: {sorted(declared) or 'none'})")
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: tool call {name!r} arguments are not JSON ({e})") from None
            if not isinstance(arguments, Mapping):
                raise ValueError(f"{where}: tool call {name!r} arguments must be a JSON object, got {arguments!r:.80}")
            if call.get("id") is not None:
                calls_so_far.add(call["id"])
            calls_so_far.add(k2_call_id(call, position))
            position += 1
        if role == "tool" and message.get("tool_call_id") not in calls_so_far:
            raise ValueError(f"{where}: tool_call_id {message.get('tool_call_id')!r} matches no earlier tool call")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to train on")
    return messages, tools


# ---------------------------------------------------------------- rendering + tokenisation


def tokenize_conversation(messages: list[dict], tools: list[dict] | None, template: ChatTemplate,
                          tokenizer: Tokenizer, source: str = "") -> Example:
    """Render with `template` and tokenise it in runs of segments of equal trainability (see the module doc)."""
    runs: list[tuple[str, bool]] = []
    for s in template.segments(messages, tools):
        if runs and runs[-1][1] == s.trainable:
            runs[-1] = (runs[-1][0] + s.text, s.trainable)
        else:
            runs.append((s.text, s.trainable))
    ids: list[int] = []
    mask: list[bool] = []
    for (_, trainable), piece in zip(runs, tokenizer.encode_batch([t for t, _ in runs]), strict=True):
        ids += piece
        mask += [trainable] * len(piece)
    if mask:
        mask[0] = False  # nothing before it in its row predicts it
    return Example(ids=ids, loss_mask=mask, source=source)


def read_chat_jsonl(paths: Iterable[str | os.PathLike], tokenizer: Tokenizer, template: ChatTemplate, seq_len: int,
                    on_bad_example: Literal["skip", "fail"] = "skip",
                    report: Callable[[BadExample], None] | None = None) -> tuple[list[Example], list[BadExample]]:
    """Every trainable conversation of the files, and a report for each line that is not (see the module docstring).

    With "fail" the first bad line raises BadExampleError; with "skip" each is passed to `report` as it is found."""
    if on_bad_example not in ("skip", "fail"):
        raise ValueError(f"on_bad_example must be 'skip' or 'fail', got {on_bad_example!r}")
    examples: list[Example] = []
    bad: list[BadExample] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SFT data file not found: {path}")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                source = f"{path}:{lineno}"
                try:
                    example = _line_example(line, tokenizer, template, seq_len, source)
                except (ValueError, TypeError) as e:
                    problem = BadExample(str(path), lineno, str(e))
                    if on_bad_example == "fail":
                        raise BadExampleError(f"{problem} (data.on_bad_example = 'fail')") from None
                    bad.append(problem)
                    if report is not None:
                        report(problem)
                    continue
                examples.append(example)
    if not examples:
        raise ValueError(f"no trainable conversation in {', '.join(map(str, paths))} "
                         f"({len(bad)} bad line{'s' * (len(bad) != 1)})")
    return examples, bad


def _line_example(line: str, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int, source: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e})") from None
    messages, tools = check_conversation(record)
    if not template.supports_tools and (tools or any(m.get("tool_calls") for m in messages)):
        raise ValueError(f"chat template {template.name!r} does not render tools or tool calls")
    example = tokenize_conversation(messages, tools, template, tokenizer, source)
    if len(example.ids) > seq_len:
        raise ValueError(f"{len(example.ids)} tokens, longer than the context data.seq_len = {seq_len}")
    if not example.trained_tokens:
        raise ValueError("no token carries loss after rendering (an empty assistant turn?)")
    return example


# ---------------------------------------------------------------- packing


@dataclass
class PackedBatch:
    """Rows of packed examples; labels are the ids where a token carries loss, IGNORE elsewhere."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long, restarting at 0 for each example
    document_ids: torch.Tensor  # (B, T) long, one id per example of a row (padding is its own document)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> PackedBatch:
        return PackedBatch(self.input_ids[start:stop], self.labels[start:stop], self.position_ids[start:stop],
                           self.document_ids[start:stop])

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(*(t.to(device, non_blocking=True) for t in
                             (self.input_ids, self.labels, self.position_ids, self.document_ids)))

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def pack_examples(examples: list[Example], seq_len: int, pad_id: int) -> PackedBatch:
    """All examples packed whole into rows of seq_len (first fit decreasing); raises if one is longer."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].ids), i))
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []
    for i in order:
        n = len(examples[i].ids)
        if n > seq_len:
            raise ValueError(f"{examples[i].source}: {n} tokens do not fit a row of seq_len {seq_len}")
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            rows.append([])
            free.append(seq_len)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= n
    shape = (len(rows), seq_len)
    batch = PackedBatch(torch.full(shape, pad_id), torch.full(shape, IGNORE), torch.zeros(shape, dtype=torch.long),
                        torch.zeros(shape, dtype=torch.long))
    for r, members in enumerate(rows):
        at = 0
        for doc, i in enumerate(members + [None]):
            n = len(examples[i].ids) if i is not None else seq_len - at  # None: the padding after the last one
            if n == 0:
                continue
            span = slice(at, at + n)
            batch.position_ids[r, span] = torch.arange(n)
            batch.document_ids[r, span] = doc
            if i is not None:
                ids = torch.tensor(examples[i].ids)
                batch.input_ids[r, span] = ids
                batch.labels[r, span] = ids.masked_fill(~torch.tensor(examples[i].loss_mask), IGNORE)
                batch.labels[r, at] = IGNORE  # an example's first token is never predicted
            at += n
    return batch


class PackedBatches:
    """Endless batches of `batch_size` packed rows, reshuffled each epoch; `state_dict` resumes the stream exactly."""

    def __init__(self, rows: PackedBatch, batch_size: int, seed: int):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.position = 0  # rows handed out so far, over all epochs

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=generator)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> PackedBatch:
        n = len(self.rows)
        orders: dict[int, torch.Tensor] = {}  # one permutation per epoch this batch touches
        index = []
        for p in range(self.position, self.position + self.batch_size):
            epoch, i = divmod(p, n)
            if epoch not in orders:
                orders[epoch] = self._epoch_order(epoch)
            index.append(int(orders[epoch][i]))
        self.position += self.batch_size
        chosen = torch.tensor(index)
        return PackedBatch(self.rows.input_ids[chosen], self.rows.labels[chosen], self.rows.position_ids[chosen],
                           self.rows.document_ids[chosen])

    @property
    def epoch(self) -> float:
        return self.position / len(self.rows)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["rows"] != len(self.rows):
            raise ValueError(f"data state is for {state['rows']} rows with seed {state['seed']}, this data has "
                             f"{len(self.rows)} rows with seed {self.seed}: the SFT data changed since the checkpoint")
        self.position = int(state["position"])
