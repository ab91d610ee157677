"""The KV connector's segment store and its RAM arena (services.llm.kv.store, .arena): the
cache is reserved up front, serves exactly what was saved, and stays inside its budget."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from livelens.config import REPO_ROOT
from services.llm.kv.arena import ALIGN, RamArena
from services.llm.kv.store import SegmentStore


def test_arena_is_resident_when_made() -> None:
    """In a process of its own: in a long one (pytest's), freed memory that is still resident
    can be reused, and RSS would not show the arena."""
    probe = ("import psutil; from services.llm.kv.arena import RamArena; p = psutil.Process(); "
             "before = p.memory_info().rss; a = RamArena(64 * 2**20); "
             "print((p.memory_info().rss - before) / a.capacity)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    share = float(out.stdout.strip())
    assert share >= 0.9, f"RSS grew by {share:.0%} of a 64 MB arena"


def test_arena_spans_merge_back_into_one() -> None:
    arena = RamArena(10 * ALIGN)
    spans = [arena.alloc(ALIGN) for _ in range(10)]
    assert None not in spans and len(set(spans)) == 10
    assert arena.alloc(1) is None  # full
    for start in spans[1::2] + spans[0::2]:  # every other first: merges with both neighbours
        assert start is not None
        arena.free(start, ALIGN)
    assert arena.free_bytes == arena.capacity
    assert arena.alloc(arena.capacity) == 0  # one span again, not ten


def test_arena_rounds_up_to_alignment() -> None:
    arena = RamArena(4 * ALIGN)
    a, b = arena.alloc(1), arena.alloc(ALIGN + 1)
    assert (a, b) == (0, ALIGN)
    assert arena.free_bytes == ALIGN and b is not None
    assert arena.view(b, torch.zeros(3, dtype=torch.float64)).data_ptr() % ALIGN == 0


def _layers(n_tokens: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.attn": (torch.randn(n_tokens, 2, 8, generator=g),
                                                 torch.randn(n_tokens, 2, 8, generator=g)) for i in range(2)}


def test_store_serves_saved_segments_from_its_arena_within_budget(tmp_path) -> None:
    one = 2 * 2 * 16 * 2 * 8 * 4  # 16 tokens: 2 layers × (k, v) × 16 × 2 heads × 8 dims × float32
    store = SegmentStore(tmp_path, torch.float32, ram_bytes=6 * one)
    rng = random.Random(0)
    saved: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for i in range(200):  # sizes 4 to 40 tokens: the arena fragments and evicts
        seg_id = f"s{rng.randrange(30)}"
        if seg_id not in saved or rng.random() < 0.3:
            saved[seg_id] = _layers(rng.randrange(4, 41), seed=i)
            store.save(seg_id, 0, saved[seg_id])
        got = store.load(seg_id)
        for name, (k, v) in saved[seg_id].items():
            assert torch.equal(got[f"{name}.k"], k) and torch.equal(got[f"{name}.v"], v)
        assert store.ram_used <= store.ram_bytes


def test_store_keeps_recent_segments_in_ram(tmp_path) -> None:
    store = SegmentStore(tmp_path, torch.float32, ram_bytes=2**20)
    layers = _layers(16, seed=1)
    store.save("recent", 0, layers)
    (tmp_path / "recent.safetensors").unlink()  # served from RAM, not disk
    name = "model.layers.0.self_attn.attn"
    assert torch.equal(store.load("recent")[f"{name}.k"], layers[name][0])
    store.delete("recent")
    assert store.ram_used == 0
    with pytest.raises(FileNotFoundError):
        store.load("recent")


def test_store_without_ram_keeps_nothing(tmp_path) -> None:
    store = SegmentStore(tmp_path, torch.float32)
    store.save("a", 0, _layers(4, seed=2))
    assert store.ram_used == 0
