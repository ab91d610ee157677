"""The engine-cache materializer's requests, against a stand-in engine with vLLM's prefix-cache
rule (whole blocks, hashed in a chain over the prompt's embeddings; at most prompt - 1 tokens
from the cache): what each frame's prefill sends and computes, the cut at a block boundary,
slides, a rebuild, held frames, and a prefix evicted by other streams counted as a miss.
(The real engine: tests/test_engine_cache.py; through the stack: test_engine_cache_stack.py.)"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np
import pytest
import torch

from livelens.config import LivelensConfig, with_settings
from services.llm.context import frame_block
from services.llm.engine import Delta
from services.llm.engine_cache import EngineCacheMaterializer
from services.llm.prompt_compute import PromptCompute
from services.llm.resources import frames_only_resources
from services.llm.stream import Stream

BLOCK = 32


class PrefixCacheEngine:
    """Serves 1-token requests as vLLM's prefix cache would count them."""

    def __init__(self) -> None:
        self.blocks: set[str] = set()
        self.requests: list[tuple[int, int]] = []  # (prompt tokens, cached tokens)

    def _hashes(self, embeds: torch.Tensor) -> list[str]:
        out, parent = [], ""
        for i in range(embeds.shape[0] // BLOCK):
            block = embeds[i * BLOCK:(i + 1) * BLOCK].float().numpy().tobytes()
            parent = hashlib.sha256(parent.encode() + block).hexdigest()
            out.append(parent)
        return out

    async def generate(self, embeds: torch.Tensor, request_id: str, max_tokens: int, **_: object
                       ) -> AsyncIterator[Delta]:
        hashes = self._hashes(embeds)
        hit = 0
        for h in hashes[:(embeds.shape[0] - 1) // BLOCK]:
            if h not in self.blocks:
                break
            hit += 1
        self.blocks.update(hashes)
        self.requests.append((int(embeds.shape[0]), hit * BLOCK))
        yield Delta("x", True, 0.0, 1, [0], hit * BLOCK)


def stream_on(engine: PrefixCacheEngine, **settings: object) -> Stream:
    cfg = with_settings(LivelensConfig(), {
        "llm.context.materializer": "engine_cache",
        "llm.context.sink_frames": 1,
        "llm.context.window_frames": 4,
        "llm.engine.block_size": BLOCK,
        "llm.backpressure.max_prefill_batch_frames": 1,
        **settings,
    })  # type: ignore[arg-type]
    try:
        res = frames_only_resources(cfg)
    except FileNotFoundError:
        pytest.skip("LLM not built (make models)")
    materializer = EngineCacheMaterializer(engine, res.embedder, cfg.llm)  # type: ignore[arg-type]
    return Stream("t/cam", replace(res, materializer=materializer))


def feed(stream: Stream, seqs: range, rng: np.random.Generator) -> None:
    for seq in seqs:
        stream.add(seq, seq * 0.5, rng.standard_normal((49, 576)).astype(np.float16), np.ones(49, bool))


async def settle(stream: Stream) -> None:
    while not stream.ready(stream.context.last_seq):
        await asyncio.sleep(0.001)


def test_each_frame_is_computed_once_and_a_slide_recomputes_what_is_left() -> None:
    async def run() -> tuple[Stream, PrefixCacheEngine, list[int]]:
        engine, rng = PrefixCacheEngine(), np.random.default_rng(0)
        stream = stream_on(engine)
        sizes = []
        for seq in range(12):  # one at a time: each prefilled before the next arrives
            feed(stream, range(seq, seq + 1), rng)
            await settle(stream)
            sizes.append(len(stream.context.window))
        return stream, engine, sizes

    stream, engine, sizes = asyncio.run(run())
    # window 4, slide 3 (3/4): it holds 2 to 4 frames after the sink
    assert sizes == [0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2]
    assert len(engine.requests) == 12
    # every request is cut one token past its last whole block, and computes only what the
    # one before did not leave cached (its new frame; the slides: what is left of the window)
    assert all(sent % BLOCK == 1 for sent, _ in engine.requests)
    one = stream.res.embedder.block_tokens(frame_block(stream.context.window[-1]))  # ~64 tokens a frame
    computed = [sent - cached for sent, cached in engine.requests]
    slides = [i for i in range(1, 12) if sizes[i] < sizes[i - 1]]
    assert slides == [5, 8, 11]
    steady = [computed[i] for i in range(1, 12) if i not in slides]
    # whole blocks between the last request's boundary and this one's, and the one token past
    assert all(n % BLOCK == 1 and n <= one + BLOCK + 1 for n in steady), computed
    assert all(computed[i] > max(steady) for i in slides), computed  # the frame left is computed again
    frame = stream.compute.spent["frame"]
    assert frame.items == 12 and frame.computed_tokens == sum(computed)
    assert frame.computed_tokens / frame.items <= 1.5 * one
    assert stream.compute.prefix_misses == 0


def test_frames_that_left_the_window_before_their_prefill_are_skipped_and_a_rebuild_prefills_the_window() -> None:
    async def run() -> tuple[Stream, EngineCacheMaterializer]:
        engine, rng = PrefixCacheEngine(), np.random.default_rng(1)
        stream = stream_on(engine)
        feed(stream, range(10), rng)  # a burst: the window slides twice before prefill catches up
        await settle(stream)
        m = stream.res.materializer
        assert isinstance(m, EngineCacheMaterializer)
        return stream, m

    stream, m = asyncio.run(run())
    assert m.stats.frames_skipped > 0
    assert m.stats.frames_ingested + m.stats.frames_skipped == 10
    assert stream.ready(9)

    async def rebuild() -> int:
        engine = PrefixCacheEngine()
        fresh = EngineCacheMaterializer(engine, m.embedder, m.cfg)  # type: ignore[arg-type]
        fresh.rebuilt(stream.context, stream.kv, [], compute=PromptCompute())
        while not fresh.ready_seq(stream.context) >= stream.context.last_seq:
            await asyncio.sleep(0.001)
        return fresh.stats.frames_ingested

    assert asyncio.run(rebuild()) == len(stream.context.sink) + len(stream.context.window)


def test_a_prefix_evicted_by_other_streams_is_counted_as_a_miss() -> None:
    async def run() -> Stream:
        engine, rng = PrefixCacheEngine(), np.random.default_rng(2)
        stream = stream_on(engine)
        feed(stream, range(3), rng)
        await settle(stream)
        engine.blocks.clear()  # the LRU gave the stream's pages to other streams
        feed(stream, range(3, 4), rng)
        await settle(stream)
        return stream

    stream = asyncio.run(run())
    assert stream.compute.prefix_misses == 1


def test_held_frames_go_in_with_the_next_prefill() -> None:
    async def run() -> list[str]:
        engine, rng = PrefixCacheEngine(), np.random.default_rng(3)
        stream = stream_on(engine)
        taken: list[str] = []
        feed(stream, range(1), rng)
        stream.res.materializer.hold(stream.stream_id, lambda: taken.append("held"))
        await settle(stream)
        while stream.res.materializer.backlog_s(stream.stream_id):
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        return taken

    assert asyncio.run(run()) == ["held"]
