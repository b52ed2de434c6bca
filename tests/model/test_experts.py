import pytest
import torch
import torch.nn.functional as F

from openk2.model import experts as experts_mod
from openk2.model.experts import experts_swiglu


def reference(xs, gate, up, down, counts):
    """Plain autograd: each expert's SwiGLU on its slice, as a loop of matmuls."""
    outs = [(F.silu(x @ gate[e].T) * (x @ up[e].T)) @ down[e].T for e, x in enumerate(xs.split(counts))]
    return torch.cat(outs)


def problem(E=6, H=32, I=16, counts=(5, 0, 9, 1, 0, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(sum(counts), H, generator=g)
    gate, up = torch.randn(E, I, H, generator=g) * 0.2, torch.randn(E, I, H, generator=g) * 0.2
    down = torch.randn(E, H, I, generator=g) * 0.2
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    return xs, gate, up, down, ends, list(counts)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
def test_forward_and_gradients_match_plain_autograd(monkeypatch, grouped):
    """Both paths give the loop-of-matmuls output and gradients; experts without rows get zero gradients."""
    monkeypatch.setattr(experts_mod, "grouped_mm_runs", lambda *_: grouped)
    xs, gate, up, down, ends, counts = problem()
    dy = torch.randn(xs.shape[0], xs.shape[1])
    leaves = [t.clone().requires_grad_() for t in (xs, gate, up, down)]
    y, _, _ = experts_swiglu(*leaves, ends)
    y.backward(dy)
    ref_leaves = [t.clone().requires_grad_() for t in (xs, gate, up, down)]
    ref = reference(*ref_leaves, counts)
    ref.backward(dy)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)
    for w in leaves[1:]:
        assert not w.grad[[1, 4]].any()  # the empty experts


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
def test_only_routed_rows_are_multiplied(monkeypatch, grouped):
    """Experts that no row chose multiply nothing: the rows each expert multiplies, forward and backward."""
    monkeypatch.setattr(experts_mod, "grouped_mm_runs", lambda *_: grouped)
    xs, gate, up, down, ends, counts = problem(counts=(10, 10, 0, 0, 0, 0))
    rows = []
    real_mm, real_grouped = torch.mm, F.grouped_mm

    def counting_mm(a, b, **kw):
        rows.append((*a.shape, *b.shape))  # H = 32 and I = 16 here, so a 10 can only be an expert's rows
        return real_mm(a, b, **kw)

    def counting_grouped_mm(a, b, offs):
        rows.append(torch.diff(offs, prepend=offs.new_zeros(1)).tolist())
        return real_grouped(a, b, offs=offs)

    monkeypatch.setattr(torch, "mm", counting_mm)
    monkeypatch.setattr(F, "grouped_mm", counting_grouped_mm)
    leaves = [t.clone().requires_grad_() for t in (xs, gate, up, down)]
    experts_swiglu(*leaves, ends)[0].sum().backward()
    if grouped:  # every call sees experts 0 and 1 with 10 rows each, the other four with none
        assert rows and all(r == [10, 10, 0, 0, 0, 0] for r in rows)
    else:
        assert len(rows) == 2 * 6 and all(10 in shapes for shapes in rows)  # 3 forward, 3 backward per expert


def moe_block():
    """A small MoE block (router, 8 experts, shared expert) in training mode, and an input for it."""
    from openk2 import preset
    from openk2.model.model import MoE

    config = preset("tiny").replace(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8,
                                    num_experts_per_tok=2, n_group=1, topk_group=1)
    torch.manual_seed(0)
    layer = MoE(config).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return layer, torch.randn(2, 12, 64)


def test_compiled_moe_layer_equals_eager():
    """torch.compile takes a whole MoE block, experts included, in one graph (fullgraph), forward and backward."""
    layer, x = moe_block()
    y_eager, _ = layer(x.clone().requires_grad_())
    y_eager.square().sum().backward()
    want = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)
    y, _ = compiled(x.clone().requires_grad_())
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for n, p in layer.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paths_match_plain_autograd(dtype):
    """On a GPU: whichever path this build takes (grouped_mm or the loop) against plain autograd."""
    xs, gate, up, down, ends, counts = problem(H=64, I=32)
    dy = torch.randn(xs.shape[0], xs.shape[1])
    leaves = [t.to("cuda", dtype).requires_grad_() for t in (xs, gate, up, down)]
    y, _, _ = experts_swiglu(*leaves, ends.cuda())
    y.backward(dy.to("cuda", dtype))
    ref_leaves = [t.to("cuda", dtype).requires_grad_() for t in (xs, gate, up, down)]
    reference(*ref_leaves, counts).backward(dy.to("cuda", dtype))
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, **tol)


def test_autocast_runs_the_experts_in_the_autocast_dtype():
    """Under bf16 autocast (the GPU training path, here on the CPU) the experts compute in bf16 like every other
    matmul, and their fp32 parameters get fp32 gradients close to the fp32 ones."""
    layer, x = moe_block()
    layer(x)[0].square().sum().backward()
    want = layer.experts.gate_proj.grad.clone()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    got = layer.experts.gate_proj.grad
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.05 * want.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and compiled, as `train.compile` runs it on a GPU
        y_compiled, _ = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(y_compiled.float(), y.float(), rtol=2e-2, atol=2e-2)
