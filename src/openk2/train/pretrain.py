"""The pretraining loop (paper §2.1–2.4): WSD schedule, gradient accumulation, clipping, MuonClip or
AdamW, aux-loss-free expert balance, validation, anomaly handling, atomic checkpoints and bit-exact resume.

`pretrain(config)` is a short sequence of named steps; each piece lives in its own module. The loop itself,
`train_loop(TrainingParts, state)`, is shared with SFT (`openk2.train.sft`), which brings its own batches and step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from openk2.config import load_config
from openk2.data.tokenizer import Tokenizer
from openk2.device import autocast_dtype, tune_cpu_allocator
from openk2.model import K2ForCausalLM, ModelConfig, preset
from openk2.optim.schedule import lr_multiplier
from openk2.train import checkpoint as ckpt
from openk2.train.config import OptimSection, PretrainConfig
from openk2.train.data import PretrainData, prepare_pretrain_data
from openk2.train.distributed import Distributed
from openk2.train.plots import plot_run
from openk2.train.run import RunDir, read_metrics


def build_model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    overrides = dict(cfg.model.overrides)
    model_config = preset(cfg.model.preset).replace(**overrides)
    if model_config.vocab_size != vocab_size:
        if "vocab_size" in overrides:
            raise ValueError(f"model vocab_size {model_config.vocab_size} differs from the tokenizer's {vocab_size}")
        model_config = model_config.replace(vocab_size=vocab_size)
    return model_config


def build_optimizer(cfg: PretrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    from openk2.optim import MuonClip, split_parameters

    o = cfg.optim
    if o.name == "muonclip":
        return MuonClip(model, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                        qk_clip_tau=o.qk_clip_tau, adamw_lr=o.adamw_lr, adamw_betas=tuple(o.betas))
    # MuonClip's partition, so that `adamw_lr` means the same parameters under either optimizer.
    matrices, rest = split_parameters(model)
    rest_lr = o.lr if o.adamw_lr is None else o.adamw_lr
    groups = [{"params": [p for _, p in matrices], "weight_decay": o.weight_decay, "lr": o.lr},
              {"params": [p for _, p in rest if p.ndim >= 2], "weight_decay": o.weight_decay, "lr": rest_lr},
              {"params": [p for _, p in rest if p.ndim < 2], "weight_decay": 0.0, "lr": rest_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]


class AnomalyGuard:
    """Flags a non-finite loss or a spike above `factor` × the running mean (EMA) of past losses."""

    def __init__(self, factor: float, warmup: int = 10, decay: float = 0.95):
        self.factor, self.warmup, self.decay = factor, warmup, decay
        self.mean, self.count = 0.0, 0

    def check(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return "non-finite loss"
        if self.count >= self.warmup and loss > self.factor * self.mean:
            return f"loss spike {loss:.3f} > {self.factor:g} x running mean {self.mean:.3f}"
        return None

    def update(self, loss: float) -> None:
        self.mean = loss if self.count == 0 else self.decay * self.mean + (1 - self.decay) * loss
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.count = state["mean"], state["count"]


class StopRequested:
    """SIGINT / SIGTERM ask the loop to save and exit after the current step (a second SIGINT kills)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame):
        if self.signal == signal.SIGINT and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = sig

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device: torch.device, dist: Distributed) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    for batch in batches:
        local = dist.local_rows(batch).to(device)
        with _autocast(device):
            total += model(local, labels=local).loss.float()
    model.train()
    return dist.mean(total).item() / max(1, len(batches))


def _autocast(device: torch.device):
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    anomaly: str | None
    counts: dict[str, int] = field(default_factory=dict)  # what the step trained on, e.g. {"tokens": B * T}


def apply_gradients(model, optimizer, loss_value: float, cfg: OptimSection, guard: AnomalyGuard) -> StepResult:
    """The end of every step: check the loss, clip the gradient norm, step (or skip an anomaly), clear gradients."""
    anomaly = guard.check(loss_value)
    grad_norm = float("nan")
    if anomaly is None:
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        if not math.isfinite(grad_norm):
            anomaly = "non-finite gradient norm"
    if anomaly is None:
        optimizer.step()
        guard.update(loss_value)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, grad_norm, anomaly)


def train_step(model, optimizer, batch: torch.Tensor, cfg: PretrainConfig, device: torch.device,
               dist: Distributed, guard: AnomalyGuard) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches of this rank's rows of the global batch."""
    local = dist.local_rows(batch)
    micro = local.shape[0] // cfg.train.grad_accum
    total = torch.zeros((), device=device)
    for i in range(cfg.train.grad_accum):
        mb = local[i * micro:(i + 1) * micro].to(device, non_blocking=True)
        with _autocast(device):
            loss = model(mb, labels=mb).loss / cfg.train.grad_accum
        loss.backward()
        total += loss.detach().float()
    result = apply_gradients(model, optimizer, dist.mean(total).item(), cfg.optim, guard)
    result.counts = {"tokens": batch.numel()}
    return result


def max_logit_monitor(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Who records S_max: MuonClip itself, or (for AdamW) a log-only QK-Clip so every run reports it.

    None when the model has no attention that records its max logits (a transformers model without it)."""
    if hasattr(optimizer, "clip_stats"):
        return None
    from openk2.optim import QKClip, find_clip_targets

    targets = find_clip_targets(model)
    return QKClip(targets, tau=None) if targets else None


def telemetry(optimizer: torch.optim.Optimizer, monitor, tau: float | None) -> dict[str, Any]:
    """Per-layer max attention logit and the clipped-head fractions of this step (paper Fig. 2)."""
    stats = monitor.apply() if monitor is not None else getattr(optimizer, "clip_stats", None)
    if stats is None:
        return {}
    return {"max_logit": [round(float(m.max()), 4) for m in stats.max_logits], "qk_clip_tau": tau,
            "clipped_fraction": stats.clipped_fraction, "ever_clipped_fraction": stats.ever_clipped_fraction,
            "min_gamma": stats.min_gamma}


@dataclass
class TrainingParts:
    """What a stage (pretraining, SFT) hands the shared loop: its model, data, step and how to save and reload."""

    verb: str  # "pretrain" | "sft": progress bar, messages, the resume command
    cfg: Any  # a run config with `optim`, `schedule` and `train` sections (PretrainConfig, SFTConfig)
    run: RunDir
    dist: Distributed
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Any  # next(batches) gives a batch; state_dict() / load_state_dict() put the cursor in checkpoints
    step: Callable[[Any, AnomalyGuard], StepResult]  # one optimizer step on one global batch (apply_gradients)
    evaluate: Callable[[], float] | None  # validation loss, or None for no validation
    load_weights: Callable[[Path], dict[str, torch.Tensor]]  # a checkpoint's model state dict (rollback)
    tokenizer: Tokenizer | None = None  # saved beside each checkpoint's weights
    chat_template: str | None = None  # Jinja written into the checkpoint's tokenizer_config.json (None: default)


def train_loop(parts: TrainingParts, state: dict[str, Any] | None) -> dict[str, Any]:
    """Steps until cfg.train.steps: schedule, step, balance, metrics, validation, checkpoints, anomalies, signals.

    `state` is the trainer state of the checkpoint being resumed (None for a fresh run)."""
    cfg, run, dist, model, optimizer, batches = parts.cfg, parts.run, parts.dist, parts.model, parts.optimizer, \
        parts.batches
    guard = AnomalyGuard(cfg.train.spike_factor)
    monitor = max_logit_monitor(model, optimizer)
    counters: dict[str, int] = {"tokens": 0}
    start_step = 0
    if state is not None:
        dist.load_optimizer_state(optimizer, state["optimizer"])
        batches.load_state_dict(state["data"])
        guard.load_state_dict(state["guard"])
        counters = dict(state.get("counters", {"tokens": state["tokens_seen"]}))
        start_step = state["step"]
        ckpt.set_rng_states(state["rng"])

    def trainer_state(step: int) -> dict[str, Any]:
        return {"step": step, "optimizer": dist.optimizer_state(optimizer), "data": batches.state_dict(),
                "guard": guard.state_dict(), "tokens_seen": counters["tokens"], "counters": dict(counters),
                "rng": ckpt.rng_states()}

    def save(step: int) -> Path | None:
        state_ = trainer_state(step)
        full = dist.full_model_state(model)
        if dist.is_main:
            return ckpt.save_checkpoint(run.checkpoints, step, model, state_, keep=cfg.train.keep_checkpoints,
                                        model_state=full, tokenizer=parts.tokenizer,
                                        chat_template=parts.chat_template)
        return None

    balances = hasattr(model, "update_expert_bias")  # K2 models; transformers models have no router bias
    tau = cfg.optim.qk_clip_tau if cfg.optim.name == "muonclip" else None
    val_loss = None
    step = start_step
    bar = tqdm(total=cfg.train.steps, initial=start_step, desc=parts.verb, unit="step", disable=not dist.is_main,
               dynamic_ncols=True)
    with StopRequested() as stop:
        while step < cfg.train.steps:
            lr = set_lr(optimizer, lr_multiplier(step, cfg.train.steps, cfg.schedule.kind, cfg.schedule.warmup_steps,
                                                 cfg.schedule.decay_fraction, cfg.schedule.min_lr_ratio))
            batch = next(batches)
            t0 = time.perf_counter()
            result = parts.step(batch, guard)
            balance = model.update_expert_bias(gamma=cfg.optim.expert_bias_update) if balances else None
            elapsed = time.perf_counter() - t0
            if result.anomaly is not None:
                action = cfg.train.on_anomaly
                if dist.is_main:
                    run.log({"kind": "anomaly", "step": step + 1, "reason": result.anomaly, "action": action})
                    tqdm.write(f"step {step + 1}: {result.anomaly} -> {action}")
                if action == "stop":
                    save(step)
                    raise RuntimeError(f"stopped at step {step + 1}: {result.anomaly} (train.on_anomaly = 'stop')")
                if action == "rollback":
                    last = ckpt.latest_checkpoint(run.checkpoints)
                    if last is not None:
                        back = ckpt.load_trainer_state(last)
                        dist.load_model_state(model, parts.load_weights(last))
                        dist.load_optimizer_state(optimizer, back["optimizer"])
                        guard.load_state_dict(back["guard"])
                        counters = dict(back.get("counters", {"tokens": back["tokens_seen"]}))
                        step = back["step"]  # the data cursor goes on: the bad batch is skipped
                        bar.n = step
                        continue
                step += 1  # skip: the batch is consumed, the weights are untouched
                bar.update(1)
                continue
            step += 1
            for key, n in result.counts.items():
                counters[key] = counters.get(key, 0) + n
            record = {"kind": "train", "step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                      **{k: v for k, v in counters.items()},
                      "tokens_per_s": result.counts.get("tokens", 0) / elapsed,
                      **({"expert_load_max_over_mean": balance["load_max_over_mean"]} if balance else {}),
                      **telemetry(optimizer, monitor, tau)}
            if dist.is_main:
                run.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}",
                            **({"max_logit": f"{max(record['max_logit']):.1f}"} if record.get("max_logit") else {}))
            if parts.evaluate is not None and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                val_loss = parts.evaluate()
                if dist.is_main:
                    run.log({"kind": "val", "step": step, "val_loss": val_loss, "tokens": counters["tokens"]})
                    tqdm.write(f"step {step}: val_loss {val_loss:.4f}")
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                save(step)
            if stop.signal is not None:
                save(step)
                if dist.is_main:
                    bar.close()
                    print(f"\nstopped by signal {signal.Signals(stop.signal).name} at step {step}; checkpoint saved. "
                          f"Resume: openk2 {parts.verb} --resume {run.path}")
                run.close()
                return {"stopped": True, "step": step}
    bar.close()
    run.close()
    summary = {"step": step, "tokens_seen": counters["tokens"], "counters": dict(counters), "val_loss": val_loss,
               "run_dir": str(run.path)}
    if dist.is_main:
        last = [r for r in read_metrics(run.path) if r.get("kind") == "train" and r.get("max_logit")]
        summary["max_logit"] = max(last[-1]["max_logit"]) if last else None
        summary["plots"] = [str(p) for p in plot_run(run.path)]
    return summary


def new_run_dir(cfg: Any, verb: str) -> None:
    """Fill `{time}` into cfg.run_dir; refuse a folder that already holds a run."""
    cfg.run_dir = cfg.run_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    if (Path(cfg.run_dir) / "metrics.jsonl").exists():
        raise ValueError(f"run folder {cfg.run_dir} already holds a run: continue it with "
                         f"`openk2 {verb} --resume {cfg.run_dir}` or choose another run_dir")


def pretrain(cfg: PretrainConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train a model from the config; with `resume`, continue the run folder's latest checkpoint."""
    dist = Distributed.from_env()
    try:
        return _pretrain(cfg, resume, dist)
    finally:
        dist.close()


def _pretrain(cfg: PretrainConfig, resume: str | Path | None, dist: Distributed) -> dict[str, Any]:
    device = dist.device(cfg.train.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    if resume is None:
        new_run_dir(cfg, "pretrain")
    run = RunDir(cfg.run_dir)
    data: PretrainData = prepare_pretrain_data(cfg.data, seed=cfg.train.seed, dist=dist)

    torch.manual_seed(cfg.train.seed)
    model_config = build_model_config(cfg, data.vocab_size)
    start_step, state = 0, None
    if resume is not None:
        checkpoint = ckpt.latest_checkpoint(run.checkpoints)
        if checkpoint is not None:
            state = ckpt.load_trainer_state(checkpoint)
            model = ckpt.load_model(checkpoint, device=device)
            start_step = state["step"]
    if state is None:
        model = K2ForCausalLM(model_config).to(device)
    model.train()
    model = dist.parallelize(model)
    if cfg.train.compile:
        model.compile()  # in place: parameter names, checkpoints and the optimizer see the same module
    optimizer = build_optimizer(cfg, model)
    batches = data.train_batches(cfg.train.batch_size, cfg.data.seq_len)
    val = data.val_batches(cfg.train.batch_size, cfg.data.seq_len, cfg.train.eval_batches)
    if dist.is_main:
        if resume is not None:
            run.truncate_metrics(start_step)  # steps after the checkpoint are redone
        if state is None:
            run.create(cfg, device)
    if dist.is_main:
        print(f"openk2 pretrain: {model_config.num_parameters() / 1e6:.1f}M parameters "
              f"({model_config.num_parameters(active=True) / 1e6:.1f}M active), {cfg.optim.name}, device {device}"
              f"{f', {dist.world_size} ranks' if dist.world_size > 1 else ''}; run folder {run.path}"
              + (f"; resumed at step {start_step}" if start_step else ""))
    parts = TrainingParts(
        verb="pretrain", cfg=cfg, run=run, dist=dist, device=device, model=model, optimizer=optimizer, batches=batches,
        step=lambda batch, guard: train_step(model, optimizer, batch, cfg, device, dist, guard),
        evaluate=lambda: evaluate(model, val, device, dist),
        load_weights=lambda checkpoint: ckpt.load_model(checkpoint).state_dict(), tokenizer=data.tokenizer)
    return train_loop(parts, state)


def load_pretrain_config(path: str | Path | None, overrides: list[str]) -> PretrainConfig:
    return load_config(PretrainConfig, path, overrides)


def resume_config(run_dir: str | Path, overrides: list[str] = ()) -> PretrainConfig:
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.toml)")
    return load_config(PretrainConfig, path, [f'run_dir="{Path(run_dir)}"', *overrides])
