"""A child process with a log file, a readiness check and a clean stop.

Every server livelens starts locally (broker, Triton, the three services) is one of
these, so `livelens up` and the test fixtures stop them all the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class ProcessFailed(RuntimeError):
    """A managed process exited or never became ready; the message ends with its log."""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name})"
    return f"exited with code {code}"


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        ready_check: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.ready_check = ready_check
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def is_ready(self) -> bool:
        """Overridden by servers that know how to ask; by default the given check."""
        return self.ready_check() if self.ready_check else self.running

    def start(self) -> None:
        if self.running:
            raise ProcessFailed(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        # A new session: Ctrl-C in the terminal reaches `livelens up`, which stops the
        # children in order, instead of hitting every child at once.
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float, poll_s: float = 0.25) -> float:
        """Block until is_ready(); returns seconds since start(). Fails fast, with the
        log's tail, when the process exits."""
        if self.proc is None:
            raise ProcessFailed(f"{self.name} was not started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.poll_ready():
                return time.monotonic() - self.started_at
            time.sleep(poll_s)
        raise ProcessFailed(
            f"{self.name} not ready after {timeout_s:.0f}s; log {self.log_path}:\n"
            + log_tail(self.log_path)
        )

    def poll_ready(self) -> bool:
        """One readiness check; ProcessFailed (how it ended, its log) if the process exited."""
        if self.proc is None:
            raise ProcessFailed(f"{self.name} was not started")
        if not self.running:
            raise ProcessFailed(f"{self.name} {describe_exit(self.proc.returncode)}; log {self.log_path}:\n"
                                + log_tail(self.log_path))
        try:
            return self.is_ready()
        except Exception:  # noqa: BLE001 - not ready yet, whatever the reason
            return False

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the process group, then SIGKILL to whatever is left of it
        (children such as Triton's backend stubs or vLLM's engine core)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.proc = None

    def __enter__(self) -> ManagedProcess:
        self.start()
        try:
            self.wait_ready(60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_all_ready(waits: list[tuple[ManagedProcess, float]], poll_s: float = 0.25) -> None:
    """Wait for several processes at once, each with its own timeout: the first that exits
    or runs out of time fails the wait, with its log (no waiting on the others first)."""
    start = time.monotonic()
    pending = list(waits)
    while pending:
        for p, timeout_s in list(pending):
            if p.poll_ready():
                pending.remove((p, timeout_s))
            elif time.monotonic() - start > timeout_s:
                raise ProcessFailed(f"{p.name} not ready after {timeout_s:.0f}s; log {p.log_path}:\n"
                                    + log_tail(p.log_path))
        if pending:
            time.sleep(poll_s)
