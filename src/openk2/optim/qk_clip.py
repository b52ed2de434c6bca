"""QK-Clip (K2 paper §2.1, Algorithm 1; spec §2): cap each head's max attention logit at τ by rescaling W_q, W_k.

After the optimizer step, for each head h with S_max^h > τ, γ_h = τ / S_max^h and
  MHA:     W_q^h, W_k^h ← √γ_h·W_q^h, √γ_h·W_k^h       (GQA: per KV group, γ from the group's max S_max)
  MLA:     q^C, k^C rows of head h ← √γ_h;  q^R rows ← γ_h;  v rows and the shared k^R rows untouched
so that head h's logits, all bilinear in those rows, are scaled by exactly γ_h.

S_max comes from the attention modules themselves, through a small recording protocol:
`record_max_logits: bool`, `max_logits: Tensor | None` of shape (n_heads,) (the running max of
the scaled, causal pre-softmax logits since the last reset) and `reset_max_logits()`.
`openk2`'s `MultiHeadLatentAttention` implements it; any q_proj/k_proj attention that does can be clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from openk2.optim.sharded import is_dtensor, local_part


# ----------------------------------------------------------------------------- adapters
def scale_rows_(weight: Tensor, rows: Tensor) -> None:
    """weight[i] *= rows[i] in place for a (out, ...) weight or (out,) bias; rows of 1 stay bit-identical.

    An FSDP2-sharded weight (a DTensor) scales its local rows by its own part of `rows`.
    """
    scale = rows.view(-1, *([1] * (weight.ndim - 1)))
    if is_dtensor(weight):
        weight.to_local().mul_(local_part(scale.expand(weight.shape), weight))
    else:
        weight.mul_(scale)


class ClipTarget:
    """One attention module: reads its recorded S_max and knows which rows to rescale."""

    def __init__(self, name: str, module: nn.Module, n_heads: int):
        self.name, self.module, self.n_heads = name, module, n_heads

    def start_recording(self) -> None:
        self.module.record_max_logits = True
        self.module.reset_max_logits()

    def stop_recording(self) -> None:
        self.module.record_max_logits = False
        self.module.reset_max_logits()

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def max_logits(self) -> Tensor:
        """(n_heads,) fp32; -inf for a module that ran no forward since the last reset."""
        m = self.module.max_logits
        if m is None:
            return torch.full((self.n_heads,), -math.inf, device=self.device)
        return m.detach().float()

    def gamma(self, s_max: Tensor, tau: float) -> Tensor:
        """Per query head scale γ (1 for heads left alone), from (n_heads,) S_max."""
        return torch.where(s_max > tau, tau / s_max, torch.ones_like(s_max))

    def scale_(self, gamma: Tensor) -> None:
        raise NotImplementedError


class MLAClipTarget(ClipTarget):
    """MLA (spec §2): q^C and k^C rows by √γ, q^R rows by γ; v rows and the shared k^R rows never."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module, module.n_heads)
        self.d_nope, self.d_rope, self.d_v = module.d_nope, module.d_rope, module.d_v

    def scale_(self, gamma: Tensor) -> None:
        m, H = self.module, self.n_heads
        root, keep = gamma.sqrt()[:, None], torch.ones_like(gamma)[:, None]  # (H, 1)
        # q rows per head are [q^C | q^R]: k^R is shared by all heads, so q^R takes all of γ
        q_rows = torch.cat((root.expand(H, self.d_nope), gamma[:, None].expand(H, self.d_rope)), dim=1)
        kv_rows = torch.cat((root.expand(H, self.d_nope), keep.expand(H, self.d_v)), dim=1)  # [k^C | v]: v stays
        scale_rows_((m.q_proj if m.q_lora_rank is None else m.q_b_proj).weight, q_rows.flatten())
        scale_rows_(m.kv_b_proj.weight, kv_rows.flatten())


class GQAClipTarget(ClipTarget):
    """MHA / GQA with q_proj, k_proj: rows of head h (and their biases, if any) by √γ.

    With GQA a KV head serves `n_heads / n_kv_heads` query heads, so one γ per group, from the
    group's largest S_max, scales the group's query heads and its key head.
    """

    def __init__(self, name: str, module: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__(name, module, n_heads)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        for proj, heads in (("q_proj", n_heads), ("k_proj", n_kv_heads)):
            rows = getattr(module, proj).weight.shape[0]
            if rows != heads * head_dim:
                raise ValueError(f"{name}.{proj} has {rows} rows, not {heads} heads × head_dim {head_dim}")
        if n_heads % n_kv_heads:
            raise ValueError(f"{name}: {n_heads} query heads do not split into {n_kv_heads} KV groups")

    def gamma(self, s_max: Tensor, tau: float) -> Tensor:
        group_max = s_max.view(self.n_kv_heads, -1).amax(dim=1)  # (n_kv,)
        return super().gamma(group_max, tau).repeat_interleave(self.n_heads // self.n_kv_heads)

    def scale_(self, gamma: Tensor) -> None:
        root_q = gamma.sqrt()  # (n_heads,)
        root_k = root_q.view(self.n_kv_heads, -1)[:, 0]  # one value per group
        for proj, root in ((self.module.q_proj, root_q), (self.module.k_proj, root_k)):
            rows = root.repeat_interleave(self.head_dim)  # (heads · head_dim,)
            scale_rows_(proj.weight, rows)
            if proj.bias is not None:  # q = Wx + b: both scale, or the logit is not scaled by γ
                scale_rows_(proj.bias, rows)


def gqa_target(name: str, module: nn.Module) -> GQAClipTarget:
    """Read head counts from the module (ours: num_heads, num_key_value_heads) or its config (transformers)."""
    if getattr(module, "q_norm", None) is not None or getattr(module, "k_norm", None) is not None:
        raise ValueError(f"{name} normalises q/k after q_proj/k_proj, which would undo QK-Clip's rescaling")
    config = getattr(module, "config", None)
    n_heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads", None)
    n_kv = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(module, "head_dim", None)
    if not (n_heads and head_dim):
        raise ValueError(f"{name} has q_proj/k_proj but no num_heads/head_dim to split them by")
    return GQAClipTarget(name, module, n_heads, n_kv, head_dim)


def find_clip_targets(model: nn.Module) -> list[ClipTarget]:
    """Every attention module of `model` that records its max logits, with the adapter that clips it."""
    targets: list[ClipTarget] = []
    for name, module in model.named_modules():
        if not hasattr(module, "record_max_logits"):
            continue
        if hasattr(module, "kv_b_proj"):
            targets.append(MLAClipTarget(name, module))
        elif hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            targets.append(gqa_target(name, module))
        else:
            raise ValueError(f"{name} ({type(module).__name__}) records max logits but has neither MLA's "
                             f"kv_b_proj nor q_proj/k_proj: QK-Clip does not know which rows to scale")
    return targets


# ----------------------------------------------------------------------------- clip + telemetry
@dataclass
class QKClipStats:
    """What one `QKClip.apply` saw and did; `max_logits[i]` is layer `layers[i]`'s (n_heads,) S_max."""

    step: int
    layers: list[str]
    max_logits: list[Tensor]
    clipped_fraction: float  # heads with S_max > τ this step
    ever_clipped_fraction: float  # heads clipped at least once since the optimizer was built
    min_gamma: float  # smallest γ applied this step, 1.0 when none

    def metrics(self) -> dict[str, float]:
        """Scalars for metrics.jsonl."""
        return {
            "qk_clip/max_logit": max(float(m.max()) for m in self.max_logits),
            "qk_clip/clipped_fraction": self.clipped_fraction,
            "qk_clip/ever_clipped_fraction": self.ever_clipped_fraction,
            "qk_clip/min_gamma": self.min_gamma,
        }


class QKClip:
    """Reads S_max from `targets` after each optimizer step, clips heads over τ, keeps telemetry.

    tau None is log-only: S_max is recorded and reported, nothing is rescaled.
    """

    def __init__(self, targets: list[ClipTarget], tau: float | None = 100.0):
        if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"qk_clip_tau must be a positive number (or None for log-only), got {tau!r}")
        if not targets:
            raise ValueError("QK-Clip found no attention layers that record their max logits (MLA, or "
                             "q_proj/k_proj attention with record_max_logits)")
        self.targets, self.tau = targets, tau
        self.step = 0
        self.clip_counts = [torch.zeros(t.n_heads, dtype=torch.long) for t in targets]  # steps each head was clipped
        self.last: QKClipStats | None = None
        for t in targets:
            t.start_recording()

    @torch.no_grad()
    def apply(self) -> QKClipStats:
        """Clip every head whose S_max since the last call exceeds τ, then clear the recorded S_max."""
        s_max = torch.cat([t.max_logits() for t in self.targets])  # (total heads,)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(s_max, op=torch.distributed.ReduceOp.MAX)  # S_max over data-parallel ranks
        per_layer = list(s_max.cpu().split([t.n_heads for t in self.targets]))
        over = [m > self.tau if self.tau is not None else torch.zeros_like(m, dtype=torch.bool) for m in per_layer]
        min_gamma = 1.0
        for t, m, o, count in zip(self.targets, per_layer, over, self.clip_counts):
            if o.any():
                gamma = t.gamma(m, self.tau)
                min_gamma = min(min_gamma, float(gamma.min()))
                t.scale_(gamma.to(t.device))
                count += o
            t.module.reset_max_logits()
        self.step += 1
        total = sum(t.n_heads for t in self.targets)
        self.last = QKClipStats(
            step=self.step, layers=[t.name for t in self.targets], max_logits=per_layer,
            clipped_fraction=sum(int(o.sum()) for o in over) / total,
            ever_clipped_fraction=sum(int((c > 0).sum()) for c in self.clip_counts) / total,
            min_gamma=min_gamma,
        )
        return self.last

    def stop(self) -> None:
        """Turn recording off again (the modules go back to their fused attention)."""
        for t in self.targets:
            t.stop_recording()

    def state_dict(self) -> dict:
        return {"step": self.step,
                "clip_counts": {t.name: c.clone() for t, c in zip(self.targets, self.clip_counts)}}

    def load_state_dict(self, state: dict) -> None:
        names = [t.name for t in self.targets]
        if sorted(state["clip_counts"]) != sorted(names):
            raise ValueError(f"QK-Clip state is for layers {sorted(state['clip_counts'])}, "
                             f"this model has {sorted(names)}")
        self.step = int(state["step"])
        self.clip_counts = [state["clip_counts"][n].clone().long().cpu() for n in names]
