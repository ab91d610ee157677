"""`pip install livelens` (no extras) into an empty virtual environment gives a working
client: the SDK, `livelens watch` and `livelens health` against the running stack and
the topic subscriber, without torch, vLLM or any server dependency; the server commands
say which extra they need.

The wheel is built from sdk/ (the client's own distribution) and installed with pip, its
dependencies from the package index at the versions requirements.lock pins (as
constraints: the lock's other packages are not installed). It holds the `livelens`
package alone: no `services`, no `devtools`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
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


SDK = REPO_ROOT / "sdk" / "livelens"


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client-wheel")
    src = root / "src"  # a copy: setuptools writes its build files beside the sources
    shutil.copytree(REPO_ROOT / "sdk", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", root / "dist", src)
    return next((root / "dist").glob("livelens-*.whl"))


def sdk_modules() -> list[str]:
    """Every module of the SDK in this tree, generated code included."""
    return sorted("livelens." + ".".join(p.relative_to(SDK).with_suffix("").parts).removesuffix(".__init__")
                  for p in SDK.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_client_wheel_holds_the_sdk_alone(client_wheel: Path) -> None:
    names = zipfile.ZipFile(client_wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"livelens"}, packages
    modules = sorted("livelens." + n.removeprefix("livelens/").removesuffix(".py").replace("/", ".").removesuffix(
        ".__init__") for n in names if n.endswith(".py"))
    assert modules == sdk_modules()
    assert "livelens.v1.api_pb2" in modules and "livelens.client" in modules and "livelens.cli" in modules
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "livelens = livelens.cli:main" in zipfile.ZipFile(client_wheel).read(entry_points).decode()


def test_no_sdk_module_imports_server_code() -> None:
    """Read from the sources, so a lazy import inside a function counts too."""
    server = ("services", "devtools", *(m for m in SERVER_ONLY if m != "kubernetes"))  # kube: the SDK's own extra
    offending = []
    for path in SDK.rglob("*.py"):
        if "v1" in path.relative_to(SDK).parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from") and words[1].split(".")[0] in server:
                offending.append(f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert not offending, "\n".join(offending)


@pytest.fixture(scope="module")
def client_venv(client_wheel: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client-install")
    wheel = client_wheel
    venv = root / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check",
        "-c", REPO_ROOT / "requirements.lock", wheel)
    return venv


def test_the_client_install_has_no_server_dependencies(client_venv: Path) -> None:
    probe = f"import importlib.util as u; print(' '.join(m for m in {SERVER_ONLY!r} if u.find_spec(m)))"
    assert run(client_venv / "bin" / "python", "-c", probe).stdout.strip() == ""
    # ... and every module of the SDK imports without them
    run(client_venv / "bin" / "python", "-c", "import " + ", ".join(sdk_modules()))


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
