"""Real MCP tool servers over stdio (paper §3.1.1, spec §4.1): harvest their `tools/list`, call their tools.

The paper fetches 3000+ real MCP tools from public servers; here the same machinery runs against servers installed
beside us: `mcp-server-time`, `mcp-server-git` (on a throwaway repository) and `mcp-server-sqlite` (which pins
`mcp<2`, so it lives in its own virtual environment under `.venv/envs/mcp-sqlite`). The client speaks through the
official SDK (`mcp.client.stdio.stdio_client`, `mcp.ClientSession`) on an event loop of its own thread, so the
synchronous `MCPClient` can be called from any thread. A server that died is restarted and the call retried once;
a call that runs past its timeout comes back as a failed `MCPCallResult` (and the hung server is replaced before the
next call); nothing here waits without a bound. Timeouts and the retry count are ours (the paper gives none).
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import mcp
import mcp.types as mcp_types
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT
from pydantic import TypeAdapter

from openk2.agentic.tools import ToolSpec

_RAW_RESULT = TypeAdapter(dict[str, Any])  # keeps a result as the JSON object the server sent, unmodelled


@dataclass(frozen=True)
class MCPServerSpec:
    """How to start one MCP server over stdio: its name (the tools' `source` is `mcp:<name>`) and command line."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # merged over the SDK's safe default environment
    cwd: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"MCP server name must be a non-empty string, got {self.name!r}")
        if not self.command or not all(isinstance(part, str) for part in self.command):
            raise ValueError(f"MCP server {self.name!r}: command must be a non-empty list of strings, "
                             f"got {self.command!r}")

    def check_installed(self) -> None:
        """Raise FileNotFoundError naming `make setup` when the server's executable is not there."""
        exe = self.command[0]
        if shutil.which(exe) is None:
            raise FileNotFoundError(f"MCP server {self.name!r}: executable {exe!r} not found; run `make setup`, "
                                    "which installs mcp-server-time and mcp-server-git into .venv and "
                                    "mcp-server-sqlite into .venv/envs/mcp-sqlite")


def _venv_bin() -> Path:
    # The servers are console scripts beside the interpreter running us (.venv/bin), whatever the working directory.
    return Path(sys.executable).parent


def _venv_root() -> Path:
    return Path(sys.prefix)


def _server_exe(name: str, bin_dir: Path) -> str:
    local = bin_dir / name
    if local.exists():
        return str(local)
    return shutil.which(name) or str(local)  # a missing one is reported by check_installed(), naming `make setup`


def time_server() -> MCPServerSpec:
    """mcp-server-time, its local zone pinned to UTC so the harvested descriptions match on every machine."""
    return MCPServerSpec("time", [_server_exe("mcp-server-time", _venv_bin()), "--local-timezone", "Etc/UTC"])


def make_throwaway_repo(path: Path) -> Path:
    """A fresh git repository at `path` with two commits and one uncommitted change, for mcp-server-git to work on."""
    path.mkdir(parents=True, exist_ok=True)
    # Identity and config come from the command line, so the user's global git config neither helps nor interferes.
    git = ["git", "-c", "user.name=openk2", "-c", "user.email=openk2@localhost", "-c", "commit.gpgsign=false"]
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env=env, timeout=30)
    (path / "README.md").write_text("# scratch\n\nA throwaway repository for the MCP git server.\n")
    subprocess.run([*git, "-C", str(path), "add", "README.md"], check=True, env=env, timeout=30)
    subprocess.run([*git, "-C", str(path), "commit", "-q", "-m", "Add README"], check=True, env=env, timeout=30)
    (path / "notes.txt").write_text("first note\n")
    subprocess.run([*git, "-C", str(path), "add", "notes.txt"], check=True, env=env, timeout=30)
    subprocess.run([*git, "-C", str(path), "commit", "-q", "-m", "Add notes"], check=True, env=env, timeout=30)
    (path / "notes.txt").write_text("first note\nsecond note\n")  # left unstaged: git_status / git_diff see it
    return path


def git_server(run_dir: Path) -> MCPServerSpec:
    """mcp-server-git bound (`--repository`) to a throwaway repository it creates under `run_dir`."""
    repo = run_dir / "git-repo"
    if not (repo / ".git").exists():
        make_throwaway_repo(repo)
    return MCPServerSpec("git", [_server_exe("mcp-server-git", _venv_bin()), "--repository", str(repo)])


def sqlite_server(run_dir: Path) -> MCPServerSpec:
    """mcp-server-sqlite from its own venv (it needs mcp<2), on a database file under `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    exe = _venv_root() / "envs" / "mcp-sqlite" / "bin" / "mcp-server-sqlite"
    return MCPServerSpec("sqlite", [str(exe), "--db-path", str(run_dir / "sqlite.db")])


def builtin_servers(run_dir: Path) -> list[MCPServerSpec]:
    """The three servers the repository harvests from, their state (git repo, database) kept under `run_dir`."""
    return [time_server(), git_server(run_dir), sqlite_server(run_dir)]


@dataclass(frozen=True)
class MCPCallResult:
    """One `tools/call` outcome: the server's content blocks, or why there are none (error, timeout, crash)."""

    server: str
    tool: str
    ok: bool  # the server answered and did not flag an error
    content: list[dict[str, Any]]  # MCP content blocks as sent ({"type": "text", "text": ...}, ...)
    structured: dict[str, Any] | None = None  # `structuredContent`, present when the tool declares an output schema
    error: str | None = None  # the tool's error text, or the transport failure
    timed_out: bool = False
    transport_failed: bool = False  # no answer from the server (crash beyond the retry, timeout): an infra failure
    attempts: int = 1

    def text(self) -> str:
        """The text blocks joined, or the error: what a `tool` turn shows the model."""
        texts = [block["text"] for block in self.content if block.get("type") == "text" and "text" in block]
        if texts:
            return "\n".join(texts)
        return self.error or ""


@dataclass(frozen=True)
class MCPClientConfig:
    """Bounds of one client. Our choices: the paper publishes none."""

    start_timeout_s: float = 30.0  # spawn + initialize + first listing
    call_timeout_s: float = 30.0  # one tools/call, unless the call names its own
    retries_after_crash: int = 1  # restart a dead server and retry the call this many times
    max_list_pages: int = 1000  # guards against a server whose cursor never ends
    close_timeout_s: float = 10.0  # the SDK's own shutdown is bounded (~6 s worst case); this bounds our wait

    def __post_init__(self) -> None:
        for name in ("start_timeout_s", "call_timeout_s", "close_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MCPClientConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.retries_after_crash < 0 or self.max_list_pages < 1:
            raise ValueError(f"MCPClientConfig: retries_after_crash >= 0 and max_list_pages >= 1 required, got "
                             f"{self.retries_after_crash!r}, {self.max_list_pages!r}")


@asynccontextmanager
async def _connect(spec: MCPServerSpec) -> AsyncIterator[mcp.ClientSession]:
    params = StdioServerParameters(command=spec.command[0], args=spec.command[1:], env=spec.env or None,
                                   cwd=spec.cwd)
    with open(os.devnull, "w") as errlog:  # servers log to stderr; a trajectory run would drown in it
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with mcp.ClientSession(read, write) as session:
                await session.initialize()
                yield session


class _ConnectionLost(Exception):
    """The server closed the connection (it crashed or was killed)."""


class MCPClient:
    """A synchronous, thread-safe client of one MCP server: start, list tools, call tools, restart after a crash."""

    def __init__(self, spec: MCPServerSpec, config: MCPClientConfig | None = None) -> None:
        self.spec = spec
        self.config = config or MCPClientConfig()
        self._lock = threading.RLock()  # serialises (re)starts; calls themselves run concurrently on the loop
        self._stack: ExitStack | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._session_cm: AbstractContextManager[mcp.ClientSession] | None = None
        self._session: mcp.ClientSession | None = None
        self._generation = 0  # bumps on every (re)start, so two threads seeing one crash restart only once
        self._stale = False  # set after a timeout: the server may be hung, replace it before the next call
        self.restarts = 0

    def __enter__(self) -> MCPClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Spawn the server and initialise the session (no-op when already running)."""
        with self._lock:
            if self._session is not None:
                return
            self.spec.check_installed()
            if self._stack is None:
                self._stack = ExitStack()
                self._portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
            assert self._portal is not None
            cm = self._portal.wrap_async_context_manager(_connect(self.spec))
            pool = concurrent.futures.ThreadPoolExecutor(1)
            try:
                # enter the session from a helper thread so a server that never answers cannot hang us
                future = pool.submit(cm.__enter__)
                self._session = future.result(timeout=self.config.start_timeout_s)
            except concurrent.futures.TimeoutError as e:
                raise TimeoutError(f"MCP server {self.spec.name!r} did not initialise within "
                                   f"{self.config.start_timeout_s}s: {self.spec.command!r}") from e
            except (MCPError, OSError) as e:
                raise RuntimeError(f"MCP server {self.spec.name!r} failed to start ({self.spec.command!r}): "
                                   f"{e}") from e
            finally:
                pool.shutdown(wait=False)
            self._session_cm = cm
            self._generation += 1
            self._stale = False

    def _stop_session(self) -> None:
        cm, self._session_cm, self._session = self._session_cm, None, None
        if cm is None:
            return
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            pool.submit(cm.__exit__, None, None, None).result(timeout=self.config.close_timeout_s)
        except Exception:  # noqa: BLE001 - a dead server's teardown may raise anything; the process is gone either way
            pass
        finally:
            pool.shutdown(wait=False)

    def close(self) -> None:
        """Stop the server and the event loop thread."""
        with self._lock:
            self._stop_session()
            stack, self._stack, self._portal = self._stack, None, None
            if stack is not None:
                stack.close()

    def restart(self) -> None:
        """Replace the server process with a fresh one (its on-disk state, e.g. the database, persists)."""
        with self._lock:
            self._stop_session()
            self.restarts += 1
            self.start()

    def _run(self, fn: Any, timeout_s: float) -> Any:
        """Run `fn(session)` on the loop; MCPError / TimeoutError / _ConnectionLost come back to the caller."""
        with self._lock:
            if self._stale or self._session is None:
                if self._session is not None:
                    self.restart()
                else:
                    self.start()
            portal, session, generation = self._portal, self._session, self._generation
        assert portal is not None and session is not None
        future = portal.start_task_soon(fn, session)
        try:
            # the request has its own read timeout; this outer bound only fires if the loop itself is stuck
            return future.result(timeout=timeout_s + self.config.close_timeout_s)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            self._mark_stale(generation)
            raise TimeoutError(f"MCP server {self.spec.name!r} gave no answer in {timeout_s}s") from e
        except MCPError as e:
            if e.code == REQUEST_TIMEOUT:
                self._mark_stale(generation)
                raise TimeoutError(f"MCP server {self.spec.name!r}: {e.message}") from e
            if e.code == CONNECTION_CLOSED:
                self._mark_stale(generation)
                raise _ConnectionLost(e.message) from e
            raise
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream) as e:
            self._mark_stale(generation)
            raise _ConnectionLost(repr(e)) from e

    def _mark_stale(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._stale = True

    def list_tools(self) -> list[ToolSpec]:
        """Page through `tools/list` by cursor; each spec's `raw` is the tool object exactly as the server sent it."""
        timeout = self.config.start_timeout_s
        specs: list[ToolSpec] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(self.config.max_list_pages):
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor is not None else None

            async def page(session: mcp.ClientSession, params: Any = params) -> dict[str, Any]:
                return await session.send_request(mcp_types.ListToolsRequest(params=params), _RAW_RESULT,
                                                  request_read_timeout_seconds=timeout)

            try:
                result = self._run(page, timeout)
            except _ConnectionLost:
                result = self._run(page, timeout)  # the server died between calls: it was restarted, ask again
            specs.extend(ToolSpec.from_mcp(tool, self.spec.name) for tool in result.get("tools", []))
            cursor = result.get("nextCursor")
            if cursor is None:
                return specs
            if cursor in seen:
                raise ValueError(f"MCP server {self.spec.name!r} repeated tools/list cursor {cursor!r}")
            seen.add(cursor)
        raise ValueError(f"MCP server {self.spec.name!r}: tools/list did not end within "
                         f"{self.config.max_list_pages} pages")

    def call(self, tool: str, arguments: dict[str, Any], timeout_s: float | None = None) -> MCPCallResult:
        """Call `tool`; a crash is restarted and retried, a timeout or a lost server comes back as a failed result."""
        timeout = timeout_s if timeout_s is not None else self.config.call_timeout_s
        if not timeout > 0:
            raise ValueError(f"call timeout must be > 0, got {timeout!r}")

        async def call(session: mcp.ClientSession) -> dict[str, Any]:
            request = mcp_types.CallToolRequest(params=mcp_types.CallToolRequestParams(name=tool, arguments=arguments))
            return await session.send_request(request, _RAW_RESULT, request_read_timeout_seconds=timeout)

        attempts = 0
        while True:
            attempts += 1
            try:
                raw = self._run(call, timeout)
            except TimeoutError as e:
                return MCPCallResult(self.spec.name, tool, ok=False, content=[], error=str(e), timed_out=True,
                                     transport_failed=True, attempts=attempts)
            except _ConnectionLost as e:
                if attempts <= self.config.retries_after_crash:
                    continue  # _run restarts the stale server before the retry
                return MCPCallResult(self.spec.name, tool, ok=False, content=[], error=f"server lost: {e}",
                                     transport_failed=True, attempts=attempts)
            except MCPError as e:  # a JSON-RPC error answer (unknown tool, bad params): the server is fine
                return MCPCallResult(self.spec.name, tool, ok=False, content=[], error=f"{e.code}: {e.message}",
                                     attempts=attempts)
            except (RuntimeError, TimeoutError, FileNotFoundError) as e:  # the restart itself failed
                return MCPCallResult(self.spec.name, tool, ok=False, content=[], error=f"restart failed: {e}",
                                     transport_failed=True, attempts=attempts)
            is_error = bool(raw.get("isError", False))
            content = list(raw.get("content", []))
            error = "\n".join(b.get("text", "") for b in content if b.get("type") == "text") if is_error else None
            return MCPCallResult(self.spec.name, tool, ok=not is_error, content=content,
                                 structured=raw.get("structuredContent"), error=error, attempts=attempts)


class MCPToolbox:
    """Clients of several servers by name: harvest every tool, route a call to the server that owns the tool."""

    def __init__(self, specs: list[MCPServerSpec], config: MCPClientConfig | None = None) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"MCP server names must be unique, got {names!r}")
        self.clients = {spec.name: MCPClient(spec, config) for spec in specs}

    def __enter__(self) -> MCPToolbox:
        for client in self.clients.values():
            client.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def harvest(self) -> list[ToolSpec]:
        """Every tool of every server, in server order then the servers' own order."""
        return [tool for client in self.clients.values() for tool in client.list_tools()]

    def call_tool(self, tool: ToolSpec, arguments: dict[str, Any], timeout_s: float | None = None) -> MCPCallResult:
        """Call a harvested tool on its server (`tool.source` is `mcp:<server>`)."""
        server = tool.source.removeprefix("mcp:")
        if not tool.source.startswith("mcp:") or server not in self.clients:
            raise ValueError(f"tool {tool.name!r} has source {tool.source!r}, not one of the servers "
                             f"{sorted('mcp:' + name for name in self.clients)!r}")
        return self.clients[server].call(tool.name, arguments, timeout_s)
