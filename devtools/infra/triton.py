"""Run the real `tritonserver` (2.51) that ships inside the `nvidia-pytriton` wheel.

The wheel holds the server binary, its shared libraries (`nvidia_pytriton.libs`), the
Python backend and one backend stub per Python version. Triton expects the stub beside
the backend (`backends/python/triton_python_backend_stub`), and pip may install the
files without the executable bit, so `prepare_triton()` lays out a private, writable
copy under `build/triton/` (the installed wheel is never modified) and this module
starts that copy with an environment in which the stub finds libpython, numpy and
onnxruntime.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import stat
import sys
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from devtools.infra.process import ManagedProcess
from livelens.config import REPO_ROOT, TritonConfig
from services.common.malloc import malloc_env
from services.common.ports import ensure_free

STUB_NAME = "triton_python_backend_stub"
STAMP_NAME = ".livelens-layout.json"


class TritonError(RuntimeError):
    """tritonserver could not be prepared, started, or did not become ready."""


@dataclass(frozen=True)
class TritonLayout:
    server_bin: Path
    backend_dir: Path
    libs_dir: Path


def _default_work_dir() -> Path:
    return Path(os.environ.get("LIVELENS_BUILD_DIR", str(REPO_ROOT / "build"))) / "triton"


def _wheel_paths() -> tuple[Path, Path]:
    """(pytriton/tritonserver, nvidia_pytriton.libs), located without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonError("package nvidia-pytriton is not installed (it ships tritonserver)")
    root = Path(next(iter(spec.submodule_search_locations)))
    server_dir = root / "tritonserver"
    libs_dir = root.parent / "nvidia_pytriton.libs"
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise TritonError(f"no tritonserver binary in {server_dir}")
    return server_dir, libs_dir


def _make_executable(path: Path) -> None:
    mode = path.stat().st_mode
    path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def prepare_triton(work_dir: Path | None = None) -> TritonLayout:
    """Copy server + Python backend + this Python's stub into work_dir (idempotent)."""
    server_src, libs_dir = _wheel_paths()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub_src = server_src / "python_backend_stubs" / py / STUB_NAME
    if not stub_src.is_file():
        raise TritonError(f"nvidia-pytriton ships no Python backend stub for Python {py}")
    dst = (work_dir or _default_work_dir()) / "tritonserver"
    layout = TritonLayout(dst / "bin" / "tritonserver", dst / "backends", libs_dir)
    stamp = {
        "pytriton": importlib.metadata.version("nvidia-pytriton"),
        "python": py,
        "source": str(server_src),
    }
    stamp_path = dst / STAMP_NAME
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return layout
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(
        server_src, dst, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__")
    )
    stub_dst = layout.backend_dir / "python" / STUB_NAME
    shutil.copy2(stub_src, stub_dst)
    _make_executable(layout.server_bin)
    _make_executable(stub_dst)
    stamp_path.write_text(json.dumps(stamp) + "\n")  # last: marks the layout complete
    return layout


def triton_env(layout: TritonLayout, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and the Python-backend stubs it spawns."""
    env = dict(os.environ if base is None else base)
    # The copied binaries' RPATH ($ORIGIN/../..) no longer reaches the wheel's libs, and
    # the stub links libpython3.X.so: use this interpreter's, so its stdlib matches.
    libdirs = [str(layout.libs_dir)]
    libpython = sysconfig.get_config_var("LIBDIR")
    if libpython:
        libdirs.append(str(libpython))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        libdirs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    )
    # The stub is an embedded interpreter, not this venv's python: hand it the venv's
    # site-packages (numpy, onnxruntime) explicitly, and the venv's bin on PATH.
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys(site + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONHOME"] = sys.base_prefix
    env.update(malloc_env())  # large tensors per request: reuse memory, no page faults
    return env


class TritonServer(ManagedProcess):
    """One tritonserver process serving `cfg.model_repository`; ready once `model_name`
    (the model the encoder asks for: encoder.model_name) is.

    with TritonServer(cfg, model_name, log_path) as server:   # start() + wait_ready()
        ...
    """

    def __init__(self, cfg: TritonConfig, model_name: str, log_path: Path, work_dir: Path | None = None) -> None:
        super().__init__("triton", [], log_path)
        self.cfg = cfg
        self.model_name = model_name
        self.work_dir = work_dir

    @property
    def http_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.http_port}"

    def command(self, layout: TritonLayout) -> list[str]:
        return [
            str(layout.server_bin),
            f"--model-repository={self.cfg.model_repository}",
            # Bind where the config says (Triton's default is 0.0.0.0, every interface).
            f"--grpc-address={self.cfg.host}",
            f"--grpc-port={self.cfg.grpc_port}",
            f"--http-address={self.cfg.host}",
            f"--http-port={self.cfg.http_port}",
            f"--metrics-address={self.cfg.host}",
            f"--metrics-port={self.cfg.metrics_port}",
            f"--backend-directory={layout.backend_dir}",
            "--allow-metrics=true",
            # CPU only: no DCGM probing, no CUDA pinned-memory pool to fail allocating.
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--log-verbose=0",
            "--exit-on-error=true",
        ]

    def start(self) -> None:
        for port, name in (
            (self.cfg.grpc_port, "triton.grpc_port"),
            (self.cfg.http_port, "triton.http_port"),
            (self.cfg.metrics_port, "triton.metrics_port"),
        ):
            ensure_free(self.cfg.host, port, name)
        if not Path(self.cfg.model_repository).is_dir():
            raise TritonError(f"model repository {self.cfg.model_repository} does not exist")
        layout = prepare_triton(self.work_dir)
        self.argv = self.command(layout)
        self.env = triton_env(layout)
        super().start()

    def _get_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def is_ready(self) -> bool:
        return self._get_ok("/v2/health/ready") and self._get_ok(
            f"/v2/models/{self.model_name}/ready"
        )

    def wait_ready(self, timeout_s: float | None = None, poll_s: float = 0.25) -> float:
        """Block until server and model are ready; return seconds since start()."""
        return super().wait_ready(self.cfg.startup_timeout_s if timeout_s is None else timeout_s, poll_s)
