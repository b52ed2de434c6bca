"""Muon: momentum orthogonalised by Newton–Schulz, RMS-matched to AdamW (K2 paper §2.1, Algorithm 1; spec §2).

    M_t = μ·M_{t-1} + G_t;   U_t = G_t + μ·M_t (Nesterov) or M_t
    O_t = NewtonSchulz5(U_t)
    W_t = W_{t-1} − η·(0.2·√max(A, B)·O_t + λ·W_{t-1})

A 3-D parameter is a stack of matrices (the routed experts, (E, out, in)): each expert is
orthogonalised on its own, all of them in one batched call. The functional `muon_` is shared with
`MuonClip`, which adds AdamW and QK-Clip around it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

from openk2.optim.sharded import holds_whole_matrices, is_dtensor, local_part

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, also K2's (spec §2)
NS_CHUNK_ELEMENTS = 1 << 22  # matrices per batched NS call: as many as fit in this many elements (at least one)


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (exact enough to test against fp64); bf16 on accelerators, as Keller Jordan and Moonlight run it."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """≈ U Vᵀ of G = U S Vᵀ for each matrix of G (..., A, B) (spec §2: quintic Newton–Schulz).

    Returns a new tensor in `dtype`; G is never written to.
    """
    a, b, c = coefficients
    # out of place throughout: G may be the momentum buffer itself (torch.optim.Muon 2.13 divides a
    # bf16 buffer in place here, because .bfloat16() of a bf16 tensor is that tensor)
    X = G.reshape(-1, *G.shape[-2:])  # (N, A, B)
    tall = X.shape[-2] > X.shape[-1]
    if tall:  # iterate on the wide orientation: the Gram matrix X Xᵀ is then the small one
        X = X.mT
    # normalise before casting: one rounding to `dtype` instead of two (‖X‖_2 ≤ ‖X‖_F = 1)
    X = (X / X.norm(dim=(-2, -1), keepdim=True, dtype=torch.float32).clamp_min(eps)).to(dtype)
    for _ in range(steps):
        A = X @ X.mT  # (N, A, A) with A ≤ B
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # bA + cA²
        X = torch.baddbmm(X, B, X, beta=a)  # aX + b(XXᵀ)X + c(XXᵀ)²X
    return (X.mT if tall else X).reshape(G.shape)


def muon_scale(shape: torch.Size) -> float:
    """0.2·√max(A, B): an update of RMS 0.2, AdamW's typical RMS, so Muon reuses AdamW's lr and λ (Moonlight §2.2)."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


@torch.no_grad()
def muon_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_steps: int,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_dtype: torch.dtype | None,
) -> None:
    """One Muon step on `params` in place (spec §2); buffers hold M_{t-1} and become M_t."""
    for p, g, m in zip(params, grads, momentum_buffers):
        m.mul_(momentum).add_(g)  # M_t = μ M_{t-1} + G_t: the paper's sum form, not an EMA
        u = g.add(m, alpha=momentum) if nesterov else m
        p.mul_(1 - lr * weight_decay)  # decoupled weight decay on W_{t-1}
        shape = p.shape[-2:]
        if is_dtensor(p):  # an FSDP2 shard
            if not holds_whole_matrices(p):
                # rows of each matrix are split over ranks (Moonlight's distributed Muon): gather the full
                # update, orthogonalise it on every rank, keep this rank's rows of the result
                o = orthogonalized(u.full_tensor(), ns_steps, ns_coefficients, eps,
                                   ns_dtype or default_ns_dtype(p.device))
                p.to_local().add_(local_part(o, p), alpha=-lr * muon_scale(shape))
                continue
            p, u = p.to_local(), u.to_local()  # whole experts on this rank: orthogonalise them here
        # a stack of experts goes through NS in chunks of whole matrices: batched, yet with bounded
        # temporaries (K2 has 384 experts of 2048×7168 per layer); one chunk is as fast as many on CPU
        chunk = max(1, NS_CHUNK_ELEMENTS // shape.numel())
        for p_part, u_part in zip(p.view(-1, *shape).split(chunk), u.view(-1, *shape).split(chunk)):
            o = newton_schulz(u_part, ns_steps, ns_coefficients, eps, ns_dtype or default_ns_dtype(p.device))
            p_part.add_(o, alpha=-lr * muon_scale(shape))


def orthogonalized(u: Tensor, ns_steps: int, ns_coefficients: tuple[float, float, float], eps: float,
                   ns_dtype: torch.dtype) -> Tensor:
    """Newton–Schulz of each matrix of `u` (A, B) or (E, A, B), in chunks of whole matrices, as one tensor."""
    shape = u.shape[-2:]
    chunk = max(1, NS_CHUNK_ELEMENTS // shape.numel())
    parts = u.reshape(-1, *shape).split(chunk)
    return torch.cat([newton_schulz(part, ns_steps, ns_coefficients, eps, ns_dtype) for part in parts]).view(u.shape)


class Muon(Optimizer):
    """Muon for 2-D weights and (E, A, B) stacks of them (K2 paper §2.1, Algorithm 1 without QK-Clip).

    `ns_dtype` None picks fp32 on CPU and bf16 elsewhere. Momentum buffers have the parameter's dtype.
    Unlike `torch.optim.Muon`, the momentum is the paper's sum μM + G (an EMA differs from it only by
    the factor 1−μ, which Newton–Schulz normalises away) and Newton–Schulz never aliases the buffer.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_dtype: torch.dtype | None = None,
    ):
        check_muon_hyperparameters(lr, momentum, weight_decay, ns_steps, ns_coefficients, eps)
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "ns_steps": ns_steps, "ns_coefficients": tuple(ns_coefficients), "eps": eps, "ns_dtype": ns_dtype}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.ndim not in (2, 3):
                    name = group["param_names"][i] if "param_names" in group else f"#{i}"
                    raise ValueError(f"Muon takes 2-D matrices or 3-D stacks of them; parameter {name} has shape "
                                     f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            muon_group_(group, self.state)
        return loss


def muon_group_(group: dict, state: dict) -> None:
    """Apply `muon_` to one param group, creating momentum buffers on first use."""
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    muon_(params, [p.grad for p in params], [state[p]["momentum_buffer"] for p in params],
          lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
          weight_decay=group["weight_decay"], ns_steps=group["ns_steps"], ns_coefficients=group["ns_coefficients"],
          eps=group["eps"], ns_dtype=group["ns_dtype"])


def check_muon_hyperparameters(lr, momentum, weight_decay, ns_steps, ns_coefficients, eps) -> None:
    """Fail loudly, naming the bad value (house rule 10)."""
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not (isinstance(ns_steps, int) and ns_steps >= 1):
        raise ValueError(f"ns_steps must be a positive int, got {ns_steps!r}")
    if len(ns_coefficients) != 3:
        raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
