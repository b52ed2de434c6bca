"""End to end (issue 6 acceptance): `openk2 synth`'s pipeline against SmolLM2 served by our server, real MCP tools."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from openk2.agentic.config import load_synth_config
from openk2.agentic.pipeline import run_synth
from tests.agentic.test_pipeline import check_sft_line


@pytest.fixture(scope="module")
def smol_url(smollm2_dir):
    from openk2.serve.app import create_app
    from openk2.serve.loading import load_served_model
    from tests.serve.conftest import ServerThread

    served = load_served_model(smollm2_dir, max_batch=8, max_seq_len=2048, served_name="smollm2")
    with ServerThread(create_app(served)) as server:
        yield server.base_url + "/v1"


def e2e_overrides(run_dir: Path, base_url: str) -> list[str]:
    """The tiny config cut to what SmolLM2 on two CPU cores does in a few minutes."""
    return [f"run_dir={json.dumps(str(run_dir))}", f"llm.base_url={json.dumps(base_url)}",
            f"llm.cache_dir={json.dumps(str(run_dir.parent / 'cache'))}", "llm.max_tokens=96",
            'tools.evolve.categories=["travel"]', "tools.evolve.tools_per_domain=3", "tools.evolve.max_rounds=1",
            "tools.evolve.json_attempts=1", "tools.evolve.max_tokens=384", "agents.count=3", "agents.max_tokens=64",
            "tasks.count=4", "tasks.complexity=[1, 2]", "tasks.request_attempts=1", "tasks.max_tokens=96",
            "episodes.assistant_max_tokens=64", "episodes.user_max_tokens=24", "judge.attempts=1",
            "judge.max_tokens=48", "judge.must_pass=false", 'judge.on_unusable="programmatic"']


@pytest.mark.slow
def test_synth_runs_end_to_end_against_a_served_smollm2(tmp_path: Path, smol_url: str) -> None:
    run_dir = tmp_path / "run"
    config = load_synth_config("configs/synth_tiny.toml", e2e_overrides(run_dir, smol_url))
    assert config.llm.model == "auto"  # resolved from the server's /models
    stats = asyncio.run(run_synth(config, progress=False, log=print))

    sft = [json.loads(line) for line in (run_dir / "sft.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (run_dir / "rejected.jsonl").read_text().splitlines()]
    assert len(sft) == stats["output"]["sft"] >= 1  # gold mode: the plan's calls pass the programmatic checks
    assert len(sft) + len(rejected) == stats["episodes"]["generated"] == stats["tasks"]["kept"]
    for line in sft:
        check_sft_line(line)
    assert any(m.get("tool_calls") for line in sft for m in line["messages"])
    sources = {s for line in sft + rejected for s in line["provenance"]["source"]}
    assert sources & {"mcp:time", "mcp:sqlite"}, "no agent used a real MCP tool"

    saved = json.loads((run_dir / "stats.json").read_text())
    assert saved["tools"]["by_domain"]["mcp/time"]["kept"] == 2 and saved["tools"]["by_domain"]["mcp/sqlite"][
        "kept"] == 3
    assert saved["llm_usage"]["agents"]["completion_tokens"] > 0 and saved["llm_usage"]["judge"]["calls"] >= 1
    assert (run_dir / "plots" / "stats.png").exists()

    # a rerun of the finished folder does nothing new and changes no output
    again = asyncio.run(run_synth(load_synth_config("configs/synth_tiny.toml", e2e_overrides(run_dir, smol_url)),
                                  progress=False, log=print))
    assert again["output"] == stats["output"] and again["episodes"]["episodes_this_run"] == 0
