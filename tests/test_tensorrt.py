"""The GPU serving configuration, checked where no GPU is: the two Triton configurations
of the vision model agree, the ONNX has a dynamic batch axis matching them, the TensorRT
optimization profile follows the GPU configuration, and the build script says clearly
that it cannot run without TensorRT. (The engine build itself needs a GPU node.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from livelens.config import REPO_ROOT
from livelens.models.tensorrt import Profile, profile_for, read_config, trtexec_command

MODEL = REPO_ROOT / "model_repo" / "vision_encoder"


def test_cpu_and_gpu_configurations_agree() -> None:
    cpu, gpu = read_config(MODEL / "config.pbtxt"), read_config(MODEL / "configs" / "gpu.pbtxt")
    assert (cpu.backend, gpu.platform) == ("python", "tensorrt_plan")
    assert gpu.default_model_filename == "model.plan"
    assert cpu.name == gpu.name == MODEL.name
    assert cpu.max_batch_size == gpu.max_batch_size
    assert list(cpu.input) == list(gpu.input) and list(cpu.output) == list(gpu.output)
    assert cpu.dynamic_batching == gpu.dynamic_batching
    from tritonclient.grpc import model_config_pb2 as mc

    assert [g.kind for g in cpu.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in gpu.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def test_profile_covers_the_batches_triton_forms() -> None:
    gpu = read_config(MODEL / "configs" / "gpu.pbtxt")
    p = profile_for(gpu)
    assert p == Profile("pixels", (3, 224, 224), 1, max(gpu.dynamic_batching.preferred_batch_size),
                        gpu.max_batch_size)
    cmd = trtexec_command("trtexec", Path("m.onnx"), Path("m.plan"), p)
    assert "--minShapes=pixels:1x3x224x224" in cmd and f"--maxShapes=pixels:{gpu.max_batch_size}x3x224x224" in cmd
    # a queue that prefers smaller batches gets an engine tuned for them
    del gpu.dynamic_batching.preferred_batch_size[:]
    gpu.dynamic_batching.preferred_batch_size.extend([2, 4])
    assert profile_for(gpu).opt_batch == 4
    gpu.max_batch_size = 0
    with pytest.raises(ValueError, match="max_batch_size"):
        profile_for(gpu)


def test_onnx_has_a_dynamic_batch_axis_matching_the_configuration() -> None:
    onnx_path = MODEL / "1" / "model.onnx"
    if not onnx_path.is_file():
        pytest.skip("vision model not built (make models)")
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    cfg = read_config(MODEL / "configs" / "gpu.pbtxt")
    for value, spec in ((graph.input[0], cfg.input[0]), (graph.output[0], cfg.output[0])):
        dims = value.type.tensor_type.shape.dim
        assert value.name == spec.name
        assert dims[0].dim_param and not dims[0].dim_value  # batch: symbolic
        assert [d.dim_value for d in dims[1:]] == list(spec.dims)


def test_build_script_without_tensorrt_exits_2_with_a_sentence(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "livelens.models.tensorrt", str(MODEL), "--dry-run"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 0 and "--optShapes=pixels:" in run.stdout
    model = tmp_path / "m"
    (model / "configs").mkdir(parents=True)
    (model / "1").mkdir()
    (model / "configs" / "gpu.pbtxt").write_text((MODEL / "configs" / "gpu.pbtxt").read_text())
    (model / "1" / "model.onnx").write_bytes(b"onnx")
    run = subprocess.run([sys.executable, "-m", "livelens.models.tensorrt", str(model)], capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 2 and "trtexec not found" in run.stderr
    run = subprocess.run([sys.executable, "-m", "livelens.models.tensorrt", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 2 and "does not exist" in run.stderr
