"""What `make models` builds the vision models from: build-only settings, read from the
environment (LIVELENS_VISION__SEED, LIVELENS_VISION__PROJECTOR), never by a service."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from livelens.config import ConfigError, LivelensConfig

PROJECTORS = ("trained", "seeded")  # the MobileNetV2 encoder's (`VisionBuild.projector`)


@dataclass(frozen=True)
class VisionBuild:
    """How `make models` builds the vision models into triton.model_repository."""

    model_repository: Path
    seed: int = 0
    # The MobileNetV2 encoder's projector: "seeded" (a random Linear from `seed`: the
    # untrained baseline) or "trained" (the shipped LLaVA-style MLP). "seeded" stays the
    # default until the trained one grounds: the shipped weights give nearly the same
    # tokens for every frame (docs/projector.md, Scores).
    projector: str = "seeded"

    @classmethod
    def of(cls, cfg: LivelensConfig, env: dict[str, str] | None = None) -> VisionBuild:
        env = dict(os.environ if env is None else env)
        seed = env.get("LIVELENS_VISION__SEED", "0")
        projector = env.get("LIVELENS_VISION__PROJECTOR", "seeded")
        if not seed.isdigit():
            raise ConfigError(f"LIVELENS_VISION__SEED: expected a non-negative integer, got {seed!r}")
        if projector not in PROJECTORS:
            raise ConfigError(f"LIVELENS_VISION__PROJECTOR must be one of {', '.join(PROJECTORS)}, got {projector!r}")
        return cls(Path(cfg.triton.model_repository), int(seed), projector)

    @property
    def onnx_path(self) -> Path:
        return self.model_repository / "vision_encoder" / "1" / "model.onnx"

    @property
    def vit_onnx_path(self) -> Path:
        return self.model_repository / "vision_vit" / "1" / "model.onnx"
