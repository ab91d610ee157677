"""What a running `livelens up` tells the client commands on the same machine: where its
supervisor's status file is (`UP_POINTER`), and each process's state in that file, which
`livelens health` and `livelens status` show (restarts, how the last one ended). The
supervisor (devtools.infra.supervisor) writes both."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from livelens.config import build_dir

UP_POINTER = Path(build_dir()) / "up.json"  # {"pid": the `livelens up` process, "status": the status file}


@dataclass
class ProcessState:
    name: str
    pid: int = 0
    state: str = "running"  # running, restarting
    restarts: int = 0
    last_exit: str = ""
    last_exit_unix: float = 0.0
    next_start_unix: float = 0.0
    health: str = ""  # host:port of its grpc.health.v1 service, where it has one


def read_status(path: Path) -> dict[str, ProcessState]:
    """The states a supervisor wrote (empty when there is no file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {d["name"]: ProcessState(**d) for d in data.get("processes", [])}


def supervised() -> dict[str, ProcessState]:
    """What the supervisor of a running `livelens up` says of its processes (nothing when
    no `livelens up` runs)."""
    try:
        pointer = json.loads(UP_POINTER.read_text())
        os.kill(int(pointer["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return {}
    return read_status(Path(pointer["status"]))
