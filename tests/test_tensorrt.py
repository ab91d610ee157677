"""The GPU serving configuration, checked where no GPU is: the two Triton configurations
of each vision model agree, the ONNX has dynamic axes matching them, the TensorRT
optimization profile follows the GPU configuration, and the build script says clearly
that it cannot run without TensorRT. (The engine build itself needs a GPU node.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devtools.models.tensorrt import InputProfile, Profile, profile_for, read_config, trtexec_command
from livelens.config import REPO_ROOT

MODEL = REPO_ROOT / "model_repo" / "vision_encoder"
MODELS = [MODEL.parent / name for name in ("vision_encoder", "vision_vit", "vision_vit_full")]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_cpu_and_gpu_configurations_agree(model: Path) -> None:
    cpu, gpu = read_config(model / "config.pbtxt"), read_config(model / "configs" / "gpu.pbtxt")
    assert (cpu.backend, gpu.platform) == ("python", "tensorrt_plan")
    assert gpu.default_model_filename == "model.plan"
    assert cpu.name == gpu.name == model.name
    assert cpu.max_batch_size == gpu.max_batch_size
    for a, b in zip(cpu.input, gpu.input, strict=True):  # ragged batching is the Python backend's
        assert (a.name, a.data_type, list(a.dims)) == (b.name, b.data_type, list(b.dims))
    assert list(cpu.output) == list(gpu.output)
    assert cpu.dynamic_batching == gpu.dynamic_batching
    for key in ("num_patches", "plain_model"):
        assert (key in cpu.parameters) == (key in gpu.parameters)
        if key in cpu.parameters:
            assert cpu.parameters[key].string_value == gpu.parameters[key].string_value
    from tritonclient.grpc import model_config_pb2 as mc

    assert [g.kind for g in cpu.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in gpu.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def test_profile_covers_the_batches_triton_forms() -> None:
    gpu = read_config(MODEL / "configs" / "gpu.pbtxt")
    p = profile_for(gpu)
    opt = max(gpu.dynamic_batching.preferred_batch_size)
    assert p == Profile((InputProfile("pixels", (1, 3, 224, 224), (opt, 3, 224, 224),
                                      (gpu.max_batch_size, 3, 224, 224)),))
    cmd = trtexec_command("trtexec", Path("m.onnx"), Path("m.plan"), p)
    assert "--minShapes=pixels:1x3x224x224" in cmd and f"--maxShapes=pixels:{gpu.max_batch_size}x3x224x224" in cmd
    # a queue that prefers smaller batches gets an engine tuned for them
    del gpu.dynamic_batching.preferred_batch_size[:]
    gpu.dynamic_batching.preferred_batch_size.extend([2, 4])
    assert profile_for(gpu).inputs[0].opt[0] == 4
    gpu.max_batch_size = 0
    with pytest.raises(ValueError, match="max_batch_size"):
        profile_for(gpu)


def test_vit_profile_covers_every_recompute_count() -> None:
    """The cached ViT's variable dims take their range from `tensorrt_profile`: K patches
    recomputed 1..196 and M = 196 - K cache rows 0..195 (a whole frame sends none)."""
    gpu = read_config(MODEL.parent / "vision_vit" / "configs" / "gpu.pbtxt")
    p = {i.name: i for i in profile_for(gpu).inputs}
    assert p["index"] == InputProfile("index", (1, 1), (16, 49), (16, 196))
    assert p["keys_others"] == InputProfile("keys_others", (1, 6, 0, 384), (16, 6, 147, 384), (16, 6, 195, 384))
    assert p["values_others"] == InputProfile("values_others", (1, 6, 0, 384), (16, 6, 147, 384), (16, 6, 195, 384))
    del gpu.parameters["tensorrt_profile"]
    with pytest.raises(ValueError, match="tensorrt_profile"):
        profile_for(gpu)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_onnx_has_dynamic_axes_matching_the_configuration(model: Path) -> None:
    onnx_path = model / "1" / "model.onnx"
    if not onnx_path.is_file():
        pytest.skip("vision model not built (make models)")
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    cfg = read_config(model / "configs" / "gpu.pbtxt")
    values = {v.name: v for v in [*graph.input, *graph.output]}
    for spec in [*cfg.input, *cfg.output]:
        dims = values[spec.name].type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value  # batch: symbolic
        # a config's -1 is a symbolic dim of the graph, and every fixed dim is the same
        assert [d.dim_value or -1 for d in dims[1:]] == list(spec.dims), spec.name


def test_build_script_without_tensorrt_exits_2_with_a_sentence(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "devtools.models.tensorrt", str(MODEL), "--dry-run"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 0 and "--optShapes=pixels:" in run.stdout
    model = tmp_path / "m"
    (model / "configs").mkdir(parents=True)
    (model / "1").mkdir()
    (model / "configs" / "gpu.pbtxt").write_text((MODEL / "configs" / "gpu.pbtxt").read_text())
    (model / "1" / "model.onnx").write_bytes(b"onnx")
    run = subprocess.run([sys.executable, "-m", "devtools.models.tensorrt", str(model)], capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 2 and "trtexec not found" in run.stderr
    run = subprocess.run([sys.executable, "-m", "devtools.models.tensorrt", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 2 and "does not exist" in run.stderr
