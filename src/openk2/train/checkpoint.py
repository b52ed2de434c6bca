"""Training checkpoints: the model in hub layout plus everything needed to resume bit-exactly.

    checkpoints/step_00000100/model/        config.json + safetensors + tokenizer (servable, loadable by transformers)
    checkpoints/step_00000100/trainer.pt    optimizer state, data cursor, RNG states, counters
    checkpoints/latest                      name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced
atomically after it: a crash at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openk2.data.tokenizer import Tokenizer
from openk2.model import K2ForCausalLM


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(root: str | os.PathLike, step: int, model: K2ForCausalLM, trainer_state: dict[str, Any],
                    keep: int = 2, model_state: dict[str, torch.Tensor] | None = None,
                    tokenizer: Tokenizer | None = None, chat_template: str | None = None) -> Path:
    """Write step `step`; keep the newest `keep` checkpoints. `model_state` overrides the weights
    written (a full state dict gathered from sharded parameters); `tokenizer` goes beside the weights so
    that `model/` is a complete folder that `openk2 serve` and transformers load as it is; `chat_template` (Jinja)
    goes into its tokenizer_config.json (None: `Tokenizer.save`'s default).
    `model` is a K2ForCausalLM or any module with transformers' `save_pretrained(path)`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if model_state is None:
        model.save_pretrained(tmp / "model")
    else:
        from openk2.model import hub

        hub.save_state(model.config, model_state, tmp / "model")
    if tokenizer is not None:
        tokenizer.save(tmp / "model", chat_template=chat_template)
    torch.save(trainer_state, tmp / "trainer.pt")
    final = root / name
    if final.exists():  # the same step written again after a rollback
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".latest.tmp{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    root = Path(root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "trainer.pt").exists() else None


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / "trainer.pt", map_location="cpu", weights_only=False)


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> K2ForCausalLM:
    return K2ForCausalLM.from_pretrained(Path(checkpoint) / "model", device=device)
