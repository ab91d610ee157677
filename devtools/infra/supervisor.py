"""Keeps the local stack's processes running, the way Kubernetes keeps a pod's containers.

A process that exits is started again after a back-off that doubles with each crash
(1 s, 2 s, 4 s ... at most 30 s) and is reset once the process has stayed up for a
minute; each restart is logged with how the process ended ("killed by signal 9
(SIGKILL)", "exited with code 1") and the tail of its log. The state of every process
goes to a JSON file that `livelens health` shows (`livelens.local_stack`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from devtools.infra.process import ManagedProcess, describe_exit, log_tail
from livelens.local_stack import ProcessState

log = logging.getLogger("livelens.supervisor")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # up this long: the next crash starts the back-off over


class Supervisor:
    def __init__(self, processes: list[ManagedProcess], status_path: Path,
                 report: Callable[[str], None] = print) -> None:
        self.processes = list(processes)
        self.lock = threading.Lock()  # the process list changes while the thread watches it
        self.status_path = status_path
        self.report = report
        self.states = {p.name: ProcessState(p.name, pid=p.proc.pid if p.proc else 0) for p in processes}
        self.backoff = {p.name: BACKOFF_FIRST_S for p in processes}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        self.write()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(5)

    def add(self, p: ManagedProcess, health: str = "") -> None:
        """Watch one more (started) process: a replica added to a running stack."""
        with self.lock:
            self.states[p.name] = ProcessState(p.name, pid=p.proc.pid if p.proc else 0, health=health)
            self.backoff[p.name] = BACKOFF_FIRST_S
            self.processes.append(p)
            self.write()

    def remove(self, name: str) -> None:
        """Stop watching `name` (its caller stops it)."""
        with self.lock:
            self.processes = [p for p in self.processes if p.name != name]
            self.states.pop(name, None)
            self.backoff.pop(name, None)
            self.write()

    def _run(self) -> None:
        while not self.stop_event.wait(0.25):
            with self.lock:
                for p in self.processes:
                    self.check(p)

    def check(self, p: ManagedProcess) -> None:
        st = self.states[p.name]
        now = time.time()
        if st.state == "running":
            if p.running:
                if time.monotonic() - p.started_at > STABLE_AFTER_S:
                    self.backoff[p.name] = BACKOFF_FIRST_S
                return
            code = p.proc.returncode if p.proc is not None else None
            delay = self.backoff[p.name]
            self.backoff[p.name] = min(BACKOFF_MAX_S, delay * 2)
            st.state, st.last_exit, st.last_exit_unix = "restarting", describe_exit(code), now
            st.next_start_unix = now + delay
            self.report(f"{p.name} {st.last_exit}; restarting in {delay:g}s (restart {st.restarts + 1}); "
                        f"log {p.log_path}:\n{log_tail(p.log_path, 8)}")
            self.write()
        elif now >= st.next_start_unix:
            p.stop()  # whatever is left of its process group
            p.start()
            st.state, st.restarts = "running", st.restarts + 1
            st.pid = p.proc.pid if p.proc else 0
            self.report(f"{p.name} restarted (pid {st.pid})")
            self.write()

    def write(self) -> None:
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"updated_unix": time.time(),
                                   "processes": [asdict(s) for s in self.states.values()]}, indent=1))
        tmp.replace(self.status_path)
