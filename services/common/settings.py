"""The services' configuration: `livelens.config` (the settings every reader shares, the
client commands included) with what a server does when it loads them: the imported
model's config (`model.spec`) applied. (The LLM service also checks that its largest
context fits the engine: `services.llm.budget`.)
"""

from __future__ import annotations

import os
from pathlib import Path

from livelens.config import ConfigError, LivelensConfig, load_config, with_settings
from services.common.model_spec import ModelSpec, SpecError


def load_service_config(path: str | os.PathLike[str] | None = None,
                        env: dict[str, str] | None = None) -> LivelensConfig:
    """`load_config`, then the model config applied."""
    return apply_model_spec(load_config(path, env))


def apply_model_spec(cfg: LivelensConfig) -> LivelensConfig:
    """`cfg` with the settings `model.spec` decides (see ModelConfig)."""
    if not cfg.model.spec:
        return cfg
    try:
        spec = ModelSpec.read(cfg.model.spec)
    except SpecError as exc:
        raise ConfigError(f"model.spec: {exc}") from exc
    root = Path(cfg.model.spec) if Path(cfg.model.spec).is_dir() else Path(cfg.model.spec).parent
    rope_type = spec.rope.get("rope_type", "default")
    if cfg.llm.context.materializer == "streaming_kv" and rope_type != "default":
        raise ConfigError(f"model.spec {cfg.model.spec}: the model's RoPE is {rope_type!r}; the streaming-KV "
                          "connector re-rotates plain RoPE only: set llm.context.materializer: engine_cache")
    return with_settings(cfg, {"llm.engine.model_path": str(root / spec.llm_dir),
                               "encoder.model_name": spec.vision_model,
                               "encoder.frame_tags": 0,
                               "llm.context.recall_notes": 0})  # its notes are made of tags
