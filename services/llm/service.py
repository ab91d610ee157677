"""The LLM service: tokens + commands in, answer deltas out.

One consumer group reads the tokens and commands topics; both are keyed by stream id and
have the same partition count, so the replica that owns a stream's partition holds its
context and receives its questions. Kafka polling runs in a thread; contexts, questions
and the engine live on one asyncio loop, so a context is only touched from one place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livelens import kafka as lk
from livelens.config import LivelensConfig
from livelens.health import HealthServer
from livelens.records import get_tokens
from livelens.v1 import messages_pb2 as pb
from services.llm.context import FrameSegment, StreamContext
from services.llm.embedder import ContextEmbedder
from services.llm.engine import VllmEngine
from services.llm.materializer import Materializer, RecomputeMaterializer, StreamingKVMaterializer
from services.llm.question_retrieval import QuestionQueries, question_scores
from services.llm.segments import Segment, TieredSegmentStore, best_first, cosine_scores

log = logging.getLogger("livelens.llm")


@dataclass
class LLMStats:
    frames: int = 0
    duplicates: int = 0
    unchanged: int = 0  # frames the encoder did not re-encode
    questions: int = 0
    errors: int = 0


class LLMService:
    def __init__(self, cfg: LivelensConfig) -> None:
        self.cfg = cfg
        self.contexts: dict[str, StreamContext] = {}
        self.stats = LLMStats()
        self.stop_event = threading.Event()
        self.assigned = threading.Event()  # the group gave us partitions: we hold streams
        self.embedder: ContextEmbedder | None = None
        self.engine: VllmEngine | None = None
        self.materializer: Materializer | None = None
        self.queries: QuestionQueries | None = None  # question-text retrieval (streaming_kv)
        self.producer: Any = None
        self.examples: dict[str, np.ndarray] = {}  # request id -> pooled example embedding
        # stream -> the last token received at each grid position [grid, hidden] (the encoder
        # drops tokens that did not change)
        self.held: dict[str, np.ndarray] = {}
        c = cfg.llm
        self.store = TieredSegmentStore(
            ram_budget_bytes=int(c.store_ram_mb * 2**20),
            disk_dir=Path(c.store_disk_dir) / f"llm-{os.getpid()}" if c.store_disk_dir else None,
            disk_budget_bytes=int(c.store_disk_mb * 2**20), retention_segments=c.retention_segments)

    # --- state -----------------------------------------------------------------------
    def context(self, stream_id: str) -> StreamContext:
        ctx = self.contexts.get(stream_id)
        if ctx is None:
            c = self.cfg.llm
            ctx = StreamContext(stream_id, c.sink_frames, c.window_frames, c.dialogue_turns,
                                chunk_frames=c.chunk_frames, on_evict=self.store_evicted)
            self.contexts[stream_id] = ctx
        return ctx

    def store_evicted(self, stream_id: str, index: int, frames: list[FrameSegment]) -> None:
        self.store.put(Segment(stream_id, index, tuple(frames)))
        if self.materializer is not None:
            self.materializer.frames_evicted(stream_id, index, frames)

    def retrieve(self, stream_id: str, example: np.ndarray | None, question: str) -> list[FrameSegment]:
        """Stored segments for a question, in time order: scored by the example image's
        pooled embedding when the question has one, else (streaming KV) by the question's
        own attention queries against each segment's mean key. Top-k, then cut to the
        retrieved part's token budget (best first)."""
        c = self.cfg.llm
        if not c.retrieve_top_k:
            return []
        if example is not None:
            indices, keys = self.store.keys(stream_id)
            ranked = best_first(indices, cosine_scores(keys, example), c.retrieve_top_k)
        elif self.queries is not None and isinstance(self.materializer, StreamingKVMaterializer):
            assert self.embedder is not None
            indices, qkeys = self.materializer.question_keys(stream_id)
            if not indices:
                return []
            query = self.queries(self.embedder.embed_text(f"<|im_start|>user\n{question}<|im_end|>\n"))
            ranked = best_first(indices, question_scores(qkeys, query), c.retrieve_top_k)
        else:
            return []
        picked: list[Segment] = []
        budget = c.retrieve_token_budget
        for index in ranked:
            segment = self.store.get(stream_id, index)
            if segment is None:  # a corrupt or missing file is skipped (and counted)
                continue
            size = sum(f.num_tokens for f in segment.frames)
            if size > budget:
                break
            budget -= size
            picked.append(segment)
        return [f for segment in sorted(picked, key=lambda g: g.index) for f in segment.frames]

    def on_tokens(self, rec: pb.TokensRecord) -> None:
        tokens, kept = get_tokens(rec)
        if rec.query_request_id:  # a question's example image: the retrieval query
            self.examples[rec.query_request_id] = tokens.astype(np.float32).mean(0)
            while len(self.examples) > 1024:  # examples whose question never came
                self.examples.pop(next(iter(self.examples)))
            return
        ctx = self.context(rec.stream_id)
        if rec.unchanged or not tokens.shape[0]:  # the encoder's cache: nothing new to see
            if ctx.note_unchanged(rec.seq):
                self.stats.unchanged += 1
            else:
                self.stats.duplicates += 1
            return
        held = self.held.get(rec.stream_id)
        if held is None or held.shape != (kept.size, tokens.shape[1]):
            held = self.held[rec.stream_id] = np.zeros((kept.size, tokens.shape[1]), np.float32)
        held[kept] = tokens
        frame = FrameSegment(rec.seq, rec.pts_s, tokens, kept, pooled=held.mean(0))
        if ctx.add_frame(frame):
            self.stats.frames += 1
            if self.materializer is not None:
                self.materializer.frame_added(ctx, frame)
        else:
            self.stats.duplicates += 1

    def on_command(self, rec: pb.CommandRecord) -> None:
        kind = rec.WhichOneof("command")
        if kind == "close":
            self.contexts.pop(rec.stream_id, None)
            self.held.pop(rec.stream_id, None)
            self.store.drop_stream(rec.stream_id)
            if self.materializer is not None:
                self.materializer.drop_stream(rec.stream_id)
        elif kind == "ask":
            self.stats.questions += 1
            asyncio.get_running_loop().create_task(self.answer(rec))

    # --- answering -------------------------------------------------------------------
    def respond(self, cmd: pb.CommandRecord, **fields: Any) -> None:
        msg = pb.ResponseRecord(stream_id=cmd.stream_id, tenant=cmd.tenant,
                                request_id=cmd.ask.request_id, proactive=cmd.ask.proactive, **fields)
        lk.publish(self.producer, self.cfg.kafka.responses_topic, cmd.stream_id, msg)

    async def answer(self, cmd: pb.CommandRecord) -> None:
        assert self.materializer is not None and self.embedder is not None
        c = self.cfg.llm
        picked = time.time()
        ctx = self.context(cmd.stream_id)
        ask = cmd.ask
        # The question overtakes the frames sent just before it and its example image
        # (both go through the encoder first, and on the streaming-KV path through their
        # prefill): wait, bounded, until they are here.
        waited = time.monotonic()
        deadline = waited + c.frame_wait_s
        while (self.materializer.ready_seq(ctx) < ask.after_seq
               or (ask.has_example and ask.request_id not in self.examples)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        waited = time.monotonic() - waited
        t0 = time.perf_counter()
        retrieved = self.retrieve(cmd.stream_id, self.examples.pop(ask.request_id, None), ask.question)
        composed = ctx.compose(c.system_prompt, ask.question, retrieved=retrieved)
        max_tokens = ask.max_tokens or c.max_answer_tokens
        # Trim the oldest window frames until the prompt plus the answer fits.
        limit = len(ctx.window)
        while self.embedder.count(composed) + max_tokens > c.max_model_len and limit > 0:
            limit -= 1
            composed = ctx.compose(c.system_prompt, ask.question, window_limit=limit, retrieved=retrieved)
        compose_s = time.perf_counter() - t0
        timings = pb.AnswerTimings(queue_s=max(0.0, picked - cmd.gateway_time_unix),
                                   frame_wait_s=waited, compose_s=compose_s,
                                   context_tokens=self.embedder.count(composed), context_frames=len(composed.frames))
        text: list[str] = []
        stream_time = composed.newest_pts_s
        try:
            async for delta in self.materializer.generate(composed, f"{ask.request_id}-{uuid.uuid4().hex[:6]}",
                                                          max_tokens):
                if delta.first_token_s is not None:
                    timings.ttft_s = delta.first_token_s
                text.append(delta.text)
                if delta.finished:
                    timings.total_s = time.perf_counter() - t0
                    self.respond(cmd, text_delta=delta.text, final=True, stream_time_s=stream_time,
                                 timings=timings, retrieved_pts_s=[f.pts_s for f in retrieved])
                elif delta.text:
                    self.respond(cmd, text_delta=delta.text, stream_time_s=stream_time)
        except Exception as exc:  # noqa: BLE001 - the asker must hear about any failure
            self.stats.errors += 1
            log.exception("question %s on %s failed", ask.request_id, cmd.stream_id)
            self.respond(cmd, final=True, error=f"the model could not answer: {exc}",
                         stream_time_s=stream_time)
            return
        finally:
            self.producer.flush()
        if not ask.proactive:
            ctx.add_turn(ask.question, "".join(text).strip())

    def warmup_context(self) -> torch.Tensor:
        """A context as long as a full one (sink + window of 7x7-token frames), of
        random visual tokens, distinct from any stream's so it caches nothing useful."""
        assert self.embedder is not None
        c = self.cfg.llm
        ctx = StreamContext("warmup", c.sink_frames, c.window_frames, 0)
        rng = np.random.default_rng(0)
        for i in range(c.sink_frames + c.window_frames):
            tokens = rng.standard_normal((49, self.embedder.hidden_size)).astype(np.float16)
            ctx.add_frame(FrameSegment(i, i * 0.5, tokens, np.ones(49, bool)))
        return self.embedder.embed(ctx.compose(c.system_prompt, "warm-up"))

    # --- plumbing --------------------------------------------------------------------
    def poll_kafka(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        k = self.cfg.kafka
        consumer = lk.make_group_consumer(k, [k.tokens_topic, k.commands_topic],
                                          self.cfg.llm.group_id)
        try:
            while not self.stop_event.is_set():
                polled = consumer.poll(timeout_ms=100)
                if consumer.assignment():
                    self.assigned.set()
                for tp, records in polled.items():
                    for r in records:
                        is_tokens = tp.topic == k.tokens_topic
                        msg: Any = pb.TokensRecord() if is_tokens else pb.CommandRecord()
                        try:
                            msg.ParseFromString(r.value)
                        except Exception:  # noqa: BLE001 - a foreign record on our topic
                            log.warning("unparseable record on %s", tp.topic)
                            continue
                        loop.call_soon_threadsafe(queue.put_nowait, msg)
        finally:
            consumer.close()
            loop.call_soon_threadsafe(queue.put_nowait, None)

    async def run(self) -> None:
        cfg = self.cfg
        health = HealthServer(cfg.llm.health_host, cfg.llm.health_port, "llm.health_port",
                              "livelens.llm").start()
        self.embedder = ContextEmbedder(cfg.llm.model_path)
        if cfg.llm.materializer == "streaming_kv":
            kv_dir = Path(cfg.llm.kv_store_dir) / f"llm-{os.getpid()}"
            self.engine = VllmEngine(cfg.llm, kv_dir)
            self.materializer = StreamingKVMaterializer(self.engine, self.embedder, cfg.llm)
            self.queries = QuestionQueries(cfg.llm.model_path, cfg.llm.retrieve_layers)
        else:
            kv_dir = None
            self.engine = VllmEngine(cfg.llm)
            self.materializer = RecomputeMaterializer(self.engine, self.embedder)
        lk.ensure_topics(cfg.kafka)
        self.producer = lk.make_producer(cfg.kafka, "livelens-llm")
        warm = self.warmup_context()
        log.info("engine warm-up (%d tokens) took %.1fs", warm.shape[0],
                 await self.engine.warmup(warm))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        poller = threading.Thread(target=self.poll_kafka, args=(loop, queue), daemon=True)
        poller.start()
        # Serving means owning partitions: before that, questions would find no frames.
        await asyncio.to_thread(self.assigned.wait, 60)
        health.set(True)
        log.info("llm service ready: model %s", cfg.llm.model_path)
        try:
            while (msg := await queue.get()) is not None:
                try:
                    if isinstance(msg, pb.TokensRecord):
                        self.on_tokens(msg)
                    else:
                        self.on_command(msg)
                except ValueError as exc:
                    self.stats.errors += 1
                    log.warning("bad record for stream %s: %s", msg.stream_id, exc)
        finally:
            health.set(False)
            self.stop_event.set()
            poller.join(5)
            self.producer.close()
            self.store.close()
            self.engine.shutdown()
            if kv_dir is not None:  # stored KV is a cache of this process
                shutil.rmtree(kv_dir, ignore_errors=True)
            health.stop()


def main(cfg: LivelensConfig) -> None:
    service = LLMService(cfg)

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop_event.set)
        await service.run()

    asyncio.run(runner())
