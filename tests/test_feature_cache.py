"""The encoder's per-stream feature cache on crafted frames: identical, one patch changed,
a scene cut; token drop, the token budget and the periodic refresh."""

from __future__ import annotations

import numpy as np

from livelens.config import FeatureCacheConfig
from services.encoder.feature_cache import StreamCache, patch_differences

GRID, SIZE, HID = 7, 224, 16


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((3, SIZE, SIZE), dtype=np.float32)


def tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).standard_normal((GRID * GRID, HID)).astype(np.float32)


def test_patch_differences_locate_the_change() -> None:
    a = image(0)
    b = a.copy()
    b[:, 32:64, 96:128] += 0.5  # patch (1, 3)
    d = patch_differences(b, a, GRID, GRID)
    assert d.shape == (GRID, GRID) and np.argmax(d) == 1 * GRID + 3 and d[1, 3] == np.float32(0.5)
    assert np.count_nonzero(d) == 1


def test_identical_frame_skipped_one_patch_dropped_scene_cut_encoded() -> None:
    cache = StreamCache(FeatureCacheConfig(max_tokens_per_frame=0, refresh_frames=100))
    first = image(0)
    d = cache.decide(first)
    assert (d.encode, d.reason) == (True, "first")
    t0 = tokens(0)
    assert cache.kept(d, t0).all()  # a stream's first frame goes out whole

    d = cache.decide(first.copy())  # identical
    assert (d.encode, d.reason, d.changed_fraction) == (False, "unchanged", 0.0)

    moved = first.copy()
    moved[:, 0:32, 0:32] = 1.0 - moved[:, 0:32, 0:32]  # patch (0, 0) and 2 more changed
    moved[:, 64:96, 64:128] = 0.0
    d = cache.decide(moved)
    assert d.encode and d.reason == "changed" and d.changed_fraction == 3 / 49
    t1 = t0.copy()
    t1[[0, 2 * GRID + 2, 2 * GRID + 3]] = tokens(1)[:3]  # the changed patches' tokens differ
    kept = cache.kept(d, t1)
    assert sorted(np.flatnonzero(kept)) == [0, 2 * GRID + 2, 2 * GRID + 3]  # the rest dropped

    cut = image(7)  # scene cut: every patch changed, every token differs
    d = cache.decide(cut)
    assert d.encode and d.changed_fraction == 1.0
    assert cache.kept(d, tokens(2)).all()
    assert cache.stats.skipped == 1 and cache.stats.frames == 4


def test_token_budget_keeps_the_most_novel() -> None:
    cache = StreamCache(FeatureCacheConfig(max_tokens_per_frame=5, refresh_frames=100))
    d = cache.decide(image(0))
    t0 = tokens(0)
    cache.kept(d, t0)
    t1 = t0.copy()
    rng = np.random.default_rng(5)
    novel = [3, 11, 17, 20, 30, 40, 44, 48]
    for rank, pos in enumerate(novel):  # increasingly different from the cache: angle grows with rank
        u = rng.standard_normal(HID).astype(np.float32)
        a = t0[pos] / np.linalg.norm(t0[pos])
        u -= (u @ a) * a
        angle = 0.3 + 0.15 * rank
        t1[pos] = np.cos(angle) * a + np.sin(angle) * u / np.linalg.norm(u)
    d = cache.decide(image(9))
    kept = cache.kept(d, t1)
    assert int(kept.sum()) == 5 and set(np.flatnonzero(kept)) == set(novel[-5:])
    # what the LLM received is cached: dropped positions keep the older token
    assert cache.tokens is not None
    assert np.array_equal(cache.tokens[novel[0]], t0[novel[0]])
    assert np.array_equal(cache.tokens[novel[-1]], t1[novel[-1]])


def test_refresh_encodes_and_publishes_whole() -> None:
    cache = StreamCache(FeatureCacheConfig(refresh_frames=4))
    frame = image(0)
    reasons = []
    for _ in range(9):
        d = cache.decide(frame)
        reasons.append(d.reason)
        if d.encode:
            assert cache.kept(d, tokens(0)).all() or d.reason == "changed"
    assert reasons == ["first", "unchanged", "unchanged", "unchanged", "refresh",
                       "unchanged", "unchanged", "unchanged", "refresh"]
