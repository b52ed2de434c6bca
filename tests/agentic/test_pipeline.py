"""The synth pipeline with a FakeLLM: output format, stats, kill-and-rerun resumability, failures recorded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from openk2.agentic.config import SynthConfig, load_synth_config
from openk2.agentic.mcp import MCPCallResult
from openk2.agentic.pipeline import JsonlLog, run_synth
from openk2.agentic.tools import ToolSpec
from tests.agentic.test_agents_tasks import FakeKill, FakeLLM

LOGS = {"agents.jsonl": "agent_id", "tasks.jsonl": "task_id", "episodes.jsonl": "episode_id",
        "judged.jsonl": "episode_id"}


def _config(run_dir: Path, *more: str) -> SynthConfig:
    return load_synth_config("configs/synth_tiny.toml", [f"run_dir={json.dumps(str(run_dir))}",
                                                         "tools.mcp_servers=[]", "tools.code_tool=false",
                                                         "tasks.count=10", "episodes.concurrency=4", *more])


def _run(config: SynthConfig, llm: Any = None, toolbox: Any = None) -> dict[str, Any]:
    return asyncio.run(run_synth(config, llm=llm or FakeLLM(), toolbox=toolbox, progress=False, log=lambda s: None))


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_sft_line(line: dict[str, Any]) -> None:
    """What every output line must hold: OpenAI messages with tool calls tied to tool turns, tools, provenance."""
    messages, tools = line["messages"], line["tools"]
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"]
    names = {t["function"]["name"] for t in tools}
    assert all(t["type"] == "function" and "parameters" in t["function"] for t in tools)
    pending: list[str] = []
    index = 0
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                assert call["type"] == "function" and call["function"]["name"] in names
                assert call["id"] == f"functions.{call['function']['name']}:{index}"
                assert isinstance(json.loads(call["function"]["arguments"]), dict)
                pending.append(call["id"])
                index += 1
        elif m["role"] == "tool":
            assert m["tool_call_id"] == pending.pop(0) and isinstance(m["content"], str)
    assert not pending
    provenance = line["provenance"]
    assert {"agent", "task", "domain", "source", "seed", "assistant", "judge"} <= set(provenance)


def test_a_run_writes_the_output_stats_and_plot(tmp_path: Path) -> None:
    stats = _run(_config(tmp_path / "run"))
    run = tmp_path / "run"
    sft = _lines(run / "sft.jsonl")
    assert len(sft) == stats["output"]["sft"] == stats["judge"]["kept"] > 0
    for line in sft:
        check_sft_line(line)
        assert line["provenance"]["assistant"] == "gold" and line["provenance"]["judge"]["verdict"] == "pass"
    assert any(m.get("tool_calls") for line in sft for m in line["messages"])
    saved = json.loads((run / "stats.json").read_text())
    for stage in ("tools", "agents", "tasks", "episodes", "judge"):
        assert {"generated", "valid", "kept", "by_domain"} <= set(saved[stage])
        assert sum(row["kept"] for row in saved[stage]["by_domain"].values()) == saved[stage]["kept"]
    assert saved["tasks"]["generated"] == 10 and saved["episodes"]["generated"] == saved["tasks"]["kept"]
    assert {"evolve/domains", "evolve/tools", "agents", "tasks", "episodes/assistant", "episodes/user",
            "judge"} <= set(saved["llm_usage"])
    assert (run / "plots" / "stats.png").stat().st_size > 1000
    assert (run / "config.toml").exists() and (run / "env.json").exists()
    assert [r["stage"] for r in _lines(run / "metrics.jsonl")] == ["tools", "agents", "tasks", "episodes"]


@pytest.mark.parametrize("kill_after", [3, 6, 12, 30])  # while evolving, writing agents, tasks, episodes
def test_a_killed_run_continues_without_duplicates_or_losses(tmp_path: Path, kill_after: int) -> None:
    reference = _run(_config(tmp_path / "whole"))
    config = _config(tmp_path / "killed")
    with pytest.raises(FakeKill):
        _run(config, FakeLLM(kill_after=kill_after))
    _run(_config(tmp_path / "killed"))
    for name, key in LOGS.items():
        ids = [r[key] for r in _lines(tmp_path / "killed" / name)]
        assert len(ids) == len(set(ids)), f"{name} repeats an item"
        assert sorted(ids) == sorted(r[key] for r in _lines(tmp_path / "whole" / name)), f"{name} lost an item"
    for name in ("sft.jsonl", "rejected.jsonl"):
        assert _lines(tmp_path / "killed" / name) == _lines(tmp_path / "whole" / name)
    assert json.loads((tmp_path / "killed" / "stats.json").read_text())["output"] == reference["output"]


def test_a_line_cut_by_a_kill_is_dropped_and_redone(tmp_path: Path) -> None:
    _run(_config(tmp_path / "run"))
    episodes = tmp_path / "run" / "episodes.jsonl"
    whole = episodes.read_text()
    lines = whole.splitlines(keepends=True)
    episodes.write_text("".join(lines[:-1]) + lines[-1][:40])  # the last trajectory cut mid-write
    judged = tmp_path / "run" / "judged.jsonl"
    judged.write_text("".join(judged.read_text().splitlines(keepends=True)[:-2]))
    _run(_config(tmp_path / "run"))
    assert sorted(episodes.read_text().splitlines()) == sorted(whole.splitlines())
    log = JsonlLog(episodes, "episode_id")
    assert len(log.load()) == len(lines)


def test_rerunning_a_folder_with_another_config_is_refused(tmp_path: Path) -> None:
    _run(_config(tmp_path / "run"))
    with pytest.raises(ValueError, match="another config"):
        _run(_config(tmp_path / "run", "tasks.count=12"))
    stats = asyncio.run(run_synth(_config(tmp_path / "run", "tasks.count=12"), llm=FakeLLM(), resume=True,
                                  progress=False, log=lambda s: None))
    assert stats["tasks"]["generated"] == 12  # a resume may extend the run


class FakeToolbox:
    """The time server: harvestable; its calls crash once (then work), or always time out."""

    def __init__(self, mode: str):
        self.mode, self.calls = mode, 0

    def harvest(self) -> list[ToolSpec]:
        schema = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
        return [ToolSpec.from_mcp({"name": "get_current_time", "description": "Current time in a zone.",
                                   "inputSchema": schema}, "time"),
                ToolSpec.from_mcp({"name": "get_timezone_offset", "description": "UTC offset of a zone.",
                                   "inputSchema": schema}, "time")]

    def call_tool(self, tool: ToolSpec, arguments: dict[str, Any], timeout_s: float | None = None) -> MCPCallResult:
        self.calls += 1
        if self.mode == "timeout" and self.calls > 2:  # the gold plans get answers, the episodes do not
            return MCPCallResult("time", tool.name, False, [], error="no answer in 30s", timed_out=True,
                                 transport_failed=True)
        if self.mode == "crash" and self.calls == 3:  # the first episode's call: the server died
            return MCPCallResult("time", tool.name, False, [], error="server lost", transport_failed=True)
        return MCPCallResult("time", tool.name, True, [{"type": "text", "text": f"{arguments['timezone']} 09:00"}])


@pytest.mark.parametrize("mode", ["crash", "timeout"])
def test_tool_server_failures_are_retried_or_recorded_and_the_run_goes_on(tmp_path: Path, mode: str) -> None:
    config = _config(tmp_path / "run", 'tools.mcp_servers=["time"]', "tools.synthetic=false", "tasks.count=2",
                     "tasks.complexity=[1]", "agents.count=1", "episodes.concurrency=1")
    stats = _run(config, toolbox=FakeToolbox(mode))
    episodes = _lines(tmp_path / "run" / "episodes.jsonl")
    assert len(episodes) == 2
    if mode == "crash":
        assert episodes[0]["attempts"] == 2 and all(e["status"] == "ok" for e in episodes)
        assert stats["output"]["sft"] == 2
    else:
        assert all(e["status"] == "failed" and e["reason"].startswith("infrastructure") for e in episodes)
        assert all(e["attempts"] == 2 for e in episodes) and stats["episodes"]["failures"] == {"infrastructure": 2}
        rejected = _lines(tmp_path / "run" / "rejected.jsonl")
        assert len(rejected) == 2 and all("episode_ok" in r["provenance"]["judge"]["reasons"][0] for r in rejected)


def test_a_model_that_returns_garbage_everywhere_still_completes_the_run(tmp_path: Path) -> None:
    garbage = {stage: (lambda m, kw: "<|im_end|> ]]}{") for stage in
               ("agents", "tasks", "episodes/assistant", "episodes/user", "judge")}
    stats = _run(_config(tmp_path / "run", "tools.synthetic=false", "tools.code_tool=true",
                         f"tools.path={json.dumps(str(_tools_file(tmp_path)))}"), FakeLLM(garbage))
    assert stats["agents"]["fallback_prompts"] == 4 and stats["tasks"]["request_sources"] == {
        "template": stats["tasks"]["kept"]}
    assert stats["output"]["sft"] == 0 and stats["output"]["rejected"] == stats["tasks"]["kept"] > 0
    assert stats["judge"]["reject_reasons"] == {"LLM judge": stats["tasks"]["kept"]}


def _tools_file(tmp_path: Path) -> Path:
    from openk2.agentic.evolve import save_tools
    from tests.agentic.test_agents_tasks import expense_tools, flight_tools

    path = tmp_path / "tools.jsonl"
    save_tools(flight_tools() + expense_tools(), path)
    return path


def test_the_cli_runs_synth_and_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    from openk2.cli import main

    assert main(["synth", "configs/synth_tiny.toml", "--set", "agents.count=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "agents" in err[0]
    assert main(["synth", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(["synth", "--set", f"run_dir={json.dumps(str(tmp_path / 'r'))}", "--set",
                 'llm.base_url="http://127.0.0.1:9/v1"']) == 2
    assert "did not list a model" in capsys.readouterr().err
