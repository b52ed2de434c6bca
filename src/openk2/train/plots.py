"""PNG plots of a run folder: loss, max attention logit per layer (paper Fig. 2), expert balance."""

from __future__ import annotations

import os
from pathlib import Path

from openk2.train.run import read_metrics


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write RUN_DIR/plots/{loss,max_logit,expert_balance}.png from metrics.jsonl; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a run folder?")
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=f"loss — {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "loss.png"))

    with_logits = [r for r in train if r.get("max_logit")]
    if with_logits:
        fig, ax = plt.subplots(figsize=(7, 4))
        n_layers = len(with_logits[0]["max_logit"])
        for i in range(n_layers):
            ax.plot([r["step"] for r in with_logits], [r["max_logit"][i] for r in with_logits], lw=0.8,
                    label=f"layer {i}")
        tau = with_logits[-1].get("qk_clip_tau")
        if tau:
            ax.axhline(tau, color="k", ls="--", lw=0.8, label=f"τ = {tau:g}")
        ax.set(xlabel="step", ylabel="max attention logit", title="max logit per layer (QK-Clip, paper Fig. 2)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, out / "max_logit.png"))

    with_load = [r for r in train if r.get("expert_load_max_over_mean")]
    if with_load:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i in range(len(with_load[0]["expert_load_max_over_mean"])):
            ax.plot([r["step"] for r in with_load], [r["expert_load_max_over_mean"][i] for r in with_load],
                    lw=0.8, label=f"MoE layer {i}")
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="perfect balance")
        ax.set(xlabel="step", ylabel="max load / mean load", title="expert balance (aux-loss-free bias)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "expert_balance.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
