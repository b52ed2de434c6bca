"""Paper experiment (a), QK-Clip in small (paper §2.1, Fig. 2 / App. D): vanilla Muon vs MuonClip.

Two pretraining runs on the same data and seed, differing only in `optim.qk_clip_tau` (None: S_max is
recorded, nothing is clipped = vanilla Muon; τ: MuonClip). Checks the acceptance of issue 4 (a):
vanilla's max logit exceeds 10τ; MuonClip's stays ≤ 1.25τ after its first clip; MuonClip's final
validation loss is ≤ 1.01× vanilla's. Writes runs/experiments/qk_clip/{vanilla,muonclip}/, the plot
benchmarks/experiments/qk_clip.png and a row under "## Paper experiments: (a) QK-Clip" in
benchmarks/RESULTS.md. Usage: python benchmarks/experiments/qk_clip.py [--tau 10] [--steps 150]
[--set key=value ...] [--plot-only] [--no-results]
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

RUNS = ROOT / "runs" / "experiments" / "qk_clip"
PLOT = ROOT / "benchmarks" / "experiments" / "qk_clip.png"
SECTION = "## Paper experiments: (a) QK-Clip"

# Shared by both runs. Muon lr 0.04 (twice the default) makes the tiny preset's logits pass 10τ within
# ~100 steps; short sequences (64) keep a step cheap on 2 busy CPU cores.
BASE = [
    "model.preset=tiny",
    "data.seq_len=64",
    "train.batch_size=8",
    "train.seed=0",
    "optim.lr=0.04",
    "optim.adamw_lr=3e-3",
    "train.eval_every=50",
    "train.eval_batches=8",
    "train.checkpoint_every=100000",  # no mid-run checkpoints: only the final one
]
GOAL_VANILLA, GOAL_CLIPPED, GOAL_VAL_RATIO = 10.0, 1.25, 1.01


def run_one(name: str, tau: float | None, steps: int, extra: list[str]) -> Path:
    """One pretraining run into RUNS/name; tau None is vanilla Muon (S_max logged, never clipped)."""
    run_dir = RUNS / name

    def set_tau(cfg) -> None:  # a TOML override cannot spell None
        cfg.optim.qk_clip_tau = tau

    summary, seconds = run_pretrain(run_dir, [*BASE, f"train.steps={steps}", *extra], edit=set_tau)
    print(f"{name}: {seconds:.0f} s, val_loss {summary['val_loss']:.4f}, "
          f"final max logit {summary['max_logit']:.1f}")
    return run_dir


def read_run(run_dir: Path) -> tuple[list[int], list[float], list[int], list[float]]:
    """(steps, max logit over layers per step, val steps, val losses) from a run folder's metrics.jsonl."""
    from openk2.train.run import read_metrics

    train = [r for r in read_metrics(run_dir) if r.get("kind") == "train" and r.get("max_logit")]
    return ([r["step"] for r in train], [max(r["max_logit"]) for r in train], *val_curve(run_dir, x="step"))


def checks(tau: float, vanilla: tuple, clipped: tuple) -> dict:
    """The three acceptance numbers of issue 4 (a). S_max of step s is measured before that step's clip."""
    v_steps, v_max, v_val_steps, v_val = vanilla
    c_steps, c_max, c_val_steps, c_val = clipped
    over = [s for s, m in zip(v_steps, v_max) if m > GOAL_VANILLA * tau]
    first_clip = next((s for s, m in zip(c_steps, c_max) if m > tau), None)
    after = [m for s, m in zip(c_steps, c_max) if first_clip is not None and s > first_clip]
    ratio = c_val[-1] / v_val[-1]
    return {
        "vanilla_peak": max(v_max), "vanilla_first_over_10tau": over[0] if over else None,
        "vanilla_ok": bool(over),
        "first_clip_step": first_clip, "clipped_peak_after_first_clip": max(after) if after else None,
        "clipped_ok": bool(after) and max(after) <= GOAL_CLIPPED * tau,
        "val_vanilla": v_val[-1], "val_muonclip": c_val[-1], "val_ratio": ratio, "val_ok": ratio <= GOAL_VAL_RATIO,
        "steps": v_steps[-1],
    }


def plot(tau: float, vanilla: tuple, clipped: tuple, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_logit, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (steps, max_logit, val_steps, val), label, color in ((vanilla, "vanilla Muon", "C3"),
                                                             (clipped, f"MuonClip (τ={tau:g})", "C0")):
        ax_logit.plot(steps, max_logit, lw=1.0, color=color, label=label)
        ax_val.plot(val_steps, val, "o-", color=color, label=label)
    ax_logit.axhline(tau, color="k", ls="--", lw=0.8, label="τ")
    ax_logit.axhline(GOAL_CLIPPED * tau, color="k", ls=":", lw=0.8, label="1.25τ")
    ax_logit.axhline(GOAL_VANILLA * tau, color="gray", ls="-.", lw=0.8, label="10τ")
    ax_logit.set(yscale="log", xlabel="step", ylabel="max attention logit S_max (all layers, heads)",
                 title="max logit (before each step's clip)")
    ax_val.set(xlabel="step", ylabel="validation loss", title="validation loss")
    for ax in (ax_logit, ax_val):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("QK-Clip in small (paper Fig. 2): tiny preset, same data and seed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_row(command: str, tau: float, c: dict, minutes: float | None) -> str:
    ok = lambda b: "pass" if b else "FAIL"  # noqa: E731
    over = f"step {c['vanilla_first_over_10tau']}" if c["vanilla_first_over_10tau"] else "never"
    peak = c["clipped_peak_after_first_clip"]
    after = f"{peak:.2f} = {peak / tau:.3f}τ" if peak is not None else "n/a"
    return (f"| {time.strftime('%Y-%m-%d')} | `{command}` | {tau:g} | {c['steps']} | "
            f"{c['vanilla_peak']:.1f} (> 10τ at {over}) {ok(c['vanilla_ok'])} | "
            f"step {c['first_clip_step']}; {after} {ok(c['clipped_ok'])} | "
            f"{c['val_vanilla']:.4f} | {c['val_muonclip']:.4f} | {c['val_ratio']:.4f} {ok(c['val_ok'])} | "
            f"{f'{minutes:.1f}' if minutes is not None else '-'} |")


def append_result(row: str) -> None:
    """Add `row` to the QK-Clip section of RESULTS.md (creating the section at the end); other sections untouched."""
    header = ("| date | command | τ | steps | vanilla peak max logit (goal > 10τ) | MuonClip first clip; "
              "peak after it (goal ≤ 1.25τ) | val vanilla | val MuonClip | ratio (goal ≤ 1.01) | minutes |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    intro = ("Vanilla Muon (`optim.qk_clip_tau` unset: S_max logged, never clipped) against MuonClip, same data "
             "and seed; S_max is the largest pre-softmax logit over layers and heads, measured before each "
             "step's clip. Plot: `benchmarks/experiments/qk_clip.png`. Machine: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; wall-clock minutes.")
    add_results_row(RESULTS, SECTION, intro, header, row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tau", type=float, default=10.0, help="MuonClip's τ (K2: 100; small here so 10τ is reachable)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for both runs, e.g. --set optim.lr=0.03")
    ap.add_argument("--plot-only", action="store_true", help="reuse the run folders; only plot and check")
    ap.add_argument("--no-results", action="store_true", help="do not write a row to benchmarks/RESULTS.md")
    args = ap.parse_args()
    command = shlex.join(["python", "benchmarks/experiments/qk_clip.py", *sys.argv[1:]])

    minutes = None
    if not args.plot_only:
        start = time.perf_counter()
        run_one("vanilla", None, args.steps, args.overrides)
        run_one("muonclip", args.tau, args.steps, args.overrides)
        minutes = (time.perf_counter() - start) / 60
    vanilla, clipped = read_run(RUNS / "vanilla"), read_run(RUNS / "muonclip")
    plot(args.tau, vanilla, clipped, PLOT)
    c = checks(args.tau, vanilla, clipped)

    tau = args.tau
    print(f"\nQK-Clip experiment, τ = {tau:g}, {c['steps']} steps; plot {PLOT.relative_to(ROOT)}")
    print(f"  vanilla Muon max logit: peak {c['vanilla_peak']:.1f}; first > 10τ = {10 * tau:g} at "
          f"{c['vanilla_first_over_10tau'] or 'never'} -> {'PASS' if c['vanilla_ok'] else 'FAIL'}")
    if c["first_clip_step"] is None:
        print("  MuonClip: S_max never exceeded τ, nothing was clipped -> FAIL (no clip to test)")
    else:
        peak = c["clipped_peak_after_first_clip"]
        print(f"  MuonClip: first clip at step {c['first_clip_step']}; peak max logit after it "
              f"{peak if peak is None else f'{peak:.2f} = {peak / tau:.3f}τ'} (goal ≤ {GOAL_CLIPPED * tau:g}) "
              f"-> {'PASS' if c['clipped_ok'] else 'FAIL'}")
    print(f"  val loss: vanilla {c['val_vanilla']:.4f}, MuonClip {c['val_muonclip']:.4f}, ratio {c['val_ratio']:.4f} "
          f"(goal ≤ {GOAL_VAL_RATIO}) -> {'PASS' if c['val_ok'] else 'FAIL'}")
    row = results_row(command, tau, c, minutes)
    print(f"\nRESULTS.md row ({SECTION}):\n{row}")
    if not args.no_results:
        append_result(row)
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
