"""`openk2 synth CONFIG`: agentic data synthesis, stage by stage into a resumable run folder (paper §3.1.1, spec §4).

    RUN_DIR/config.toml, env.json, metrics.jsonl   the resolved config, the environment, one line per stage
    tools.jsonl (+ tools_rejected.jsonl)            real MCP tools harvested + synthetic tools evolved (or a file)
    agents.jsonl                                    one agent per line (system prompt + tool subset)
    tasks.jsonl                                     one task per line, dropped ones too (with the reason)
    episodes.jsonl                                  one trajectory per line, failed ones too (with the reason)
    judged.jsonl                                    one verdict per trajectory
    sft.jsonl, rejected.jsonl                       the output: OpenAI messages + tools + provenance
    stats.json, usage.json, plots/stats.png         generated / valid / kept per stage and domain, LLM tokens

Every stage appends one flushed line per finished item, keyed by a stable id (agent-0003, task-00017,
task-00017/ep0) derived from the config and seed, so a run killed anywhere and rerun skips what it finished and
does what it did not, never duplicating or losing an item (a line cut by the kill is dropped and redone). The
output files are rewritten whole from the logs at the end. Episodes run as asyncio tasks, `episodes.concurrency`
at a time; each is judged as soon as it ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from openk2.agentic.agents import Agent, draft_agents, tool_domain, write_agent
from openk2.agentic.catalog import load_catalog
from openk2.agentic.config import SynthConfig
from openk2.agentic.episode import Trajectory, run_episode
from openk2.agentic.evolve import evolve_tools, load_tools, save_tools
from openk2.agentic.judge import Verdict, judge
from openk2.agentic.llm import LLMClient, LLMConfig
from openk2.agentic.sandbox import python_tool_spec
from openk2.agentic.simulate import ToolSimulator, is_code_tool
from openk2.agentic.tasks import Task, plan_task, write_task
from openk2.agentic.tools import ToolSpec
from openk2.config import load_config, to_toml
from openk2.train.run import RunDir

STAGES = ("tools", "agents", "tasks", "episodes", "judge")


class JsonlLog:
    """An append-only JSONL file of records keyed by `key`; a last line cut by a kill is dropped on load."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self._file: Any = None

    def load(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return records
        good = 0  # bytes up to the end of the last whole, parsable line
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # only a kill mid-write makes one, and it can only be the last line
                if not line.endswith(b"\n"):
                    break
                records.setdefault(record[self.key], record)  # the first wins; a rerun never writes a second
                good += len(line)
        if good != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return records

    def append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()  # in the OS's hands: a killed process loses nothing written

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def stable_seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


async def _bounded(items: Iterable[Any], limit: int, work: Callable[[Any], Awaitable[None]], bar: Any) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def one(item: Any) -> None:
        async with semaphore:
            await work(item)
        bar.update(1)

    await asyncio.gather(*(one(item) for item in items))


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False)


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def resolve_model(config: LLMConfig) -> LLMConfig:
    """`model = "auto"`: the first model the server lists at /models (ours serves one)."""
    if config.model != "auto":
        return config
    import httpx

    url = config.base_url.rstrip("/") + "/models"
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {config.api_key}"}, timeout=30)
        response.raise_for_status()
        name = response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"llm.model = \"auto\" but {url} did not list a model ({e}); is `openk2 serve` running "
                         "there? Or set llm.model") from e
    return replace(config, model=name)


class Synthesis:
    """One run of the pipeline over a run folder: the stages in order, each resumable."""

    def __init__(self, config: SynthConfig, llm: Any, toolbox: Any | None, progress: bool, log: Callable[[str], None]):
        self.cfg, self.llm, self.toolbox, self.progress, self.log = config, llm, toolbox, progress, log
        self.path = Path(config.run_dir)
        self.run = RunDir(self.path)
        self.tools: dict[str, ToolSpec] = {}

    def simulator(self, tools: list[ToolSpec], seed: int) -> ToolSimulator:
        return ToolSimulator(tools, self.cfg.simulator, seed, real=self.toolbox)

    # -- tools ---------------------------------------------------------------------------------------------------

    async def stage_tools(self) -> dict[str, Any]:
        path, stats_path = self.path / "tools.jsonl", self.path / "tools_stats.json"
        if path.exists() and stats_path.exists():  # tools.jsonl is written last and atomically: present = done
            tools = load_tools(path)
            stats = json.loads(stats_path.read_text())
        else:
            tools, stats = await self._build_tools()
            stats_path.write_text(json.dumps(stats, indent=1) + "\n")
            save_tools(tools, path)
        servers = {t.source.removeprefix("mcp:") for t in tools if t.source.startswith("mcp:")}
        missing = sorted(servers - set(self.cfg.tools.mcp_servers))
        if missing:
            raise ValueError(f"the tools include real tools of MCP server(s) {missing} that tools.mcp_servers = "
                             f"{self.cfg.tools.mcp_servers} does not start")
        self.tools = {t.name: t for t in tools}
        return stats

    async def _build_tools(self) -> tuple[list[ToolSpec], dict[str, Any]]:
        cfg = self.cfg.tools
        by_domain: dict[str, dict[str, int]] = {}

        def count(domain: str, generated: int = 0, valid: int = 0) -> None:
            row = by_domain.setdefault(domain, {"generated": 0, "valid": 0, "kept": 0})
            row["generated"] += generated
            row["valid"] += valid

        tools: list[ToolSpec] = []
        if cfg.path is not None:
            tools = load_tools(cfg.path)
            for t in tools:
                count(tool_domain(t), 1, 1)
        else:
            if cfg.mcp_servers:
                harvested = await asyncio.to_thread(self.toolbox.harvest)
                for t in harvested:
                    count(tool_domain(t), 1, 1)
                tools = [t for t in harvested if t.name not in cfg.exclude]
            if cfg.synthetic:
                result = await evolve_tools(self.llm, cfg.evolve, existing=tools)
                for t in result.tools:
                    count(tool_domain(t), 1, 1)
                for candidate, reason in result.rejected:
                    count(f"{candidate.category}/{candidate.domain}", 1, int(reason.startswith(("near duplicate",
                                                                                                "duplicate name"))))
                tools += result.tools
                _write_atomic(self.path / "tools_rejected.jsonl",
                              (json.dumps({"category": c.category, "domain": c.domain, "raw": c.raw, "reason": r},
                                          ensure_ascii=False) for c, r in result.rejected))
            if cfg.catalog:
                known = {t.name for t in tools}
                for t in load_catalog():
                    count(tool_domain(t), 1, 1)
                    if t.name not in known:
                        tools.append(t)
        if cfg.code_tool and not any(is_code_tool(t) for t in tools):
            tools.append(python_tool_spec())
            count("code", 1, 1)
        names = Counter(t.name for t in tools)
        if dup := [n for n, k in names.items() if k > 1]:
            raise ValueError(f"tool names repeat in the repository: {dup}")
        for t in tools:
            by_domain[tool_domain(t)]["kept"] += 1
        return tools, _totals(by_domain)

    # -- agents --------------------------------------------------------------------------------------------------

    async def stage_agents(self) -> tuple[list[Agent], dict[str, Any]]:
        drafts = draft_agents(list(self.tools.values()), self.cfg.agents, self.cfg.seed)
        log = JsonlLog(self.path / "agents.jsonl", "agent_id")
        done = log.load()
        bar = _bar(len(drafts), "agents", self.progress)
        bar.update(len(done))

        async def work(draft: Any) -> None:
            agent = await write_agent(self.llm, draft, self.tools, self.cfg.agents,
                                      stable_seed(self.cfg.seed, draft.agent_id))
            done[draft.agent_id] = agent.to_dict()
            log.append(agent.to_dict())

        try:
            await _bounded([d for d in drafts if d.agent_id not in done], self.cfg.episodes.concurrency, work, bar)
        finally:
            log.close()
            bar.close()
        agents = [Agent.from_dict(done[d.agent_id]) for d in drafts]
        by_domain: dict[str, dict[str, int]] = {}
        for a in agents:
            row = by_domain.setdefault(a.domain, {"generated": 0, "valid": 0, "kept": 0})
            row["generated"] += 1
            row["valid"] += a.prompt_source == "llm"
            row["kept"] += 1
        return agents, {**_totals(by_domain), "fallback_prompts": sum(a.prompt_source != "llm" for a in agents)}

    # -- tasks ---------------------------------------------------------------------------------------------------

    async def stage_tasks(self, agents: list[Agent]) -> tuple[list[Task], dict[str, Any]]:
        cfg = self.cfg.tasks
        specs = [(f"task-{i:05d}", agents[i % len(agents)], cfg.complexity[i % len(cfg.complexity)])
                 for i in range(cfg.count)]
        log = JsonlLog(self.path / "tasks.jsonl", "task_id")
        done = log.load()
        bar = _bar(len(specs), "tasks", self.progress)
        bar.update(len(done))

        async def work(spec: tuple[str, Agent, int]) -> None:
            task_id, agent, complexity = spec
            seed = stable_seed(self.cfg.seed, task_id)
            try:
                task = await asyncio.to_thread(plan_task, agent, self.tools, self.simulator, cfg, task_id,
                                               complexity, seed)
                if task.kept:
                    task = await write_task(self.llm, task, self.tools, cfg)
            except Exception as e:  # noqa: BLE001 - one bad tool (an unsampleable schema) must not stop the run
                self._error(task_id, e)
                task = Task(task_id, agent.agent_id, agent.domain, complexity, seed, False,
                            f"error: {type(e).__name__}: {e}", [], {})
            done[task_id] = task.to_dict()
            log.append(task.to_dict())

        try:
            await _bounded([s for s in specs if s[0] not in done], self.cfg.episodes.concurrency, work, bar)
        finally:
            log.close()
            bar.close()
        tasks = [Task.from_dict(done[task_id]) for task_id, _, _ in specs]
        by_domain: dict[str, dict[str, int]] = {}
        for t in tasks:
            row = by_domain.setdefault(t.domain, {"generated": 0, "valid": 0, "kept": 0})
            row["generated"] += 1
            row["valid"] += t.kept
            row["kept"] += t.kept
        return tasks, {**_totals(by_domain),
                       "drop_reasons": dict(Counter(t.reason.split(":", 1)[0] for t in tasks if not t.kept)),
                       "request_sources": dict(Counter(t.request_source for t in tasks if t.kept))}

    # -- episodes and judge --------------------------------------------------------------------------------------

    async def stage_episodes(self, agents: list[Agent], tasks: list[Task]) -> tuple[list[tuple[Trajectory, Verdict]],
                                                                                     dict[str, Any]]:
        cfg = self.cfg.episodes
        by_id = {a.agent_id: a for a in agents}
        jobs = [(f"{t.task_id}/ep{k}", t) for t in tasks if t.kept for k in range(cfg.per_task)]
        episodes_log = JsonlLog(self.path / "episodes.jsonl", "episode_id")
        judged_log = JsonlLog(self.path / "judged.jsonl", "episode_id")
        episodes, verdicts = episodes_log.load(), judged_log.load()
        bar = _bar(len(jobs), "episodes", self.progress)
        bar.update(sum(eid in verdicts for eid, _ in jobs))
        started = time.monotonic()
        rolled = 0

        async def work(job: tuple[str, Task]) -> None:
            nonlocal rolled
            eid, task = job
            agent = by_id[task.agent_id]
            if eid not in episodes:
                trajectory = await self._episode(task, agent, eid)
                rolled += 1
                episodes[eid] = trajectory.to_dict()
                episodes_log.append(trajectory.to_dict())
            trajectory = Trajectory.from_dict(episodes[eid])
            try:
                verdict = await judge(self.llm, trajectory, task, agent, self.tools, self.cfg.judge)
            except Exception as e:  # noqa: BLE001 - recorded as a rejection; the run goes on
                self._error(eid, e)
                verdict = Verdict(eid, False, [f"judge error: {type(e).__name__}: {e}"], [])
            verdicts[eid] = verdict.to_dict()
            judged_log.append(verdict.to_dict())

        try:
            await _bounded([j for j in jobs if j[0] not in verdicts], cfg.concurrency, work, bar)
        finally:
            episodes_log.close()
            judged_log.close()
            bar.close()
        seconds = time.monotonic() - started
        pairs = [(Trajectory.from_dict(episodes[eid]), Verdict.from_dict(verdicts[eid])) for eid, _ in jobs]
        return pairs, {"episodes_this_run": rolled, "seconds": round(seconds, 2),
                       "trajectories_per_minute": round(rolled / seconds * 60, 2) if rolled and seconds > 0 else None}

    async def _episode(self, task: Task, agent: Agent, eid: str) -> Trajectory:
        seed = stable_seed(self.cfg.seed, eid)
        for attempt in range(1, self.cfg.episodes.retries + 2):
            try:
                trajectory = await run_episode(self.llm, task, agent, self.tools, self.simulator, self.cfg.episodes,
                                               eid, seed)
            except Exception as e:  # noqa: BLE001 - a failed episode is recorded, the run goes on
                self._error(eid, e)
                trajectory = Trajectory(eid, task.task_id, agent.agent_id, agent.domain, self.cfg.episodes.assistant,
                                        seed, "", status="failed", reason=f"error: {type(e).__name__}: {e}")
            trajectory.attempts = attempt
            if not trajectory.reason.startswith("infrastructure"):
                break
        return trajectory

    def _error(self, item: str, error: Exception) -> None:
        with open(self.path / "errors.log", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {item}\n"
                    f"{''.join(traceback.format_exception(error))}\n")

    # -- output --------------------------------------------------------------------------------------------------

    def write_output(self, agents: list[Agent], tasks: list[Task], pairs: list[tuple[Trajectory, Verdict]]
                     ) -> tuple[int, int]:
        by_agent = {a.agent_id: a for a in agents}
        by_task = {t.task_id: t for t in tasks}
        kept, rejected = [], []
        for trajectory, verdict in sorted(pairs, key=lambda p: p[0].episode_id):
            agent, task = by_agent[trajectory.agent_id], by_task[trajectory.task_id]
            line = sft_record(trajectory, verdict, agent, task, self.tools)
            (kept if verdict.kept else rejected).append(json.dumps(line, ensure_ascii=False))
        _write_atomic(self.path / "sft.jsonl", kept)
        _write_atomic(self.path / "rejected.jsonl", rejected)
        return len(kept), len(rejected)


def sft_record(trajectory: Trajectory, verdict: Verdict, agent: Agent, task: Task,
               tools: dict[str, ToolSpec]) -> dict[str, Any]:
    """One output line: OpenAI messages (tool_calls, tool_call_id kept), the agent's tools, provenance."""
    sources = sorted({tools[n].source for n in agent.tools})
    return {"id": trajectory.episode_id, "messages": trajectory.messages,
            "tools": [tools[n].to_openai() for n in agent.tools],
            "provenance": {"agent": agent.agent_id, "task": task.task_id, "domain": agent.domain,
                           "source": sources, "seed": trajectory.seed, "assistant": trajectory.mode,
                           "persona": trajectory.persona, "complexity": task.complexity,
                           "prompt_source": agent.prompt_source, "request_source": task.request_source,
                           "stop": trajectory.stop, "status": trajectory.status, "notes": trajectory.notes,
                           "judge": {"kept": verdict.kept, "verdict": verdict.llm_verdict, "reasons": verdict.reasons,
                                     "checks": {c.name: c.passed for c in verdict.checks}}}}


def _totals(by_domain: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {k: sum(row[k] for row in by_domain.values()) for k in ("generated", "valid", "kept")} | {
        "by_domain": dict(sorted(by_domain.items()))}


def _pair_stats(pairs: list[tuple[Trajectory, Verdict]]) -> tuple[dict[str, Any], dict[str, Any]]:
    episodes: dict[str, dict[str, int]] = {}
    judged: dict[str, dict[str, int]] = {}
    for trajectory, verdict in pairs:
        e = episodes.setdefault(trajectory.domain, {"generated": 0, "valid": 0, "kept": 0})
        e["generated"] += 1
        e["valid"] += trajectory.status == "ok"
        e["kept"] += trajectory.status == "ok"
        j = judged.setdefault(trajectory.domain, {"generated": 0, "valid": 0, "kept": 0})
        j["generated"] += 1
        j["valid"] += bool(verdict.checks) and all(c.passed for c in verdict.checks)
        j["kept"] += verdict.kept
    failed: Counter[str] = Counter(t.reason.split(":", 1)[0] for t, _ in pairs if t.status != "ok")
    why: Counter[str] = Counter()
    for _, verdict in pairs:
        if not verdict.kept:
            failing = [c.name for c in verdict.checks if not c.passed]
            why[f"check {failing[0]}" if failing else "LLM judge" if verdict.checks else "judge error"] += 1
    return ({**_totals(episodes), "failures": dict(failed), "stops": dict(Counter(t.stop for t, _ in pairs))},
            {**_totals(judged), "reject_reasons": dict(why),
             "llm_verdicts": dict(Counter(str(v.llm_verdict) for _, v in pairs))})


def plot_stats(stats: dict[str, Any], out: Path) -> Path:
    """plots/stats.png: generated / valid / kept per stage, and kept vs rejected trajectories per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(STAGES))
    for i, key in enumerate(("generated", "valid", "kept")):
        left.bar(x + (i - 1) * 0.27, [stats[s][key] for s in STAGES], 0.27, label=key)
    left.set_xticks(x, STAGES)
    left.set_title("per stage")
    left.legend()
    domains = list(stats["judge"]["by_domain"])
    rows = [stats["judge"]["by_domain"][d] for d in domains]
    y = np.arange(len(domains))
    right.barh(y - 0.2, [r["kept"] for r in rows], 0.4, label="kept")
    right.barh(y + 0.2, [r["generated"] - r["kept"] for r in rows], 0.4, label="rejected")
    right.set_yticks(y, domains, fontsize=8)
    right.set_title("trajectories per domain")
    right.legend()
    fig.tight_layout()
    path = out / "stats.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _add_usage(base: dict[str, dict[str, int]], now: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    total = {stage: dict(row) for stage, row in base.items()}
    for stage, row in now.items():
        into = total.setdefault(stage, {})
        for key, value in row.items():
            into[key] = into.get(key, 0) + value
    return total


def prepare_run(config: SynthConfig, resume: bool = False) -> RunDir:
    """Fill `{time}`, create the run folder (config.toml, env.json) or check it holds this config."""
    import torch

    config.run_dir = config.run_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    run = RunDir(config.run_dir)
    saved = run.path / "config.toml"
    if saved.exists() and not resume and saved.read_text() != to_toml(config):
        raise ValueError(f"run folder {config.run_dir} holds a run with another config: continue it with "
                         f"`openk2 synth --resume {config.run_dir}` or choose another run_dir")
    if saved.exists():
        saved.write_text(to_toml(config))  # a resume may extend the run (more tasks, another judge setting)
    else:
        run.create(config, torch.device("cpu"))
    return run


def resume_synth_config(run_dir: str | Path, overrides: list[str] = ()) -> SynthConfig:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a synth run folder (no config.toml)")
    return load_config(SynthConfig, path, [f"run_dir={json.dumps(str(run_dir))}", *overrides])


async def run_synth(config: SynthConfig, *, llm: Any | None = None, toolbox: Any | None = None, resume: bool = False,
                    progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) every stage; returns the stats of stats.json. `llm`, `toolbox`: real ones when None."""
    started = time.monotonic()
    run = prepare_run(config, resume)
    owned: list[Any] = []
    if llm is None and config.llm.enabled:
        llm_config = resolve_model(config.llm)
        llm = LLMClient(llm_config)
        owned.append(llm)
    if toolbox is None and config.tools.mcp_servers:
        from openk2.agentic.mcp import MCPToolbox, git_server, sqlite_server, time_server

        makers = {"time": lambda: time_server(), "git": lambda: git_server(run.path / "mcp"),
                  "sqlite": lambda: sqlite_server(run.path / "mcp")}
        toolbox = MCPToolbox([makers[name]() for name in config.tools.mcp_servers])
        owned.append(toolbox)
    usage_path = run.path / "usage.json"
    base_usage = json.loads(usage_path.read_text()) if usage_path.exists() else {}
    synthesis = Synthesis(config, llm, toolbox, progress, log)

    def checkpoint(stage: str, seconds: float, **extra: Any) -> None:
        usage = _add_usage(base_usage, getattr(llm, "usage", {}))
        usage_path.write_text(json.dumps(usage, indent=1) + "\n")
        run.log({"kind": "stage", "stage": stage, "seconds": round(seconds, 2), **extra})

    try:
        t = time.monotonic()
        stats: dict[str, Any] = {"tools": await synthesis.stage_tools()}
        checkpoint("tools", time.monotonic() - t, kept=stats["tools"]["kept"])
        t = time.monotonic()
        agents, stats["agents"] = await synthesis.stage_agents()
        checkpoint("agents", time.monotonic() - t, kept=stats["agents"]["kept"])
        t = time.monotonic()
        tasks, stats["tasks"] = await synthesis.stage_tasks(agents)
        checkpoint("tasks", time.monotonic() - t, kept=stats["tasks"]["kept"])
        t = time.monotonic()
        pairs, throughput = await synthesis.stage_episodes(agents, tasks)
        stats["episodes"], stats["judge"] = _pair_stats(pairs)
        stats["episodes"].update(throughput)
        checkpoint("episodes", time.monotonic() - t, kept=stats["judge"]["kept"],
                   trajectories_per_minute=throughput["trajectories_per_minute"])
        kept, rejected = synthesis.write_output(agents, tasks, pairs)
    finally:
        for thing in owned:
            if isinstance(thing, LLMClient):
                await thing.aclose()
            else:
                thing.close()
        run.close()
    stats["output"] = {"sft": kept, "rejected": rejected}
    stats["acceptance"] = {s: round(stats[s]["kept"] / stats[s]["generated"], 4) if stats[s]["generated"] else None
                           for s in STAGES}
    stats["llm_usage"] = json.loads(usage_path.read_text())
    stats["seconds"] = round(time.monotonic() - started, 2)
    (run.path / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    stats["plot"] = str(plot_stats(stats, run.plots))
    stats["run_dir"] = str(run.path)
    log(summary_line(stats))
    return stats


def summary_line(stats: dict[str, Any]) -> str:
    tokens = sum(row.get("prompt_tokens", 0) + row.get("completion_tokens", 0) for row in stats["llm_usage"].values())
    rate = stats["episodes"].get("trajectories_per_minute")
    return (f"synth: {stats['tools']['kept']} tools, {stats['agents']['kept']} agents, {stats['tasks']['kept']}/"
            f"{stats['tasks']['generated']} tasks kept, {stats['episodes']['generated']} episodes "
            f"({stats['episodes']['generated'] - stats['episodes']['valid']} failed), {stats['output']['sft']} kept / "
            f"{stats['output']['rejected']} rejected; {tokens:,} LLM tokens"
            + (f"; {rate} trajectories/min" if rate else "") + f"\nrun folder: {stats['run_dir']}  "
            f"(sft.jsonl, rejected.jsonl, stats.json, plots/stats.png)")


def synth(config: SynthConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Synchronous entry point (the CLI's)."""
    return asyncio.run(run_synth(config, resume=resume, progress=progress))
