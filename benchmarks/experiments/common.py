"""What the paper-experiment scripts share: one pretraining run into a folder they own, validation
curves from its metrics, and a row appended to their own section of benchmarks/RESULTS.md."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def run_pretrain(run_dir: Path, overrides: list[str], edit: Callable | None = None,
                 reuse: bool = False) -> tuple[dict, float]:
    """Pretrain into `run_dir` (emptied first: the script owns it) on the repo's data cache.

    `edit` changes the loaded config where a TOML override cannot (e.g. a None). With `reuse`, a folder that
    holds a finished run of exactly this config is kept and not trained again (0 seconds). Returns the run's
    summary and its wall-clock seconds."""
    from openk2.config import to_toml
    from openk2.train.pretrain import load_pretrain_config, pretrain

    cfg = load_pretrain_config(None, [*overrides, f'data.cache_dir="{ROOT / "data"}"', f'run_dir="{run_dir}"'])
    if edit is not None:
        edit(cfg)
    if reuse and (run_dir / "config.toml").exists() and (run_dir / "config.toml").read_text() == to_toml(cfg):
        steps, losses = val_curve(run_dir, x="step")
        if steps and steps[-1] == cfg.train.steps:
            return {"val_loss": losses[-1], "reused": True}, 0.0
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    summary = pretrain(cfg)
    return summary, time.perf_counter() - start


def val_curve(run_dir: Path, x: str = "tokens") -> tuple[list[int], list[float]]:
    """(x, validation loss) of a run folder's validation lines; x is "tokens" or "step"."""
    from openk2.train.run import read_metrics

    val = [r for r in read_metrics(run_dir) if r.get("kind") == "val"]
    return [r[x] for r in val], [r["val_loss"] for r in val]


def add_results_row(results: Path, section: str, intro: str, header: str, row: str) -> None:
    """Add `row` under `section` (created at the end with `intro` and the table `header` when missing)."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    if section not in lines:
        results.write_text(text.rstrip("\n") + f"\n\n{section}\n\n{intro}\n\n{header}\n{row}\n")
        return
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_row = max((i for i in range(start, end) if lines[i].startswith("|")), default=None)
    if last_row is None:
        lines[end:end] = ["", header, row, ""]
    else:
        lines.insert(last_row + 1, row)
    results.write_text("\n".join(lines) + "\n")
