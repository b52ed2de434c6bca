"""MuonClip (K2 paper §2.1, Algorithm 1; spec §2): Muon for hidden matrices, AdamW for the rest, then QK-Clip.

One optimizer over the whole model, so that an lr scheduler scales both halves together; its
param groups are Muon's then AdamW's (`group["use_muon"]` tells them apart).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.adamw import adamw

from openk2.optim.muon import NS_COEFFICIENTS, check_muon_hyperparameters, muon_group_
from openk2.optim.qk_clip import QKClip, QKClipStats, find_clip_targets


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon, AdamW) named parameters (spec §2).

    Muon: every 2-D hidden matrix (the router's gate too) and stacked experts (E, out, in).
    AdamW: embeddings, the output head, norms and any other vector. Frozen parameters: neither.
    Buffers (the router's e_score_correction_bias) are not parameters, so no optimizer moves them.
    """
    vocab = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if isinstance(out, nn.Module):
        vocab.append(out)
    vocab_params = {id(p) for m in vocab for p in m.parameters()}  # embedding and head: AdamW (Moonlight §2.2)
    muon, adam = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in vocab_params or p.ndim < 2:
            adam.append((name, p))
        elif p.ndim == 2 or (p.ndim == 3 and name.rpartition(".")[0].endswith("experts")):  # 3-D: (E, out, in)
            muon.append((name, p))
        else:
            raise ValueError(f"MuonClip cannot place parameter {name!r} of shape {tuple(p.shape)}: Muon takes 2-D "
                             f"matrices and (E, out, in) stacks under an `experts` module, AdamW vectors, "
                             f"embeddings and the output head")
    return muon, adam


def fusable(params) -> bool:
    """torch's fused AdamW kernel (6x faster than its per-tensor loop on CPU) takes float tensors on CPU/CUDA."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class MuonClip(Optimizer):
    """Muon + QK-Clip over `model`'s parameters (K2 paper Algorithm 1); `step()` after each backward.

    `adamw_lr` / `adamw_weight_decay` default to `lr` / `weight_decay`: Muon's 0.2·√max(A, B) scale
    matches AdamW's update RMS, so both share them (Moonlight §2.2). AdamW's betas (0.9, 0.95) and
    eps 1e-8 are Moonlight's; the K2 paper gives none. `qk_clip_tau` None records S_max without
    clipping. Telemetry of the last step: `clip_stats`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_dtype: torch.dtype | None = None,
        qk_clip_tau: float | None = 100.0,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
    ):
        check_muon_hyperparameters(lr, momentum, weight_decay, ns_steps, ns_coefficients, eps)
        adamw_lr = lr if adamw_lr is None else adamw_lr
        adamw_weight_decay = weight_decay if adamw_weight_decay is None else adamw_weight_decay
        for name, value, ok in (("adamw_lr", adamw_lr, adamw_lr >= 0), ("adamw_eps", adamw_eps, adamw_eps > 0),
                                ("adamw_weight_decay", adamw_weight_decay, adamw_weight_decay >= 0),
                                ("adamw_betas", adamw_betas, all(0 <= b < 1 for b in adamw_betas))):
            if not ok:
                raise ValueError(f"{name}={value!r} is out of range (lr, weight decay >= 0; eps > 0; betas in [0, 1))")
        targets = find_clip_targets(model)
        muon, adam = split_parameters(model)
        groups = [
            {"params": muon, "use_muon": True, "lr": lr, "momentum": momentum, "nesterov": nesterov,
             "weight_decay": weight_decay, "ns_steps": ns_steps, "ns_coefficients": tuple(ns_coefficients),
             "eps": eps, "ns_dtype": ns_dtype},
            {"params": adam, "use_muon": False, "lr": adamw_lr, "betas": tuple(adamw_betas), "eps": adamw_eps,
             "weight_decay": adamw_weight_decay, "fused": fusable(p for _, p in adam)},
        ]
        super().__init__([g for g in groups if g["params"]], {})
        self.qk_clip = QKClip(targets, qk_clip_tau)  # last: it switches recording on, once nothing can fail

    @torch.no_grad()
    def step(self, closure=None):
        """Muon and AdamW updates, then QK-Clip with the S_max of the forwards since the last step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                muon_group_(group, self.state)
            else:
                self._adamw_group(group)
        self.qk_clip.apply()
        return loss

    def _adamw_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if not self.state[p]:  # torch.optim.AdamW's state layout (fused: step on the parameter's device)
                step = torch.zeros((), device=p.device) if group["fused"] else torch.tensor(0.0)
                self.state[p].update(step=step, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state = [self.state[p] for p in params]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [],
              [s["step"] for s in state], fused=group["fused"] or None, amsgrad=False, beta1=group["betas"][0],
              beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=False)

    @property
    def clip_stats(self) -> QKClipStats | None:
        """Per-layer, per-head S_max and clip fractions of the last step (None before the first)."""
        return self.qk_clip.last

    def state_dict(self) -> dict:
        """torch's optimizer state (momenta, AdamW moments and steps) plus QK-Clip's step and counters."""
        state = super().state_dict()
        state["qk_clip"] = self.qk_clip.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        clip = state_dict.pop("qk_clip", None)
        super().load_state_dict(state_dict)
        if clip is not None:
            self.qk_clip.load_state_dict(clip)
