"""Supervised fine-tuning (paper §3.1): `openk2 sft CONFIG` on chat JSONL, loss on the assistant's tokens only.

A short composition over shared parts: the data of `openk2.data.sft` (render, mask, validate, pack), a model (a
hub-layout folder: K2 family -> openk2's K2ForCausalLM, any other causal LM -> transformers; or a K2 preset),
MuonClip by default (the paper fine-tunes with Muon) or AdamW, and pretraining's loop, run folder, checkpoints and
bit-exact resume (`openk2.train.pretrain.train_loop`). Packed rows never attend across examples: K2 models get
`document_ids`, transformers models `position_ids` that restart per example with no attention mask and no cache,
which transformers turns into a block-diagonal causal mask (eager and sdpa alike).

QK-Clip on transformers models: their q_proj/k_proj attention (Llama, Qwen2, Mistral, SmolLM2, ...) is given the
S_max recording protocol of `openk2.optim.qk_clip` through a registered attention function: `sdpa` always, plus,
when recording, each head's max logit recomputed without autograd. Attention that normalises q or k
after the projections (Qwen3's q_norm) cannot be clipped that way: MuonClip refuses it, use optim.name = "adamw".

K2's chat format on a model whose tokenizer lacks K2's markers (SmolLM2): with `data.add_chat_tokens` they are added
as special tokens and the embeddings grow to hold them, each new row the mean of its name's pieces; the checkpoint's
tokenizer then carries K2's chat template, so `openk2 serve --model RUN_DIR` renders and parses K2 tool calls.
"""

from __future__ import annotations

import json
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from openk2.config import load_config
from openk2.data.chat import K2_CHAT_TOKENS, K2_MODEL_TYPES, ChatTemplate
from openk2.data.sft import BadExample, PackedBatch, PackedBatches, pack_examples, read_chat_jsonl
from openk2.data.tokenizer import PAD_TOKEN, Tokenizer, load_tokenizer, train_tokenizer
from openk2.device import tune_cpu_allocator
from openk2.model import K2ForCausalLM, preset
from openk2.train import checkpoint as ckpt
from openk2.train.config import OptimSection, ScheduleSection, TrainSection
from openk2.train.distributed import Distributed
from openk2.train.pretrain import (
    AnomalyGuard,
    StepResult,
    TrainingParts,
    _autocast,
    apply_gradients,
    build_optimizer,
    new_run_dir,
    train_loop,
)
from openk2.train.run import RunDir

# the attention implementation name under which transformers models record S_max for QK-Clip
RECORDING_ATTENTION = "openk2_sdpa_recording"


# ---------------------------------------------------------------- config


@dataclass
class SFTModelSection:
    path: str | None = None  # a hub-layout model folder; when set it wins over `preset`
    preset: str = "tiny"  # a K2 preset, randomly initialised (smoke runs)
    overrides: dict[str, Any] = field(default_factory=dict)  # preset ModelConfig fields to change


@dataclass
class SFTDataSection:
    train: list[str] = field(default_factory=list)  # chat JSONL files; empty = the built-in sample (sft_sample.py)
    val: list[str] = field(default_factory=list)  # validation JSONL; empty = val_fraction of the training lines
    val_fraction: float = 0.1
    chat_template: str = "k2"  # "k2" (spec §4), "model" (the model folder's own), or a .jinja file
    tokenizer: str | None = None  # a preset's tokenizer; None = the model folder's, or one trained on the data
    vocab_size: int = 1024  # of the tokenizer trained on the data (preset models without data.tokenizer)
    seq_len: int = 512  # packed row length; a longer conversation is a bad example
    on_bad_example: Literal["skip", "fail"] = "skip"  # skip: report, count, write bad_examples.jsonl; fail: stop
    add_chat_tokens: bool = True  # K2 template, tokenizer without K2's markers: add them, grow the embeddings


@dataclass
class SFTConfig:
    run_dir: str = "runs/sft-{time}"
    model: SFTModelSection = field(default_factory=SFTModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    optim: OptimSection = field(default_factory=OptimSection)  # the same section as pretraining
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:  # the train and optim sections check themselves
        if not 0 <= self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if self.data.seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {self.data.seq_len}")


def load_sft_config(path: str | Path | None, overrides: list[str]) -> SFTConfig:
    return load_config(SFTConfig, path, overrides)


def resume_sft_config(run_dir: str | Path, overrides: list[str] = ()) -> SFTConfig:
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.toml)")
    return load_config(SFTConfig, path, [f'run_dir="{Path(run_dir)}"', *overrides])


# ---------------------------------------------------------------- model + tokenizer


def is_k2_folder(model_dir: Path) -> bool:
    config = model_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: not a hub-layout model folder")
    return json.loads(config.read_text()).get("model_type") in K2_MODEL_TYPES


def load_model_folder(model_dir: Path, device: torch.device) -> torch.nn.Module:
    """K2 family -> K2ForCausalLM; anything else -> transformers' AutoModelForCausalLM (fp32, sdpa)."""
    if is_k2_folder(model_dir):
        return K2ForCausalLM.from_pretrained(model_dir, device=device)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)


def add_chat_tokens(tokenizer: Tokenizer, model: torch.nn.Module) -> list[str]:
    """Add K2's chat markers missing from the tokenizer as special tokens; grow a transformers model's embeddings."""
    missing = [t for t in K2_CHAT_TOKENS if tokenizer.backend.token_to_id(t) is None]
    if not missing:
        return []
    if isinstance(model, K2ForCausalLM):
        raise ValueError(f"the K2 model's tokenizer lacks K2's chat tokens {missing}; give a tokenizer that has them")
    tokenizer.backend.add_special_tokens(missing)
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > rows:
        model.resize_token_embeddings(tokenizer.vocab_size, mean_resizing=False)
    init_from_names(tokenizer, model, missing)
    return missing


def init_from_names(tokenizer: Tokenizer, model: torch.nn.Module, tokens: list[str]) -> None:
    """Each new token's input and output rows = the mean of the rows of its name's pieces ("tool call end").

    Mean-of-vocabulary rows (transformers' default) start every new marker at nearly the same vector, and a short
    fine-tune then confuses them: SmolLM2 after 41 CPU steps wrote <|tool_call_end|> wherever any marker belonged.
    Rows from the names start them apart, each near words that say what it marks.
    """
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != tables[0].data_ptr():  # untied head
        tables.append(output.weight)
    with torch.no_grad():
        for token in tokens:
            name = token.strip("<|>").replace("_", " ").replace("im ", "")  # "<|im_user|>" -> "user"
            pieces = [i for i in tokenizer.backend.encode(" " + name, add_special_tokens=False).ids
                      if i < tables[0].shape[0] and tokenizer.backend.id_to_token(i) not in tokens]
            row = tokenizer.backend.token_to_id(token)
            for table in tables:
                table[row] = table[pieces].mean(dim=0)


def sft_template(cfg: SFTDataSection, model_dir: Path | None) -> ChatTemplate:
    if cfg.chat_template == "k2":
        return ChatTemplate.k2()
    if cfg.chat_template == "model" and model_dir is None:
        raise ValueError("data.chat_template = 'model' needs model.path (a preset model has no template of its own)")
    return ChatTemplate.for_model(model_dir or Path("."), cfg.chat_template)


def train_data_paths(cfg: SFTDataSection, run: RunDir) -> list[Path]:
    if cfg.train:
        return [Path(p) for p in cfg.train]
    from openk2.data.sft_sample import write_sample_jsonl

    path = run.path / "data" / "sample.jsonl"
    return [path if path.is_file() else write_sample_jsonl(path)]


def tokenizer_for_preset(cfg: SFTDataSection, paths: list[Path], template: ChatTemplate) -> Tokenizer:
    """data.tokenizer, or a byte-level BPE (K2's special tokens) trained on the rendered conversations."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    texts = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                texts.append(template.render(record["messages"], record.get("tools")))
            except (ValueError, TypeError, KeyError):
                continue  # bad lines are reported when the data is read
    return train_tokenizer(texts, cfg.vocab_size, progress=False)


# ---------------------------------------------------------------- S_max recording for transformers attention


def _recording_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """sdpa; while `module.record_max_logits` in a training forward, also each head's S_max (spec §2).

    The logits for S_max are recomputed without autograd, one sequence at a time, so recording keeps nothing for the
    backward pass and holds at most one (heads, Tq, Tk) block: the attention itself stays sdpa (fused, no (B, heads,
    T, T) probabilities saved), which on CPU is the difference between fitting in memory or not.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(module, "record_max_logits", False) and torch.is_grad_enabled():
        with torch.no_grad():
            batch_max = _head_max_logits(query, key, attention_mask, scaling)
            module.max_logits = batch_max if module.max_logits is None else torch.maximum(module.max_logits, batch_max)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _head_max_logits(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None) -> torch.Tensor:
    """(heads,) max over the batch of each query head's scaled, unmasked logits; GQA groups share their KV head."""
    B, nh, Tq, d = query.shape
    nkv, Tk = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else d ** -0.5
    out = torch.full((nh,), float("-inf"), device=query.device)
    if attention_mask is None:  # transformers skipped the mask: plain causal, the same for every sequence
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
    for b in range(B):
        q = query[b].reshape(nkv, nh // nkv, Tq, d)
        logits = (q @ key[b].transpose(-2, -1).unsqueeze(1)).float().mul_(scale).reshape(nh, Tq, Tk)
        if attention_mask is not None:
            mask = attention_mask[b if attention_mask.shape[0] > 1 else 0]
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        out = torch.maximum(out, logits.masked_fill_(~allowed, float("-inf")).amax(dim=(-2, -1)))
    return out


def _reset_max_logits(module) -> None:
    module.max_logits = None


def enable_max_logit_recording(model: torch.nn.Module) -> int:
    """Give a transformers model's q_proj/k_proj attention modules qk_clip.py's recording protocol; count them."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)
    AttentionMaskInterface.register(RECORDING_ATTENTION, sdpa_mask)
    model.set_attn_implementation(RECORDING_ATTENTION)
    n = 0
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "k_proj") and not hasattr(module, "record_max_logits"):
            module.record_max_logits = False
            module.max_logits = None
            module.reset_max_logits = types.MethodType(_reset_max_logits, module)
            n += 1
    return n


# ---------------------------------------------------------------- step + validation


def packed_loss(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Mean next-token loss over the batch's loss-carrying tokens, with no attention across packed examples."""
    if isinstance(model, K2ForCausalLM):
        return model(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
                     document_ids=batch.document_ids).loss
    # no attention mask and no cache: transformers reads the restarts of position_ids as packed sequences
    return model(input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
                 use_cache=False).loss


def sft_step(model, optimizer, batch: PackedBatch, cfg: SFTConfig, device: torch.device, dist: Distributed,
             guard: AnomalyGuard) -> StepResult:
    """One optimizer step; each micro-batch's mean loss is weighted by its share of the step's trained tokens, so the
    step's loss is the token-weighted mean over every example of the global batch."""
    rows = len(batch) // dist.world_size
    local = batch.rows(dist.rank * rows, (dist.rank + 1) * rows) if dist.enabled else batch
    micro = len(local) // cfg.train.grad_accum
    trained = dist.mean(torch.tensor(float(local.trained_tokens))).item() * dist.world_size  # over all ranks
    total = torch.zeros((), device=device)
    for i in range(cfg.train.grad_accum):
        mb = local.rows(i * micro, (i + 1) * micro).to(device)
        n = mb.trained_tokens
        if n == 0:
            continue
        with _autocast(device):
            # × world_size: data-parallel gradients are averaged over ranks, the token weights already sum to 1
            loss = packed_loss(model, mb) * (n * dist.world_size / trained)
        loss.backward()
        total += loss.detach().float()
    result = apply_gradients(model, optimizer, dist.mean(total).item(), cfg.optim, guard)
    result.counts = {"tokens": batch.input_ids.numel(), "trained_tokens": batch.trained_tokens}
    return result


@torch.no_grad()
def evaluate_packed(model, rows: PackedBatch, batch_size: int, device: torch.device) -> float:
    """Token-weighted mean loss over every validation row."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        mb = rows.rows(start, start + batch_size).to(device)
        n = mb.trained_tokens
        if n:
            with _autocast(device):
                loss_sum += float(packed_loss(model, mb).float()) * n
            tokens += n
    model.train()
    return loss_sum / max(tokens, 1)


# ---------------------------------------------------------------- the run


@dataclass
class SFTData:
    train: PackedBatch
    val: PackedBatch | None
    bad: list[BadExample]
    examples: int
    val_examples: int


def prepare_sft_data(cfg: SFTConfig, paths: list[Path], tokenizer: Tokenizer, template: ChatTemplate,
                     log) -> SFTData:
    """Read, validate and pack the training (and validation) conversations; report every bad line through `log`."""
    d = cfg.data
    kwargs = {"tokenizer": tokenizer, "template": template, "seq_len": d.seq_len, "on_bad_example": d.on_bad_example,
              "report": lambda bad: log(f"bad example skipped: {bad}")}
    examples, bad = read_chat_jsonl(paths, **kwargs)
    if d.val:
        val_examples, val_bad = read_chat_jsonl([Path(p) for p in d.val], **kwargs)
        bad += val_bad
    else:  # a fixed, seeded share of the training conversations
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
        n_val = int(len(examples) * d.val_fraction)
        val_examples = [examples[i] for i in sorted(order[:n_val])]
        examples = [examples[i] for i in sorted(order[n_val:])]
    pad = tokenizer.backend.token_to_id(PAD_TOKEN)
    pad = tokenizer.eos_id if pad is None else pad  # padding carries no loss and attends only to itself
    return SFTData(train=pack_examples(examples, d.seq_len, pad),
                   val=pack_examples(val_examples, d.seq_len, pad) if val_examples else None, bad=bad,
                   examples=len(examples), val_examples=len(val_examples))


def sft(cfg: SFTConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune the configured model on chat JSONL; with `resume`, continue the run folder's latest checkpoint."""
    dist = Distributed.from_env()
    try:
        return _sft(cfg, resume, dist)
    finally:
        dist.close()


def _sft(cfg: SFTConfig, resume: str | Path | None, dist: Distributed) -> dict[str, Any]:
    device = dist.device(cfg.train.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    if resume is None:
        new_run_dir(cfg, "sft")
    run = RunDir(cfg.run_dir)
    checkpoint = ckpt.latest_checkpoint(run.checkpoints) if resume is not None else None
    state = ckpt.load_trainer_state(checkpoint) if checkpoint is not None else None
    torch.manual_seed(cfg.train.seed)
    model_dir = Path(cfg.model.path) if cfg.model.path else None
    template = sft_template(cfg.data, model_dir)
    paths = train_data_paths(cfg.data, run)

    if checkpoint is not None:  # weights and tokenizer (chat tokens included) as they were saved
        tokenizer = load_tokenizer(checkpoint / "model")
        model = load_model_folder(checkpoint / "model", device)
    elif model_dir is not None:
        tokenizer = load_tokenizer(cfg.data.tokenizer or model_dir)
        model = load_model_folder(model_dir, device)
    else:
        tokenizer = tokenizer_for_preset(cfg.data, paths, template)
        model_config = preset(cfg.model.preset).replace(**cfg.model.overrides)
        model = K2ForCausalLM(model_config.replace(vocab_size=tokenizer.vocab_size)).to(device)
    added = add_chat_tokens(tokenizer, model) if template.native_k2 and cfg.data.add_chat_tokens else []
    log = tqdm.write if dist.is_main else (lambda _: None)
    data = prepare_sft_data(cfg, paths, tokenizer, template, log)

    model.train()
    model = dist.parallelize(model)
    is_k2 = isinstance(model, K2ForCausalLM)
    if not is_k2 and cfg.optim.name == "muonclip":
        enable_max_logit_recording(model)
    optimizer = build_optimizer(cfg, model)
    batches = PackedBatches(data.train, cfg.train.batch_size, cfg.train.seed)
    start_step = state["step"] if state is not None else 0
    if dist.is_main:
        if resume is not None:
            run.truncate_metrics(start_step)  # steps after the checkpoint are redone
        if state is None:
            run.create(cfg, device)
            bad_path = run.path / "bad_examples.jsonl"
            bad_path.write_text("".join(json.dumps(b.to_json()) + "\n" for b in data.bad))
            run.log({"kind": "data", "step": 0, "examples": data.examples, "val_examples": data.val_examples,
                     "bad_examples": len(data.bad), "rows": len(data.train),
                     "trained_tokens_per_epoch": data.train.trained_tokens,
                     "fill": round(float((data.train.labels != -100).float().mean()), 4)})
        n_params = sum(p.numel() for p in model.parameters())
        print(f"openk2 sft: {type(model).__name__} {n_params / 1e6:.1f}M parameters, {cfg.optim.name}, device {device};"
              f" {data.examples} conversations in {len(data.train)} rows of {cfg.data.seq_len} tokens"
              f" ({len(data.bad)} bad lines skipped, see bad_examples.jsonl), template {template.name}"
              + (f", added chat tokens {added}" if added else "") + f"; run folder {run.path}"
              + (f"; resumed at step {start_step}" if start_step else ""))
    parts = TrainingParts(
        verb="sft", cfg=cfg, run=run, dist=dist, device=device, model=model, optimizer=optimizer, batches=batches,
        step=lambda batch, guard: sft_step(model, optimizer, batch, cfg, device, dist, guard),
        evaluate=(lambda: evaluate_packed(model, data.val, cfg.train.batch_size, device)) if data.val else None,
        load_weights=lambda path: load_model_folder(path / "model", torch.device("cpu")).state_dict(),
        tokenizer=tokenizer, chat_template=None if template.native_k2 else template.source)
    started = time.perf_counter()
    summary = train_loop(parts, state)
    summary["seconds"] = time.perf_counter() - started
    summary["bad_examples"] = len(data.bad)
    return summary
