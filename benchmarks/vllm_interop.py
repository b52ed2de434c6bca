"""Interop (issue 5): vLLM loads a K2-shaped checkpoint saved by openk2, and its greedy tokens equal our engine's.

    python benchmarks/vllm_interop.py [--prompts 8] [--max-tokens 32]

Sets up vLLM's CPU build in .venv/envs/vllm on first use (benchmarks/vllm_peer/setup.sh, ~3 min) and pretrains the
checkpoint once (benchmarks/vllm_peer/model.py). Exits 1 when any sequence differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_peer.model import ROOT, k2_checkpoint  # noqa: E402

from openk2.data.tokenizer import load_tokenizer  # noqa: E402
from openk2.model import K2ForCausalLM  # noqa: E402
from openk2.serve import Engine, SamplingParams  # noqa: E402

TEXTS = [
    "def fibonacci(n):\n    ",
    "The Linux kernel schedules",
    "import os\nimport sys\n\n",
    "class Config:\n    \"\"\"",
    "In this tutorial we",
    "for i in range(10):",
    "Return the number of",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def vllm_python() -> str:
    return subprocess.run([str(ROOT / "benchmarks" / "vllm_peer" / "setup.sh")], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]


def vllm_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="2")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    worker = ROOT / "benchmarks" / "vllm_peer" / "offline_worker.py"
    proc = subprocess.run([str(ROOT / vllm_python()), str(worker), str(model_dir), f.name, str(max_tokens)],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    os.unlink(f.name)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"vLLM failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="pretraining steps of the checkpoint (made once)")
    args = parser.parse_args()
    model_dir = k2_checkpoint(args.steps)
    tokenizer = load_tokenizer(model_dir)
    prompts = [tokenizer.encode(t) for t in (TEXTS * args.prompts)[: args.prompts]]
    model = K2ForCausalLM.from_pretrained(model_dir).float()
    ours = [c.token_ids for c in Engine(model, max_batch=len(prompts), max_seq_len=1024).generate(
        prompts, SamplingParams(max_new_tokens=args.max_tokens, stop_token_ids=()))]
    theirs = vllm_greedy(model_dir, prompts, args.max_tokens)
    same = 0
    print(f"checkpoint: {model_dir}\n{'prompt':>6} {'len':>4}  result")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        same += first is None
        verdict = "identical" if first is None else \
            f"differs from token {first}: ours {a[first:first + 4]} vLLM {b[first:first + 4]}"
        print(f"{i:>6} {len(prompts[i]):>4}  {verdict}")
    print(f"greedy tokens identical for {same}/{len(prompts)} prompts x {args.max_tokens} tokens (fp32)")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
