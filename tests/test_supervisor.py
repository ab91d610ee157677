"""The local stack's supervisor and start-up wait, on real child processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from devtools.infra.process import ManagedProcess, ProcessFailed, describe_exit, wait_all_ready
from devtools.infra.supervisor import Supervisor
from livelens.local_stack import read_status


def child(tmp: Path, name: str, code: str) -> ManagedProcess:
    return ManagedProcess(name, [sys.executable, "-c", code], tmp / f"{name}.log")


def test_exits_are_described():
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(3) == "exited with code 3"


def test_a_service_that_cannot_start_stops_the_wait_at_once(tmp_path):
    slow = child(tmp_path, "slow", "import time; time.sleep(60)")
    broken = child(tmp_path, "broken", "import sys; print('llm.engine.max_model_len is too small'); sys.exit(3)")
    slow.ready_check = lambda: False
    broken.ready_check = lambda: False
    for p in (slow, broken):
        p.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ProcessFailed) as failed:
            wait_all_ready([(slow, 60.0), (broken, 60.0)])
    finally:
        slow.stop()
        broken.stop()
    assert time.monotonic() - t0 < 10  # not after the slow one's 60 s
    assert "broken exited with code 3" in str(failed.value) and "llm.engine.max_model_len" in str(failed.value)


def test_crashed_processes_are_restarted_with_back_off(tmp_path):
    crashing = child(tmp_path, "crashing", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    steady = child(tmp_path, "steady", "import time; time.sleep(60)")
    for p in (crashing, steady):
        p.start()
    said: list[str] = []
    supervisor = Supervisor([crashing, steady], tmp_path / "status.json", report=said.append).start()
    try:
        deadline = time.monotonic() + 20
        while read_status(tmp_path / "status.json")["crashing"].restarts < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        supervisor.stop()
        crashing.stop()
        steady.stop()
    status = read_status(tmp_path / "status.json")
    assert status["crashing"].restarts >= 3 and status["steady"].restarts == 0
    assert status["crashing"].last_exit == "killed by signal 9 (SIGKILL)"
    delays = [float(line.split("restarting in ")[1].split("s ")[0]) for line in said if "restarting in" in line]
    assert delays[:3] == [1.0, 2.0, 4.0]  # doubling, as Kubernetes backs off


def test_a_replica_added_later_is_restarted_until_removed(tmp_path):
    steady = child(tmp_path, "steady", "import time; time.sleep(60)")
    steady.start()
    supervisor = Supervisor([steady], tmp_path / "status.json", report=lambda _: None).start()
    replica = child(tmp_path, "steady-2", "import time; time.sleep(60)")
    replica.start()
    try:
        supervisor.add(replica)
        assert replica.proc is not None
        first = replica.proc.pid
        replica.proc.kill()
        deadline = time.monotonic() + 10
        while read_status(tmp_path / "status.json")["steady-2"].restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert replica.running and replica.proc is not None and replica.proc.pid != first
        supervisor.remove("steady-2")
        replica.stop()
        time.sleep(1.5)  # past the first back-off: a watched process would be started again
        assert not replica.running and "steady-2" not in read_status(tmp_path / "status.json")
    finally:
        supervisor.stop()
        steady.stop()
        replica.stop()
