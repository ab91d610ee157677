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
from livelens.models.spec import served_chat
from livelens.records import get_tokens
from livelens.v1 import messages_pb2 as pb
from services.llm.context import FrameSegment, StreamContext
from services.llm.embedder import ContextEmbedder
from services.llm.engine import VllmEngine
from services.llm.materializer import Materializer, RecomputeMaterializer, StreamingKVMaterializer
from services.llm.question_retrieval import QuestionQueries
from services.llm.segments import TieredSegmentStore
from services.llm.stream import Added, ContextError, ContextMethod, Stream, StreamResources

log = logging.getLogger("livelens.llm")


@dataclass
class LLMStats:
    frames: int = 0
    duplicates: int = 0
    unchanged: int = 0  # frames the encoder did not re-encode
    questions: int = 0
    errors: int = 0
    cancelled: int = 0  # generations stopped: the asker's deadline passed, it cancelled, or the stream closed


def segment_store(cfg: LivelensConfig) -> TieredSegmentStore:
    c = cfg.llm
    return TieredSegmentStore(
        ram_budget_bytes=int(c.store_ram_mb * 2**20),
        disk_dir=Path(c.store_disk_dir) / f"llm-{os.getpid()}" if c.store_disk_dir else None,
        disk_budget_bytes=int(c.store_disk_mb * 2**20), retention_segments=c.retention_segments)


def build_resources(cfg: LivelensConfig, kv_dir: Path | None) -> tuple[VllmEngine, StreamResources]:
    """The engine and what every stream shares, as `llm.materializer` says (the service,
    the benchmarks and the tests all build them here)."""
    c = cfg.llm
    chat, after_frames = served_chat(cfg.model.spec)
    embedder = ContextEmbedder(c.model_path)
    store = segment_store(cfg)
    materializer: Materializer
    if c.materializer == "streaming_kv":
        if kv_dir is None:
            raise ValueError("llm.materializer streaming_kv needs a KV store directory")
        engine = VllmEngine(c, kv_dir)
        materializer = StreamingKVMaterializer(engine, embedder, c, chat)
        recompute = RecomputeMaterializer(engine, embedder, cache_salt="recompute")
        queries: QuestionQueries | None = QuestionQueries(c.model_path, c.retrieve_layers)
    else:
        engine = VllmEngine(c)
        materializer = recompute = RecomputeMaterializer(engine, embedder)
        queries = None
    return engine, StreamResources(c, embedder, store, materializer, recompute, queries, chat, after_frames)


class LLMService:
    def __init__(self, cfg: LivelensConfig, res: StreamResources | None = None) -> None:
        """`res`: what the streams share, for a caller that drives the service without
        running it (`run` builds its own, with the engine)."""
        self.cfg = cfg
        self.streams: dict[str, Stream] = {}
        self.stats = LLMStats()
        self.stop_event = threading.Event()
        self.assigned = threading.Event()  # the group gave us partitions: we hold streams
        self.res = res
        self.producer: Any = None
        self.answering: dict[str, tuple[str, asyncio.Task[None]]] = {}  # request id -> (stream, its task)

    # --- state -----------------------------------------------------------------------
    def stream(self, stream_id: str) -> Stream:
        assert self.res is not None
        s = self.streams.get(stream_id)
        if s is None:
            s = self.streams[stream_id] = Stream(stream_id, self.res)
        return s

    def on_tokens(self, rec: pb.TokensRecord) -> None:
        tokens, kept = get_tokens(rec)
        stream = self.stream(rec.stream_id)
        if rec.query_request_id:  # a question's example image: the retrieval query
            stream.add_example(rec.query_request_id, tokens)
            return
        added = stream.add(rec.seq, rec.pts_s, tokens, kept, unchanged=rec.unchanged, tags=tuple(rec.tags),
                           tag_scores=tuple(rec.tag_scores))
        if added is Added.FRAME:
            self.stats.frames += 1
        elif added is Added.UNCHANGED:
            self.stats.unchanged += 1
        else:
            self.stats.duplicates += 1

    def on_command(self, rec: pb.CommandRecord) -> None:
        kind = rec.WhichOneof("command")
        if kind == "close":
            stream = self.streams.pop(rec.stream_id, None)
            if stream is not None:
                stream.close()
            for stream_id, task in list(self.answering.values()):  # nobody is left to hear them
                if stream_id == rec.stream_id:
                    task.cancel()
        elif kind == "cancel":
            entry = self.answering.get(rec.cancel.request_id)
            if entry is not None:
                entry[1].cancel()
        elif kind == "ask":
            self.stats.questions += 1
            task = asyncio.get_running_loop().create_task(self.answer(rec))
            self.answering[rec.ask.request_id] = (rec.stream_id, task)
            task.add_done_callback(lambda t: self.answered(rec, t))

    # --- answering -------------------------------------------------------------------
    def respond(self, cmd: pb.CommandRecord, **fields: Any) -> None:
        msg = pb.ResponseRecord(stream_id=cmd.stream_id, tenant=cmd.tenant,
                                request_id=cmd.ask.request_id, proactive=cmd.ask.proactive, **fields)
        lk.publish(self.producer, self.cfg.kafka.responses_topic, cmd.stream_id, msg)

    def answered(self, cmd: pb.CommandRecord, task: asyncio.Task[None]) -> None:
        """A question's task ended. Cancelled (CancelAsk, its stream closed), at any stage,
        even before it ran: its answer ends with a final record that says so."""
        self.answering.pop(cmd.ask.request_id, None)
        if task.cancelled():
            self.stats.cancelled += 1
            log.info("question %s on %s cancelled", cmd.ask.request_id, cmd.stream_id)
            self.respond(cmd, final=True, error="the answer was stopped: it was cancelled")
            self.producer.flush()

    async def answer(self, cmd: pb.CommandRecord) -> None:
        c = self.cfg.llm
        picked = time.time()
        stream = self.stream(cmd.stream_id)
        ask = cmd.ask
        example_id = ask.request_id if ask.has_example else None
        # The question overtakes the frames sent just before it and its example image
        # (both go through the encoder first, and on the streaming-KV path through their
        # prefill): wait, bounded, until they are here.
        waited = time.monotonic()
        deadline = waited + c.frame_wait_s
        while not stream.ready(ask.after_seq, example_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        waited = time.monotonic() - waited
        t0 = time.perf_counter()
        # the gateway checks it; a producer writing to the commands topic directly is capped here
        max_tokens = min(ask.max_tokens, c.max_answer_tokens) if ask.max_tokens > 0 else c.max_answer_tokens
        try:
            method = ContextMethod(ask.context_method)
            composed = stream.compose(ask.question, max_tokens, method, example_id)
        except (ValueError, ContextError) as exc:  # an unknown method, a context that cannot be built
            self.stats.errors += 1
            self.respond(cmd, final=True, error=f"the model could not answer: {exc}")
            self.producer.flush()
            return
        timings = pb.AnswerTimings(queue_s=max(0.0, picked - cmd.gateway_time_unix),
                                   frame_wait_s=waited, compose_s=time.perf_counter() - t0,
                                   context_tokens=composed.tokens, context_frames=len(composed.context.frames),
                                   context_method=method.value or c.materializer)
        text: list[str] = []
        stream_time = composed.context.newest_pts_s
        # Past the asker's deadline nobody waits for the answer: stop it, in the engine too
        # (cancelling vLLM's generate aborts the request).
        remaining = max(0.0, ask.deadline_unix - time.time()) if ask.deadline_unix else None
        try:
            async with asyncio.timeout(remaining):
                async for delta in composed.materializer.generate(
                        composed.context, f"{ask.request_id}-{uuid.uuid4().hex[:6]}", max_tokens):
                    if delta.first_token_s is not None:
                        timings.ttft_s = delta.first_token_s
                    text.append(delta.text)
                    if delta.finished:
                        timings.total_s = time.perf_counter() - t0
                        self.respond(cmd, text_delta=delta.text, final=True, stream_time_s=stream_time,
                                     timings=timings, retrieved_pts_s=[f.pts_s for f in composed.retrieved])
                    elif delta.text:
                        self.respond(cmd, text_delta=delta.text, stream_time_s=stream_time)
        except TimeoutError:
            self.stats.cancelled += 1
            log.info("question %s on %s stopped after %d tokens: its deadline passed", ask.request_id,
                     cmd.stream_id, len(text))
            self.respond(cmd, final=True, error="the answer was stopped: its deadline passed",
                         stream_time_s=stream_time)
            return
        except Exception as exc:  # noqa: BLE001 - the asker must hear about any failure
            self.stats.errors += 1
            log.exception("question %s on %s failed", ask.request_id, cmd.stream_id)
            self.respond(cmd, final=True, error=f"the model could not answer: {exc}",
                         stream_time_s=stream_time)
            return
        finally:
            self.producer.flush()
        if not ask.proactive and method is ContextMethod.DEFAULT:  # evaluation questions leave no trace
            stream.add_turn(ask.question, "".join(text).strip())

    def warmup_context(self) -> torch.Tensor:
        """A context as long as a full one (sink + window of 7x7-token frames), of
        random visual tokens, distinct from any stream's so it caches nothing useful."""
        assert self.res is not None
        c = self.cfg.llm
        ctx = StreamContext("warmup", c.sink_frames, c.window_frames, 0)
        rng = np.random.default_rng(0)
        for i in range(c.sink_frames + c.window_frames):
            tokens = rng.standard_normal((49, self.res.embedder.hidden_size)).astype(np.float16)
            ctx.add_frame(FrameSegment(i, i * 0.5, tokens, np.ones(49, bool)))
        return self.res.embedder.embed(ctx.compose(c.system_prompt, "warm-up"))

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
        kv_dir = Path(cfg.llm.kv_store_dir) / f"llm-{os.getpid()}" if cfg.llm.materializer == "streaming_kv" else None
        engine, self.res = build_resources(cfg, kv_dir)
        lk.ensure_topics(cfg.kafka)
        self.producer = lk.make_producer(cfg.kafka, "livelens-llm")
        warm = self.warmup_context()
        log.info("engine warm-up (%d tokens) took %.1fs", warm.shape[0],
                 await engine.warmup(warm))
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
            self.res.store.close()
            engine.shutdown()
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
