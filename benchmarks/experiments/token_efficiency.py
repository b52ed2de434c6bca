"""Paper experiment (b), token efficiency in small (Moonlight §3, K2 paper §2.1): MuonClip vs AdamW.

Both optimizers train the same model on the default corpus with the same data, seed, steps and
schedule, each over a learning-rate sweep. L* = AdamW's best final validation loss; the number is the
fraction of AdamW's tokens the best Muon run needs to first reach L* (linear interpolation between
validation points). Goal of issue 4 (b): ≤ 0.6. MuonClip uses Moonlight's RMS matching (update RMS
0.2), so one lr grid serves both; its AdamW group (embeddings, head, norms) takes the same lr.
Writes runs/experiments/token_efficiency/{muon,adamw}-lr*/, benchmarks/experiments/token_efficiency.png
and a row under "## Paper experiments: (b) Muon vs AdamW token efficiency" in benchmarks/RESULTS.md.
Usage: python benchmarks/experiments/token_efficiency.py [--steps 200] [--lrs 1e-3,3e-3,1e-2]
[--threads N] [--set key=value ...] [--plot-only] [--no-results]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, add_results_row, run_pretrain, val_curve  # the script's folder is on sys.path

RUNS = ROOT / "runs" / "experiments" / "token_efficiency"
PLOT = ROOT / "benchmarks" / "experiments" / "token_efficiency.png"
SECTION = "## Paper experiments: (b) Muon vs AdamW token efficiency"

# Shared by every run: tiny preset, short sequences and frequent validation so each run has a
# val-loss-vs-tokens curve. τ = 100 (K2's) for MuonClip: at these lrs the logits stay far below it.
BASE = [
    "model.preset=tiny",
    "data.seq_len=64",
    "train.batch_size=8",
    "train.seed=0",
    "optim.qk_clip_tau=100.0",
    "train.eval_every=25",
    "train.eval_batches=6",
    "train.checkpoint_every=100000",  # no mid-run checkpoints: only the final one
]
GOAL_RATIO = 0.6


def run_name(opt: str, lr: float) -> str:
    return f"{opt}-lr{lr:g}"


def run_one(opt: str, lr: float, steps: int, extra: list[str]) -> Path:
    """One pretraining run into RUNS/<opt>-lr<lr>; opt is "muon" (MuonClip) or "adamw"."""
    run_dir = RUNS / run_name(opt, lr)
    optim = (["optim.name=\"muonclip\"", f"optim.lr={lr}", f"optim.adamw_lr={lr}"] if opt == "muon"
             else ["optim.name=\"adamw\"", f"optim.lr={lr}"])
    summary, seconds = run_pretrain(run_dir, [*BASE, *optim, f"train.steps={steps}", *extra])
    print(f"{run_name(opt, lr)}: {seconds:.0f} s, val_loss {summary['val_loss']:.4f}")
    return run_dir


def tokens_to_reach(tokens: list[int], losses: list[float], target: float) -> float | None:
    """First token count at which the curve reaches ≤ target, interpolated linearly; None if never."""
    for i, (t, loss) in enumerate(zip(tokens, losses)):
        if loss <= target:
            if i == 0:
                return float(t)
            t0, l0 = tokens[i - 1], losses[i - 1]
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
    return None


def analyse(curves: dict[tuple[str, float], tuple[list[int], list[float]]]) -> dict:
    """L* (AdamW's best final val loss), the best Muon run's tokens to L*, and the ratio to AdamW's tokens."""
    adamw = {lr: c for (opt, lr), c in curves.items() if opt == "adamw"}
    muon = {lr: c for (opt, lr), c in curves.items() if opt == "muon"}
    best_adamw_lr = min(adamw, key=lambda lr: adamw[lr][1][-1])
    target, adamw_tokens = adamw[best_adamw_lr][1][-1], adamw[best_adamw_lr][0][-1]
    reach = {lr: tokens_to_reach(*c, target) for lr, c in muon.items()}
    reached = {lr: t for lr, t in reach.items() if t is not None}
    best_muon_lr = (min(reached, key=reached.get) if reached else min(muon, key=lambda lr: muon[lr][1][-1]))
    muon_tokens = reached.get(best_muon_lr)
    ratio = muon_tokens / adamw_tokens if muon_tokens is not None else None
    return {"target": target, "best_adamw_lr": best_adamw_lr, "adamw_tokens": adamw_tokens,
            "best_muon_lr": best_muon_lr, "muon_tokens": muon_tokens, "ratio": ratio,
            "ok": ratio is not None and ratio <= GOAL_RATIO,
            "final": {f"{opt} {lr:g}": c[1][-1] for (opt, lr), c in sorted(curves.items())}}


def plot(curves: dict, a: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lrs = sorted({lr for _, lr in curves})
    for (opt, lr), (tokens, losses) in sorted(curves.items()):
        shade = 0.45 + 0.55 * lrs.index(lr) / max(1, len(lrs) - 1)
        color = plt.cm.Blues(shade) if opt == "muon" else plt.cm.Reds(shade)
        ax.plot(tokens, losses, "o-" if opt == "muon" else "s--", ms=3, color=color,
                label=f"{'MuonClip' if opt == 'muon' else 'AdamW'} lr {lr:g}")
    ax.axhline(a["target"], color="k", ls=":", lw=0.8, label=f"L* = AdamW best final {a['target']:.3f}")
    if a["muon_tokens"] is not None:
        ax.axvline(a["muon_tokens"], color="C0", ls=":", lw=0.8,
                   label=f"Muon reaches L* at {a['ratio']:.2f}× AdamW's tokens")
    ax.set(xlabel="training tokens", ylabel="validation loss", title="MuonClip vs AdamW, tiny preset, default corpus")
    lo = min(min(c[1]) for c in curves.values())
    ax.set_ylim(lo - 0.1, lo + 2.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_row(command: str, steps: int, a: dict, minutes: float | None) -> str:
    finals = ", ".join(f"{k} {v:.3f}" for k, v in a["final"].items())
    muon = f"{a['muon_tokens']:.0f}" if a["muon_tokens"] is not None else "never"
    ratio = f"{a['ratio']:.3f}" if a["ratio"] is not None else "> 1 (not reached)"
    return (f"| {time.strftime('%Y-%m-%d')} | `{command}` | {steps} | {finals} | "
            f"{a['target']:.4f} (AdamW lr {a['best_adamw_lr']:g}, {a['adamw_tokens']} tokens) | "
            f"{muon} (Muon lr {a['best_muon_lr']:g}) | {ratio} {'pass' if a['ok'] else 'FAIL'} | "
            f"{f'{minutes:.1f}' if minutes is not None else '-'} |")


def append_result(row: str) -> None:
    """Add `row` to this experiment's section of RESULTS.md (creating it at the end); other sections untouched."""
    header = ("| date | command | steps | final val loss per run | L* = AdamW best final val loss | "
              "tokens for best Muon to reach L* | fraction of AdamW's tokens (goal ≤ 0.6) | minutes |\n"
              "|---|---|---|---|---|---|---|---|")
    intro = ("MuonClip (τ = 100, never reached here; Moonlight RMS matching, AdamW group at the same lr) against "
             "AdamW (betas 0.9/0.95, weight decay 0.1 for both), tiny preset, seq_len 64, batch 8, same data, "
             "seed and WSD schedule; validation every 25 steps on 6 batches. The fraction is interpolated "
             "linearly between validation points; Muon is compared mid-run (before its decay phase) against "
             "AdamW's end-of-run loss. Plot: `benchmarks/experiments/token_efficiency.png`. Machine: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared); "
             "wall-clock minutes.")
    add_results_row(RESULTS, SECTION, intro, header, row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma-separated lr grid, used for both optimizers")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every run")
    ap.add_argument("--plot-only", action="store_true", help="reuse the run folders; only plot and analyse")
    ap.add_argument("--no-results", action="store_true", help="do not write a row to benchmarks/RESULTS.md")
    args = ap.parse_args()
    command = shlex.join(["python", "benchmarks/experiments/token_efficiency.py", *sys.argv[1:]])
    lrs = [float(x) for x in args.lrs.split(",")]
    if len(lrs) < 3:
        raise ValueError(f"--lrs needs at least 3 learning rates (issue 4 (b)), got {lrs}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    minutes = None
    if not args.plot_only:
        start = time.perf_counter()
        for lr in lrs:
            for opt in ("adamw", "muon"):
                run_one(opt, lr, args.steps, args.overrides)
        minutes = (time.perf_counter() - start) / 60
    curves = {(opt, lr): val_curve(RUNS / run_name(opt, lr)) for lr in lrs for opt in ("adamw", "muon")}
    a = analyse(curves)
    plot(curves, a, PLOT)

    print(f"\nToken efficiency, {args.steps} steps; plot {PLOT.relative_to(ROOT)}")
    for k, v in a["final"].items():
        print(f"  final val loss {k}: {v:.4f}")
    print(f"  L* = {a['target']:.4f} (AdamW lr {a['best_adamw_lr']:g}, {a['adamw_tokens']} tokens)")
    if a["ratio"] is None:
        print("  no Muon run reached L* -> FAIL")
    else:
        print(f"  Muon lr {a['best_muon_lr']:g} reaches L* at {a['muon_tokens']:.0f} tokens = {a['ratio']:.3f}× "
              f"AdamW's (goal ≤ {GOAL_RATIO}) -> {'PASS' if a['ok'] else 'FAIL'}")
    row = results_row(command, args.steps, a, minutes)
    print(f"\nRESULTS.md row ({SECTION}):\n{row}")
    if not args.no_results:
        append_result(row)
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
