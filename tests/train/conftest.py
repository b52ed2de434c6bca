import subprocess
import sys
from pathlib import Path

import pytest

# a K2-shaped model small enough that a step takes milliseconds
MICRO_MODEL = ("{hidden_size = 64, intermediate_size = 128, moe_intermediate_size = 32, num_hidden_layers = 2, "
               "num_attention_heads = 2, num_key_value_heads = 2, q_lora_rank = 32, kv_lora_rank = 16, "
               "qk_nope_head_dim = 16, qk_rope_head_dim = 8, v_head_dim = 16, n_routed_experts = 8, "
               "num_experts_per_tok = 2}")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small real-text corpus: this interpreter's own standard-library sources."""
    root = tmp_path_factory.mktemp("corpus")
    import json as stdlib_json

    src = Path(stdlib_json.__file__).parent.parent
    for i, f in enumerate(sorted(src.glob("*.py"))[:60]):
        (root / f"{i:03d}_{f.stem}.txt").write_text(f.read_text(errors="replace"))
    return root


def micro_overrides(corpus: Path, cache: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "run_dir": f'"{run_dir}"', "data.corpus": f'["{corpus}"]', "data.cache_dir": f'"{cache}"',
        "data.vocab_size": "512", "data.seq_len": "32", "data.val_fraction": "0.1",
        "model.overrides": MICRO_MODEL, "train.batch_size": "4", "train.steps": "16",
        "train.eval_every": "8", "train.eval_batches": "2", "train.checkpoint_every": "4",
        "schedule.warmup_steps": "4", "optim.lr": "0.01", **{k: str(v) for k, v in extra.items()},
    }
    return [f"{k}={v}" for k, v in values.items()]


def openk2_cli(*args: str, nproc: int = 1, **kwargs) -> subprocess.Popen:
    """`python -m openk2 ARGS`, or with nproc > 1 the same under torchrun (gloo on CPU, a free port)."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    return subprocess.Popen([sys.executable, *launcher, "-m", "openk2", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]
