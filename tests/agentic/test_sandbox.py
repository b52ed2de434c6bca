"""The code sandbox (spec §4.3): no network, CPU / memory / wall-time / output limits, its own removed temp dir."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from openk2.agentic.sandbox import Sandbox, SandboxLimits, network_namespace_available, python_tool_spec, run_code

FAST = SandboxLimits(cpu_s=1, memory_mb=512, wall_s=3.0, output_bytes=4096)


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    """A TCP server on this host's loopback that accepts anything: the sandbox must not reach it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    assert not accepted, "the sandbox reached the host's loopback"


@pytest.mark.parametrize("use_netns", [False, pytest.param(True, marks=pytest.mark.skipif(
    not network_namespace_available(), reason="kernel refuses unprivileged network namespaces"))])
def test_python_cannot_connect_or_resolve(listener: int, use_netns: bool) -> None:
    box = Sandbox(FAST, use_netns=use_netns)
    connect = box.run(f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {listener}))\n"
                      "print('connected')")
    assert connect.exit_code != 0 and "connected" not in connect.stdout
    assert "network access is disabled" in connect.stderr
    lookup = box.run("import socket\nprint(socket.getaddrinfo('localhost', 80))")
    assert lookup.exit_code != 0 and "name lookups are disabled" in lookup.stderr


@pytest.mark.skipif(not network_namespace_available(), reason="kernel refuses unprivileged network namespaces")
def test_kernel_layer_alone_blocks_the_network(listener: int) -> None:
    # bash has no audit hook: only the empty network namespace stands between it and the host's listener
    result = Sandbox(FAST).run(f"exec 3<>/dev/tcp/127.0.0.1/{listener} && echo connected\necho done", "bash")
    assert result.network_isolation == "netns+audit"
    assert "connected" not in result.stdout and "done" in result.stdout
    assert "unreachable" in result.stderr.lower()


def test_infinite_loop_is_stopped_by_the_cpu_limit() -> None:
    result = run_code("while True:\n    pass", limits=FAST)
    assert result.timed_out and result.killed_reason == "cpu_time"
    assert result.duration_s < FAST.wall_s


def test_sleeping_program_is_stopped_by_the_wall_limit() -> None:
    result = run_code("import time\nprint('start', flush=True)\ntime.sleep(60)",
                      limits=SandboxLimits(cpu_s=5, wall_s=1.0))
    assert result.timed_out and result.killed_reason == "wall_time"
    assert result.stdout == "start\n" and result.duration_s < 3


def test_allocating_2gb_fails() -> None:
    result = run_code("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", limits=FAST)
    assert "allocated" not in result.stdout and result.exit_code != 0
    assert result.killed_reason == "memory" and "MemoryError" in result.stderr


def test_files_stay_in_its_temp_dir_which_is_removed(tmp_path: Path) -> None:
    outside = tmp_path / "escape.txt"
    code = ("import os\nopen('inside.txt', 'w').write('ok')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\n"
            f"open({str(outside)!r}, 'w').write('escaped')\n")
    result = run_code(code, limits=FAST)
    workdir, listing = result.stdout.splitlines()[:2]
    assert listing == "['inside.txt', 'main.py']"
    assert "writing outside the sandbox directory is disabled" in result.stderr
    assert not outside.exists()
    assert not Path(workdir).exists()  # the sandbox directory is gone after the run


def test_output_is_cut_at_its_limit() -> None:
    result = run_code("import sys\nwhile True:\n    sys.stdout.write('x' * 1000)", limits=FAST)
    assert len(result.stdout) == FAST.output_bytes and result.killed_reason == "output_limit"


def test_ordinary_program_runs_and_reports_exit_code() -> None:
    ok = run_code("import math\nprint(math.factorial(20))", limits=FAST)
    assert ok.ok and ok.stdout == "2432902008176640000\n" and ok.exit_code == 0
    failed = run_code("raise SystemExit(3)", limits=FAST)
    assert failed.exit_code == 3 and failed.killed_reason is None and not failed.ok


def test_bad_inputs_are_named_errors() -> None:
    with pytest.raises(ValueError, match="'ruby'"):
        run_code("puts 1", language="ruby")
    with pytest.raises(ValueError, match="cpu_s"):
        SandboxLimits(cpu_s=0)
    with pytest.raises(TypeError, match="bytes"):
        run_code(b"print(1)")  # type: ignore[arg-type]


def test_python_tool_spec_is_a_sandbox_tool() -> None:
    spec = python_tool_spec()
    assert spec.name == "run_python" and spec.source == "sandbox" and spec.input_schema["required"] == ["code"]
