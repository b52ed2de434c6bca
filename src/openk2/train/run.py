"""The run folder (house rule 6): resolved config, environment, metrics as JSONL, plots, checkpoints.

    RUN_DIR/config.toml      the resolved config (what `--resume` reads back)
    RUN_DIR/env.json         git sha, versions, device, command line
    RUN_DIR/metrics.jsonl    one JSON object per line: {"kind": "train"|"val", "step": ..., ...}
    RUN_DIR/plots/*.png      written at the end and by `openk2 plot RUN_DIR`
    RUN_DIR/checkpoints/     see `openk2.train.checkpoint`
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from openk2.config import to_toml


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    import openk2

    return {
        "openk2": openk2.__version__,
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "argv": sys.argv,
    }


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self.plots = self.path / "plots"
        self.checkpoints = self.path / "checkpoints"
        self._metrics = None

    def create(self, config: Any, device: torch.device) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.toml").write_text(to_toml(config))
        (self.path / "env.json").write_text(json.dumps(environment(device), indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics line; flushed at once so a crash loses nothing already logged."""
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", buffering=1)
        self._metrics.write(json.dumps(record) + "\n")

    def truncate_metrics(self, last_step: int) -> None:
        """Drop lines after `last_step` (a resumed run redoes those steps)."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and _step_of(line) <= last_step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_path)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except json.JSONDecodeError:  # a line cut by a crash
        return 1 << 62


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a last line cut short by a kill
    return records
