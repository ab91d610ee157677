"""Per-stream feature cache of the encoder: do not pay for what did not change.

Per frame, in order:

1. frame skipping: the preprocessed frame is cut into the token grid's patches; a patch
   changed when its mean absolute pixel difference against the *last encoded* frame is
   above `skip_patch_threshold`. With at most `skip_changed_fraction` of the patches
   changed, the vision model is not run: the frame is published as unchanged (no tokens,
   its novelty = the changed fraction).
   For a ViT served with partial recompute (level 3, STC-Cacher), an encoded frame lists
   the patches to recompute: those above `recompute_patch_threshold`; with more than
   `recompute_max_fraction` of them changed, the whole frame is encoded. The ViT's cache
   (keys and values of every layer, and its last tokens) is the stream's `vit_state`.
2. token drop (TimeChat-Online's Differential Token Drop, feature mode): after encoding,
   a token whose cosine with the cached token of the same grid position is above
   `drop_threshold` is not published; the kept mask says which positions were.
3. token budget (STC-Pruner's idea): at most `max_tokens_per_frame` tokens, the most novel
   (lowest cosine with the cache; for a stream's first frame, with the frame's mean token).

The cache holds, per grid position, the token the LLM last received there, so what the
LLM sees at a position is always the cache. Every `refresh_frames`-th frame is encoded
and published whole, so the cache never drifts for long. Numpy only: the encoder service
does not import torch.

A `StreamCache` is one stream's; it lives in the stream's state (`streams.EncoderStream`),
with the replica that owns the stream's partition.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from livelens.config import FeatureCacheConfig
from services.encoder.grid import UNKNOWN, Grid
from services.encoder.novelty import token_cosines


@dataclass
class FrameDecision:
    """What to do with one frame, before the vision model (`encode`) and after (`kept`)."""

    encode: bool
    changed_fraction: float  # of patches, against the last encoded frame
    reason: str  # "first", "refresh", "changed", "partial", "unchanged"
    recompute: np.ndarray | None = None  # "partial": the patches (row-major) the ViT recomputes


@dataclass(frozen=True)
class ViTState:
    """The ViT's per-stream cache after a frame (replaced whole, never mutated): what the
    model needs to recompute some patches of the next one, and its last tokens."""

    keys: np.ndarray  # [layers, patches, width]
    values: np.ndarray  # [layers, patches, width]
    tokens: np.ndarray  # [patches, out]

    def updated(self, index: np.ndarray, tokens: np.ndarray, keys: np.ndarray, values: np.ndarray) -> ViTState:
        """A copy with the rows of the patches `index` replaced (tokens [K, out]; keys and
        values [K, layers, width], as the model returns them)."""
        out = ViTState(self.keys.copy(), self.values.copy(), self.tokens.copy())
        out.keys[:, index] = keys.transpose(1, 0, 2)
        out.values[:, index] = values.transpose(1, 0, 2)
        out.tokens[index] = tokens
        return out


@dataclass
class CacheStats:
    frames: int = 0
    skipped: int = 0
    tokens_total: int = 0  # grid positions of every frame
    tokens_published: int = 0
    patches_computed: int = 0  # patches the vision model computed (a whole frame: all of them)

    @property
    def compute_saved(self) -> float:
        """Of the vision model's work on every patch of every frame: the fraction not done."""
        return 1.0 - self.patches_computed / self.tokens_total if self.tokens_total else 0.0

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
    grid: Grid = UNKNOWN  # the served model's; else learned from the first encoded frame
    pixels: np.ndarray | None = None  # the last encoded frame, [C, H, W] in 0..1
    tokens: np.ndarray | None = None  # what the LLM last received per position [T, H] (float32)
    vit_state: ViTState | None = None  # level 3: the ViT's cache after the last encoded frame
    since_refresh: int = 0
    stats: CacheStats = field(default_factory=CacheStats)

    def decide(self, pixels01: np.ndarray, partial: bool = False) -> FrameDecision:
        """Levels 1 and 3. `pixels01`: the frame as the vision model gets it, scaled to 0..1;
        `partial`: the model recomputes chosen patches (a ViT with a cache)."""
        self.stats.frames += 1
        if self.pixels is None:
            decision = FrameDecision(True, 1.0, "first")
        else:
            diff = patch_differences(pixels01, self.pixels, *self._grid()).ravel()
            changed = float((diff > self.cfg.skip_patch_threshold).mean())
            if self.since_refresh + 1 >= self.cfg.refresh_frames:
                decision = FrameDecision(True, changed, "refresh")
            elif self.cfg.skip_frames and changed <= self.cfg.skip_changed_fraction:
                self.since_refresh += 1
                self.stats.skipped += 1
                return FrameDecision(False, changed, "unchanged")
            elif partial and self.cfg.partial_recompute and \
                    float((diff > self.cfg.recompute_patch_threshold).mean()) <= self.cfg.recompute_max_fraction:
                # At least the most changed patch: a frame that is encoded recomputes something.
                index = np.flatnonzero(diff > self.cfg.recompute_patch_threshold)
                decision = FrameDecision(True, changed, "partial",
                                         index if index.size else np.array([int(diff.argmax())]))
            else:
                decision = FrameDecision(True, changed, "changed")
        # The reference is the last frame *sent* to the model: a later frame of the same
        # poll is compared with it before its tokens are back. A partial recompute keeps the
        # old pixels of the patches it did not recompute, so the small changes they had add
        # up until they cross the threshold.
        if decision.recompute is not None and self.pixels is not None:
            self.pixels = self._blend(pixels01, decision.recompute)
        else:
            self.pixels = pixels01
        self.since_refresh = 0 if decision.reason in ("first", "refresh") else self.since_refresh + 1
        return decision

    def _grid(self) -> tuple[int, int]:
        """The token grid; before the first frame's tokens are back (and the model did not
        say), the usual 7x7."""
        return (self.grid.h, self.grid.w) if self.grid.known else (7, 7)

    def _blend(self, pixels01: np.ndarray, index: np.ndarray) -> np.ndarray:
        assert self.pixels is not None
        c, h, w = pixels01.shape
        gh, gw = self._grid()
        ph, pw = h // gh, w // gw
        out = self.pixels.copy()
        for i in index.tolist():
            y, x = divmod(i, gw)
            out[:, y * ph:(y + 1) * ph, x * pw:(x + 1) * pw] = pixels01[:, y * ph:(y + 1) * ph, x * pw:(x + 1) * pw]
        return out

    def snapshot(self) -> StreamCache:
        """A copy to restore after a failed model call (arrays replaced whole are shared)."""
        return replace(self, tokens=None if self.tokens is None else self.tokens.copy(),
                       stats=replace(self.stats))

    def unchanged(self) -> int:
        """Account for a skipped frame once the grid is known; returns the grid size."""
        self.stats.tokens_total += self.grid.size
        return self.grid.size

    @property
    def hidden(self) -> int:
        """The tokens' width, once a frame's are back (else 0)."""
        return self.tokens.shape[1] if self.tokens is not None else 0

    def kept(self, decision: FrameDecision, tokens: np.ndarray) -> np.ndarray:
        """Levels 2 and 4 for an encoded frame: the kept mask [T]; updates the cache."""
        t = tokens.astype(np.float32)
        if not self.grid.known:
            self.grid = Grid.of(t.shape[0])
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
        self.stats.patches_computed += int(kept.size) if decision.recompute is None else int(decision.recompute.size)
        return kept
