"""A code sandbox for code-execution tools (paper §3.1.1 "real execution sandboxes", spec §4.3).

Each run is a fresh subprocess in its own temporary directory (its cwd, HOME and TMPDIR; deleted afterwards) under
`resource` limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), size of any file written (RLIMIT_FSIZE), no
core dumps, and a process cap (RLIMIT_NPROC, where it can bind: not for root); a wall-clock limit kills the whole
process group, and output past its cap is cut (and the program stopped). Two layers keep it off the network:
  1. kernel: `unshare --map-root-user --net` puts the child in a new user + network namespace holding only a down
     loopback, so no socket can reach anything (used whenever this kernel allows unprivileged namespaces);
  2. interpreter: a bootstrap adds a `sys.addaudithook` (which code cannot remove) refusing internet sockets,
     connects and name lookups, and file writes outside the sandbox directory; it always runs, so Python is
     confined even where (1) is unavailable. Shell code (`language="bash"`) is only accepted where (1) is.
The default limits are ours (the paper gives none).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openk2.agentic.tools import ToolSpec

LANGUAGES = ("python", "bash")

# Runs first inside the child (python -I -c): installs the audit hook, then runs the user's main.py as __main__.
_BOOTSTRAP = r'''
import os, sys
def _guard(root):
    import socket
    blocked_families = {socket.AF_INET, socket.AF_INET6}
    root = os.path.realpath(root)
    def hook(event, args):
        if event == "socket.__new__" and args[1] in blocked_families:
            raise PermissionError("sandbox: network access is disabled")
        if event in ("socket.connect", "socket.connect_ex", "socket.sendto", "socket.bind") and args[0].family \
                in blocked_families:
            raise PermissionError("sandbox: network access is disabled")
        if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostbyname_ex"):
            raise PermissionError("sandbox: name lookups are disabled")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and (
                (isinstance(args[1], str) and any(c in args[1] for c in "wax+"))
                or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
            path = os.path.realpath(os.fsdecode(args[0]))
            if not (path == root or path.startswith(root + os.sep) or path == os.devnull):
                raise PermissionError(f"sandbox: writing outside the sandbox directory is disabled: {path}")
    sys.addaudithook(hook)
_guard(os.getcwd())
del _guard
sys.argv = ["main.py"]
sys.path.insert(0, os.getcwd())
import runpy
runpy.run_path("main.py", run_name="__main__")
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run. Our defaults; the paper gives none."""

    cpu_s: int = 5  # CPU seconds (SIGXCPU at the limit, SIGKILL one second later)
    memory_mb: int = 512  # address space: large allocations fail with MemoryError
    wall_s: float = 10.0  # wall clock, covers sleeping and blocked programs that use no CPU
    output_bytes: int = 64 * 1024  # per stream; past it the output is cut and the program stopped
    file_mb: int = 16  # the largest file the program may write
    max_processes: int = 64  # RLIMIT_NPROC, applied where it can bind (not when running as root)

    def __post_init__(self) -> None:
        for name in ("cpu_s", "memory_mb", "wall_s", "output_bytes", "file_mb", "max_processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    """What a run left: its output (cut at the limit), exit code, and which limit stopped it if one did."""

    stdout: str
    stderr: str
    exit_code: int  # negative: killed by that signal
    timed_out: bool  # stopped by the wall-clock or CPU limit
    killed_reason: str | None  # None, "wall_time", "cpu_time", "memory", "file_size", "output_limit"
    network_isolation: str  # "netns+audit" or "audit"
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed_reason is None

    def to_content(self) -> dict[str, Any]:
        """The tool result shown to the model."""
        return {"stdout": self.stdout, "stderr": self.stderr, "exit_code": self.exit_code,
                "timed_out": self.timed_out, "killed_reason": self.killed_reason}


def network_namespace_available() -> bool:
    """Whether this kernel lets an unprivileged process make a user + network namespace (`unshare -rn`)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "--map-root-user", "--net", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _limit_child(limits: SandboxLimits) -> None:
    # Runs in the child between fork and exec: only async-signal-safe work, no imports, no allocations to speak of.
    cpu = int(limits.cpu_s)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    size = limits.file_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.getuid() != 0:  # root ignores RLIMIT_NPROC, and inside a user namespace it would count the whole host
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))


def _read_capped(proc: subprocess.Popen[bytes], limits: SandboxLimits, deadline: float) -> tuple[bytes, bytes, str]:
    """Drain both pipes up to their cap; returns (stdout, stderr, reason we stopped it or "")."""
    import selectors

    out = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in out:
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ)
    reason = ""
    while selector.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reason = "wall_time"
            break
        for key, _ in selector.select(timeout=min(remaining, 0.5)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                continue
            buf = out[key.fileobj]
            buf += chunk
            if len(buf) > limits.output_bytes:
                del buf[limits.output_bytes:]
                reason = "output_limit"
        if reason:
            break
    selector.close()
    return bytes(out[proc.stdout]), bytes(out[proc.stderr]), reason


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Sandbox:
    """Runs code under `limits`; probes once which network layer this machine allows."""

    def __init__(self, limits: SandboxLimits | None = None, use_netns: bool | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.use_netns = network_namespace_available() if use_netns is None else use_netns
        if self.use_netns and not network_namespace_available():
            raise ValueError("use_netns=True but this kernel refuses `unshare --map-root-user --net`")

    @property
    def network_isolation(self) -> str:
        return "netns+audit" if self.use_netns else "audit"

    def run(self, code: str, language: str = "python", limits: SandboxLimits | None = None) -> SandboxResult:
        """Run `code` in a fresh temp dir (removed afterwards) and return what it printed and how it ended."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
        if language == "bash" and not self.use_netns:
            raise ValueError("language='bash' needs the network namespace layer, which this machine refuses")
        limits = limits or self.limits
        workdir = Path(tempfile.mkdtemp(prefix="openk2-sandbox-"))
        try:
            if language == "python":
                (workdir / "main.py").write_text(code, encoding="utf-8")
                argv = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP]  # -B: no .pyc writes
            else:
                (workdir / "main.sh").write_text(code, encoding="utf-8")
                argv = ["/bin/bash", "--noprofile", "--norc", "main.sh"]
            if self.use_netns:
                argv = [shutil.which("unshare") or "unshare", "--map-root-user", "--net", *argv]
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
                   "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
            return self._execute(argv, workdir, env, limits)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _execute(self, argv: list[str], workdir: Path, env: dict[str, str], limits: SandboxLimits) -> SandboxResult:
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,  # its own group: one kill takes all
                                preexec_fn=lambda: _limit_child(limits))
        try:
            stdout, stderr, reason = _read_capped(proc, limits, start + limits.wall_s)
            if reason:
                _kill_group(proc)
            try:
                proc.wait(timeout=max(0.1, start + limits.wall_s - time.monotonic()))
            except subprocess.TimeoutExpired:  # closed its pipes but kept running
                reason = "wall_time"
                _kill_group(proc)
                proc.wait()
        finally:
            _kill_group(proc)  # nothing it forked outlives the run
            proc.stdout.close()
            proc.stderr.close()
        code = proc.returncode
        err_text = stderr.decode("utf-8", "replace")
        if not reason:
            if code in (-signal.SIGXCPU, -signal.SIGKILL):
                reason = "cpu_time"
            elif code == -signal.SIGXFSZ or "File too large" in err_text:
                reason = "file_size"
            elif "MemoryError" in err_text:
                reason = "memory"
        return SandboxResult(stdout=stdout.decode("utf-8", "replace"), stderr=err_text, exit_code=code,
                             timed_out=reason in ("wall_time", "cpu_time"), killed_reason=reason or None,
                             network_isolation=self.network_isolation, duration_s=time.monotonic() - start)


def run_code(code: str, language: str = "python", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` once in a fresh sandbox (see `Sandbox`)."""
    return Sandbox(limits).run(code, language)


def python_tool_spec() -> ToolSpec:
    """The `run_python` code-execution tool the simulator routes to the sandbox."""
    return ToolSpec(
        name="run_python",
        description="Run a Python 3 program in a sandbox (no network, limited CPU, memory and time) and return "
                    "what it printed.",
        input_schema={"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                      "required": ["code"], "additionalProperties": False},
        output_schema={"type": "object",
                       "properties": {"stdout": {"type": "string"}, "stderr": {"type": "string"},
                                      "exit_code": {"type": "integer"}, "timed_out": {"type": "boolean"},
                                      "killed_reason": {"type": ["string", "null"]}},
                       "required": ["stdout", "stderr", "exit_code", "timed_out", "killed_reason"]},
        source="sandbox")
