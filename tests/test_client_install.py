"""`pip install livelens` (no extras) into an empty virtual environment gives a working
client: the SDK, `livelens watch` and `livelens health` against the running stack and
the topic subscriber, without torch, vLLM or any server dependency; the server commands
say which extra they need.

The wheel is built from this tree and installed with pip, its dependencies from the
package index at the versions requirements.lock pins (as constraints: the lock's other
packages are not installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from livelens.config import REPO_ROOT
from livelens.video import sample_video

pytestmark = pytest.mark.integration

SERVER_ONLY = ("torch", "vllm", "transformers", "tritonclient", "onnxruntime", "prometheus_client", "kubernetes")


def run(*cmd: str | Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client-install")
    src = root / "src"  # the package sources only: setuptools writes its build files beside them
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    for package in ("livelens", "services"):
        shutil.copytree(REPO_ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", root / "dist", src)
    wheel = next((root / "dist").glob("livelens-*.whl"))
    venv = root / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check",
        "-c", REPO_ROOT / "requirements.lock", wheel)
    return venv


def test_the_client_install_has_no_server_dependencies(client_venv: Path) -> None:
    probe = f"import importlib.util as u; print(' '.join(m for m in {SERVER_ONLY!r} if u.find_spec(m)))"
    assert run(client_venv / "bin" / "python", "-c", probe).stdout.strip() == ""
    # ... and the SDK, the subscriber and the CLI import without them
    run(client_venv / "bin" / "python", "-c", "import livelens.client, livelens.subscriber, livelens.watcher")


def test_server_commands_name_the_extra_they_need(client_venv: Path) -> None:
    out = run(client_venv / "bin" / "livelens", "up", "--no-demo", check=False, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "pip install 'livelens[server]'" in out.stderr and "Traceback" not in out.stderr


def test_the_client_install_streams_to_the_running_stack(client_venv: Path, stack) -> None:
    config = stack.run_dir / "livelens.yaml"
    health = run(client_venv / "bin" / "livelens", "--config", config, "health", timeout=60)
    assert health.stdout.count("SERVING") >= 3 and "NOT SERVING" not in health.stdout

    watch = run(client_venv / "bin" / "livelens", "--config", config, "watch", sample_video("vtest.avi"),
                "--target", stack.gateway_target, "--token", "test-token", "--max-seconds", "4",
                "--ask", "2:What do you see?", timeout=180)
    assert "Q: What do you see?" in watch.stdout
    answer = [line for line in watch.stdout.splitlines() if "] A: " in line]
    assert answer and answer[0].split("] A: ", 1)[1].strip(), watch.stdout

    # The SDK, from a script of the user's own, and the subscriber on the responses topic.
    script = textwrap.dedent(f"""
        import asyncio
        from livelens.client import Answer, Client
        from livelens.config import load_config
        from livelens.records import encode_jpeg
        from livelens.subscriber import TopicSubscriber
        from livelens.video import read_frames

        async def main():
            frames = [encode_jpeg(f.rgb) for f in read_frames({str(sample_video("vtest.avi"))!r}, 2.0,
                                                              max_seconds=3)]
            async with Client({stack.gateway_target!r}, "test-token") as client:
                async with client.watch("client-install") as session:
                    for seq, jpeg in enumerate(frames):
                        await session.send_frame(seq, seq / 2.0, jpeg)
                    rid = await session.ask("What do you see?", max_tokens=8)
                    async for e in session.events():
                        if isinstance(e, Answer) and e.request_id == rid and e.final:
                            return rid

        rid = asyncio.run(main())
        cfg = load_config({str(config)!r})
        with TopicSubscriber(cfg.kafka, ["responses"], from_beginning=True, tenant="acme",
                             stream_id="client-install") as sub:
            print("ANSWERED", any(r.request_id == rid and r.final for r in sub.records(timeout_s=10)))
    """)
    out = run(client_venv / "bin" / "python", "-c", script, timeout=180)
    assert "ANSWERED True" in out.stdout, out.stdout + out.stderr
