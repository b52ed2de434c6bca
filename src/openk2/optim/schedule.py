"""Learning-rate schedules as multipliers of the base lr (paper §2.4: K2 pretrains with WSD)."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, kind: str = "wsd", warmup_steps: int = 0,
                  decay_fraction: float = 0.2, min_ratio: float = 0.1) -> float:
    """Multiplier of the base lr at `step` (0-based) of `total_steps`.

    wsd: linear warmup, constant ("stable"), then a linear decay to `min_ratio` over the last
    `decay_fraction` of training (Warmup-Stable-Decay, as K2 and MiniCPM use).
    cosine: linear warmup then cosine to `min_ratio`. constant: warmup then 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_ratio) * progress
    if kind == "cosine":
        progress = min(1.0, (step - warmup_steps + 1) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {kind!r}; expected 'wsd', 'cosine' or 'constant'")
