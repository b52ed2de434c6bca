"""oneDNN-prepacked linears: the same numbers as F.linear, and no packing where it cannot help or does not fit."""

import pytest
import torch
import torch.nn.functional as F

from openk2.serve import packed_linear
from openk2.serve.packed_linear import PackedLinear, pack_linears, packing_available

needs_onednn = pytest.mark.skipif(not packing_available(torch.zeros(1, 1)), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 16, 100])
def test_packed_linear_equals_f_linear(rows):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    x, residual = torch.randn(rows, 32, generator=g), torch.randn(rows, 48, generator=g)
    torch.testing.assert_close(PackedLinear(w)(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(PackedLinear(w, b)(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(PackedLinear(w).add_to(residual, x), residual + F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_packed_copy_does_not_follow_later_changes_to_the_weight():
    """A copy: whoever changes the weights must pack again (HFEngine.load_weights does)."""
    w = torch.randn(8, 4)
    packed = PackedLinear(w)
    x = torch.randn(2, 4)
    before = F.linear(x, w)
    w.mul_(2)
    torch.testing.assert_close(packed(x), before)


def test_no_packing_for_other_dtypes_or_when_the_copies_do_not_fit(monkeypatch):
    w = torch.randn(64, 64)
    assert pack_linears([(w.to(torch.bfloat16), None)]) is None
    assert pack_linears([]) is None
    monkeypatch.setattr(packed_linear, "free_memory_bytes", lambda: 2 * w.numel() * w.element_size() - 1)
    assert pack_linears([(w, None)]) is None  # 16 KB would take more than half of the "free" 32 KB
    if packing_available(w):
        monkeypatch.setattr(packed_linear, "free_memory_bytes", lambda: None)  # unknown: pack
        assert len(pack_linears([(w, None), (w, None)])) == 2
