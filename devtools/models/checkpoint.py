"""A local Hugging Face checkpoint of a vision-language model, read for import.

Reads `config.json` and the safetensors weights (one file or a sharded index), names the
family, and refuses families livelens cannot serve with the reason. Weight names are
normalized to one layout whatever transformers version saved them:

    vision_tower.<tower's own names>      (e.g. embeddings..., encoder.layers.0...)
    multi_modal_projector.linear_{1,2}.*
    image_newline
    language_model.<Qwen2ForCausalLM names> (model.layers.0..., lm_head.weight)

transformers 5 saves LLaVA-OneVision with `language_model.model.*` and
`language_model.lm_head.weight`; older saves and the hub's original conversions use
`vision_tower.vision_model.*`; in memory transformers 5 uses `model.vision_tower.*`,
`model.language_model.*` and `lm_head.weight`. All three read the same here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED = {"llava_onevision": "LLaVA-OneVision / LongVA layout (SigLIP or CLIP tower, MLP projector, Qwen2 LM)"}
# Families a user may bring, and why they cannot be served (docs/models.md says the same).
UNSUPPORTED = {
    "qwen2_vl": "Qwen2-VL's M-RoPE needs 3-D (time, height, width) positions for visual tokens; vLLM's "
                "prompt_embeds input carries only 1-D positions",
    "qwen2_5_vl": "Qwen2.5-VL's M-RoPE needs 3-D positions for visual tokens; prompt_embeds carries 1-D ones",
    "llava_next_video": "LLaVA-NeXT-Video pools frames differently (stride-2 average pooling) and is not "
                        "implemented yet",
    "llava": "LLaVA-1.5 is an image model (no video pooling); not implemented",
}
TEXT_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported; the message says why and what would do."""


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    weights: dict[str, Any]  # normalized name -> torch.Tensor

    @property
    def family(self) -> str:
        return str(self.config["model_type"])

    def part(self, prefix: str) -> dict[str, Any]:
        """The weights under `prefix.`, without it."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.weights.items() if k.startswith(prefix + ".")}


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json: not a Hugging Face checkpoint directory")
    try:
        config: dict[str, Any] = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{cfg_path}: not JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type in UNSUPPORTED:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported; livelens imports: "
                              + "; ".join(f"{k} ({v})" for k, v in SUPPORTED.items()))
    text_type = config.get("text_config", {}).get("model_type", "qwen2")
    if text_type not in TEXT_ARCHITECTURES:
        raise CheckpointError(f"{path}: language model {text_type!r} is not supported (Qwen2 only: the KV "
                              "connector and the import are verified for it)")
    return config


def normalize(name: str) -> str:
    """One checkpoint weight name -> the layout in the module docstring."""
    for old, new in (("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline"),
                     ("model.language_model.", "language_model.model."),
                     ("language_model.model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head.")):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if name.startswith("vision_tower.vision_model."):
        name = "vision_tower." + name[len("vision_tower.vision_model."):]
    return name


def read_weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (a .bin checkpoint must be re-saved as "
                              "safetensors first: `model.save_pretrained(dir)` with transformers)")
    weights: dict[str, Any] = {}
    for name in files:
        for key, tensor in load_file(str(path / name)).items():
            weights[normalize(key)] = tensor
    return weights


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    config = read_config(path)
    weights = read_weights(path)
    missing = [p for p in ("vision_tower.", "multi_modal_projector.", "language_model.model.")
               if not any(k.startswith(p) for k in weights)]
    if missing:
        raise CheckpointError(f"{path}: the weights hold nothing under {', '.join(missing)}: not a complete "
                              f"{config['model_type']} checkpoint")
    return Checkpoint(path, config, weights)
