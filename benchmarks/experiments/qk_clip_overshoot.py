"""Why MuonClip's logged max logit overshoots τ after its first clip (issue 4 (a): goal ≤ 1.25τ).

Algorithm 1 (paper §2.1) clips with S_max from the forward *before* the update, and the next step logs S_max on a
new batch. For a head clipped at step s, the logged S_max of step s+1 over τ is the product of two factors:
- update growth: S_max on batch s with the updated and clipped weights, over τ (exactly 1 if the update did not
  move the head's logits);
- batch-to-batch spread: S_max on batch s+1 over S_max on batch s, both with the weights after step s.
This trains MuonClip exactly as `qk_clip.py` does (same config, same data and seed) with two extra forwards per
step, prints both factors' quantiles over the clipped heads, then the spread of S_max across 12 batches of a few
shapes on the final weights (does a larger batch steady the max?).
Usage: python benchmarks/experiments/qk_clip_overshoot.py [--tau 10] [--steps 150] [--set key=value ...]
"""

from __future__ import annotations

import argparse

import torch
from common import ROOT  # the script's folder is on sys.path
from qk_clip import BASE


def quantiles(xs: torch.Tensor) -> str:
    q = torch.quantile(xs, torch.tensor([0.5, 0.9, 0.99]))
    return f"median {q[0]:.3f}, p90 {q[1]:.3f}, p99 {q[2]:.3f}, max {xs.max():.3f} (n={xs.numel()})"


def main() -> None:
    from openk2 import K2ForCausalLM
    from openk2.optim.schedule import lr_multiplier
    from openk2.train.data import prepare_pretrain_data
    from openk2.train.distributed import Distributed
    from openk2.train.pretrain import (
        AnomalyGuard,
        build_model_config,
        build_optimizer,
        load_pretrain_config,
        set_lr,
        train_step,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tau", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    run_dir = ROOT / "runs" / "experiments" / "qk_clip_overshoot"  # the config needs one; nothing is written there
    cfg = load_pretrain_config(None, [*BASE, f"train.steps={args.steps}", f"optim.qk_clip_tau={args.tau}",
                                      *args.overrides, f'data.cache_dir="{ROOT / "data"}"', f'run_dir="{run_dir}"'])
    dist = Distributed.from_env()
    device = dist.device(cfg.train.device)
    data = prepare_pretrain_data(cfg.data, seed=cfg.train.seed, dist=dist)
    torch.manual_seed(cfg.train.seed)
    model = K2ForCausalLM(build_model_config(cfg, data.vocab_size)).to(device).train()
    optimizer = build_optimizer(cfg, model)
    targets, tau = optimizer.qk_clip.targets, args.tau
    guard = AnomalyGuard(cfg.train.spike_factor)

    def s_max(batch: torch.Tensor) -> torch.Tensor:
        """(all heads,) S_max of one forward that trains nothing (recording runs only with grad enabled)."""
        for t in targets:
            t.module.reset_max_logits()
        model(batch.to(device))
        out = torch.cat([t.max_logits() for t in targets]).cpu()  # beside the clip's own S_max, on the host
        for t in targets:
            t.module.reset_max_logits()
        return out

    growth, spread, first_clip = [], [], None
    batches = data.train_batches(cfg.train.batch_size, cfg.data.seq_len)
    batch = next(batches)
    s = cfg.schedule
    for step in range(args.steps):
        set_lr(optimizer, lr_multiplier(step, args.steps, s.kind, s.warmup_steps, s.decay_fraction, s.min_lr_ratio))
        train_step(model, optimizer, batch, cfg, device, dist, guard)
        model.update_expert_bias(gamma=cfg.optim.expert_bias_update)
        before = torch.cat(optimizer.clip_stats.max_logits)  # this step's S_max, the one the clip used
        clipped = before > tau
        same = s_max(batch)
        batch = next(batches)
        nxt = s_max(batch)
        if clipped.any():
            first_clip = step if first_clip is None else first_clip
            growth.append(same[clipped] / tau)
            spread.append(nxt[clipped] / same[clipped])
    if first_clip is None:
        print("no head went over τ: nothing to measure")
        return
    print(f"MuonClip, τ = {tau:g}, {args.steps} steps, first clip at step {first_clip + 1}; over the clipped heads:")
    print(f"  update growth (S_max on the same batch after update + clip, over τ): {quantiles(torch.cat(growth))}")
    print(f"  batch-to-batch spread (next batch / same batch, same weights):       {quantiles(torch.cat(spread))}")
    print("S_max over 12 batches on the final weights, each head over its median:")
    for rows, seq in ((8, 64), (32, 64), (8, 256), (32, 256)):
        it = data.train_batches(rows, seq)
        S = torch.stack([s_max(next(it)) for _ in range(12)])
        print(f"  batch {rows:>2} x {seq:<3}: {quantiles((S / S.median(dim=0).values).flatten())}")


if __name__ == "__main__":
    main()
