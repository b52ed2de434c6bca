"""The typed config of a pretraining run (`openk2 pretrain CONFIG.toml --set key=value`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelSection:
    preset: str = "tiny"
    # ModelConfig fields to change from the preset, e.g. {num_hidden_layers = 2}
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    # Corpus files or folders (.txt, .md, .jsonl with "text", .parquet); empty = the default corpus
    # (CPython's standard library + Python and Linux docs, built offline by `openk2 data prepare`).
    corpus: list[str] = field(default_factory=list)
    cache_dir: str = "data"  # default corpus, trained tokenizer and token shards live here
    tokenizer: str | None = None  # tokenizer.json / folder / tiktoken .model; None = train one
    vocab_size: int = 8192  # for a trained tokenizer; must equal the model's vocab_size
    val_fraction: float = 0.02
    seq_len: int = 256


@dataclass
class OptimSection:
    name: Literal["muonclip", "adamw"] = "muonclip"
    lr: float = 3e-3  # Muon's lr (MuonClip; RMS-matched to AdamW, Moonlight §2.2) or AdamW's lr (adamw)
    # Embeddings, head and norms: MuonClip's AdamW group, and the same group under plain AdamW. None = lr, as
    # Moonlight §2.2 shares one lr; set it to tune that group apart (AdamW's one lr is a compromise between them).
    adamw_lr: float | None = None
    weight_decay: float = 0.1  # K2 uses 0.1 (paper §2.4)
    momentum: float = 0.95
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    qk_clip_tau: float | None = 100.0  # None: record max logits, never clip
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off
    expert_bias_update: float = 1e-3  # γ of the aux-loss-free balance (DeepSeek-V3)

    def __post_init__(self) -> None:
        if self.qk_clip_tau is not None and self.qk_clip_tau <= 0:
            raise ValueError(f"optim.qk_clip_tau must be positive, got {self.qk_clip_tau}")


@dataclass
class ScheduleSection:
    kind: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # WSD: share of the steps spent decaying
    min_lr_ratio: float = 0.1


@dataclass
class TrainSection:
    steps: int = 300
    batch_size: int = 8  # global, in sequences
    grad_accum: int = 1  # micro-batches per step (each batch_size / grad_accum sequences)
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # a non-finite loss, or one above spike_factor × its running mean: skip the step, roll back
    # to the last checkpoint (and skip the batch), or save and stop
    on_anomaly: Literal["skip", "rollback", "stop"] = "skip"
    spike_factor: float = 3.0
    device: str = "auto"  # auto: cuda when present (bf16 autocast), else cpu (fp32)
    # torch.compile the model (inductor): fewer, fused kernels, which pays on a GPU, where a small model's step is
    # launch-bound; on a CPU the matmuls dominate and the first step pays about a minute of compiling
    compile: bool = False

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("train.steps, train.batch_size and train.grad_accum must be positive")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                             f"train.grad_accum={self.grad_accum}")


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain-{time}"  # {time} becomes the start time, YYYYmmdd-HHMMSS
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self) -> None:
        if not 0 <= self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
