"""The routed experts' SwiGLU on rows sorted by expert, as one autograd op (DeepSeek-V3's dropless MoE, spec §1).

Why one op with its own backward: torch.compile cannot trace a loop whose trip counts live on the device, and
inductor lowers `grouped_mm` in bf16 only. As a custom op the experts are one opaque node of a compiled graph and
the rest of the layer compiles around them; in eager mode it is the same arithmetic. Each expert multiplies only
the rows routed to it: `F.grouped_mm` where this torch runs the dtype on this device, else a loop over the experts
that have rows (it reads the row counts on the host: one sync per layer on a GPU).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def _grouped_mm_takes(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this build's grouped_mm runs `dtype` on `device_type`: probed once, since it varies by version
    (CPU kernels from torch 2.9, fp32 on CUDA only in some builds)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a = torch.zeros(8, 16, dtype=dtype, device=device_type)
        F.grouped_mm(a, torch.zeros(2, 16, 16, dtype=dtype, device=device_type),
                     offs=torch.tensor([4, 8], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def grouped_mm_runs(x: Tensor, w: Tensor) -> bool:
    """Whether x (rows) against the expert stack w can go through `F.grouped_mm`: same dtype, a dtype the device
    takes, and every row a multiple of 16 bytes (the kernel's alignment)."""
    return (x.dtype == w.dtype and all(d * x.element_size() % 16 == 0 for d in w.shape[1:])
            and _grouped_mm_takes(x.device.type, x.dtype))


def _segments(ends: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert with rows."""
    out, start = [], 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out.append((e, start, end))
        start = end
    return out


@torch.library.custom_op("openk2::experts_swiglu", mutates_args=())
def experts_swiglu(xs: Tensor, gate: Tensor, up: Tensor, down: Tensor, ends: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """xs (S, H) rows sorted by expert; gate, up (E, I, H), down (E, H, I) (the hub's row layouts); ends (E,) int32
    cumulative row counts. Returns y (S, H) = down_e(silu(gate_e x) * up_e x) per row, and the pre-activations
    g, u (S, I) that the backward needs."""
    if grouped_mm_runs(xs, gate):
        g = F.grouped_mm(xs, gate.transpose(1, 2), offs=ends)
        u = F.grouped_mm(xs, up.transpose(1, 2), offs=ends)
        return F.grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=ends), g, u
    S, I = xs.shape[0], gate.shape[1]
    g, u, y = xs.new_zeros(S, I), xs.new_zeros(S, I), xs.new_zeros(S, xs.shape[1])
    for e, a, b in _segments(ends):
        torch.mm(xs[a:b], gate[e].T, out=g[a:b])
        torch.mm(xs[a:b], up[e].T, out=u[a:b])
        torch.mm(F.silu(g[a:b]) * u[a:b], down[e].T, out=y[a:b])
    return y, g, u


@experts_swiglu.register_fake
def _(xs, gate, up, down, ends):
    S, I = xs.shape[0], gate.shape[1]
    return xs.new_empty(S, xs.shape[1]), xs.new_empty(S, I), xs.new_empty(S, I)


@torch.library.custom_op("openk2::experts_swiglu_backward", mutates_args=())
def experts_swiglu_backward(dy: Tensor, xs: Tensor, gate: Tensor, up: Tensor, down: Tensor, ends: Tensor,
                            g: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (xs, gate, up, down) of `experts_swiglu`'s y, given dy (S, H). Experts without rows get zeros."""
    sig = torch.sigmoid(g)
    act = g * sig  # silu(g)
    d_act = sig * (1 + g * (1 - sig))  # silu'(g)
    h = act * u
    if grouped_mm_runs(xs, gate):
        dh = F.grouped_mm(dy, down, offs=ends)  # (S, I)
        dg, du = dh * u * d_act, dh * act
        d_down = F.grouped_mm(dy.T, h, offs=ends)  # (E, H, I): groups run along the rows
        d_gate = F.grouped_mm(dg.T, xs, offs=ends)
        d_up = F.grouped_mm(du.T, xs, offs=ends)
        return F.grouped_mm(dg, gate, offs=ends) + F.grouped_mm(du, up, offs=ends), d_gate, d_up, d_down
    dxs, d_gate, d_up, d_down = (torch.zeros_like(t) for t in (xs, gate, up, down))
    for e, a, b in _segments(ends):
        torch.mm(dy[a:b].T, h[a:b], out=d_down[e])
        dh = dy[a:b] @ down[e]
        dg, du = dh * u[a:b] * d_act[a:b], dh * act[a:b]
        torch.mm(dg.T, xs[a:b], out=d_gate[e])
        torch.mm(du.T, xs[a:b], out=d_up[e])
        torch.addmm(dg @ gate[e], du, up[e], out=dxs[a:b])
    return dxs, d_gate, d_up, d_down


@experts_swiglu_backward.register_fake
def _(dy, xs, gate, up, down, ends, g, u):
    return torch.empty_like(xs), torch.empty_like(gate), torch.empty_like(up), torch.empty_like(down)


def _setup_context(ctx, inputs, output) -> None:
    xs, gate, up, down, ends = inputs
    _, g, u = output
    ctx.save_for_backward(xs, gate, up, down, ends, g, u)


def _backward(ctx, dy, _dg, _du):
    xs, gate, up, down, ends, g, u = ctx.saved_tensors
    return (*experts_swiglu_backward(dy.contiguous(), xs, gate, up, down, ends, g, u), None)


experts_swiglu.register_autograd(_backward, setup_context=_setup_context)
