"""`livelens models import CHECKPOINT_DIR [--name NAME]`: a local Hugging Face checkpoint
of a supported family, split into what livelens serves.

Writes
- `MODEL_REPO/NAME/`: the Triton model (frames -> the family's video tokens): `1/model.onnx`
  run by the repository's ONNX Runtime Python backend on CPU (`config.pbtxt`), and
  `configs/gpu.pbtxt` for a TensorRT plan built from the same ONNX on GPU nodes;
- `MODELS_DIR/NAME/llm/`: the language model, a directory vLLM loads on its own;
- `MODELS_DIR/NAME/livelens_model.json`: the livelens model config (`ModelSpec`), and the
  vectors it names (LLaVA-OneVision's `image_newline.npy`).

The ONNX is checked against the PyTorch module it was exported from before anything is
written under its final name.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from devtools.models.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from services.common.model_spec import ModelSpec, Preprocessing, SpecError, chat_layout

BACKEND_FILE = Path(__file__).resolve().parents[2] / "model_repo" / "vision_encoder" / "1" / "model.py"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ONNX_TOLERANCE = 1e-3  # max |ONNX - PyTorch| over a random batch, relative to the tokens' max


def _config_pbtxt(name: str, prep: dict, tokens: int, hidden: int, dtype: str, gpu: bool) -> str:  # type: ignore[type-arg]
    size = prep["size"]
    triton_dtype = {"float16": "TYPE_FP16", "float32": "TYPE_FP32"}[dtype]
    head = (f'# {name}: frames -> video tokens, imported by `livelens models import`.\n'
            + ('# GPU nodes: a TensorRT plan built from 1/model.onnx (python -m devtools.models.tensorrt).\n'
               f'name: "{name}"\nplatform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\n' if gpu else
               '# CPU: ONNX Runtime inside the Python backend (the tritonserver here ships no onnxruntime backend).\n'
               f'name: "{name}"\nbackend: "python"\n'))
    body = (f"max_batch_size: 16\n\n"
            f'input [\n  {{\n    name: "pixels"\n    data_type: TYPE_FP32\n    dims: [ 3, {size}, {size} ]\n  }}\n]\n'
            f'output [\n  {{\n    name: "tokens"\n    data_type: {triton_dtype}\n    dims: [ {tokens}, {hidden} ]\n'
            f"  }}\n]\n\n"
            "dynamic_batching {\n  preferred_batch_size: [ 4, 8, 16 ]\n  max_queue_delay_microseconds: 2000\n}\n\n"
            f"instance_group [\n  {{\n    count: 1\n    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}\n  }}\n]\n")
    # The frames' preprocessing travels with the model: the encoder reads it from here.
    entries = [("preprocessing", json.dumps(prep, separators=(",", ":")))]
    if not gpu:
        entries += [("intra_op_threads", "2"), ("onnx_file", "model.onnx")]
    params = ",\n".join(f"  {{\n    key: \"{k}\"\n    value: {{ string_value: '{v}' }}\n  }}" for k, v in entries)
    return head + body + "\nparameters [\n" + params + "\n]\n"


def _chat_template(ckpt: Checkpoint) -> str:
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "processor_config.json"):
        path = ckpt.path / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text()
        template = json.loads(path.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    raise CheckpointError(f"{ckpt.path}: no chat template (chat_template.jinja, or chat_template in "
                          "chat_template.json / tokenizer_config.json / processor_config.json)")


def _video_token(ckpt: Checkpoint) -> str:
    """The video token's text, by its id (video_token_index) in the tokenizer's added tokens."""
    index = int(ckpt.config.get("video_token_index", ckpt.config.get("video_token_id", -1)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = ckpt.path / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        for tok in data.get("added_tokens", []):
            if tok.get("id") == index:
                return str(tok["content"])
        decoder = data.get("added_tokens_decoder", {})
        if str(index) in decoder:
            return str(decoder[str(index)]["content"])
    return "<video>"


def check_onnx(model: object, onnx_path: Path, size: int) -> float:
    """Max |ONNX Runtime - PyTorch| over a seeded random batch of 2, relative to the largest token."""
    import onnxruntime as ort
    import torch

    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(pixels)).float().numpy()  # type: ignore[operator]
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"pixels": pixels})[0].astype(np.float32)
    return float(np.abs(got - want).max() / max(1e-6, float(np.abs(want).max())))


def import_checkpoint(checkpoint: str | Path, name: str | None, model_repo: Path, models_dir: Path,
                      tokens_dtype: str = "float32",
                      progress: Callable[[str], None] = lambda m: print(f"[import] {m}", flush=True)) -> ModelSpec:
    import torch

    from devtools.models import llava_onevision as family

    t0 = time.monotonic()
    ckpt = read_checkpoint(checkpoint)
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(checkpoint).resolve().name).strip("-")
    if not NAME_RE.match(name):
        raise CheckpointError(f"model name {name!r}: letters, digits, '_', '.', '-' (at most 64; a Triton model name)")
    if tokens_dtype not in ("float16", "float32"):
        raise CheckpointError(f"tokens dtype {tokens_dtype!r}: float16 or float32")
    progress(f"{ckpt.path}: {ckpt.family}, {len(ckpt.weights)} tensors")
    prep = family.preprocessing(ckpt)
    model = family.frame_tokens(ckpt, getattr(torch, tokens_dtype))
    try:
        chat = chat_layout(_chat_template(ckpt), _video_token(ckpt))
    except SpecError as exc:
        raise CheckpointError(f"{ckpt.path}: {exc}") from exc

    triton_dir = model_repo / name
    version = triton_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    progress(f"vision model -> {version / 'model.onnx'} (ONNX export)")
    onnx_tmp = family.export_onnx(model, prep["size"], version / "model.onnx.new")
    error = check_onnx(model, onnx_tmp, prep["size"])
    if error > ONNX_TOLERANCE:
        onnx_tmp.unlink()
        raise CheckpointError(f"the exported vision model differs from PyTorch by {error:.2e} (relative) > "
                              f"{ONNX_TOLERANCE}: not written")
    onnx_tmp.replace(version / "model.onnx")
    progress(f"  ONNX Runtime vs PyTorch: max relative difference {error:.1e}")
    with torch.no_grad():
        sample = model(torch.zeros(1, 3, prep["size"], prep["size"]))
    tokens, hidden = int(sample.shape[1]), int(sample.shape[2])
    grid = [model.pooled, model.pooled]
    shutil.copy(BACKEND_FILE, version / "model.py")
    (triton_dir / "configs").mkdir(exist_ok=True)
    (triton_dir / "config.pbtxt").write_text(_config_pbtxt(name, prep, tokens, hidden, tokens_dtype, False))
    (triton_dir / "configs" / "gpu.pbtxt").write_text(_config_pbtxt(name, prep, tokens, hidden, tokens_dtype, True))
    (version / "model_info.json").write_text(json.dumps({
        "model_id": f"{ckpt.family}:{ckpt.path.name}", "hidden_size": hidden, "grid": grid,
        "tokens_per_frame": tokens, "outputs": ["tokens"], "preprocessing": prep,
        "input": {"name": "pixels", "dtype": "float32", "shape": [-1, 3, prep["size"], prep["size"]]},
        "output": {"name": "tokens", "dtype": tokens_dtype, "shape": [-1, tokens, hidden]}}, indent=2) + "\n")

    out = models_dir / name
    progress(f"language model -> {out / 'llm'}")
    text = family.write_language_model(ckpt, out / "llm")
    family.save_newline(ckpt, out / "image_newline.npy")
    chat = replace(chat, after_frames_embedding="image_newline.npy")
    config_hash = hashlib.sha256((ckpt.path / "config.json").read_bytes()).hexdigest()[:16]
    spec = ModelSpec(
        name=name, family=ckpt.family, source=f"{ckpt.path.name} (config.json sha256 {config_hash})",
        vision_model=name, grid=grid, hidden_size=hidden, tokens_dtype=tokens_dtype, llm_dir="llm",
        dtype=str(text.get("torch_dtype") or text.get("dtype") or "float32"),
        rope=dict(text.get("rope_parameters") or {"rope_theta": text.get("rope_theta", 10000.0),
                                                  "rope_type": "default"}),
        chat=chat, preprocessing=Preprocessing(**{k: prep[k] for k in ("size", "mean", "std", "resample", "rescale")}),
        extra={"vision_feature_layer": ckpt.config.get("vision_feature_layer"),
               "vision_feature_select_strategy": ckpt.config.get("vision_feature_select_strategy")})
    path = spec.write(out)
    progress(f"model config -> {path} ({time.monotonic() - t0:.0f} s)")
    return spec
