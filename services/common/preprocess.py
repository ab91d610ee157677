"""Frame preprocessing for the vision encoder, numpy + OpenCV only.

The encoder service imports this without torch, so it must stay free of torch imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# ImageNet statistics the MobileNetV2 weights were trained with.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess(frame_rgb_uint8: np.ndarray, size: int = 224, mean: np.ndarray = IMAGENET_MEAN,
               std: np.ndarray = IMAGENET_STD, resample: str = "area") -> np.ndarray:
    """RGB uint8 [H,W,3] -> normalized float32 [3,size,size] ((x/255 - mean) / std).

    The whole frame is squashed to size×size (no crop) so that the token grid covers
    everything the camera saw. `resample`: "area" (the built-in model's: averaging when
    shrinking, bilinear when enlarging) or "bicubic" (an imported family's; OpenCV's
    bicubic, which unlike torchvision's does not antialias when shrinking).
    """
    frame = np.asarray(frame_rgb_uint8)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB frame of shape [H,W,3], got {frame.shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {frame.dtype}")
    h, w = frame.shape[:2]
    if resample == "bicubic":
        interp = cv2.INTER_CUBIC
    else:  # INTER_AREA averages when shrinking (no aliasing); bilinear when enlarging.
        interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
    resized = cv2.resize(frame, (size, size), interpolation=interp)
    x = resized.astype(np.float32) * (1.0 / 255.0)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(frames: list[np.ndarray], size: int = 224) -> np.ndarray:
    """A list of RGB uint8 frames -> float32 [N,3,size,size]."""
    return np.stack([preprocess(f, size) for f in frames]).astype(np.float32, copy=False)


@dataclass(frozen=True)
class FramePreprocessing:
    """The served vision model's preprocessing: the built-in one's, or an imported
    family's (written by `livelens models import` into its Triton config)."""

    size: int
    mean: np.ndarray = field(default_factory=lambda: IMAGENET_MEAN)
    std: np.ndarray = field(default_factory=lambda: IMAGENET_STD)
    resample: str = "area"

    def __call__(self, frame_rgb_uint8: np.ndarray) -> np.ndarray:
        return preprocess(frame_rgb_uint8, self.size, self.mean, self.std, self.resample)

    def to_unit_range(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed [3, H, W] back to 0..1 (what the feature cache's thresholds are in)."""
        return pixels * self.std[:, None, None] + self.mean[:, None, None]

    @classmethod
    def of_model(cls, params: dict | None, image_size: int) -> FramePreprocessing:  # type: ignore[type-arg]
        """An imported model's (its Triton config's "preprocessing"), else the built-in one's."""
        if not params:
            return cls(image_size)
        return cls(int(params["size"]), np.asarray(params["mean"], np.float32),
                   np.asarray(params["std"], np.float32), str(params.get("resample", "bicubic")))
