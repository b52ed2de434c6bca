"""BFCL before and after SFT on synthesized trajectories (issue 7 item 4), in one command.

    PYTHONPATH=src python benchmarks/bfcl_sft.py --data synth/sft.jsonl --model models/smollm2 --out runs/bfcl-sft \
        [--sft-config configs/sft_bfcl.toml] [--set train.steps=200 ...] [--epochs 3] [--limit N] \
        [--categories simple_python ...] [--skip-before] [--concurrency 64] [--synth-run runs/synth-...] [--device cuda]

Stages, each a subprocess of `sys.executable -m openk2` logging to OUT/<stage>.log (no install of openk2 needed):

    data          read + pack the SFT data as `openk2 sft` will (in-process): conversations, tokens, rows, steps
    before        serve MODEL (`openk2 serve`, free port, /health), `openk2 eval bfcl` -> OUT/eval_before/
    sft           `openk2 sft CONFIG --set model.path=MODEL --set data.train=[DATA] --set run_dir=OUT/sft ...`
    after         serve OUT/sft (its final checkpoint), eval again -> OUT/eval_after/

then OUT/results.json (everything, the exact commands included), OUT/results.md (a table for benchmarks/RESULTS.md)
and OUT/bfcl_before_after.png. A failed stage is reported with its log's tail, the stages that do not depend on it
still run, the results hold what was measured, and the exit status is 1. `--data sample` trains on the built-in
sample (openk2.data.sft_sample); a `.gz` file is decompressed into OUT/data/ first.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
LOG_TAIL = 60  # lines of a failed stage's log shown on the console


@dataclass
class Stage:
    """One stage's outcome: what ran, how long, where its log is, and the error when it failed."""

    name: str
    ok: bool = False
    seconds: float = 0.0
    log: str | None = None
    commands: list[str] = field(default_factory=list)
    error: str | None = None


class StageFailed(RuntimeError):
    """A stage could not finish; the message names the reason (the log holds the details)."""


class Terminated(StageFailed):
    """SIGTERM or SIGINT (a wrapper's deadline, Ctrl-C): the running stage stops, its children are ended."""


def _terminate(signum, frame) -> None:
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


# ---------------------------------------------------------------- subprocesses


def child_env(device: str | None = None) -> dict[str, str]:
    """The environment of every child: src/ on PYTHONPATH (no install), unbuffered output; cpu hides the GPUs."""
    env = dict(os.environ)
    src = str(REPO / "src")
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in parts if p != src])
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def openk2_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "openk2", *args]


def run_logged(cmd: list[str], log_path: Path, stage: Stage, env: dict[str, str]) -> float:
    """Run cmd to completion with stdout+stderr appended to log_path; raise StageFailed on a non-zero exit."""
    stage.commands.append(shlex.join(cmd))
    print(f"  $ {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    seconds = time.perf_counter() - started
    if rc != 0:
        raise StageFailed(f"`{cmd[3] if len(cmd) > 3 else cmd[0]}` exited with status {rc} after {seconds:.1f} s")
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`openk2 serve` as a child process: started, waited for on /health, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, model: Path, name: str, log_path: Path, stage: Stage, args: argparse.Namespace):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name, self.log_path, self.health_timeout = name, log_path, args.health_timeout
        self.cmd = openk2_cmd("serve", "--model", str(model), "--port", str(self.port), "--served-model-name", name,
                              "--max-batch", str(args.concurrency), "--max-seq-len", str(args.max_seq_len))
        self.env = child_env(args.device)
        self.proc: subprocess.Popen | None = None
        self._log = None
        stage.commands.append(shlex.join(self.cmd))

    def __enter__(self) -> Server:
        print(f"  $ {shlex.join(self.cmd)}", flush=True)
        self._log = open(self.log_path, "a", encoding="utf-8")
        self._log.write(f"$ {shlex.join(self.cmd)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env)
        started = time.perf_counter()
        try:
            self._wait_healthy(started + self.health_timeout)
        except BaseException:  # __exit__ does not run when __enter__ raises
            self.stop()
            raise
        print(f"  server up at {self.url} in {time.perf_counter() - started:.1f} s", flush=True)
        return self

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise StageFailed(f"the server exited with status {self.proc.returncode} before it was healthy")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.perf_counter() > deadline:
                raise StageFailed(f"the server was not healthy after {self.health_timeout:.0f} s")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the server ends its scheduler and uvicorn on SIGTERM
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                print(f"  server {self.proc.pid} did not stop in 10 s after SIGTERM: killed", flush=True)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def log_tail(path: Path | None, lines: int = LOG_TAIL) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")  # progress bars: one line each
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


# ---------------------------------------------------------------- stages


def prepare_data(args: argparse.Namespace, out: Path) -> Path:
    """The training JSONL: the built-in sample, a decompressed .gz, or the file itself (absolute)."""
    if args.data == "sample":
        from openk2.data.sft_sample import write_sample_jsonl

        return write_sample_jsonl(out / "data" / "sample.jsonl", n=args.sample_size)
    path = Path(args.data).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file")
    if path.suffix == ".gz":
        plain = out / "data" / path.name[:-3]
        plain.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return plain
    return path


def data_stage(args: argparse.Namespace, sets: list[str], log_path: Path) -> dict[str, Any]:
    """Read and pack the data exactly as `openk2 sft` will (same config, same tokens added); count it."""
    from openk2.data.chat import K2_CHAT_TOKENS
    from openk2.data.tokenizer import load_tokenizer
    from openk2.train.run import RunDir
    from openk2.train.sft import load_sft_config, prepare_sft_data, sft_template, train_data_paths

    cfg = load_sft_config(args.sft_config, sets)
    model_dir = Path(cfg.model.path)
    template = sft_template(cfg.data, model_dir)
    paths = train_data_paths(cfg.data, RunDir(cfg.run_dir))
    tokenizer = load_tokenizer(cfg.data.tokenizer or model_dir)
    added = []
    if template.native_k2 and cfg.data.add_chat_tokens:  # as train.sft.add_chat_tokens does, without the model
        added = [t for t in K2_CHAT_TOKENS if tokenizer.backend.token_to_id(t) is None]
        tokenizer.backend.add_special_tokens(added)
    with open(log_path, "a", encoding="utf-8") as log:
        d = prepare_sft_data(cfg, paths, tokenizer, template, lambda msg: log.write(msg + "\n"))
    rows, val_rows = len(d.train), len(d.val) if d.val is not None else 0
    train_tokens = _non_pad_tokens(d.train)
    stats = {
        "path": [str(p) for p in paths],
        "lines": sum(1 for p in paths for line in open(p, encoding="utf-8") if line.strip()),
        "conversations": d.examples + d.val_examples, "train_conversations": d.examples,
        "val_conversations": d.val_examples, "bad_examples": len(d.bad), "seq_len": cfg.data.seq_len,
        "tokens": train_tokens + (_non_pad_tokens(d.val) if d.val is not None else 0), "train_tokens": train_tokens,
        "trained_tokens": d.train.trained_tokens,
        "val_trained_tokens": d.val.trained_tokens if d.val is not None else 0, "rows": rows, "val_rows": val_rows,
        "non_pad_fraction": round(train_tokens / max(rows * cfg.data.seq_len, 1), 4),
        "chat_tokens_added": added, "batch_size": cfg.train.batch_size, "config_steps": cfg.train.steps,
        "epochs_at_config_steps": round(cfg.train.steps * cfg.train.batch_size / max(rows, 1), 3),
    }
    if args.epochs is not None:
        stats["steps"] = max(1, math.ceil(args.epochs * rows / cfg.train.batch_size))
    return stats


def _non_pad_tokens(batch) -> int:
    """Tokens of real examples in packed rows: all but each row's padding, its last document when that has no label."""
    total = 0
    for r in range(len(batch)):
        last = batch.document_ids[r] == batch.document_ids[r, -1]
        padded = bool((batch.labels[r][last] == -100).all())  # an example always trains on some token
        total += batch.input_ids.shape[1] - (int(last.sum()) if padded else 0)
    return total


def eval_stage(args: argparse.Namespace, model: Path, name: str, out: Path, stage: Stage) -> dict[str, Any]:
    """Serve MODEL, run `openk2 eval bfcl` on it, stop the server; the eval's summary.json as a dict."""
    eval_dir = out / f"eval_{stage.name}"
    serve_log, eval_log = out / f"serve_{stage.name}.log", out / f"eval_{stage.name}.log"
    stage.log = str(serve_log)  # the log a failure shows: the server's until it is up, then the eval's
    cmd = openk2_cmd("eval", "bfcl", "--categories", *args.categories, "--out", str(eval_dir))
    with Server(model, name, serve_log, stage, args) as server:
        stage.log = str(eval_log)
        cmd += ["--endpoint", server.url + "/v1", "--model", name, "--concurrency", str(args.concurrency),
                "--max-tokens", str(args.max_tokens), "--temperature", "0"]
        if args.limit is not None:
            cmd += ["--limit", str(args.limit)]
        try:
            run_logged(cmd, eval_log, stage, child_env(args.device))
        except StageFailed:
            print(f"  --- tail of {serve_log}", flush=True)
            print(log_tail(serve_log, 20), flush=True)
            raise
    return read_eval_summary(eval_dir / "summary.json")


def read_eval_summary(path: Path, categories: list[str] | None = None) -> dict[str, Any]:
    """What results.json keeps of an `openk2 eval bfcl` summary.json: CATEGORIES only (all when None), and their
    unweighted mean, so that a reused summary of more categories compares like with like."""
    summary = json.loads(path.read_text())
    scores = {c["category"]: {k: c[k] for k in ("items", "correct", "accuracy", "error_types")}
              for c in summary["categories"] if categories is None or c["category"] in categories}
    mean = sum(s["accuracy"] for s in scores.values()) / len(scores) if scores else 0.0
    return {"mean_accuracy": mean, "endpoint_config": summary["config"], "categories": scores,
            "dir": str(path.parent)}


def sft_stage(args: argparse.Namespace, sets: list[str], out: Path, stage: Stage) -> dict[str, Any]:
    """`openk2 sft` as a child, timed; what its run folder says about the run."""
    log_path = out / "sft.log"
    stage.log = str(log_path)
    cmd = openk2_cmd("sft", str(args.sft_config), *[a for s in sets for a in ("--set", s)])
    wall = run_logged(cmd, log_path, stage, child_env(args.device))
    return {"wall_s": round(wall, 2), **read_sft_run(out / "sft")}


def read_sft_run(run_dir: Path) -> dict[str, Any]:
    """Steps, tokens, loss, throughput and device from an sft run folder's metrics.jsonl, env.json, checkpoints."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [m for m in metrics if m.get("kind") == "train"]
    val = [m for m in metrics if m.get("kind") == "val"]
    data = next((m for m in metrics if m.get("kind") == "data"), {})
    env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").exists() else {}
    step_seconds, prev = 0.0, 0
    for m in train:  # each step's own tokens over its own tokens/s: the loop's time without loading and saving
        if m.get("tokens_per_s"):
            step_seconds += (m["tokens"] - prev) / m["tokens_per_s"]
        prev = m["tokens"]
    last = train[-1] if train else {}
    latest = run_dir / "checkpoints" / "latest"
    return {
        "run_dir": str(run_dir), "steps": last.get("step", 0), "tokens_seen": last.get("tokens", 0),
        "trained_tokens_seen": last.get("trained_tokens", 0), "loop_s": round(step_seconds, 2),
        "loop_tokens_per_s": round(last.get("tokens", 0) / step_seconds, 1) if step_seconds else None,
        "first_loss": train[0]["loss"] if train else None, "final_loss": last.get("loss"),
        "val_loss": [{"step": m["step"], "val_loss": m["val_loss"]} for m in val],
        "max_logit": max(last["max_logit"]) if last.get("max_logit") else None,
        "anomalies": sum(m.get("kind") == "anomaly" for m in metrics), "data_record": data,
        "device": env.get("device"), "cuda_device": env.get("cuda_device"), "torch": env.get("torch"),
        "checkpoint": str(run_dir / "checkpoints" / latest.read_text().strip() / "model") if latest.exists() else None,
    }


# ---------------------------------------------------------------- report


def device_name(args: argparse.Namespace, results: dict[str, Any]) -> str:
    sft = results.get("sft") or {}
    if sft.get("cuda_device"):
        return sft["cuda_device"]
    try:
        import torch

        if args.device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception as e:  # report, not fail: the name is a label
        return f"unknown ({type(e).__name__}: {e})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str | None]:
    """Python and the libraries the children run on (read from package metadata, nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "tokenizers", "fastapi", "openai", "bfcl-eval"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def synth_usage(run_dir: Path) -> dict[str, Any]:
    """SYNTH_RUN_DIR/usage.json (LLM tokens per synthesis stage) with totals."""
    usage = json.loads((run_dir / "usage.json").read_text())
    total = {k: sum(int(row.get(k, 0)) for row in usage.values()) for k in
             ("prompt_tokens", "completion_tokens", "calls", "cached_calls", "failures")}
    total["tokens"] = total["prompt_tokens"] + total["completion_tokens"]
    return {"run_dir": str(run_dir), "per_stage": usage, "total": total}


def percent(score: dict[str, Any] | None, category: str) -> str:
    if not score or category not in score["categories"]:
        return "n/a"
    c = score["categories"][category]
    return f"{100 * c['accuracy']:.1f}% ({c['correct']}/{c['items']})"


def markdown(results: dict[str, Any]) -> str:
    """category | before | after, then the mean, the run's facts, the command."""
    before, after = results.get("before"), results.get("after")
    lines = ["| category | before | after |", "|---|---|---|"]
    for c in results["categories"]:
        lines.append(f"| {c} | {percent(before, c)} | {percent(after, c)} |")
    means = [f"{100 * s['mean_accuracy']:.1f}%" if s else "n/a" for s in (before, after)]
    lines.append(f"| **mean** | **{means[0]}** | **{means[1]}** |")
    data, sft = results.get("data") or {}, results.get("sft") or {}
    facts = []
    if data:
        d = {k: data.get(k, 0) for k in ("conversations", "val_conversations", "bad_examples", "tokens",
                                         "train_tokens", "trained_tokens", "rows", "seq_len")}
        facts.append(f"data: {d['conversations']:,} conversations ({d['val_conversations']} held out for validation, "
                     f"{d['bad_examples']} bad lines skipped), {d['tokens']:,} tokens; an epoch is "
                     f"{d['train_tokens']:,} tokens ({d['trained_tokens']:,} assistant tokens with loss) in "
                     f"{d['rows']:,} rows of {d['seq_len']}")
    if sft.get("steps"):
        facts.append(f"SFT: {sft['steps']} steps, {sft['tokens_seen']:,} tokens seen "
                     f"({sft['trained_tokens_seen']:,} with loss), loss {sft['first_loss']:.3f} -> "
                     f"{sft['final_loss']:.3f}, {sft['wall_s']:.0f} s wall ({sft['loop_s']:.0f} s in the loop, "
                     f"{sft['loop_tokens_per_s'] or 0:,.0f} tokens/s)")
    facts.append(f"device: {results.get('device')}")
    if results.get("synth_usage"):
        t = results["synth_usage"]["total"]
        facts.append(f"synthesis LLM usage: {t['tokens']:,} tokens ({t['prompt_tokens']:,} prompt + "
                     f"{t['completion_tokens']:,} completion) in {t['calls']:,} calls")
    failed = [s["name"] for s in results["stages"] if not s["ok"]]
    if failed:
        facts.append(f"FAILED stages: {', '.join(failed)} (see results.json)")
    limit = results["args"].get("limit")
    facts.append(f"BFCL non-live AST, {'first ' + str(limit) + ' items per category' if limit else 'all items'}, "
                 f"greedy, max {results['args']['max_tokens']} tokens")
    return "\n".join(lines + [""] + [f"- {f}" for f in facts] + ["", f"`{results['command']}`", ""])


def plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: accuracy per category (and the mean), before vs after SFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(results["categories"]) + ["mean"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    for i, (key, color) in enumerate((("before", "tab:gray"), ("after", "tab:blue"))):
        score = results.get(key)
        if not score:
            continue
        values = [100 * score["categories"][c]["accuracy"] if c in score["categories"] else 0 for c in cats[:-1]]
        values.append(100 * score["mean_accuracy"])
        xs = [x + (i - 0.5) * width for x in range(len(cats))]
        bars = ax.bar(xs, values, width, label=f"{key} SFT", color=color)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(cats)), cats, rotation=15)
    ax.set(ylabel="accuracy (%)", ylim=(0, 118),
           title=f"BFCL non-live AST before/after SFT — {Path(results['model']).name}, {results.get('device') or '?'}")
    if results.get("before") or results.get("after"):
        ax.legend(loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict[str, Any], out: Path) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table)
    try:
        plot(results, out / "bfcl_before_after.png")
    except Exception as e:  # the numbers are written already; say why the picture is not
        print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
    return table


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="chat JSONL (or .jsonl.gz) to fine-tune on; 'sample' = built-in")
    p.add_argument("--model", required=True, help="hub-layout model folder (e.g. SmolLM2 converted from its GGUF)")
    p.add_argument("--out", required=True, help="output folder (must not hold a run already)")
    p.add_argument("--sft-config", default=str(REPO / "configs" / "sft_bfcl.toml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="sft config override (repeat)")
    p.add_argument("--epochs", type=float, help="set train.steps to cover the packed rows this many times")
    p.add_argument("--limit", type=int, help="first N items per BFCL category (default: all)")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES, metavar="CATEGORY")
    p.add_argument("--skip-before", action="store_true", help="do not evaluate the base model")
    p.add_argument("--before", metavar="SUMMARY_JSON",
                   help="reuse an earlier `openk2 eval bfcl` summary.json of the base model instead of evaluating it")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight; also the server's --max-batch")
    p.add_argument("--max-tokens", type=int, default=512, help="per BFCL reply")
    p.add_argument("--max-seq-len", type=int, default=2048, help="server context per slot (prompts are <1k tokens)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), help="train.device, and cpu hides GPUs from serve")
    p.add_argument("--health-timeout", type=float, default=300.0, help="seconds to wait for a server's /health")
    p.add_argument("--synth-run", help="synthesis run folder: its usage.json (LLM tokens) goes into the results")
    p.add_argument("--sample-size", type=int, default=64, help="conversations of --data sample")
    p.add_argument("--prep-command", action="append", default=[], metavar="CMD",
                   help="a command that prepared the inputs (e.g. the GGUF conversion), recorded in results.json")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs <= 0:
        p.error(f"--epochs must be positive, got {args.epochs}")
    if args.epochs is not None and any(s.split("=", 1)[0].strip() == "train.steps" for s in args.set):
        p.error("give either --epochs or --set train.steps=..., not both")
    if args.concurrency < 1 or args.max_tokens < 1:
        p.error("--concurrency and --max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if (out / "results.json").exists() or (out / "sft" / "metrics.jsonl").exists():
        print(f"error: {out} already holds a run; choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model).resolve()
    args.sft_config = str(Path(args.sft_config).resolve())
    if not (model / "config.json").is_file():
        print(f"error: --model {args.model}: no config.json (convert the GGUF first: openk2 convert gguf)",
              file=sys.stderr)
        return 2
    src = str(REPO / "src")
    if src not in sys.path:
        sys.path.insert(0, src)  # the data stage imports openk2 in-process, as the children do from PYTHONPATH
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    results: dict[str, Any] = {
        "experiment": "BFCL before/after SFT on synthesized trajectories (issue 7 item 4)",
        "command": command, "args": {k: v for k, v in vars(args).items()}, "categories": args.categories,
        "model": str(model), "out": str(out), "prep_commands": args.prep_command, "versions": versions(),
        "started": time.strftime("%F %T"),
        "stages": [], "device": None, "data": None, "before": None, "sft": None, "after": None, "synth_usage": None,
    }
    stages: list[Stage] = []
    signal.signal(signal.SIGTERM, _terminate)  # subprocess.run kills its child and Server stops on the way out
    signal.signal(signal.SIGINT, _terminate)

    def run_stage(name: str, fn) -> Any:
        stage = Stage(name)
        stages.append(stage)
        if any(isinstance(s.error, str) and s.error.startswith("Terminated") for s in stages):
            stage.error = "skipped: the harness was stopped"
            results["stages"] = [asdict(s) for s in stages]
            return None
        print(f"[{time.strftime('%T')}] stage {name}", flush=True)
        started = time.perf_counter()
        try:
            value = fn(stage)
            stage.ok = True
            return value
        except Exception as e:
            stage.error = f"{type(e).__name__}: {e}"
            print(f"  stage {name} FAILED: {stage.error}", file=sys.stderr, flush=True)
            if not isinstance(e, StageFailed):
                tb = traceback.format_exc()
                print(tb, file=sys.stderr, flush=True)
                if stage.log:
                    with open(stage.log, "a", encoding="utf-8") as f:
                        f.write(tb)
            if stage.log:
                print(f"  --- last lines of {stage.log}:\n{log_tail(Path(stage.log))}", file=sys.stderr, flush=True)
            return None
        finally:
            stage.seconds = round(time.perf_counter() - started, 2)
            print(f"  stage {name}: {'ok' if stage.ok else 'FAILED'} in {stage.seconds:.1f} s", flush=True)
            results["stages"] = [asdict(s) for s in stages]
            write_results(results, out)  # after every stage: a crash later keeps what was measured

    if args.synth_run:
        results["synth_usage"] = run_stage("synth_usage", lambda st: synth_usage(Path(args.synth_run).resolve()))

    def data(stage: Stage) -> dict[str, Any]:
        stage.log = str(out / "data.log")
        path = prepare_data(args, out)
        results["data_path"] = str(path)
        return data_stage(args, sft_sets(path), Path(stage.log))

    def sft_sets(path: Path, steps: int | None = None) -> list[str]:
        sets = [f"model.path={json.dumps(str(model))}", f"data.train={json.dumps([str(path)])}",
                f"run_dir={json.dumps(str(out / 'sft'))}"]
        if args.device:
            sets.append(f"train.device={json.dumps(args.device)}")
        if steps is not None:
            sets.append(f"train.steps={steps}")
        return sets + args.set  # the caller's overrides last: they win

    results["data"] = run_stage("data", data)
    steps = (results["data"] or {}).get("steps")
    if args.epochs is not None and steps is None:
        print("  --epochs needs the data stage; sft runs with the config's train.steps", file=sys.stderr)

    if args.before:  # the base model's eval from an earlier run (it does not change): its summary.json
        results["before"] = {**read_eval_summary(Path(args.before), args.categories), "reused": args.before}
    elif not args.skip_before:
        results["before"] = run_stage("before", lambda st: eval_stage(args, model, "base", out, st))

    if "data_path" in results:
        results["sft"] = run_stage("sft", lambda st: sft_stage(args, sft_sets(Path(results["data_path"]), steps),
                                                               out, st))
    if results["sft"] is not None:
        results["after"] = run_stage("after", lambda st: eval_stage(args, out / "sft", "sft", out, st))

    results["device"] = device_name(args, results)
    results["finished"] = time.strftime("%F %T")
    results["stages"] = [asdict(s) for s in stages]
    table = write_results(results, out)
    print("\n" + table)
    print(f"results: {out}/results.json, results.md, bfcl_before_after.png; logs: {out}/*.log")
    failed = [s.name for s in stages if not s.ok]
    if failed:
        print(f"FAILED stages: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
