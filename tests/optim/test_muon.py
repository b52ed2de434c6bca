import math

import pytest
import torch

from openk2.optim import Muon, newton_schulz
from openk2.optim.muon import NS_COEFFICIENTS


def reference_muon(w0, grads, lr, momentum, weight_decay, nesterov=True, steps=5):
    """The spec's §2 formulas, written out again in fp64."""
    a, b, c = NS_COEFFICIENTS
    w, m = w0.double(), torch.zeros_like(w0, dtype=torch.float64)
    for g in grads:
        g = g.double()
        m = momentum * m + g
        u = g + momentum * m if nesterov else m
        x = u.T if u.shape[0] > u.shape[1] else u
        x = x / x.norm()
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + b * gram @ x + c * gram @ gram @ x
        o = x.T if u.shape[0] > u.shape[1] else x
        w = w - lr * (0.2 * math.sqrt(max(w.shape)) * o + weight_decay * w)
    return w


def run(opt_cls, w0, grads, **kwargs):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


SHAPES = [(64, 96), (96, 64), (48, 48)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov", [True, False])
def test_fp32_matches_fp64_spec_reference(shape, nesterov):
    w0 = torch.randn(shape) * 0.02
    grads = [torch.randn(shape) for _ in range(10)]
    ours = run(Muon, w0, grads, lr=0.02, weight_decay=0.1, nesterov=nesterov, ns_dtype=torch.float32)
    ref = reference_muon(w0, grads, lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=nesterov)
    assert rel(ours - w0, ref - w0.double()) < 1e-6  # relative to the parameter change, the stricter measure


@pytest.mark.parametrize("shape", [(64, 192), (192, 64), (128, 256)])
def test_bf16_matches_torch_muon_match_rms_adamw(shape):
    """torch.optim.Muon keeps an EMA momentum, (1−μ)× ours, which NS normalises away; it always runs NS in bf16.

    Two bf16 NS runs differ by their rounding noise: ≈ 0.8% here, up to 1% on square matrices (whose
    small singular values NS amplifies most), so the shapes are rectangular, as transformer weights are.
    """
    w0 = torch.randn(shape) * 0.02
    grads = [torch.randn(shape) for _ in range(10)]
    kwargs = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True}
    ours = run(Muon, w0, grads, ns_dtype=torch.bfloat16, **kwargs)
    theirs = run(torch.optim.Muon, w0, grads, adjust_lr_fn="match_rms_adamw", **kwargs)
    assert rel(ours - w0, theirs - w0) < 1e-2


def update_rms(shape, **kwargs):
    p = torch.nn.Parameter(torch.zeros(shape))
    p.grad = torch.randn(shape)
    Muon([p], lr=1.0, weight_decay=0.0, **kwargs).step()
    return p.detach().pow(2).mean().sqrt().item()


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (4, 64, 192)])
def test_update_rms_is_0p2_when_o_is_orthogonal(shape):
    """0.2·√max(A, B) gives RMS exactly 0.2 for O = UVᵀ; here a convergent quintic (p(1)=1, p'(1)=0) reaches UVᵀ."""
    assert abs(update_rms(shape, ns_coefficients=(15 / 8, -10 / 8, 3 / 8), ns_steps=30) - 0.2) < 1e-3


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 128), (4, 64, 192)])
def test_update_rms_with_k2_newton_schulz(shape):
    """K2's quintic does not converge to 1: it leaves singular values in about [0.68, 1.13], mean ≈ 0.85, so on
    Gaussian gradients the update RMS is ≈ 0.17–0.18, a little under Moonlight's 0.2 (which assumes O = UVᵀ)."""
    assert 0.16 <= update_rms(shape) <= 0.22


@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256), (512, 512), (1024, 1024), (768, 2048)])
def test_update_rms_is_0p2_within_0p02_at_hidden_sizes(shape):
    """At the sizes of real hidden matrices more singular values end high in K2's band: RMS 0.18–0.19 here."""
    torch.manual_seed(0)
    assert abs(update_rms(shape) - 0.2) <= 0.02


def test_batched_experts_equal_2d_loop():
    stack = torch.randn(6, 48, 80)
    batched = newton_schulz(stack)
    looped = torch.stack([newton_schulz(g) for g in stack])
    assert rel(batched, looped) < 1e-6
    # the whole optimizer: one (E, m, n) parameter == E separate (m, n) parameters
    grads = [torch.randn(6, 80, 48) for _ in range(3)]
    w0 = torch.randn(6, 80, 48) * 0.02
    stacked = run(Muon, w0, grads, lr=0.02)
    for e in range(6):
        single = run(Muon, w0[e], [g[e] for g in grads], lr=0.02)
        assert rel(stacked[e], single) < 1e-6


def test_expert_chunks_equal_one_batch(monkeypatch):
    """Large stacks go through NS a few experts at a time (bounded memory): same result as one batch."""
    from openk2.optim import muon

    w0, grads = torch.randn(6, 48, 80) * 0.02, [torch.randn(6, 48, 80) for _ in range(2)]
    whole = run(Muon, w0, grads, lr=0.02)
    monkeypatch.setattr(muon, "NS_CHUNK_ELEMENTS", 2 * 48 * 80 + 1)  # chunks of 2 experts
    assert rel(run(Muon, w0, grads, lr=0.02) - w0, whole - w0) < 1e-6


def test_bf16_momentum_buffer_survives_without_nesterov():
    """torch.optim.Muon 2.13 normalises a bf16 buffer in place when nesterov=False (.bfloat16() is a no-op view)."""
    p = torch.nn.Parameter(torch.randn(96, 64, dtype=torch.bfloat16))
    opt = Muon([p], lr=0.02, nesterov=False, ns_dtype=torch.bfloat16)
    g1, g2 = torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(96, 64, dtype=torch.bfloat16)
    p.grad = g1.clone()
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.bfloat16 and torch.equal(buf, g1)
    p.grad = g2.clone()
    opt.step()
    assert torch.equal(buf, g1 * 0.95 + g2)


def test_ns_never_writes_its_input():
    g = torch.randn(40, 20, dtype=torch.bfloat16)
    before = g.clone()
    newton_schulz(g, dtype=torch.bfloat16)
    assert torch.equal(g, before)


@pytest.mark.parametrize("name, value", [
    ("lr", -1.0), ("momentum", 1.0), ("weight_decay", -0.1), ("ns_steps", 0), ("ns_coefficients", (1.0, 2.0)),
    ("eps", 0.0),
])
def test_bad_hyperparameters_are_named(name, value):
    with pytest.raises(ValueError, match=name):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], **{"lr": 0.1, name: value})


def test_rejects_vectors_naming_them():
    with pytest.raises(ValueError, match="bias"):
        Muon([("bias", torch.nn.Parameter(torch.zeros(4)))], lr=0.1)
