"""`livelens models import` on tiny seeded LLaVA-OneVision checkpoints (a SigLIP tower, and
a CLIP tower with its CLS token and the second-last layer, LongVA-style): the split model
computes what transformers' whole model computes.

- The Triton model's ONNX (run with ONNX Runtime, as the repository's backend runs it)
  gives transformers' video features frame by frame; the newline vector saved beside the
  language model is the checkpoint's.
- The language model directory, fed the model config's chat layout around those tokens,
  gives transformers' whole-model logits and greedy tokens for the same frames and
  question (transformers' processor expands the one <video> token to frames x tokens + 1;
  done by hand here: its video processor needs torchvision, which the project does not
  install).

Tolerances: float32 throughout; ONNX vs PyTorch 1e-4 relative; logits 1e-4 absolute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.models.checkpoint import CheckpointError, normalize, read_checkpoint
from devtools.models.tensorrt import profile_for, read_config
from livelens.config import REPO_ROOT, LLMConfig
from services.common.model_spec import ModelSpec

IMAGE_SIZE = 56  # tests/tiny_checkpoints.py

FRAMES = 3
SYSTEM = "You watch a video."
QUESTION = "What is in the video?"


@pytest.fixture(scope="module", params=["siglip", "clip"])
def imported(request, tmp_path_factory) -> tuple[Path, Path, ModelSpec]:
    if not (Path(LLMConfig().engine.model_path) / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not built (make models): its tokenizer is the tiny checkpoints'")
    from devtools.models.importer import import_checkpoint
    from tests.tiny_checkpoints import build_llava_onevision

    root = tmp_path_factory.mktemp(f"import-{request.param}")
    ckpt = build_llava_onevision(root / "ckpt", tower=request.param)
    spec = import_checkpoint(ckpt, "tiny-ov", root / "model_repo", root / "models", progress=lambda m: None)
    return ckpt, root, spec


def frames() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal((FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE))
                            .astype(np.float32))


def ort_tokens(root: Path, pixels: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(root / "model_repo" / "tiny-ov" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": pixels.numpy()})[0]


def test_import_writes_the_triton_model_the_llm_dir_and_the_model_config(imported) -> None:
    ckpt, root, spec = imported
    repo = root / "model_repo" / "tiny-ov"
    assert {p.name for p in repo.iterdir()} >= {"config.pbtxt", "configs", "1"}
    assert {p.name for p in (repo / "1").iterdir()} >= {"model.onnx", "model.py", "model_info.json"}
    assert "dims: [ 16, 128 ]" in (repo / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in (repo / "configs" / "gpu.pbtxt").read_text()
    for config in (repo / "config.pbtxt", repo / "configs" / "gpu.pbtxt"):  # Triton's own parser
        params = read_config(config).parameters
        assert json.loads(params["preprocessing"].string_value)["resample"] == "bicubic"
    assert profile_for(read_config(repo / "configs" / "gpu.pbtxt")).shapes("max") == "pixels:16x3x56x56"
    assert spec.grid == [4, 4] and spec.hidden_size == 128 and spec.tokens_per_frame == 16
    assert spec.rope["rope_theta"] == 1000000.0
    assert spec.chat.head == "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    assert spec.chat.after_frames == "\n"
    assert spec.chat.question == "{question}<|im_end|>\n<|im_start|>assistant\n"
    assert spec.chat.turn == "{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n<|im_start|>user\n"
    assert ModelSpec.read(root / "models" / "tiny-ov") == spec
    llm = root / "models" / "tiny-ov" / "llm"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in llm.iterdir()}


def test_frame_tokens_are_transformers_video_features(imported) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    ckpt, root, _ = imported
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval()
    pixels = frames()
    with torch.no_grad():
        want = model.model.get_video_features(
            pixels[None], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output[0]
    got = ort_tokens(root, pixels)
    assert got.shape == (FRAMES, 16, 128)
    scale = float(want.abs().max())
    np.testing.assert_allclose(got.reshape(-1, 128), want[:-1].numpy(), atol=1e-4 * scale)
    newline = np.load(root / "models" / "tiny-ov" / "image_newline.npy")
    np.testing.assert_array_equal(newline, want[-1].numpy())


def test_split_model_answers_as_transformers(imported) -> None:
    """Whole model (input ids with the expanded video token, pixels) vs the imported LM with
    the model config's layout around the ONNX tokens and the newline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny_checkpoints import llava_onevision_reference

    ckpt, root, spec = imported
    pixels = frames()
    ref = llava_onevision_reference(ckpt, pixels, SYSTEM, QUESTION, 8)

    llm_dir = root / "models" / "tiny-ov" / spec.llm_dir
    lm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    lm_tok = AutoTokenizer.from_pretrained(llm_dir)
    embed = lm.get_input_embeddings()

    def text(s: str) -> torch.Tensor:
        return embed(torch.tensor(lm_tok(s, add_special_tokens=False).input_ids))

    newline = torch.from_numpy(np.load(root / "models" / "tiny-ov" / str(spec.chat.after_frames_embedding)))
    with torch.no_grad():
        embeds = torch.cat([text(spec.chat.head.format(system=SYSTEM)),
                            torch.from_numpy(ort_tokens(root, pixels)).reshape(-1, spec.hidden_size),
                            newline[None],
                            text(spec.chat.after_frames + spec.chat.question.format(question=QUESTION))])[None]
        split = lm(inputs_embeds=embeds).logits[0, -1]
        split_greedy = lm.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False)[0]
    assert embeds.shape[1] == ref.prompt_tokens
    assert float((split - ref.logits).abs().max()) < 1e-4
    assert split_greedy.tolist() == ref.greedy


def test_weight_names_of_every_layout_read_the_same() -> None:
    assert normalize("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == \
        "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert normalize("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == \
        "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert normalize("model.language_model.layers.0.self_attn.q_proj.bias") == \
        "language_model.model.layers.0.self_attn.q_proj.bias"
    assert normalize("language_model.model.norm.weight") == "language_model.model.norm.weight"
    assert normalize("lm_head.weight") == "language_model.lm_head.weight"
    assert normalize("language_model.lm_head.weight") == "language_model.lm_head.weight"
    assert normalize("model.image_newline") == "image_newline"


def test_unsupported_and_broken_checkpoints_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(CheckpointError, match="M-RoPE"):
        read_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llava_onevision"}')
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-m", "livelens.cli", "models", "import", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 2 and "no such checkpoint directory" in out.stderr


def test_the_cli_imports_and_says_how_to_serve(imported, tmp_path: Path) -> None:
    ckpt, _, _ = imported
    out = subprocess.run([sys.executable, "-m", "livelens.cli", "models", "import", str(ckpt), "--name", "cli-ov",
                          "--model-repo", str(tmp_path / "repo"), "--models-dir", str(tmp_path / "models")],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"model.spec: {tmp_path / 'models' / 'cli-ov'}" in out.stdout
    assert "--set triton.tensorrt.profiles.cli-ov.maxShapes=pixels:16x3x56x56" in out.stdout
    assert ModelSpec.read(tmp_path / "models" / "cli-ov").name == "cli-ov"
