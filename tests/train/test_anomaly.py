import math

import torch

from openk2 import K2ForCausalLM, preset
from openk2.config import load_config
from openk2.train.config import PretrainConfig
from openk2.train.distributed import Distributed
from openk2.train.pretrain import AnomalyGuard, train_step


def test_guard_flags_non_finite_losses_and_spikes_after_warmup():
    guard = AnomalyGuard(factor=3.0, warmup=3)
    assert guard.check(float("nan")) == "non-finite loss" and guard.check(math.inf) == "non-finite loss"
    for loss in (2.0, 2.1, 1.9):
        assert guard.check(loss) is None
        guard.update(loss)
    assert guard.check(5.0) is None
    assert guard.check(7.0).startswith("loss spike 7.000 > 3 x running mean")
    restored = AnomalyGuard(factor=3.0, warmup=3)
    restored.load_state_dict(guard.state_dict())
    assert restored.check(7.0) == guard.check(7.0)


class FakeNaNLossModel(torch.nn.Module):
    """A fake for this unit test: the real model, whose loss turns NaN on the calls listed."""

    def __init__(self, model, nan_calls):
        super().__init__()
        self.model, self.nan_calls, self.calls = model, set(nan_calls), 0

    def forward(self, ids, labels=None):
        out = self.model(ids, labels=labels)
        self.calls += 1
        if self.calls in self.nan_calls:
            out.loss = out.loss * float("nan")
        return out


def test_a_nan_batch_is_skipped_without_touching_the_weights():
    config = preset("tiny").replace(vocab_size=128, num_hidden_layers=2)
    model = FakeNaNLossModel(K2ForCausalLM(config), nan_calls={2})
    cfg = load_config(PretrainConfig, None, ["optim.name=\"adamw\"", "train.batch_size=2"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard, dist = AnomalyGuard(cfg.train.spike_factor), Distributed()
    batch = torch.randint(0, 128, (2, 16))
    first = train_step(model, opt, batch, cfg, torch.device("cpu"), dist, guard)
    assert first.anomaly is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    second = train_step(model, opt, batch, cfg, torch.device("cpu"), dist, guard)
    assert second.anomaly == "non-finite loss"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step taken
    assert all(p.grad is None for p in model.parameters())  # and no gradient left behind
    assert train_step(model, opt, batch, cfg, torch.device("cpu"), dist, guard).anomaly is None
