import pytest

from openk2.optim.schedule import lr_multiplier


def test_wsd_warms_up_holds_then_decays():
    lrs = [lr_multiplier(s, 100, "wsd", warmup_steps=10, decay_fraction=0.2, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0
    assert all(x == 1.0 for x in lrs[10:80])
    assert lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_cosine_and_constant():
    assert lr_multiplier(99, 100, "cosine", warmup_steps=0, min_ratio=0.0) == pytest.approx(0.0, abs=1e-9)
    assert lr_multiplier(50, 100, "constant", warmup_steps=5) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_multiplier(0, 10, "linear")
