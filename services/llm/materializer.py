"""Materializers: how a composed context reaches the engine. One interface, two ways:

- `RecomputeMaterializer`: a `prompt_embeds` request of the whole composed context for
  every question; vLLM's prefix cache keeps the stable head (system prompt + sink).
- `StreamingKVMaterializer`: each frame is prefilled once, when it arrives, attending to
  the head, the sink and the window before it; our KV connector (`services.llm.kv`) saves
  the frame's KV as a segment. A question then loads head + sink + retrieved + window from
  those segments (keys re-rotated to their new positions by the connector) and only the
  tail (dialogue and question) is computed.

Materializers hold no stream state of their own but the engine side (segment ids, frames
waiting for prefill): which stored KV a stream keeps is its `Stream`'s `KVLedger`, which
the streaming-KV materializer informs (saved, loaded) and obeys (deleted).

Segment ids are chosen here: `head-<hash of the system prompt>` and `<stream tag>-<seq>`,
with a per-process nonce in the stream tag so a reused stream id never meets old KV. A
stream's tag goes into its checkpoint: on a KV directory the replicas share
(`llm.store.kv_shared_dir`), a new owner keeps the tag and adopts the segments already there.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from livelens.config import LLMConfig
from services.common.model_spec import DEFAULT_CHAT, ChatLayout
from services.llm import metrics
from services.llm.context import (
    Block,
    ComposedContext,
    FrameSegment,
    StreamContext,
    TextPart,
    frame_block,
    head_block,
)
from services.llm.embedder import ContextEmbedder
from services.llm.engine import PREFILL_PRIORITY, Delta, VllmEngine
from services.llm.kv.store import SegmentStore
from services.llm.kv_ledger import KVDiskBudget, KVLedger
from services.llm.prefill_gate import PrefillGate, PrefillStats, waited_s
from services.llm.prompt_compute import PromptCompute

log = logging.getLogger("livelens.llm.materializer")


class Materializer(Protocol):
    # Where retrieved frames go: between the sink and the window (False), or after the
    # window (True: the window's prefix stays the same whatever a question retrieves).
    retrieved_after_window: bool

    def frame_added(self, ctx: StreamContext, frame: FrameSegment, kv: KVLedger,
                    compute: PromptCompute | None = None) -> None:
        """A frame entered `ctx` (after `ctx.add_frame`); `kv` is its stream's KV ledger,
        `compute` its account of what the engine computed (a prefill is recorded there)."""

    def frames_evicted(self, kv: KVLedger, index: int, frames: list[FrameSegment]) -> None:
        """Frames left the window as stored segment `index`."""

    def rebuilt(self, ctx: StreamContext, kv: KVLedger, stored: list[FrameSegment], kv_tag: str = "",
                compute: PromptCompute | None = None) -> None:
        """`ctx` was rebuilt from a replay of its tokens without this materializer (a new
        owner of the stream): make its sink and window ready for questions, and then its
        `stored` frames (the retained chunks). `kv_tag`: the last owner's (checkpoint)."""

    def kv_tag(self, stream_id: str) -> str:
        """What the stream's checkpoint carries for a new owner ("" : nothing)."""
        ...

    def ready_seq(self, ctx: StreamContext) -> int:
        """The newest frame a question can use at full speed."""
        ...

    def backlog_s(self, stream_id: str) -> float:
        """How long the stream's oldest frame not prefilled yet has waited since it reached
        the service (0: none waits)."""
        ...

    def hold(self, stream_id: str, take: Callable[[], None]) -> None:
        """The stream holds frames back (its prefill is behind): call `take` when its next
        prefill request starts, so they go in then (folded into one)."""

    def generate(self, composed: ComposedContext, request_id: str, max_tokens: int,
                 logprobs: int | None = None, first_token_ids: Sequence[int] = ()) -> AsyncIterator[Delta]:
        ...

    def drop_stream(self, stream_id: str, moved: bool = False) -> None:
        """Forget the stream: closed, or (`moved`) another replica owns it now."""


@dataclass
class RecomputeMaterializer:
    # None: frames only (benchmarks of retrieval and memory, tests): no question is answered.
    engine: VllmEngine | None
    embedder: ContextEmbedder
    # On an engine shared with the streaming-KV path: blocks whose KV the connector loaded
    # (computed with another context before them) are in vLLM's prefix cache under the
    # hash of this context's embeddings; a salt keeps recompute from ever hitting them.
    cache_salt: str | None = None
    retrieved_after_window = False

    def frame_added(self, ctx: StreamContext, frame: FrameSegment, kv: KVLedger,
                    compute: PromptCompute | None = None) -> None:
        return

    def frames_evicted(self, kv: KVLedger, index: int, frames: list[FrameSegment]) -> None:
        return

    def rebuilt(self, ctx: StreamContext, kv: KVLedger, stored: list[FrameSegment], kv_tag: str = "",
                compute: PromptCompute | None = None) -> None:
        return

    def kv_tag(self, stream_id: str) -> str:
        return ""

    def ready_seq(self, ctx: StreamContext) -> int:
        return ctx.last_seq

    def backlog_s(self, stream_id: str) -> float:
        return 0.0

    def hold(self, stream_id: str, take: Callable[[], None]) -> None:
        take()  # nothing waits for prefill

    def generate(self, composed: ComposedContext, request_id: str, max_tokens: int,
                 logprobs: int | None = None, first_token_ids: Sequence[int] = ()) -> AsyncIterator[Delta]:
        if self.engine is None:
            raise RuntimeError(f"question {request_id}: this recompute materializer has no engine: frames only")
        return self.engine.generate(self.embedder.embed(composed), request_id, max_tokens, logprobs=logprobs,
                                    cache_salt=self.cache_salt, first_token_ids=first_token_ids)

    def drop_stream(self, stream_id: str, moved: bool = False) -> None:
        return


@dataclass
class KVStats(PrefillStats):
    questions_loaded_tokens: int = 0
    questions_computed_tokens: int = 0
    kv_misses: int = 0  # a question or ingest found a block without stored KV (computed instead)
    disk_bytes: int = 0
    deleted: int = 0
    adopted: int = 0  # segments a rebuild found on the shared KV directory


@dataclass
class _Pending:
    frame: FrameSegment
    preceding: list[FrameSegment]  # sink + window before the frame, when it arrived
    arrived: float = field(default_factory=time.time)  # when it reached this service


@dataclass
class _Rebuild:
    started: float  # event-loop time
    adopted: int  # segments found on the shared KV directory
    prefills: int  # frames to prefill


@dataclass
class _StreamKV:
    """The engine side of one stream: its segment ids and its frames waiting for prefill.
    Which stored KV it keeps is its `Stream`'s ledger (`ledger`)."""

    tag: str
    ledger: KVLedger | None = None
    compute: PromptCompute | None = None  # its stream's account of what the engine computed
    queue: deque[_Pending] = field(default_factory=deque)
    # After a rebuild: the retained stored frames, prefilled (for their keys, which rank
    # them for questions) only while no new frame waits.
    backfill: deque[_Pending] = field(default_factory=deque)
    rebuild: _Rebuild | None = None  # until the rebuild's prefills are done
    task: asyncio.Task[None] | None = None
    ingested_seq: int = -1
    in_flight: list[_Pending] = field(default_factory=list)  # live frames in the engine now
    take: Callable[[], None] | None = None  # its stream holds frames for its next request (`hold`)


class StreamingKVMaterializer:
    retrieved_after_window = False

    def __init__(self, engine: VllmEngine, embedder: ContextEmbedder, cfg: LLMConfig,
                 chat: ChatLayout = DEFAULT_CHAT) -> None:
        if engine.kv_store_dir is None:
            raise ValueError("the streaming-KV materializer needs an engine started with the KV connector")
        self.engine = engine
        self.embedder = embedder
        self.cfg = cfg
        self.store = SegmentStore(engine.kv_store_dir)  # read side: metadata, deletion
        self.chat = chat
        self.head = head_block(cfg.context.system_prompt, chat)
        head_text = "".join(p.text for p in self.head.parts if isinstance(p, TextPart))
        self.head_id = "head-" + hashlib.sha256(head_text.encode()).hexdigest()[:16]
        self.nonce = uuid.uuid4().hex[:8]
        self.shared = bool(cfg.store.kv_shared_dir)  # the engine's KV directory is every replica's
        self.streams: dict[str, _StreamKV] = {}
        self.saved: dict[str, int] = {}  # segment id -> bytes on disk
        self.budget = KVDiskBudget(int(cfg.store.kv_disk_mb * 2**20))
        self.stats = KVStats()
        self.gate = PrefillGate(cfg, self.stats)

    @property
    def in_flight(self) -> int:
        return self.gate.in_flight

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
    def frame_added(self, ctx: StreamContext, frame: FrameSegment, kv: KVLedger,
                    compute: PromptCompute | None = None) -> None:
        s = self._stream(ctx.stream_id)
        s.ledger, s.compute = kv, compute
        s.queue.append(_Pending(frame, ctx.preceding()))
        self._run(ctx.stream_id, s)

    def rebuilt(self, ctx: StreamContext, kv: KVLedger, stored: list[FrameSegment], kv_tag: str = "",
                compute: PromptCompute | None = None) -> None:
        """On a shared KV directory, adopt the segments the last owner wrote (`kv_tag`: its
        ids) for every frame the stream holds (the ledger's chunks: no segment is read).
        Prefill the sink and window frames without KV in order, each attending to those
        before it; then, in the background, the `stored` ones without KV (the newest
        retained chunks), after the sink (in batches: each also after those before it in its
        batch). Until then a question that retrieves one computes it (`kv_misses`)."""
        s = self._stream(ctx.stream_id)
        s.ledger, s.compute = kv, compute
        adopted = 0
        if self.shared and kv_tag:
            s.tag = kv_tag
            held = [f.seq for f in ctx.sink] + [seq for seqs in kv.chunks.values() for seq in seqs]
            for seq in held + [f.seq for f in ctx.window]:
                seg_id = self.frame_id(ctx.stream_id, seq)
                if seg_id not in self.saved and self.store.summary(seg_id) is not None:
                    self._saved(seg_id, s)
                    adopted += 1
            self.stats.adopted += adopted
            self._enforce_budget(s)

        def missing(frame: FrameSegment) -> bool:
            return self.frame_id(ctx.stream_id, frame.seq) not in self.saved

        frames = ctx.sink + list(ctx.window)
        s.queue.extend(_Pending(frame, frames[:i]) for i, frame in enumerate(frames) if missing(frame))
        sink = list(ctx.sink)
        s.backfill.extend(_Pending(frame, sink) for frame in stored if missing(frame))
        s.rebuild = _Rebuild(asyncio.get_running_loop().time(), adopted, len(s.queue) + len(s.backfill))
        if s.queue or s.backfill:
            self._run(ctx.stream_id, s)
        else:
            self._rebuild_done(ctx.stream_id, s)

    def _rebuild_done(self, stream_id: str, s: _StreamKV) -> None:
        r, s.rebuild = s.rebuild, None
        if r is not None:
            log.info("stream %s: KV ready after the rebuild: %d segments adopted, %d frames prefilled in %.1fs",
                     stream_id, r.adopted, r.prefills, asyncio.get_running_loop().time() - r.started)

    def kv_tag(self, stream_id: str) -> str:
        return self._stream(stream_id).tag  # fixed before the first frame's KV is saved

    def _run(self, stream_id: str, s: _StreamKV) -> None:
        if s.task is None or s.task.done():
            s.task = asyncio.get_running_loop().create_task(self._ingest_loop(stream_id, s))

    def backlog_s(self, stream_id: str) -> float:
        s = self.streams.get(stream_id)
        if s is None:
            return 0.0
        return waited_s(s.in_flight, s.queue)

    def hold(self, stream_id: str, take: Callable[[], None]) -> None:
        s = self._stream(stream_id)
        s.take = take
        self._run(stream_id, s)

    async def _ingest_loop(self, stream_id: str, s: _StreamKV) -> None:
        while s.queue or s.backfill or s.take:
            async with self.gate.slot():
                if s.take is not None:  # what the stream held back meanwhile goes in now
                    take, s.take = s.take, None
                    take()
                if not (s.queue or s.backfill):
                    continue
                # taken only now: the frames that came while this stream waited go together
                live = bool(s.queue)
                source = s.queue if live else s.backfill
                batch = [source.popleft()]
                while source and len(batch) < self.cfg.backpressure.max_prefill_batch_frames:
                    batch.append(source.popleft())
                s.in_flight = batch if live else []
                try:
                    await self._ingest(stream_id, batch)
                except Exception:  # noqa: BLE001 - a failed ingest costs speed, not answers
                    self.stats.ingest_errors += 1
                    log.exception("stream %s: prefill of frames %d..%d failed; questions will compute them",
                                  stream_id, batch[0].frame.seq, batch[-1].frame.seq)
                finally:
                    s.in_flight = []
            if live:
                s.ingested_seq = batch[-1].frame.seq
                now = time.time()
                for p in batch:
                    metrics.FRAME_TO_KV.observe(max(0.0, now - (p.frame.sent_unix or p.arrived)))
        self._rebuild_done(stream_id, s)

    async def _ingest(self, stream_id: str, batch: list[_Pending]) -> None:
        """One engine request: [head][frames the first one attended to][the new frames],
        loading what is stored and saving every block that is not."""
        frames = [*batch[0].preceding, *(p.frame for p in batch)]
        blocks = [self.head, *(frame_block(f, self.chat) for f in frames)]
        load, save = self._plan(stream_id, blocks, save_missing=True)
        embeds = self.embedder.embed(ComposedContext(blocks))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        cached = 0
        with self.gate.request():
            async for delta in self.engine.generate(embeds, f"ingest-{uuid.uuid4().hex[:12]}", 1,
                                                    kv_transfer_params={"load": load, "save": save},
                                                    priority=PREFILL_PRIORITY):
                cached = max(cached, delta.cached_tokens)
        self.stats.ingest_s += loop.time() - t0
        self.stats.ingest_requests += 1
        self.stats.frames_ingested += len(batch)
        s = self._stream(stream_id)
        if s.compute is not None:
            s.compute.record("frame", int(embeds.shape[0]), cached, items=len(batch))
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
        if seg_id == self.head_id or s.ledger is None:
            return
        seq = int(seg_id.rsplit("-", 1)[1])
        means = summary.get("mean_keys") or {}
        keys = (np.stack([np.asarray(means[str(i)], np.float32).reshape(-1) for i in self.cfg.retrieval.layers])
                if all(str(i) in means for i in self.cfg.retrieval.layers) else None)
        if s.ledger.saved(seq, keys):  # prefilled after it left the window
            self.budget.evictable(s.ledger, seq)

    def frames_evicted(self, kv: KVLedger, index: int, frames: list[FrameSegment]) -> None:
        s = self._stream(kv.stream_id)
        for seq in kv.evicted(index, [f.seq for f in frames]):  # the rest: when their prefill saves them
            self.budget.evictable(kv, seq)
        self._enforce_budget(s)

    def _enforce_budget(self, s: _StreamKV) -> None:
        """The stream's retention (its least recently used frames first), then the disk budget
        over all streams. Constant work per deleted frame, whatever is stored."""
        if s.ledger is not None:
            for seq in s.ledger.over_retention():
                self._delete(s.ledger, seq)
        while self.stats.disk_bytes > self.budget.budget_bytes and (oldest := self.budget.oldest()):
            self._delete(*oldest)

    def _delete(self, ledger: KVLedger, seq: int) -> None:
        ledger.deleted(seq)
        self.budget.forget(ledger, seq)
        seg_id = self.frame_id(ledger.stream_id, seq)
        self.stats.disk_bytes -= self.saved.pop(seg_id, 0)
        self.stats.deleted += 1
        self.store.delete(seg_id)

    def ready_seq(self, ctx: StreamContext) -> int:
        s = self._stream(ctx.stream_id)
        if not s.queue and (s.task is None or s.task.done()):
            return ctx.last_seq  # nothing pending (frames after the last prefill were unchanged)
        return s.ingested_seq

    # --- questions -------------------------------------------------------------------
    async def generate(self, composed: ComposedContext, request_id: str, max_tokens: int,
                       logprobs: int | None = None, first_token_ids: Sequence[int] = ()) -> AsyncIterator[Delta]:
        stream_id = composed.stream_id
        load, _ = self._plan(stream_id, composed.blocks[:-1], save_missing=False)
        ledger = self._stream(stream_id).ledger
        for block in composed.blocks[1:len(load)]:  # least recently used leave the disk first
            if ledger is not None and block.frame is not None:
                self.budget.used(ledger, block.frame.seq)
        embeds = self.embedder.embed(composed)
        loaded = sum(self.embedder.block_tokens(b) for b in composed.blocks[:len(load)])
        self.stats.questions_loaded_tokens += loaded
        self.stats.questions_computed_tokens += int(embeds.shape[0]) - loaded
        with self.gate.answer():
            async for delta in self.engine.generate(embeds, request_id, max_tokens,
                                                    kv_transfer_params={"load": load} if load else None,
                                                    logprobs=logprobs, first_token_ids=first_token_ids):
                yield delta

    def drop_stream(self, stream_id: str, moved: bool = False) -> None:
        """Its segments are deleted, but those of a stream that `moved` on a shared KV
        directory: its new owner adopts them (and deletes them when the stream closes)."""
        s = self.streams.pop(stream_id, None)
        if s is None:
            return
        if s.task is not None:
            s.task.cancel()
        keep = moved and self.shared
        for seg_id in [i for i in self.saved if i.startswith(s.tag + "-")]:
            if s.ledger is not None:
                self.budget.forget(s.ledger, int(seg_id.rsplit("-", 1)[1]))
            self.stats.disk_bytes -= self.saved.pop(seg_id)
            if not keep:
                self.stats.deleted += 1
                self.store.delete(seg_id)
        if not keep:  # also those of earlier owners that this one never adopted
            self.stats.deleted += self.store.delete_prefix(s.tag + "-")
