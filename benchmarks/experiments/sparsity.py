"""Paper experiment (c), the sparsity scaling law in small (K2 paper §2.3): more experts at fixed activated parameters.

Three pretraining runs on the same data, seed, optimizer (MuonClip) and schedule that differ only in
`n_routed_experts`; `num_experts_per_tok` and `moe_intermediate_size` stay fixed, so every run
activates the same parameters per token and sparsity = n_routed_experts / num_experts_per_tok grows.
The paper finds validation loss falls as sparsity rises at fixed activated parameters (K2 picks 48).
Reports the final validation loss per sparsity. Writes runs/experiments/sparsity/experts<N>/,
benchmarks/experiments/sparsity.png and a row under "## Paper experiments: (c) Sparsity" in
benchmarks/RESULTS.md. Usage: python benchmarks/experiments/sparsity.py [--experts 8,16,32] [--top-k 2]
[--steps 250] [--threads N] [--set key=value ...] [--plot-only] [--no-results]
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

RUNS = ROOT / "runs" / "experiments" / "sparsity"
PLOT = ROOT / "benchmarks" / "experiments" / "sparsity.png"
SECTION = "## Paper experiments: (c) Sparsity"

# Shared by every run: tiny preset (moe_intermediate_size 128, 1 shared expert), short sequences,
# MuonClip with Muon lr 0.02, AdamW group 3e-3, τ = 100 (pinned: the recorded rows used them; the
# config default is now 3e-3, which experiment (b) found better at this scale).
BASE = [
    "model.preset=tiny",
    "optim.lr=0.02",
    "optim.adamw_lr=3e-3",
    "data.seq_len=64",
    "train.batch_size=8",
    "train.seed=0",
    "train.eval_every=50",
    "train.eval_batches=8",
    "train.checkpoint_every=100000",  # no mid-run checkpoints: only the final one
]


def run_one(experts: int, top_k: int, steps: int, extra: list[str]) -> Path:
    """One pretraining run into RUNS/experts<N> with N routed experts, top_k of them active per token."""
    run_dir = RUNS / f"experts{experts}"
    model = f"model.overrides={{n_routed_experts = {experts}, num_experts_per_tok = {top_k}}}"
    summary, seconds = run_pretrain(run_dir, [*BASE, model, f"train.steps={steps}", *extra])
    print(f"experts{experts}: {seconds:.0f} s, val_loss {summary['val_loss']:.4f}")
    return run_dir


def plot(curves: dict[int, tuple[list[int], list[float]]], top_k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_final) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (experts, (tokens, losses)) in enumerate(sorted(curves.items())):
        ax_curve.plot(tokens, losses, "o-", ms=3, color=f"C{i}",
                      label=f"{experts} experts (sparsity {experts / top_k:g})")
    sparsities = [e / top_k for e in sorted(curves)]
    finals = [curves[e][1][-1] for e in sorted(curves)]
    ax_final.plot(sparsities, finals, "o-", color="k")
    for s, f in zip(sparsities, finals):
        ax_final.annotate(f"{f:.3f}", (s, f), textcoords="offset points", xytext=(4, 4))
    ax_curve.set(xlabel="training tokens", ylabel="validation loss", title="validation loss")
    ax_final.set(xscale="log", xlabel="sparsity = routed experts / active experts", ylabel="final validation loss",
                 title=f"final validation loss, {top_k} active experts fixed")
    ax_final.set_xticks(sparsities, [f"{s:g}" for s in sparsities])
    ax_final.minorticks_off()  # the log axis' minor labels (6×10⁰) would clutter the three ticks
    for ax in (ax_curve, ax_final):
        ax.grid(alpha=0.3)
    ax_curve.legend()
    fig.suptitle("Sparsity at fixed activated parameters (paper §2.3), tiny preset, MuonClip")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_row(command: str, steps: int, top_k: int, curves: dict, minutes: float | None) -> str:
    finals = ", ".join(f"{e / top_k:g} ({e}/{top_k}): {curves[e][1][-1]:.4f}" for e in sorted(curves))
    ordered = [curves[e][1][-1] for e in sorted(curves)]
    monotone = all(b < a for a, b in zip(ordered, ordered[1:]))
    return (f"| {time.strftime('%Y-%m-%d')} | `{command}` | {steps} | {finals} | "
            f"{'yes' if monotone else 'no'} | {f'{minutes:.1f}' if minutes is not None else '-'} |")


def append_result(row: str) -> None:
    """Add `row` to this experiment's section of RESULTS.md (creating it at the end); other sections untouched."""
    header = ("| date | command | steps | final val loss per sparsity (routed/active) | "
              "loss falls as sparsity rises (paper §2.3) | minutes |\n|---|---|---|---|---|---|")
    intro = ("Same data, seed, optimizer (MuonClip, lr 0.02, AdamW group 3e-3, τ = 100) and WSD schedule; only "
             "`n_routed_experts` changes, with `num_experts_per_tok` and `moe_intermediate_size` (128) fixed, so "
             "the activated parameters per token are equal. Tiny preset, seq_len 64, batch 8. Plot: "
             "`benchmarks/experiments/sparsity.png`. Machine: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared); "
             "wall-clock minutes.")
    add_results_row(RESULTS, SECTION, intro, header, row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", default="8,16,32", help="comma-separated n_routed_experts, at least 3")
    ap.add_argument("--top-k", type=int, default=2, help="num_experts_per_tok, fixed across runs")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every run")
    ap.add_argument("--plot-only", action="store_true", help="reuse the run folders; only plot and report")
    ap.add_argument("--no-results", action="store_true", help="do not write a row to benchmarks/RESULTS.md")
    args = ap.parse_args()
    command = shlex.join(["python", "benchmarks/experiments/sparsity.py", *sys.argv[1:]])
    experts = [int(x) for x in args.experts.split(",")]
    if len(experts) < 3 or any(e < args.top_k for e in experts):
        raise ValueError(f"--experts needs at least 3 values, each ≥ --top-k {args.top_k}; got {experts}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    minutes = None
    if not args.plot_only:
        start = time.perf_counter()
        for e in experts:
            run_one(e, args.top_k, args.steps, args.overrides)
        minutes = (time.perf_counter() - start) / 60
    curves = {e: val_curve(RUNS / f"experts{e}") for e in experts}
    plot(curves, args.top_k, PLOT)

    print(f"\nSparsity, {args.top_k} active experts fixed, {args.steps} steps; plot {PLOT.relative_to(ROOT)}")
    for e in experts:
        print(f"  sparsity {e / args.top_k:g} ({e} experts): final val loss {curves[e][1][-1]:.4f}")
    row = results_row(command, args.steps, args.top_k, curves, minutes)
    print(f"\nRESULTS.md row ({SECTION}):\n{row}")
    if not args.no_results:
        append_result(row)
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
