"""Frame preprocessing for the vision encoder, numpy + OpenCV only.

The encoder service imports this without torch, so it must stay free of torch imports.
"""

from __future__ import annotations

import cv2
import numpy as np

# ImageNet statistics the MobileNetV2 weights were trained with.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def preprocess(frame_rgb_uint8: np.ndarray, size: int = 224) -> np.ndarray:
    """RGB uint8 [H,W,3] -> ImageNet-normalized float32 [3,size,size].

    The whole frame is squashed to size×size (no crop) so that the 7×7 token grid covers
    everything the camera saw.
    """
    frame = np.asarray(frame_rgb_uint8)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an RGB frame of shape [H,W,3], got {frame.shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {frame.dtype}")
    h, w = frame.shape[:2]
    # INTER_AREA averages when shrinking (no aliasing); bilinear when enlarging.
    interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
    resized = cv2.resize(frame, (size, size), interpolation=interp)
    x = resized.astype(np.float32) * (1.0 / 255.0)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(frames: list[np.ndarray], size: int = 224) -> np.ndarray:
    """A list of RGB uint8 frames -> float32 [N,3,size,size]."""
    return np.stack([preprocess(f, size) for f in frames]).astype(np.float32, copy=False)
