"""Per-stream feature cache of the encoder: do not pay for what did not change.

Per frame, in order:

1. frame skipping: the preprocessed frame is cut into the token grid's patches; a patch
   changed when its mean absolute pixel difference against the *last encoded* frame is
   above `skip_patch_threshold`. With at most `skip_changed_fraction` of the patches
   changed, the vision model is not run: the frame is published as unchanged (no tokens,
   its novelty = the changed fraction).
2. token drop (TimeChat-Online's Differential Token Drop, feature mode): after encoding,
   a token whose cosine with the cached token of the same grid position is above
   `drop_threshold` is not published; the kept mask says which positions were.
3. token budget (STC-Pruner's idea): at most `max_tokens_per_frame` tokens, the most novel
   (lowest cosine with the cache; for a stream's first frame, with the frame's mean token).

The cache holds, per grid position, the token the LLM last received there, so what the
LLM sees at a position is always the cache. Every `refresh_frames`-th frame is encoded
and published whole, so the cache never drifts for long. Numpy only: the encoder service
does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from livelens.config import FeatureCacheConfig
from services.encoder.novelty import token_cosines


@dataclass
class FrameDecision:
    """What to do with one frame, before the vision model (`encode`) and after (`kept`)."""

    encode: bool
    changed_fraction: float  # of patches, against the last encoded frame
    reason: str  # "first", "refresh", "changed", "unchanged"


@dataclass
class CacheStats:
    frames: int = 0
    skipped: int = 0
    tokens_total: int = 0  # grid positions of every frame
    tokens_published: int = 0

    @property
    def tokens_dropped(self) -> float:
        return 1.0 - self.tokens_published / self.tokens_total if self.tokens_total else 0.0


def patch_differences(a: np.ndarray, b: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Mean absolute difference per patch [grid_h, grid_w] of two images [C, H, W] (any scale)."""
    c, h, w = a.shape
    ph, pw = h // grid_h, w // grid_w
    d = np.abs(a[:, :ph * grid_h, :pw * grid_w].astype(np.float32) - b[:, :ph * grid_h, :pw * grid_w])
    return d.reshape(c, grid_h, ph, grid_w, pw).mean(axis=(0, 2, 4))


@dataclass
class StreamCache:
    cfg: FeatureCacheConfig
    grid_h: int = 0  # learned from the first encoded frame
    grid_w: int = 0
    pixels: np.ndarray | None = None  # the last encoded frame, [C, H, W] in 0..1
    tokens: np.ndarray | None = None  # what the LLM last received per position [T, H] (float32)
    since_refresh: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    def decide(self, pixels01: np.ndarray) -> FrameDecision:
        """Level 1. `pixels01`: the frame as the vision model gets it, scaled to 0..1."""
        self.stats.frames += 1
        if self.pixels is None:
            decision = FrameDecision(True, 1.0, "first")
        else:
            grid = self.grid_h or 7  # before the first frame's tokens are back: the usual 7x7
            changed = float((patch_differences(pixels01, self.pixels, grid, self.grid_w or grid)
                             > self.cfg.skip_patch_threshold).mean())
            if self.since_refresh + 1 >= self.cfg.refresh_frames:
                decision = FrameDecision(True, changed, "refresh")
            elif self.cfg.skip_frames and changed <= self.cfg.skip_changed_fraction:
                self.since_refresh += 1
                self.stats.skipped += 1
                return FrameDecision(False, changed, "unchanged")
            else:
                decision = FrameDecision(True, changed, "changed")
        # The reference is the last frame *sent* to the model: a later frame of the same
        # poll is compared with it before its tokens are back.
        self.pixels = pixels01
        self.since_refresh = 0 if decision.reason in ("first", "refresh") else self.since_refresh + 1
        return decision

    def unchanged(self) -> int:
        """Account for a skipped frame once the grid is known; returns the grid size."""
        self.stats.tokens_total += self.grid_h * self.grid_w
        return self.grid_h * self.grid_w

    def kept(self, decision: FrameDecision, pixels01: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Levels 2 and 4 for an encoded frame: the kept mask [T]; updates the cache."""
        t = tokens.astype(np.float32)
        if not self.grid_h:
            side = int(round(t.shape[0] ** 0.5))
            self.grid_h, self.grid_w = (side, t.shape[0] // side) if side * (t.shape[0] // side) == t.shape[0] \
                else (1, t.shape[0])
        whole = decision.reason in ("first", "refresh")
        if whole or self.tokens is None:
            kept = np.ones(t.shape[0], bool)
            novelty = 1.0 - token_cosines(t, t.mean(0, keepdims=True))  # STC-Pruner: unlike the frame mean
        else:
            novelty = 1.0 - token_cosines(t, self.tokens)
            kept = novelty >= 1.0 - self.cfg.drop_threshold if self.cfg.drop_tokens else np.ones(t.shape[0], bool)
        budget = self.cfg.max_tokens_per_frame
        if budget and int(kept.sum()) > budget and not whole:
            order = np.argsort(-np.where(kept, novelty, -np.inf), kind="stable")
            kept = np.zeros_like(kept)
            kept[order[:budget]] = True
        if self.tokens is None:
            self.tokens = t.copy()
        self.tokens[kept] = t[kept]
        self.stats.tokens_total += int(kept.size)
        self.stats.tokens_published += int(kept.sum())
        return kept


class FeatureCache:
    """The stream caches of one encoder replica. A stream's cache lives with the replica that
    owns its partition; after a rebalance the new owner starts it empty (one full encode)."""

    def __init__(self, cfg: FeatureCacheConfig) -> None:
        self.cfg = cfg
        self.streams: dict[str, StreamCache] = {}

    def stream(self, stream_id: str) -> StreamCache:
        cache = self.streams.get(stream_id)
        if cache is None:
            cache = self.streams[stream_id] = StreamCache(self.cfg)
        return cache

    def forget(self, stream_id: str) -> None:
        self.streams.pop(stream_id, None)

    def total(self) -> CacheStats:
        out = CacheStats()
        for c in self.streams.values():
            out.frames += c.stats.frames
            out.skipped += c.stats.skipped
            out.tokens_total += c.stats.tokens_total
            out.tokens_published += c.stats.tokens_published
        return out
