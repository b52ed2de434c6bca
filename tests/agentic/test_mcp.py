"""Real MCP servers (spec §4.1): harvest >= 20 tools from time, git and sqlite, call each, store specs losslessly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest

from openk2.agentic.mcp import (
    MCPClient,
    MCPClientConfig,
    MCPServerSpec,
    MCPToolbox,
    builtin_servers,
    sqlite_server,
)
from openk2.agentic.tools import ToolSpec


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcp-run")


@pytest.fixture(scope="module")
def toolbox(run_dir: Path):
    with MCPToolbox(builtin_servers(run_dir)) as box:
        yield box


@pytest.fixture(scope="module")
def tools(toolbox: MCPToolbox) -> list[ToolSpec]:
    return toolbox.harvest()


def _wire_tools_list(spec: MCPServerSpec) -> list[dict]:
    """tools/list read straight off the server's stdout, no SDK in between: what the server really sent."""
    proc = subprocess.Popen(spec.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        def ask(message: dict) -> dict:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        ask({"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                        "clientInfo": {"name": "wire-check", "version": "0"}}})
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
        tools, cursor = [], None
        while True:
            reply = ask({"jsonrpc": "2.0", "id": 2, "method": "tools/list",
                         "params": {"cursor": cursor} if cursor else {}})
            tools += reply["result"]["tools"]
            cursor = reply["result"].get("nextCursor")
            if not cursor:
                return tools
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_harvest_at_least_20_real_tools(tools: list[ToolSpec]) -> None:
    by_source: dict[str, list[str]] = {}
    for tool in tools:
        by_source.setdefault(tool.source, []).append(tool.name)
    assert set(by_source) == {"mcp:time", "mcp:git", "mcp:sqlite"}
    assert len(tools) >= 20, by_source
    assert {"get_current_time", "git_status", "git_log", "read_query", "create_table"} <= {t.name for t in tools}
    for tool in tools:  # every spec is a usable JSON Schema and keeps the wire object
        jsonschema.Draft202012Validator.check_schema(tool.input_schema)
        assert tool.raw["name"] == tool.name and tool.raw["inputSchema"] == tool.input_schema
    time_tool = next(t for t in tools if t.name == "get_current_time")
    assert time_tool.output_schema is not None and "datetime" in time_tool.output_schema["properties"]


def test_raw_is_exactly_what_the_server_sent(run_dir: Path, tools: list[ToolSpec]) -> None:
    for spec in builtin_servers(run_dir):
        wire = _wire_tools_list(spec)
        mine = [t.raw for t in tools if t.source == f"mcp:{spec.name}"]
        # same objects, same key order: json.dumps of both is byte-identical
        assert json.dumps(mine) == json.dumps(wire), spec.name


def test_stored_specs_round_trip_byte_for_byte(tools: list[ToolSpec], tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(tool.to_json() + "\n" for tool in tools), encoding="utf-8")
    back = [ToolSpec.from_json(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert back == tools
    assert "".join(tool.to_json() + "\n" for tool in back).encode() == path.read_bytes()
    for old, new in zip(tools, back, strict=True):
        assert json.dumps(new.raw) == json.dumps(old.raw)  # nested schemas and key order kept
    git_add = next(t for t in back if t.name == "git_add")
    assert git_add.input_schema["properties"]["files"]["type"] == "array"  # nested array schema survived


def test_one_successful_real_call_per_server(toolbox: MCPToolbox, tools: list[ToolSpec], run_dir: Path) -> None:
    by_name = {t.name: t for t in tools}
    now = toolbox.call_tool(by_name["get_current_time"], {"timezone": "Asia/Tokyo"})
    assert now.ok, now
    assert now.structured["timezone"] == "Asia/Tokyo" and now.structured["datetime"].endswith("+09:00")
    jsonschema.validate(now.structured, by_name["get_current_time"].output_schema)

    log = toolbox.call_tool(by_name["git_log"], {"repo_path": str(run_dir / "git-repo")})
    assert log.ok, log
    assert "Add notes" in log.text() and "Add README" in log.text()
    status = toolbox.call_tool(by_name["git_status"], {"repo_path": str(run_dir / "git-repo")})
    assert status.ok and "notes.txt" in status.text()

    made = toolbox.call_tool(by_name["create_table"], {"query": "CREATE TABLE cities (name TEXT, pop INTEGER)"})
    assert made.ok, made
    wrote = toolbox.call_tool(by_name["write_query"], {"query": "INSERT INTO cities VALUES ('Lyon', 522000)"})
    assert wrote.ok, wrote
    read = toolbox.call_tool(by_name["read_query"], {"query": "SELECT name, pop FROM cities"})
    assert read.ok and "Lyon" in read.text() and "522000" in read.text()
    listed = toolbox.call_tool(by_name["list_tables"], {})
    assert "cities" in listed.text()


def test_call_to_a_server_the_tool_does_not_belong_to_is_refused(toolbox: MCPToolbox) -> None:
    stray = ToolSpec("ghost", "", {"type": "object"}, source="mcp:nowhere")
    with pytest.raises(ValueError, match="mcp:nowhere"):
        toolbox.call_tool(stray, {})


def _server_pid(command: list[str]) -> int:
    """The live child of this test process running `command` (the SDK keeps the process to itself)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and any(arg.decode() == command[0] for arg in argv) and command[-1] in map(
                bytes.decode, argv):
            return int(entry.name)
    raise LookupError(f"no child runs {command!r}")


def test_killed_server_is_restarted_and_the_call_retried(tmp_path: Path) -> None:
    with MCPClient(sqlite_server(tmp_path)) as client:
        assert client.call("create_table", {"query": "CREATE TABLE kept (x INTEGER)"}).ok
        pid = _server_pid(client.spec.command)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)  # let the transport see the pipe close
        result = client.call("list_tables", {})
        assert result.ok and "kept" in result.text()  # fresh process, same database file
        assert client.restarts == 1 and _server_pid(client.spec.command) != pid


def test_missing_server_binary_names_make_setup(tmp_path: Path) -> None:
    client = MCPClient(MCPServerSpec("absent", [str(tmp_path / "no-such-mcp-server")]))
    with pytest.raises(FileNotFoundError, match="make setup"):
        client.start()
    client.close()


def test_call_past_its_timeout_fails_in_bounded_time_and_the_run_goes_on(tmp_path: Path) -> None:
    slow = ("SELECT (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000000) "
            "SELECT count(*) FROM c) AS n")  # minutes of CPU inside the server: it stops answering
    with MCPClient(sqlite_server(tmp_path), MCPClientConfig(call_timeout_s=0.5)) as client:
        start = time.monotonic()
        result = client.call("read_query", {"query": slow})
        assert time.monotonic() - start < 5
        assert not result.ok and result.timed_out and result.transport_failed
        after = client.call("list_tables", {})  # the hung server was replaced
        assert after.ok and client.restarts == 1
