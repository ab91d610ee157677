"""The `livelens` command as a user runs it: exit codes, messages, Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from livelens.config import REPO_ROOT
from services.common.ports import free_port, is_free


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livelens.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO_ROOT)


def test_bad_config_exits_2_with_the_setting():
    out = run_cli("health", env={"LIVELENS_GATEWAY__PORT": "not-a-port"})
    assert out.returncode == 2
    assert "gateway.port: expected int" in out.stderr


SUITES = ("e2e", "context", "needle", "encoder", "quality", "soak", "timing", "streams", "broker")


def test_bench_has_a_subcommand_per_suite_each_with_its_own_flags():
    listing = run_cli("bench", "--help")
    assert listing.returncode == 0 and all(suite in listing.stdout for suite in SUITES), listing.stdout
    assert "--kill-every-s" not in listing.stdout  # a suite's flags are in its own --help
    soak, quality = run_cli("bench", "soak", "--help").stdout, run_cli("bench", "quality", "--help").stdout
    assert "--kill-every-s" in soak and "--needle" not in soak
    assert "--needle" in quality and "--kill-every-s" not in quality
    wrong = run_cli("bench", "quality", "--kill-every-s", "60")  # another suite's flag
    assert wrong.returncode == 2 and "unrecognized arguments: --kill-every-s" in wrong.stderr
    assert run_cli("bench").returncode == 2  # no suite


def test_the_server_commands_come_from_the_server_package():
    from importlib.metadata import entry_points

    from livelens.cli import COMMAND_GROUP, SERVER_COMMANDS

    names = {e.name for e in entry_points(group=COMMAND_GROUP)}
    assert names == set(SERVER_COMMANDS), names
    top = run_cli("--help").stdout
    assert all(name in top for name in ("watch", "health", "status", *SERVER_COMMANDS)) and "needs livelens" not in top


def test_watch_missing_video_exits_2():
    out = run_cli("watch", "/nonexistent/video.mp4")
    assert out.returncode == 2
    assert "does not exist" in out.stderr


def test_watch_bad_ask_exits_2():
    out = run_cli("watch", "whatever.mp4", "--ask", "soon:what?")
    assert out.returncode == 2
    assert "SECONDS:QUESTION" in out.stderr


def test_watch_without_gateway_says_unavailable():
    port = free_port()
    # a sample video by its name: found where the packages put it
    out = run_cli("watch", "bigbuckbunny.mp4", "--target", f"127.0.0.1:{port}", "--no-realtime")
    assert out.returncode == 1
    assert "UNAVAILABLE" in out.stderr and f"127.0.0.1:{port}" in out.stderr


def test_up_names_the_taken_port_and_its_setting():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_cli("up", "--no-demo", env={"LIVELENS_GATEWAY__PORT": str(port)})
    if "run `make models`" in out.stderr:
        pytest.skip("models not built")
    assert out.returncode == 1
    assert f"port {port} is already in use; set gateway.port (env LIVELENS_GATEWAY__PORT)" in out.stderr


@pytest.mark.integration
def test_ctrl_c_stops_everything_up_started(tmp_path):
    from devtools.stack import PORT_SETTINGS

    # every port on a free one: a default one may be held by another test's stack or client
    ports = {name.upper().replace(".", "__"): free_port() for name in PORT_SETTINGS}
    env = {**os.environ, **{f"LIVELENS_{k}": str(v) for k, v in ports.items()},
           "LIVELENS_KAFKA__BOOTSTRAP": f"127.0.0.1:{ports['BROKER__PORT']}"}
    proc = subprocess.Popen([sys.executable, "-m", "livelens.cli", "up", "--no-demo", "--run-dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO_ROOT)
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if "livelens is up" in line or time.monotonic() > deadline:
            break
    assert any("livelens is up" in line for line in lines), "".join(lines)
    assert not is_free("127.0.0.1", ports["GATEWAY__PORT"])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    for port in ports.values():
        assert is_free("127.0.0.1", port), f"port {port} still taken after Ctrl-C"


def test_sigterm_stops_what_a_bench_started(tmp_path):
    """A bench killed with SIGTERM (a CI timeout, `kill`) stops its tritonserver on the way
    out: it runs in its own session, so nothing else would."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "livelens.cli", "bench", "encoder", "--backbone", "mobilenet",
                             "--videos", "vtest.avi", "--streams", "1", "--seconds", "60",
                             "--out", str(tmp_path / "encoder.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    triton: list[psutil.Process] = []
    while not triton and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        triton = [c for c in psutil.Process(proc.pid).children(recursive=True) if "tritonserver" in c.name()]
    assert triton, f"no tritonserver started: {proc.poll()}"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted" in out
    gone, alive = psutil.wait_procs(triton, timeout=10)
    assert not alive, f"tritonserver {[p.pid for p in alive]} outlived the bench"
