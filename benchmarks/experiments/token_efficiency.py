"""Paper experiment (b), token efficiency in small (Moonlight §3, K2 paper §2.1): MuonClip vs AdamW.

Both optimizers train the same model on the default corpus with the same data, seed, steps and
schedule, each over a learning-rate sweep. L* = AdamW's best final validation loss. Two fractions of
AdamW's tokens are reported:

- *own schedule* (the goal's number, as Moonlight compares optimizers: every point a run trained to
  completion): Muon is rerun with its whole WSD schedule (warmup, stable, decay) squeezed into a
  fraction of the steps (`--budgets`), at its best full-length lr or at each of `--budget-lrs`; the
  tokens it needs are where its best final validation loss per budget crosses L*, linear between
  budgets (AdamW's L* is likewise its best over its lr sweep).
- *mid-run*: the full-length Muon run's validation curve first reaching L* (linear between
  validation points), before its decay phase. A stricter number: it grants Muon no decay.

Goal of issue 4 (b): ≤ 0.6. MuonClip uses Moonlight's RMS matching (update RMS 0.2), so one lr grid
serves both. By default each run's one lr also drives its embeddings, head and norms (MuonClip's AdamW
group), as in Moonlight. `--adamw-lr X` instead fixes that group's lr at X in every run of both optimizers,
so the sweep compares only how each trains the hidden matrices; its run folders end in `-alr<X>`.
Writes runs/experiments/token_efficiency/{muon,adamw}-lr*/, benchmarks/experiments/token_efficiency[_alr<X>].png
and a row under "## Paper experiments: (b) Muon vs AdamW token efficiency" in benchmarks/RESULTS.md.
Usage: python benchmarks/experiments/token_efficiency.py [--steps 300] [--lrs 1e-3,3e-3,1e-2]
[--budgets 0.4,0.5,0.6,0.7,0.8] [--budget-lrs 3e-3,1e-2] [--adamw-lr X] [--threads N] [--set key=value ...] [--reuse]
[--plot-only] [--no-results]
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

# Shared by every run: tiny preset, the demo's 8 x 256 batches (at fewer tokens per step the fixed
# cost of the optimizer step dominates the wall clock) and frequent validation so each run has a
# val-loss-vs-tokens curve. τ = 100 (K2's) for MuonClip: at these lrs the logits stay far below it.
BASE = [
    "model.preset=tiny",
    "data.seq_len=256",
    "train.batch_size=8",
    "train.seed=0",
    "optim.qk_clip_tau=100.0",
    "train.eval_every=25",
    "train.eval_batches=8",
    "train.checkpoint_every=100000",  # no mid-run checkpoints: only the final one
]
GOAL_RATIO = 0.6


def run_name(opt: str, lr: float, steps: int | None = None, adamw_lr: float | None = None) -> str:
    """`<opt>-lr<lr>` for the full-length runs, `<opt>-lr<lr>-steps<n>` for the shorter budgets, `-alr<x>` when
    the embeddings, head and norms train at a fixed lr x."""
    return (f"{opt}-lr{lr:g}" + (f"-steps{steps}" if steps is not None else "")
            + (f"-alr{adamw_lr:g}" if adamw_lr is not None else ""))


def run_one(opt: str, lr: float, steps: int, extra: list[str], budget: bool = False, reuse: bool = False,
            adamw_lr: float | None = None) -> Path:
    """One pretraining run into RUNS/<run_name>; opt is "muon" (MuonClip) or "adamw"."""
    run_dir = RUNS / run_name(opt, lr, steps if budget else None, adamw_lr)
    name = "muonclip" if opt == "muon" else "adamw"
    optim = [f'optim.name="{name}"', f"optim.lr={lr}", f"optim.adamw_lr={lr if adamw_lr is None else adamw_lr}"]
    summary, seconds = run_pretrain(run_dir, [*BASE, *optim, f"train.steps={steps}", *extra], reuse=reuse)
    print(f"{run_dir.name}: {'reused' if summary.get('reused') else f'{seconds:.0f} s'}, "
          f"val_loss {summary['val_loss']:.4f}")
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


def budget_lr(curves: dict[tuple[str, float], tuple[list[int], list[float]]]) -> float:
    """The Muon lr with the lowest final validation loss at the full length: the one the budgets rerun by default."""
    return min((lr for opt, lr in curves if opt == "muon"), key=lambda lr: curves["muon", lr][1][-1])


def analyse(curves: dict[tuple[str, float], tuple[list[int], list[float]]],
            budgets: dict[tuple[float, int], tuple[list[int], list[float]]] | None = None) -> dict:
    """L* (AdamW's best final val loss); the tokens Muon needs to reach it, mid-run and on its own schedule
    (`budgets`: (lr, steps) -> curve of a shorter Muon run), each as a ratio to AdamW's tokens."""
    adamw = {lr: c for (opt, lr), c in curves.items() if opt == "adamw"}
    muon = {lr: c for (opt, lr), c in curves.items() if opt == "muon"}
    best_adamw_lr = min(adamw, key=lambda lr: adamw[lr][1][-1])
    target, adamw_tokens = adamw[best_adamw_lr][1][-1], adamw[best_adamw_lr][0][-1]
    reach = {lr: tokens_to_reach(*c, target) for lr, c in muon.items()}
    reached = {lr: t for lr, t in reach.items() if t is not None}
    best_muon_lr = (min(reached, key=reached.get) if reached else min(muon, key=lambda lr: muon[lr][1][-1]))
    muon_tokens = reached.get(best_muon_lr)
    ratio = muon_tokens / adamw_tokens if muon_tokens is not None else None
    # Own schedule: the best final loss over lrs at each length (the full runs are the longest), against its tokens.
    # When even the shortest budget reaches L*, its tokens are an upper bound, not a crossing.
    best: dict[int, tuple[float, float]] = {}  # tokens -> (final loss, lr)
    for lr, c in [(lr, c) for (lr, _), c in (budgets or {}).items()] + list(muon.items()):
        if c[0][-1] not in best or c[1][-1] < best[c[0][-1]][0]:
            best[c[0][-1]] = (c[1][-1], lr)
    finals = sorted((t, loss, lr) for t, (loss, lr) in best.items())
    scheduled = tokens_to_reach([t for t, *_ in finals], [loss for _, loss, _ in finals], target)
    scheduled_ratio = scheduled / adamw_tokens if scheduled is not None else None
    return {"target": target, "best_adamw_lr": best_adamw_lr, "adamw_tokens": adamw_tokens,
            "best_muon_lr": best_muon_lr, "muon_tokens": muon_tokens, "ratio": ratio,
            "budget_finals": finals, "scheduled_tokens": scheduled,
            "scheduled_ratio": scheduled_ratio, "shortest_reaches": finals[0][1] <= target,
            "ok": scheduled_ratio is not None and scheduled_ratio <= GOAL_RATIO,
            "final": {f"{opt} {lr:g}": c[1][-1] for (opt, lr), c in sorted(curves.items())}}


def plot(curves: dict, budgets: dict, a: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    lrs = sorted({lr for _, lr in curves})
    for (opt, lr), (tokens, losses) in sorted(curves.items()):
        shade = 0.45 + 0.55 * lrs.index(lr) / max(1, len(lrs) - 1)
        color = plt.cm.Blues(shade) if opt == "muon" else plt.cm.Reds(shade)
        ax.plot(tokens, losses, "o-" if opt == "muon" else "s--", ms=3, color=color,
                label=f"{'MuonClip' if opt == 'muon' else 'AdamW'} lr {lr:g}")
    for tokens, losses in budgets.values():
        ax.plot(tokens, losses, "-", lw=0.8, color="C0", alpha=0.5)
    ax.axhline(a["target"], color="k", ls=":", lw=0.8, label=f"L* = AdamW best final {a['target']:.3f}")
    if a["muon_tokens"] is not None:
        ax.axvline(a["muon_tokens"], color="C0", ls=":", lw=0.8,
                   label=f"mid-run: Muon reaches L* at {a['ratio']:.2f}× AdamW's tokens")
    ax.set(xlabel="training tokens", ylabel="validation loss",
           title="validation curves (thin: Muon at shorter budgets)")
    lo = min(min(c[1]) for c in curves.values())
    ax.set_ylim(lo - 0.1, lo + 2.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    # Right: final loss of each fully scheduled run against its tokens, as Moonlight compares optimizers.
    budget_lrs = sorted({lr for lr, _ in budgets})
    for lr in budget_lrs:
        points = sorted([(c[0][-1], c[1][-1]) for (l, _), c in budgets.items() if l == lr]
                        + [(curves["muon", lr][0][-1], curves["muon", lr][1][-1])])
        bx.plot(*zip(*points), "x:", ms=5, lw=0.8, label=f"MuonClip lr {lr:g}")
    tokens, finals, _ = zip(*a["budget_finals"])
    bx.plot(tokens, finals, "o-", color="C0", label="MuonClip, best lr per budget, each run its own WSD schedule")
    bx.plot([a["adamw_tokens"]], [a["target"]], "s", color="C3", ms=8, label=f"AdamW lr {a['best_adamw_lr']:g} (L*)")
    bx.axhline(a["target"], color="k", ls=":", lw=0.8)
    if a["scheduled_tokens"] is not None:
        bx.axvline(a["scheduled_tokens"], color="C0", ls=":", lw=0.8,
                   label=f"Muon reaches L* with {a['scheduled_ratio']:.2f}× AdamW's tokens")
    bx.set(xlabel="training tokens (whole run)", ylabel="final validation loss", title="final loss vs budget")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.suptitle("MuonClip vs AdamW, tiny preset, default corpus")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fraction(ratio: float | None, upper_bound: bool = False) -> str:
    if ratio is None:
        return "> 1 (not reached)"
    return f"{'≤ ' if upper_bound else ''}{ratio:.3f}"


def results_row(command: str, steps: int, a: dict, minutes: float | None) -> str:
    finals = ", ".join(f"{k} {v:.3f}" for k, v in a["final"].items())
    budgets = ", ".join(f"{t // 1000}k: {loss:.3f} (lr {lr:g})" for t, loss, lr in a["budget_finals"])
    return (f"| {time.strftime('%Y-%m-%d')} | `{command}` | {steps} ({a['adamw_tokens']:,} tokens) | {finals} | "
            f"{a['target']:.4f} (AdamW lr {a['best_adamw_lr']:g}) | {budgets} | "
            f"{fraction(a['scheduled_ratio'], a['shortest_reaches'])} {'pass' if a['ok'] else 'FAIL'} | "
            f"{fraction(a['ratio'])} (lr {a['best_muon_lr']:g}) | "
            f"{f'{minutes:.1f}' if minutes is not None else '-'} |")


def append_result(row: str) -> None:
    """Add `row` to this experiment's section of RESULTS.md (creating it at the end); other sections untouched."""
    header = ("| date | command | steps (tokens) | final val loss per run | L* = AdamW best final val loss | "
              "Muon's best final val loss per budget (tokens: loss (lr)) | fraction of AdamW's tokens, own schedule "
              "(goal ≤ 0.6) | fraction, mid-run | minutes |\n"
              "|---|---|---|---|---|---|---|---|---|")
    intro = ("MuonClip (τ = 100, never reached here; Moonlight RMS matching, AdamW group at the same lr) against "
             "AdamW (betas 0.9/0.95, weight decay 0.1 for both), tiny preset, seq_len 256, batch 8, same data, "
             "seed and WSD schedule; validation every 25 steps on 8 batches. *Own schedule*: Muon rerun with "
             "its whole WSD schedule in fewer steps (at its best full-length lr, or at each of `--budget-lrs`); "
             "the fraction is where its best final loss per budget crosses L*, linear between budgets. "
             "*Mid-run*: where the full-length Muon run's validation curve first reaches L*, before its decay. "
             "Plot: `benchmarks/experiments/token_efficiency.png`. Machine: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; wall-clock minutes.")
    add_results_row(RESULTS, SECTION, intro, header, row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma-separated lr grid, used for both optimizers")
    ap.add_argument("--budgets", default="0.4,0.5,0.6,0.7,0.8",
                    help="fractions of --steps at which Muon is rerun with its whole schedule")
    ap.add_argument("--budget-lrs", default=None,
                    help="comma-separated Muon lrs for the shorter budgets (default: the best full-length one)")
    ap.add_argument("--adamw-lr", type=float, default=None,
                    help="fixed lr of the embeddings, head and norms in every run (default: each run's swept lr)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every run")
    ap.add_argument("--plot-only", action="store_true", help="reuse the run folders; only plot and analyse")
    ap.add_argument("--reuse", action="store_true",
                    help="keep run folders that hold a finished run of the same config (e.g. after widening --lrs)")
    ap.add_argument("--no-results", action="store_true", help="do not write a row to benchmarks/RESULTS.md")
    args = ap.parse_args()
    command = shlex.join(["python", "benchmarks/experiments/token_efficiency.py", *sys.argv[1:]])
    lrs = [float(x) for x in args.lrs.split(",")]
    if len(lrs) < 3:
        raise ValueError(f"--lrs needs at least 3 learning rates (issue 4 (b)), got {lrs}")
    fractions = [float(x) for x in args.budgets.split(",")] if args.budgets else []
    if any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"--budgets are fractions of --steps in (0, 1), got {fractions}")
    budget_steps = sorted({round(f * args.steps) for f in fractions})
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    minutes = None
    start = time.perf_counter()
    if not args.plot_only:
        for lr in lrs:
            for opt in ("adamw", "muon"):
                run_one(opt, lr, args.steps, args.overrides, reuse=args.reuse, adamw_lr=args.adamw_lr)
    curves = {(opt, lr): val_curve(RUNS / run_name(opt, lr, adamw_lr=args.adamw_lr))
              for lr in lrs for opt in ("adamw", "muon")}
    budget_lrs = [float(x) for x in args.budget_lrs.split(",")] if args.budget_lrs else [budget_lr(curves)]
    if not set(budget_lrs) <= set(lrs):
        raise ValueError(f"--budget-lrs {budget_lrs} must come from --lrs {lrs} (their full-length runs end the curve)")
    if not args.plot_only:
        for lr in budget_lrs:
            for steps in budget_steps:
                run_one("muon", lr, steps, args.overrides, budget=True, reuse=args.reuse, adamw_lr=args.adamw_lr)
        minutes = (time.perf_counter() - start) / 60
    budgets = {(lr, steps): val_curve(RUNS / run_name("muon", lr, steps, args.adamw_lr))
               for lr in budget_lrs for steps in budget_steps}
    a = analyse(curves, budgets)
    plot_path = PLOT if args.adamw_lr is None else PLOT.with_name(f"{PLOT.stem}_alr{args.adamw_lr:g}.png")
    plot(curves, budgets, a, plot_path)

    print(f"\nToken efficiency, {args.steps} steps; plot {plot_path.relative_to(ROOT)}")
    for k, v in a["final"].items():
        print(f"  final val loss {k}: {v:.4f}")
    print(f"  L* = {a['target']:.4f} (AdamW lr {a['best_adamw_lr']:g}, {a['adamw_tokens']} tokens)")
    for tokens, loss, lr in a["budget_finals"]:
        print(f"  Muon, own schedule, {tokens} tokens: best final val loss {loss:.4f} (lr {lr:g})")
    print(f"  own schedule: fraction {fraction(a['scheduled_ratio'], a['shortest_reaches'])} "
          f"(goal ≤ {GOAL_RATIO}) -> {'PASS' if a['ok'] else 'FAIL'}")
    print(f"  mid-run: Muon lr {a['best_muon_lr']:g}, fraction {fraction(a['ratio'])}")
    row = results_row(command, args.steps, a, minutes)
    print(f"\nRESULTS.md row ({SECTION}):\n{row}")
    if not args.no_results:
        append_result(row)
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
