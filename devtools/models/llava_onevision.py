"""The LLaVA-OneVision family (LongVA's layout too), split for livelens.

What transformers' `LlavaOnevisionModel.get_video_features` computes for each video
frame, as one module (`FrameTokens`): the vision tower's hidden states at
`vision_feature_layer` (a list: concatenated), the first (CLS) token dropped for
`vision_feature_select_strategy: default`, the MLP projector, then bilinear pooling of the
h x w patch grid to ceil(h/2) x ceil(w/2) (`F.interpolate`, align_corners False). One
`image_newline` vector follows the last frame of the video in the LLM's input: it is
saved beside the language model and the composition appends it (`ModelSpec.chat`).

The language model is the checkpoint's Qwen2ForCausalLM, written as a directory vLLM
loads on its own.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from devtools.models.checkpoint import TEXT_ARCHITECTURES, Checkpoint, CheckpointError

# The processor defaults of transformers' LLaVA-OneVision video processor (used only where
# the checkpoint has no processor config).
DEFAULT_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP
DEFAULT_STD = [0.26862954, 0.26130258, 0.27577711]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class FrameTokens(nn.Module):
    """pixels [N, 3, S, S], preprocessed as the family does -> video tokens [N, T, H]."""

    def __init__(self, tower: nn.Module, projector: nn.Module, layers: int | list[int], strategy: str,
                 patch_grid: int, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.tower = tower
        self.projector = projector
        self.layers = layers
        self.strategy = strategy
        self.patch_grid = patch_grid
        self.pooled = math.ceil(patch_grid / 2)
        self.out_dtype = out_dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixels, output_hidden_states=True).hidden_states
        feats = (hidden[self.layers] if isinstance(self.layers, int)
                 else torch.cat([hidden[i] for i in self.layers], dim=-1))
        if self.strategy == "default":
            feats = feats[:, 1:]
        x = self.projector(feats)
        n, _, d = x.shape
        x = x.view(n, self.patch_grid, self.patch_grid, d).permute(0, 3, 1, 2)
        x = nn.functional.interpolate(x, size=[self.pooled, self.pooled], mode="bilinear")
        return x.permute(0, 2, 3, 1).reshape(n, self.pooled * self.pooled, d).to(self.out_dtype)


class Projector(nn.Module):
    """LLaVA's mlp2x_gelu: linear_1, activation, linear_2 (transformers' names)."""

    def __init__(self, state: dict[str, torch.Tensor], act: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        w1, w2 = state["linear_1.weight"], state["linear_2.weight"]
        self.linear_1 = nn.Linear(w1.shape[1], w1.shape[0], bias="linear_1.bias" in state)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(w2.shape[1], w2.shape[0], bias="linear_2.bias" in state)
        self.load_state_dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def vision_tower(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's vision tower (SigLIP or CLIP) as transformers builds it, eager attention."""
    from transformers import CONFIG_MAPPING, AutoModel

    vc = dict(ckpt.config["vision_config"])
    kind = vc.pop("model_type", "siglip_vision_model")
    if kind not in ("siglip_vision_model", "clip_vision_model"):
        raise CheckpointError(f"{ckpt.path}: vision tower {kind!r} is not supported (SigLIP or CLIP)")
    config = CONFIG_MAPPING[kind](**vc)
    config._attn_implementation = "eager"  # exports to plain ONNX ops
    tower = AutoModel.from_config(config)
    prefix = "vision_model." if hasattr(tower, "vision_model") else ""  # a wrapper, or the transformer itself
    state = {prefix + k: v for k, v in ckpt.part("vision_tower").items()}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if [m for m in missing if "head" not in m] or unexpected:
        raise CheckpointError(f"{ckpt.path}: the vision tower's weights do not fit its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return tower.eval()


def frame_tokens(ckpt: Checkpoint, out_dtype: torch.dtype = torch.float32) -> FrameTokens:
    cfg = ckpt.config
    vc = cfg["vision_config"]
    strategy = cfg.get("vision_feature_select_strategy", "full")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{ckpt.path}: vision_feature_select_strategy {strategy!r} (default or full)")
    image_size, patch = int(vc.get("image_size", 384)), int(vc.get("patch_size", 14))
    projector = Projector(ckpt.part("multi_modal_projector"), cfg.get("projector_hidden_act", "gelu"))
    return FrameTokens(vision_tower(ckpt), projector, cfg.get("vision_feature_layer", -1), strategy,
                       image_size // patch, out_dtype).eval()


def preprocessing(ckpt: Checkpoint) -> dict[str, Any]:
    """The video frames' preprocessing, from the checkpoint's processor config."""
    vc = ckpt.config["vision_config"]
    proc: dict[str, Any] = {}
    for name in ("processor_config.json", "video_preprocessor_config.json", "preprocessor_config.json"):
        path = ckpt.path / name
        if path.is_file():
            data = json.loads(path.read_text())
            proc = data.get("video_processor") or data.get("image_processor") or data
            break
    size = proc.get("size") or {}
    side = int(size.get("height") or size.get("shortest_edge") or vc.get("image_size", 384))
    return {"size": side, "mean": [float(x) for x in proc.get("image_mean", DEFAULT_MEAN)],
            "std": [float(x) for x in proc.get("image_std", DEFAULT_STD)],
            "resample": "bicubic", "rescale": float(proc.get("rescale_factor", 1 / 255))}


def export_onnx(model: FrameTokens, image_size: int, path: Path, opset: int = 17) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(2, 3, image_size, image_size),), str(tmp),
                          input_names=["pixels"], output_names=["tokens"],
                          dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    tmp.replace(path)
    return path


def write_language_model(ckpt: Checkpoint, out: Path) -> dict[str, Any]:
    """The Qwen2ForCausalLM as a directory vLLM loads: config, weights, tokenizer, template."""
    from safetensors.torch import save_file

    text = dict(ckpt.config["text_config"])
    text_type = text.get("model_type", "qwen2")
    text.update(model_type=text_type, architectures=[TEXT_ARCHITECTURES[text_type]])
    text.setdefault("torch_dtype", ckpt.config.get("torch_dtype", "float32"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in ckpt.part("language_model").items()}
    if text.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (ckpt.path / name).is_file():
            shutil.copy(ckpt.path / name, out / name)
    if not (out / "tokenizer.json").is_file() and not (out / "vocab.json").is_file():
        raise CheckpointError(f"{ckpt.path}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    return text


def save_newline(ckpt: Checkpoint, path: Path) -> None:
    newline = ckpt.weights.get("image_newline")
    if newline is None:
        raise CheckpointError(f"{ckpt.path}: no image_newline weight")
    np.save(path, newline.float().numpy())
