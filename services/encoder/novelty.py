"""Per-stream novelty: how much a frame's tokens differ from the previous frame's.

novelty = 1 - mean over grid positions of cos(token_now, token_before), the signal
TimeChat-Online's Differential Token Drop thresholds per token: a scene cut changes
most positions (novelty near 1), a still camera almost none (near 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    num = (a32 * b32).sum(-1)
    den = np.linalg.norm(a32, axis=-1) * np.linalg.norm(b32, axis=-1) + 1e-6
    return np.asarray(num / den)


@dataclass
class Novelty:
    """One stream's novelty state: the tokens of its last encoded frame."""

    last: np.ndarray | None = None  # replaced whole, never mutated

    def update(self, tokens: np.ndarray) -> float:
        """Novelty of `tokens` [T, H] against the stream's previous frame (1.0 for the first)."""
        prev, self.last = self.last, tokens
        if prev is None or prev.shape != tokens.shape:
            return 1.0
        return float(1.0 - token_cosines(tokens, prev).mean())

    def snapshot(self) -> Novelty:
        return replace(self)
