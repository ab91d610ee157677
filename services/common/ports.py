"""TCP port checks shared by everything that starts a local server.

A server that finds its port taken often fails late and obscurely (Tansu panics,
tritonserver exits after loading models), so launchers check first and name the setting
that moves the port.
"""

from __future__ import annotations

import socket


class PortInUseError(Exception):
    """A port a server needs is taken; the message says which setting moves it."""

    def __init__(self, port: int, setting: str) -> None:
        self.port = port
        self.setting = setting
        env = "LIVELENS_" + setting.replace(".", "__", 1).upper()
        super().__init__(f"port {port} is already in use; set {setting} (env {env}) to a free port")


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; racy, good enough for tests),
    never one this process was given before: ports picked together but bound later by
    different servers must differ."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port and we could bind it ourselves."""
    # A connect test catches listeners bound to other addresses of the same port
    # (e.g. 0.0.0.0), which a bind with SO_REUSEADDR might not.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        if s.connect_ex((host, port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers bind: connections in TIME_WAIT from a stopped server do not block it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ensure_free(host: str, port: int, setting: str) -> None:
    """Raise PortInUseError naming `setting` (e.g. "triton.grpc_port") if the port is taken."""
    if not is_free(host, port):
        raise PortInUseError(port, setting)
