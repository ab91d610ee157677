"""The LLM service's host memory stays flat while a stream grows to thousands of frames."""

import asyncio

import numpy as np
import pytest

from livelens.config import load_config, with_settings
from livelens.records import set_tokens
from livelens.v1 import messages_pb2 as pb
from services.llm.core import LLMCore
from services.llm.resources import frames_only_resources


def tokens_record(seq: int, rng: np.random.Generator) -> pb.TokensRecord:
    rec = pb.TokensRecord(stream_id="long", tenant="t", seq=seq, pts_s=seq * 0.5, grid_h=7, grid_w=7)
    set_tokens(rec, rng.standard_normal((49, 576)).astype(np.float16))
    return rec


def test_memory_flat_over_thousands_of_frames(tmp_path):
    cfg = with_settings(load_config(env={}), {"llm.store.segments_disk_dir": str(tmp_path),
                                              "llm.store.segments_ram_mb": 8, "llm.store.segments_disk_mb": 32})
    # Frames only, no question: a recompute materializer without an engine.
    res = frames_only_resources(cfg)
    store = res.store
    service = LLMCore(cfg, res)
    rng = np.random.default_rng(0)
    ram, disk = [], []
    for seq in range(4000):
        service.on_tokens(tokens_record(seq, rng))
        if seq % 250 == 249:
            ram.append(store.stats.ram_bytes)
            disk.append(store.stats.disk_bytes)
    ctx = service.streams["t/long"].context
    assert len(ctx.sink) == cfg.llm.context.sink_frames and len(ctx.window) == cfg.llm.context.window_frames
    assert max(ram) <= 8 * 2**20 and max(disk) <= 32 * 2**20
    assert ram[-1] == ram[len(ram) // 2], "flat once the budget is reached"
    # a replayed record changes nothing
    before = (store.stats.ram_bytes, service.stats.frames)
    service.on_tokens(tokens_record(3999, rng))
    assert (store.stats.ram_bytes, service.stats.frames) == before
    assert service.stats.duplicates == 1
    # a question cannot be answered without an engine: said clearly, not an AttributeError
    composed = service.streams["t/long"].compose("What now?", 8)

    async def answer() -> None:
        async for _ in composed.generate("q", 8):
            pass

    with pytest.raises(RuntimeError, match="has no engine: frames only"):
        asyncio.run(answer())
    store.close()
    assert not list(tmp_path.rglob("*.seg"))
