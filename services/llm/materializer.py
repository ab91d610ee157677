"""Materializers: how a composed context reaches the engine. One interface, two ways:

- `RecomputeMaterializer`: a `prompt_embeds` request of the whole composed context for
  every question; vLLM's prefix cache keeps the stable head (system prompt + sink).
- `StreamingKVMaterializer`: each frame is prefilled once, when it arrives, attending to
  the head, the sink and the window before it; our KV connector (`services.llm.kv`) saves
  the frame's KV as a segment. A question then loads head + sink + retrieved + window from
  those segments (keys re-rotated to their new positions by the connector) and only the
  tail (dialogue and question) is computed.

Segment ids are chosen here: `head-<hash of the system prompt>` and `<stream tag>-<seq>`,
with a per-process nonce in the stream tag so a reused stream id never meets old KV.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from livelens.config import LLMConfig
from services.llm.context import Block, ComposedContext, FrameSegment, StreamContext, frame_block, head_block
from services.llm.embedder import ContextEmbedder
from services.llm.engine import Delta, VllmEngine
from services.llm.kv.store import SegmentStore

log = logging.getLogger("livelens.llm.materializer")


class Materializer(Protocol):
    def frame_added(self, ctx: StreamContext, frame: FrameSegment) -> None:
        """A frame entered `ctx` (after `ctx.add_frame`)."""

    def frames_evicted(self, stream_id: str, index: int, frames: list[FrameSegment]) -> None:
        """Frames left the window as stored segment `index`."""

    def ready_seq(self, ctx: StreamContext) -> int:
        """The newest frame a question can use at full speed."""
        ...

    def generate(self, composed: ComposedContext, request_id: str, max_tokens: int,
                 logprobs: int | None = None) -> AsyncIterator[Delta]:
        ...

    def drop_stream(self, stream_id: str) -> None:
        ...


@dataclass
class RecomputeMaterializer:
    # None: frames only (benchmarks of retrieval and memory, tests): no question is answered.
    engine: VllmEngine | None
    embedder: ContextEmbedder
    # On an engine shared with the streaming-KV path: blocks whose KV the connector loaded
    # (computed with another context before them) are in vLLM's prefix cache under the
    # hash of this context's embeddings; a salt keeps recompute from ever hitting them.
    cache_salt: str | None = None

    def frame_added(self, ctx: StreamContext, frame: FrameSegment) -> None:
        return

    def frames_evicted(self, stream_id: str, index: int, frames: list[FrameSegment]) -> None:
        return

    def ready_seq(self, ctx: StreamContext) -> int:
        return ctx.last_seq

    def generate(self, composed: ComposedContext, request_id: str, max_tokens: int,
                 logprobs: int | None = None) -> AsyncIterator[Delta]:
        if self.engine is None:
            raise RuntimeError(f"question {request_id}: this recompute materializer has no engine: frames only")
        return self.engine.generate(self.embedder.embed(composed), request_id, max_tokens, logprobs=logprobs,
                                    cache_salt=self.cache_salt)

    def drop_stream(self, stream_id: str) -> None:
        return


@dataclass
class KVStats:
    frames_ingested: int = 0
    ingest_requests: int = 0
    ingest_errors: int = 0
    ingest_s: float = 0.0
    questions_loaded_tokens: int = 0
    questions_computed_tokens: int = 0
    kv_misses: int = 0  # a question or ingest found a block without stored KV (computed instead)
    disk_bytes: int = 0
    deleted: int = 0


@dataclass
class _Pending:
    frame: FrameSegment
    preceding: list[FrameSegment]  # sink + window before the frame, when it arrived


@dataclass
class _StreamKV:
    tag: str
    queue: deque[_Pending] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    ingested_seq: int = -1
    sink: set[int] = field(default_factory=set)  # seqs whose KV is never deleted
    evicted_through: int = -1  # frames up to this seq (but the sink) have left the window
    chunks: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)  # stored chunk -> its frames' seqs
    # seq -> the frame's mean pre-RoPE keys [layers, kv_heads * head_dim] (from its saved KV)
    frame_keys: dict[int, np.ndarray] = field(default_factory=dict)
    # this stream's deletable frame ids, least recently used first (as in the global order)
    evictable: OrderedDict[str, None] = field(default_factory=OrderedDict)


class StreamingKVMaterializer:
    MAX_INGEST_BATCH = 8  # frames prefilled together when ingest falls behind

    def __init__(self, engine: VllmEngine, embedder: ContextEmbedder, cfg: LLMConfig) -> None:
        if engine.kv_store_dir is None:
            raise ValueError("the streaming-KV materializer needs an engine started with the KV connector")
        self.engine = engine
        self.embedder = embedder
        self.cfg = cfg
        self.store = SegmentStore(engine.kv_store_dir)  # read side: metadata, deletion
        self.head = head_block(cfg.system_prompt)
        self.head_id = "head-" + hashlib.sha256(cfg.system_prompt.encode()).hexdigest()[:16]
        self.nonce = uuid.uuid4().hex[:8]
        self.streams: dict[str, _StreamKV] = {}
        self.saved: dict[str, int] = {}  # segment id -> bytes on disk
        # ids of stored frames out of the window, least recently used first
        # every stream's deletable frame ids, least recently used first -> their stream
        self.evictable: OrderedDict[str, _StreamKV] = OrderedDict()
        self.stats = KVStats()

    # --- ids -------------------------------------------------------------------------
    def _stream(self, stream_id: str) -> _StreamKV:
        s = self.streams.get(stream_id)
        if s is None:
            tag = "s" + hashlib.sha256(f"{self.nonce}/{stream_id}".encode()).hexdigest()[:20]
            s = self.streams[stream_id] = _StreamKV(tag)
        return s

    def frame_id(self, stream_id: str, seq: int) -> str:
        return f"{self._stream(stream_id).tag}-{seq}"

    def block_id(self, stream_id: str, block: Block) -> str:
        return self.head_id if block.frame is None else self.frame_id(stream_id, block.frame.seq)

    # --- ingest ----------------------------------------------------------------------
    def frame_added(self, ctx: StreamContext, frame: FrameSegment) -> None:
        s = self._stream(ctx.stream_id)
        if any(f is frame for f in ctx.sink):
            s.sink.add(frame.seq)
        s.queue.append(_Pending(frame, ctx.preceding()))
        if s.task is None or s.task.done():
            s.task = asyncio.get_running_loop().create_task(self._ingest_loop(ctx.stream_id, s))

    async def _ingest_loop(self, stream_id: str, s: _StreamKV) -> None:
        while s.queue:
            batch = [s.queue.popleft()]
            while s.queue and len(batch) < self.MAX_INGEST_BATCH:
                batch.append(s.queue.popleft())
            try:
                await self._ingest(stream_id, batch)
            except Exception:  # noqa: BLE001 - a failed ingest costs speed, not answers
                self.stats.ingest_errors += 1
                log.exception("stream %s: prefill of frames %d..%d failed; questions will compute them",
                              stream_id, batch[0].frame.seq, batch[-1].frame.seq)
            s.ingested_seq = batch[-1].frame.seq

    async def _ingest(self, stream_id: str, batch: list[_Pending]) -> None:
        """One engine request: [head][frames the first one attended to][the new frames],
        loading what is stored and saving every block that is not."""
        blocks = [self.head, *map(frame_block, batch[0].preceding), *(frame_block(p.frame) for p in batch)]
        load, save = self._plan(stream_id, blocks, save_missing=True)
        embeds = self.embedder.embed(ComposedContext(blocks))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async for _ in self.engine.generate(embeds, f"ingest-{uuid.uuid4().hex[:12]}", 1,
                                            kv_transfer_params={"load": load, "save": save}):
            pass
        self.stats.ingest_s += loop.time() - t0
        self.stats.ingest_requests += 1
        self.stats.frames_ingested += len(batch)
        s = self._stream(stream_id)
        for spec in save:
            self._saved(spec["id"], s)
        self._enforce_budget(s)

    def _plan(self, stream_id: str, blocks: list[Block], save_missing: bool) -> tuple[list[dict], list[dict]]:
        """Load: the longest run of stored blocks from the first one (vLLM takes external KV
        only as a prefix). Save (ingest): every block without stored KV."""
        load: list[dict] = []
        save: list[dict] = []
        start = 0
        prefix = True
        for block in blocks:
            n = self.embedder.block_tokens(block)
            seg_id = self.block_id(stream_id, block)
            if seg_id in self.saved:
                if prefix:
                    load.append({"id": seg_id})
            else:
                self.stats.kv_misses += int(prefix and not save_missing)
                prefix = False
                if save_missing:
                    save.append({"id": seg_id, "start": start, "num_tokens": n})
            start += n
        return load, save

    def _saved(self, seg_id: str, s: _StreamKV) -> None:
        summary = self.store.summary(seg_id)
        if summary is None:  # the engine did not write it (e.g. the request was cut short)
            return
        self.saved[seg_id] = int(summary.get("bytes", 0))
        self.stats.disk_bytes += self.saved[seg_id]
        if seg_id == self.head_id:
            return
        seq = int(seg_id.rsplit("-", 1)[1])
        if seq <= s.evicted_through and seq not in s.sink:  # prefilled after it left the window
            self._evictable(seg_id, s)
        means = summary.get("mean_keys") or {}
        if all(str(i) in means for i in self.cfg.retrieve_layers):
            s.frame_keys[seq] = np.stack([np.asarray(means[str(i)], np.float32).reshape(-1)
                                          for i in self.cfg.retrieve_layers])

    def frames_evicted(self, stream_id: str, index: int, frames: list[FrameSegment]) -> None:
        s = self._stream(stream_id)
        s.chunks[index] = [f.seq for f in frames]
        s.evicted_through = max(s.evicted_through, frames[-1].seq)
        for f in frames:
            seg_id = self.frame_id(stream_id, f.seq)
            if f.seq not in s.sink and seg_id in self.saved:  # else: when its prefill saves it
                self._evictable(seg_id, s)
        while len(s.chunks) > self.cfg.retention_segments:
            for seq in s.chunks.popitem(last=False)[1]:
                s.frame_keys.pop(seq, None)
        self._enforce_budget(s)

    def _evictable(self, seg_id: str, s: _StreamKV) -> None:
        self.evictable[seg_id] = s
        s.evictable[seg_id] = None

    def _used(self, seg_id: str) -> None:
        """A stored frame was loaded: it leaves the disk after the ones not used since."""
        owner = self.evictable.get(seg_id)
        if owner is not None:
            self.evictable.move_to_end(seg_id)
            owner.evictable.move_to_end(seg_id)

    def _enforce_budget(self, s: _StreamKV) -> None:
        """The stream's retention (its least recently used frames first), then the disk budget
        over all streams. Constant work per deleted frame, whatever is stored."""
        budget = int(self.cfg.kv_disk_mb * 2**20)
        retained = self.cfg.retention_segments * self.cfg.chunk_frames
        while len(s.evictable) > retained:
            self._delete(next(iter(s.evictable)))
        while self.stats.disk_bytes > budget and self.evictable:
            self._delete(next(iter(self.evictable)))

    def _delete(self, seg_id: str) -> None:
        owner = self.evictable.pop(seg_id, None)
        if owner is not None:
            owner.evictable.pop(seg_id, None)
        self.stats.disk_bytes -= self.saved.pop(seg_id, 0)
        self.stats.deleted += 1
        self.store.delete(seg_id)

    def ready_seq(self, ctx: StreamContext) -> int:
        s = self._stream(ctx.stream_id)
        if not s.queue and (s.task is None or s.task.done()):
            return ctx.last_seq  # nothing pending (frames after the last prefill were unchanged)
        return s.ingested_seq

    # --- questions -------------------------------------------------------------------
    def question_keys(self, stream_id: str) -> tuple[list[int], np.ndarray]:
        """(chunk indices in time order, their keys [n, layers, kv_heads * head_dim])."""
        s = self.streams.get(stream_id)
        indices: list[int] = []
        keys: list[np.ndarray] = []
        for index, seqs in (s.chunks.items() if s is not None else ()):
            if s is not None and all(seq in s.frame_keys for seq in seqs):  # else: not prefilled (yet)
                indices.append(index)
                keys.append(np.mean([s.frame_keys[seq] for seq in seqs], axis=0))
        if not keys:
            return [], np.zeros((0, 0, 0), np.float32)
        return indices, np.stack(keys)

    async def generate(self, composed: ComposedContext, request_id: str, max_tokens: int,
                       logprobs: int | None = None) -> AsyncIterator[Delta]:
        stream_id = composed.stream_id
        load, _ = self._plan(stream_id, composed.blocks[:-1], save_missing=False)
        for spec in load:  # least recently used leave the disk first: a retrieved frame is used
            self._used(spec["id"])
        embeds = self.embedder.embed(composed)
        loaded = sum(self.embedder.block_tokens(b) for b in composed.blocks[:len(load)])
        self.stats.questions_loaded_tokens += loaded
        self.stats.questions_computed_tokens += int(embeds.shape[0]) - loaded
        async for delta in self.engine.generate(embeds, request_id, max_tokens,
                                                kv_transfer_params={"load": load} if load else None,
                                                logprobs=logprobs):
            yield delta

    def drop_stream(self, stream_id: str) -> None:
        s = self.streams.pop(stream_id, None)
        if s is None:
            return
        if s.task is not None:
            s.task.cancel()
        for seg_id in [i for i in self.saved if i.startswith(s.tag + "-")]:
            self._delete(seg_id)
