"""The engine-cache materializer: a stream's context kept in the engine's own KV pages, on
any vLLM (CPU or GPU), with no connector.

vLLM's prefix cache hashes each full block of a prompt, `prompt_embeds` included, chained
from the blocks before it: a request whose embeddings start as an earlier one's did takes
those blocks' KV from the cache and computes only the rest. So the context is laid out so
that its front never changes while a stream lives:

    [head][sink][window, appended in order][retrieved][dialogue + question]

- Each frame is prefilled once, when it arrives: a 1-token request over
  [head][sink][window through the frame]. Everything before the frame is in the cache from
  the request before; the frame is computed, and its KV stays in the engine's pages.
- The request is cut one token past the last whole block (`llm.context.align_prefill_to_blocks`):
  vLLM caches whole blocks only, so the tokens of a trailing partial block would be computed
  by this request and again by the next. Cut, they are computed once, by the next request.
- The window slides several frames at a time (`llm.context.window_slide_frames`): the one prefill
  after a slide recomputes what is left of the window, shared by the frames of the slide.
- A question sends the whole context and computes the retrieved frames (after the window,
  with their time labels), its tail and at most the window's trailing partial block. An
  instruction check computes only its own tail.

What a request computed is read from vLLM (`num_cached_tokens`) and counted in the stream's
`PromptCompute`; a prefill that found less of its stream's prefix cached than the request
before left (vLLM's LRU evicted the stream's pages for other streams') is a prefix miss.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from livelens.config import LLMConfig
from services.common.model_spec import DEFAULT_CHAT, ChatLayout
from services.llm import metrics
from services.llm.context import ComposedContext, FrameSegment, StreamContext, frame_block, head_block
from services.llm.embedder import ContextEmbedder
from services.llm.engine import PREFILL_PRIORITY, Delta, VllmEngine
from services.llm.kv_ledger import KVLedger
from services.llm.prefill_gate import PrefillGate, PrefillStats, waited_s
from services.llm.prompt_compute import PromptCompute

log = logging.getLogger("livelens.llm.engine_cache")


@dataclass
class EngineCacheStats(PrefillStats):
    frames_skipped: int = 0  # left the window before their prefill (retrieval computes them if asked)
    prefix_misses: int = 0  # over all streams (see PromptCompute.prefix_misses)


@dataclass
class _Waiting:
    seq: int
    arrived: float  # when it reached this service
    sent_unix: float  # when the gateway took it (0: not known)


@dataclass
class _CachedStream:
    """The engine side of one stream: its frames waiting for prefill and what the last
    prefill request left in the engine's cache."""

    ctx: StreamContext
    compute: PromptCompute | None = None
    waiting: deque[_Waiting] = field(default_factory=deque)
    in_flight: list[_Waiting] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    prefilled_seq: int = -1
    take: Callable[[], None] | None = None  # its stream holds frames for its next request (`hold`)
    # The last request's blocks (None: the head, else the frame's seq) with their token
    # counts, and the tokens it left cached (whole blocks): what the next one should find.
    last_blocks: list[tuple[int | None, int]] = field(default_factory=list)
    last_cached_through: int = 0


class EngineCacheMaterializer:
    retrieved_after_window = True

    def __init__(self, engine: VllmEngine, embedder: ContextEmbedder, cfg: LLMConfig,
                 chat: ChatLayout = DEFAULT_CHAT, cache_salt: str | None = None) -> None:
        self.engine = engine
        self.embedder = embedder
        self.cfg = cfg
        self.chat = chat
        self.head = head_block(cfg.context.system_prompt, chat)
        # On an engine shared with the streaming-KV path (benchmarks): blocks its connector
        # loaded are in the prefix cache under this layout's hashes too; a salt keeps apart.
        self.cache_salt = cache_salt
        self.streams: dict[str, _CachedStream] = {}
        self.stats = EngineCacheStats()
        self.gate = PrefillGate(cfg, self.stats)

    # --- frames ----------------------------------------------------------------------
    def frame_added(self, ctx: StreamContext, frame: FrameSegment, kv: KVLedger,
                    compute: PromptCompute | None = None) -> None:
        s = self._stream(ctx, compute)
        s.waiting.append(_Waiting(frame.seq, time.time(), frame.sent_unix))
        self._run(ctx.stream_id, s)

    def frames_evicted(self, kv: KVLedger, index: int, frames: list[FrameSegment]) -> None:
        return  # their KV stays in the engine until its LRU needs the pages

    def rebuilt(self, ctx: StreamContext, kv: KVLedger, stored: list[FrameSegment], kv_tag: str = "",
                compute: PromptCompute | None = None) -> None:
        """A new owner: the sink and window are prefilled again (a few frames a request);
        stored frames are computed when a question retrieves them."""
        s = self._stream(ctx, compute)
        now = time.time()
        s.waiting.extend(_Waiting(f.seq, now, 0.0) for f in ctx.sink + list(ctx.window))
        self._run(ctx.stream_id, s)

    def kv_tag(self, stream_id: str) -> str:
        return ""

    def ready_seq(self, ctx: StreamContext) -> int:
        s = self.streams.get(ctx.stream_id)
        if s is None or (not s.waiting and (s.task is None or s.task.done())):
            return ctx.last_seq
        return s.prefilled_seq

    def backlog_s(self, stream_id: str) -> float:
        s = self.streams.get(stream_id)
        if s is None:
            return 0.0
        return waited_s(s.in_flight, s.waiting)

    def hold(self, stream_id: str, take: Callable[[], None]) -> None:
        s = self.streams.get(stream_id)
        if s is None:
            take()
            return
        s.take = take
        self._run(stream_id, s)

    def drop_stream(self, stream_id: str, moved: bool = False) -> None:
        s = self.streams.pop(stream_id, None)
        if s is not None and s.task is not None:
            s.task.cancel()

    def _stream(self, ctx: StreamContext, compute: PromptCompute | None) -> _CachedStream:
        s = self.streams.get(ctx.stream_id)
        if s is None or s.ctx is not ctx:
            if s is not None and s.task is not None:
                s.task.cancel()
            s = self.streams[ctx.stream_id] = _CachedStream(ctx)
        s.compute = compute if compute is not None else s.compute
        return s

    def _run(self, stream_id: str, s: _CachedStream) -> None:
        if s.task is None or s.task.done():
            s.task = asyncio.get_running_loop().create_task(self._prefill_loop(stream_id, s))

    async def _prefill_loop(self, stream_id: str, s: _CachedStream) -> None:
        while s.waiting or s.take:
            async with self.gate.slot():
                if s.take is not None:  # what the stream held back meanwhile goes in now
                    take, s.take = s.take, None
                    take()
                batch = self._take(s)
                if not batch:
                    continue
                s.in_flight = batch
                try:
                    await self._prefill(s, through_seq=batch[-1].seq, frames=len(batch))
                except Exception:  # noqa: BLE001 - a failed prefill costs speed, not answers
                    self.stats.ingest_errors += 1
                    log.exception("stream %s: prefill through frame %d failed; questions will compute it",
                                  stream_id, batch[-1].seq)
                finally:
                    s.in_flight = []
            s.prefilled_seq = max(s.prefilled_seq, batch[-1].seq)
            now = time.time()
            for w in batch:
                metrics.FRAME_TO_KV.observe(max(0.0, now - (w.sent_unix or w.arrived)))

    def _take(self, s: _CachedStream) -> list[_Waiting]:
        """The next frames to prefill, oldest first: at most `llm.backpressure.max_prefill_batch_frames`
        of those still in the sink or window (the others left it before their turn)."""
        held = {f.seq for f in s.ctx.sink} | {f.seq for f in s.ctx.window}
        batch: list[_Waiting] = []
        while s.waiting and len(batch) < self.cfg.backpressure.max_prefill_batch_frames:
            w = s.waiting.popleft()
            if w.seq in held:
                batch.append(w)
            else:
                self.stats.frames_skipped += 1
        return batch

    def prefix(self, ctx: StreamContext, through_seq: int) -> ComposedContext:
        """What a prefill request sends: [head][sink][window through `through_seq`], the
        front of every question's context."""
        frames = [f for f in ctx.sink + list(ctx.window) if f.seq <= through_seq]
        return ComposedContext([self.head, *(frame_block(f, self.chat) for f in frames)], ctx.stream_id)

    def cut(self, tokens: int) -> int:
        """How much of a `tokens`-long prefill to send: one token past its last whole block
        (`llm.context.align_prefill_to_blocks`), so no partial block is computed twice."""
        if not self.cfg.context.align_prefill_to_blocks:
            return tokens
        b = self.cfg.engine.block_size
        return min(tokens, (tokens - 1) // b * b + 1)

    async def _prefill(self, s: _CachedStream, through_seq: int, frames: int) -> None:
        composed = self.prefix(s.ctx, through_seq)
        blocks = [(b.frame.seq if b.frame is not None else None, self.embedder.block_tokens(b))
                  for b in composed.blocks]
        embeds = self.embedder.embed(composed)
        sent = self.cut(int(embeds.shape[0]))
        # What the request before left cached and this one shares (its blocks up to the
        # first that differs): less found cached than that is a prefix miss.
        common = 0
        for mine, before in zip(blocks, s.last_blocks, strict=False):
            if mine != before:
                break
            common += mine[1]
        b = self.cfg.engine.block_size
        expected = min(common // b * b, s.last_cached_through, (sent - 1) // b * b)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        cached = 0
        with self.gate.request():
            async for delta in self.engine.generate(embeds[:sent], f"prefill-{uuid.uuid4().hex[:12]}", 1,
                                                    cache_salt=self.cache_salt, priority=PREFILL_PRIORITY):
                cached = max(cached, delta.cached_tokens)
        self.stats.ingest_s += loop.time() - t0
        self.stats.ingest_requests += 1
        self.stats.frames_ingested += frames
        if cached < expected:
            self.stats.prefix_misses += 1
            if s.compute is not None:
                s.compute.missed_prefix()
        if s.compute is not None:
            s.compute.record("frame", sent, cached, items=frames)
        s.last_blocks, s.last_cached_through = blocks, sent // b * b

    # --- questions -------------------------------------------------------------------
    async def generate(self, composed: ComposedContext, request_id: str, max_tokens: int,
                       logprobs: int | None = None, first_token_ids: Sequence[int] = ()) -> AsyncIterator[Delta]:
        embeds = self.embedder.embed(composed)
        with self.gate.answer():
            async for delta in self.engine.generate(embeds, request_id, max_tokens, logprobs=logprobs,
                                                    cache_salt=self.cache_salt, first_token_ids=first_token_ids):
                yield delta
