"""The K2-shaped checkpoint the vLLM comparisons serve: the tiny preset with the MLA dims vLLM's CPU backend takes.

vLLM's CPU MLA backend accepts only kv_lora_rank 512 with qk_rope_head_dim 64; everything else stays tiny. The model
is pretrained briefly by `openk2 pretrain` on the default corpus so that its next-token distributions are peaked:
greedy tokens of a random model sit on near-ties that fp32 rounding differences between two engines flip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VLLM_MLA_OVERRIDES = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}


def k2_checkpoint(steps: int = 100, run_dir: Path = ROOT / "runs" / "bench-k2-vllm") -> Path:
    """Pretrain (once; reused while its checkpoint exists) and return the hub-layout model folder."""
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():
        model_dir = run_dir / "checkpoints" / latest.read_text().strip() / "model"
        if (model_dir / "tokenizer.json").exists():
            return model_dir
    overrides = ", ".join(f"{k} = {v}" for k, v in VLLM_MLA_OVERRIDES.items())
    subprocess.run([sys.executable, "-m", "openk2", "pretrain", "--set", f"model.overrides = {{{overrides}}}",
                    "--set", f"train.steps = {steps}", "--set", f"train.checkpoint_every = {steps}",
                    "--set", f"train.eval_every = {steps}", "--set", f'data.cache_dir = "{ROOT / "data"}"',
                    "--set", f'run_dir = "{run_dir}"'], check=True)
    return run_dir / "checkpoints" / latest.read_text().strip() / "model"
