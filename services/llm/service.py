"""The LLM service: tokens + commands in, answer deltas out.

One consumer group reads the tokens and commands topics; both are keyed by stream key
("tenant/stream_id") and have the same partition count, so the replica that owns a
stream's partition holds its context and receives its questions. A replica given a
partition it did not hold rebuilds its streams' contexts from their checkpoints
(`services.llm.rebuild`). Kafka polling runs in a thread; contexts, questions and the
engine live on one asyncio loop, so a context is only touched from one place.
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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from livelens import kafka as lk
from livelens.config import LivelensConfig
from livelens.health import HealthServer
from livelens.identity import key_of, split_key
from livelens.metrics import record_lag, serve_metrics
from livelens.models.spec import served_chat
from livelens.records import get_tokens
from livelens.v1 import messages_pb2 as pb
from services.llm import metrics
from services.llm.context import FrameSegment, StreamContext
from services.llm.embedder import ContextEmbedder
from services.llm.engine import VllmEngine
from services.llm.engine_cache import EngineCacheMaterializer
from services.llm.instructions import InstructionChecker, InstructionError, YesNo
from services.llm.materializer import Materializer, RecomputeMaterializer, StreamingKVMaterializer
from services.llm.question_retrieval import QuestionQueries
from services.llm.rebuild import RebuildEnd, RebuildStart, Replayed, rebuild_items
from services.llm.segments import TieredSegmentStore
from services.llm.stream import Added, ContextError, ContextMethod, Stream, StreamResources

log = logging.getLogger("livelens.llm")

MAX_CLOSED = 4096  # closed sessions remembered, so their late frames are ignored


@dataclass
class LLMStats:
    frames: int = 0
    duplicates: int = 0
    unchanged: int = 0  # frames the encoder did not re-encode
    coalesced: int = 0  # frames folded into a later one while their stream's prefill was behind (llm.max_context_lag_s)
    dropped: int = 0  # frames the encoder dropped unencoded (it was behind: encoder.max_frame_age_s)
    after_close: int = 0  # tokens records of a stream's session that had closed: ignored
    questions: int = 0
    errors: int = 0
    cancelled: int = 0  # generations stopped: the asker's deadline passed, it cancelled, or the stream closed
    dead_letters: int = 0
    rebuilds: int = 0  # streams rebuilt from a checkpoint and a replay (a new owner)
    rebuild_s: float = 0.0  # the last one's duration
    streams: int = 0  # held now


def remove_stale_dirs(root: Path) -> None:
    """The per-process store directories (`llm-<pid>`) of LLM services that died without
    cleaning up (killed): their KV and segments belong to no one now."""
    for d in root.glob("llm-*"):
        try:
            os.kill(int(d.name.removeprefix("llm-")), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            log.info("removing %s: left by a process that is gone", d)
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


def segment_store(cfg: LivelensConfig) -> TieredSegmentStore:
    c = cfg.llm
    return TieredSegmentStore(
        ram_budget_bytes=int(c.store_ram_mb * 2**20),
        disk_dir=Path(c.store_disk_dir) / f"llm-{os.getpid()}" if c.store_disk_dir else None,
        disk_budget_bytes=int(c.store_disk_mb * 2**20), retention_segments=c.retention_segments)


def build_resources(cfg: LivelensConfig, kv_dir: Path | None,
                    on_take: Callable[[str], None] | None = None) -> tuple[VllmEngine, StreamResources]:
    """The engine and what every stream shares, as `llm.materializer` says (the service,
    the benchmarks and the tests all build them here). `on_take(stream key)`: a stream's
    held-back frames go in now (its next prefill request starts)."""
    c = cfg.llm
    chat, after_frames = served_chat(cfg.model.spec)
    embedder = ContextEmbedder(c.model_path)
    store = segment_store(cfg)
    materializer: Materializer
    if c.materializer == "streaming_kv":
        if kv_dir is None:
            raise ValueError("llm.materializer streaming_kv needs a KV store directory")
        engine = VllmEngine(c, kv_dir)
        materializer = StreamingKVMaterializer(engine, embedder, c, chat, on_take=on_take)
        recompute = RecomputeMaterializer(engine, embedder, cache_salt="recompute")
        queries: QuestionQueries | None = QuestionQueries(c.model_path, c.retrieve_layers)
    elif c.materializer == "engine_cache":
        # Recompute requests share its cache: both compute every block with its own positions.
        engine = VllmEngine(c)
        materializer = EngineCacheMaterializer(engine, embedder, c, chat, on_take=on_take)
        recompute = RecomputeMaterializer(engine, embedder)
        queries = None
    else:
        engine = VllmEngine(c)
        materializer = recompute = RecomputeMaterializer(engine, embedder)
        queries = None
    return engine, StreamResources(c, embedder, store, materializer, recompute, queries, chat, after_frames)


@dataclass
class ForgetPartitions:
    partitions: set[int]


@dataclass
class Consumed:
    """A record from the polling thread, parsed, with where it came from."""

    msg: pb.TokensRecord | pb.CommandRecord
    record: Any  # kafka's ConsumerRecord: topic, partition, offset, key, value


class LLMService:
    def __init__(self, cfg: LivelensConfig, res: StreamResources | None = None) -> None:
        """`res`: what the streams share, for a caller that drives the service without
        running it (`run` builds its own, with the engine)."""
        self.cfg = cfg
        self.streams: dict[str, Stream] = {}  # by stream key "tenant/stream_id"
        self.stats = LLMStats()
        self.stop_event = threading.Event()
        self.assigned = threading.Event()  # the group gave us partitions: we hold streams
        self.res = res
        self.producer: Any = None
        # (stream key, request id) -> its answer's task
        self.answering: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.unsaved: dict[str, int] = {}  # stream key -> frames added since its checkpoint
        self.closed: OrderedDict[str, str] = OrderedDict()  # stream key -> its last session closed
        self.handled: dict[tuple[str, int], int] = {}  # (topic, partition) -> the last offset handled
        # checks new frames against standing instructions (set up with the engine, in `run`)
        self.checker: InstructionChecker | None = None
        if res is not None:
            res.materializer.on_take = self.take_coalesced

    # --- state -----------------------------------------------------------------------
    def stream(self, key: str, session_id: str = "", partition: int = -1) -> Stream:
        """The stream of `key`, created if new. A record of another session than the one
        held starts the stream afresh (the stream id was opened anew)."""
        assert self.res is not None
        s = self.streams.get(key)
        if s is not None and session_id and s.session_id and s.session_id != session_id:
            log.info("stream %s: new session %s replaces %s", key, session_id, s.session_id)
            self.drop(key, tombstone=False)
            s = None
        if s is None:
            s = self.streams[key] = Stream(key, self.res, session_id=session_id, partition=partition)
            self.stats.streams = len(self.streams)
        return s

    def drop(self, key: str, tombstone: bool, moved: bool = False) -> None:
        """Forget a stream: closed (`tombstone`: its checkpoint too), or (`moved`) its
        partition lost."""
        stream = self.streams.pop(key, None)
        self.stats.streams = len(self.streams)
        if stream is not None:
            stream.close(moved=moved)
        if self.checker is not None:
            self.checker.drop_stream(key)
        self.unsaved.pop(key, None)
        for (k, _), task in list(self.answering.items()):  # nobody is left to hear them
            if k == key:
                task.cancel()
        if tombstone and self.producer is not None:
            self.producer.send(self.cfg.kafka.checkpoints_topic, key=key.encode(), value=None)

    def save_checkpoint(self, stream: Stream) -> None:
        self.unsaved[stream.stream_id] = 0
        if self.producer is not None:
            self.producer.send(self.cfg.kafka.checkpoints_topic, key=stream.stream_id.encode(),
                               value=stream.checkpoint().SerializeToString())

    def on_tokens(self, rec: pb.TokensRecord, offset: int = -1, partition: int = -1) -> None:
        assert self.res is not None
        if rec.dropped:  # the encoder dropped it unencoded: no tokens
            tokens, kept = np.zeros((0, self.res.embedder.hidden_size), np.float16), np.zeros(0, bool)
        else:
            tokens, kept = get_tokens(rec)
        if tokens.shape[0] and tokens.shape[1] != self.res.embedder.hidden_size:
            raise ValueError(f"tokens of width {tokens.shape[1]}: the model takes {self.res.embedder.hidden_size}")
        if not np.isfinite(tokens).all():
            raise ValueError("tokens that are not finite")
        key = key_of(rec)
        if rec.session_id and self.closed.get(key) == rec.session_id:
            # its frames still in the encoder when the stream closed: they must not open it again
            self.stats.after_close += 1
            return
        stream = self.stream(key, rec.session_id, partition)
        if rec.query_request_id:  # a question's example image: the retrieval query
            stream.add_example(rec.query_request_id, tokens)
            return
        if rec.gateway_time_unix and not stream.replaying:
            metrics.FRAME_ARRIVAL.observe(max(0.0, time.time() - rec.gateway_time_unix))
        added = stream.add(rec.seq, rec.pts_s, tokens, kept, unchanged=rec.unchanged, tags=tuple(rec.tags),
                           tag_scores=tuple(rec.tag_scores), offset=offset, sent_unix=rec.gateway_time_unix,
                           dropped=rec.dropped)
        if added is Added.FRAME:
            self.frame_taken(stream, rec.seq, rec.pts_s, rec.gateway_time_unix)
        elif added is Added.HELD:  # its tags came with it: checked now, not when it goes in
            if self.checker is not None:
                self.checker.frame_added(stream, rec.seq, rec.pts_s)
        elif added is Added.UNCHANGED:
            self.stats.unchanged += 1
            self.stats.dropped += int(rec.dropped)
        elif added is Added.DUPLICATE:
            self.stats.duplicates += 1

    def frame_taken(self, stream: Stream, seq: int, pts_s: float, sent_unix: float, checked: bool = False) -> None:
        """A frame entered the stream's context (with those held back before it, if any;
        `checked`: against the stream's instructions already, when it was held)."""
        self.stats.frames += 1
        if not stream.replaying:
            metrics.TENANT_FRAMES.labels(split_key(stream.stream_id)[0]).inc()
            if sent_unix:
                metrics.FRAME_TO_CONTEXT.observe(max(0.0, time.time() - sent_unix))
        if self.checker is not None and not stream.replaying and not checked:
            self.checker.frame_added(stream, seq, pts_s)
        key = stream.stream_id
        self.unsaved[key] = self.unsaved.get(key, 0) + 1
        # not mid-replay: the checkpoint being replayed says more (and names the KV)
        if self.unsaved[key] >= self.cfg.llm.checkpoint_every_frames and not stream.replaying:
            self.save_checkpoint(stream)

    def take_coalesced(self, key: str) -> None:
        """The frames a stream held back go in now (its next prefill request starts, or a
        question needs them)."""
        stream = self.streams.get(key)
        if stream is None or stream.replaying:
            return
        before = stream.frames_coalesced
        frame = stream.take_coalesced()
        if frame is not None:
            self.stats.coalesced += stream.frames_coalesced - before
            metrics.FRAMES_COALESCED.labels(split_key(key)[0]).inc(stream.frames_coalesced - before)
            self.frame_taken(stream, frame.seq, frame.pts_s, frame.sent_unix, checked=True)

    def on_command(self, rec: pb.CommandRecord, partition: int = -1) -> None:
        kind = rec.WhichOneof("command")
        key = key_of(rec)
        if kind == "open":
            held = self.streams.get(key)
            if held is None or not (rec.open.resume or held.session_id == rec.session_id):
                self.drop(key, tombstone=False)
                self.save_checkpoint(self.stream(key, rec.session_id, partition))
                log.info("stream %s opened (session %s, partition %d)", key, rec.session_id, partition)
        elif kind == "close":
            held = self.streams.get(key)
            if held is not None and held.session_id in ("", rec.session_id):  # not a newer session's
                self.drop(key, tombstone=True)
            if rec.session_id:
                self.closed[key] = rec.session_id
                while len(self.closed) > MAX_CLOSED:
                    self.closed.popitem(last=False)
        elif kind == "cancel":
            task = self.answering.get((key, rec.cancel.request_id))
            if task is not None:
                task.cancel()
        elif kind in ("add_instruction", "cancel_instruction", "list_instructions"):
            self.on_instruction_command(rec, kind)
        elif kind == "ask":
            self.stats.questions += 1
            metrics.TENANT_QUESTIONS.labels(rec.tenant).inc()
            if key not in self.streams:
                self.respond(rec, final=True, code="NOT_FOUND", error=f"no open stream {rec.stream_id!r}")
                self.producer.flush()
                return
            self.streams[key].last_record_s = time.monotonic()
            task = asyncio.get_running_loop().create_task(self.answer(rec))
            self.answering[(key, rec.ask.request_id)] = task
            task.add_done_callback(lambda t: self.answered(rec, t))

    def on_instruction_command(self, rec: pb.CommandRecord, kind: str) -> None:
        """Add, cancel or list a stream's standing instructions; the reply lists them."""
        cmd = getattr(rec, kind)
        reply = pb.ResponseRecord(stream_id=rec.stream_id, tenant=rec.tenant, request_id=cmd.request_id, final=True)
        stream = self.streams.get(key_of(rec))
        try:
            if stream is None:
                raise InstructionError(grpc.StatusCode.NOT_FOUND, f"no open stream {rec.stream_id!r}")
            if kind == "add_instruction":
                stream.instructions.add(cmd.instruction)
                log.info("stream %s: instruction %s added: %s", stream.stream_id, cmd.instruction.instruction_id,
                         cmd.instruction.text)
            elif kind == "cancel_instruction":
                stream.instructions.cancel(cmd.instruction_id)
            if kind != "list_instructions":
                self.save_checkpoint(stream)
            reply.instructions.extend(stream.instructions.protos())
        except InstructionError as exc:
            reply.code, reply.error = exc.code.name, exc.message
        lk.publish(self.producer, self.cfg.kafka.responses_topic, reply)
        self.producer.flush()

    # --- rebuilds (a new owner of a partition) ---------------------------------------
    def on_rebuild(self, item: RebuildStart | Replayed | RebuildEnd) -> None:
        if isinstance(item, RebuildStart):
            if item.key not in self.streams:  # held already: nothing to rebuild
                self.stream(item.key, item.checkpoint.session_id, item.partition).begin_replay(item.checkpoint)
            return
        stream = self.streams.get(item.key)
        if stream is None or not stream.replaying:
            return
        if isinstance(item, Replayed):
            if item.record.session_id == stream.session_id:
                self.on_tokens(item.record, item.offset, stream.partition)
            return
        stream.end_replay()
        self.stats.rebuilds += 1
        self.stats.rebuild_s = time.monotonic() - item.started
        metrics.REBUILD.observe(self.stats.rebuild_s)
        log.info("stream %s rebuilt in %.2fs: %d records replayed, %d frames in context", item.key,
                 self.stats.rebuild_s, item.replayed, len(stream.context.sink) + len(stream.context.window))

    def forget_partitions(self, partitions: set[int]) -> None:
        """A rebalance gave these partitions to another replica: their streams are its now."""
        for key in [k for k, s in self.streams.items() if s.partition in partitions]:
            log.info("stream %s moved to another replica", key)
            self.drop(key, tombstone=False, moved=True)

    def close_idle(self) -> None:
        """Streams that got no record for llm.stream_idle_s (their Watch broke and was not
        resumed) are closed."""
        limit = time.monotonic() - self.cfg.llm.stream_idle_s
        for key in [k for k, s in self.streams.items() if s.last_record_s < limit]:
            log.info("stream %s closed: idle for %gs (llm.stream_idle_s)", key, self.cfg.llm.stream_idle_s)
            self.drop(key, tombstone=True)

    # --- answering -------------------------------------------------------------------
    def publish_alert(self, msg: pb.ResponseRecord) -> None:
        lk.publish(self.producer, self.cfg.kafka.responses_topic, msg)
        self.producer.flush()

    def respond(self, cmd: pb.CommandRecord, **fields: Any) -> None:
        msg = pb.ResponseRecord(stream_id=cmd.stream_id, tenant=cmd.tenant,
                                request_id=cmd.ask.request_id, proactive=cmd.ask.proactive, **fields)
        if msg.error:
            metrics.ANSWER_ERRORS.labels(msg.code or "INTERNAL").inc()
        lk.publish(self.producer, self.cfg.kafka.responses_topic, msg)

    def answered(self, cmd: pb.CommandRecord, task: asyncio.Task[None]) -> None:
        """A question's task ended. Cancelled (CancelAsk, its stream closed), at any stage,
        even before it ran: its answer ends with a final record that says so."""
        self.answering.pop((key_of(cmd), cmd.ask.request_id), None)
        if task.cancelled():
            self.stats.cancelled += 1
            log.info("question %s on %s cancelled", cmd.ask.request_id, key_of(cmd))
            self.respond(cmd, final=True, code="CANCELLED", error="the answer was stopped: it was cancelled")
            self.producer.flush()

    async def answer(self, cmd: pb.CommandRecord) -> None:
        c = self.cfg.llm
        picked = time.time()
        stream = self.stream(key_of(cmd))
        ask = cmd.ask
        example_id = ask.request_id if ask.has_example else None
        # The question overtakes the frames sent just before it and its example image
        # (both go through the encoder first, and on the streaming-KV path through their
        # prefill): wait, bounded, until they are here. The stream's own backlog is bounded
        # (llm.max_context_lag_s); other streams' frames do not come before it (priority).
        self.take_coalesced(stream.stream_id)  # held-back frames: the question sees them
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
                                   context_seqs=[f.seq for f in composed.context.frames],
                                   frames_seen=stream.context.frames_seen, held_frames=stream.held_frames(),
                                   context_method=method.value or c.materializer,
                                   frames_coalesced=stream.frames_coalesced, frames_dropped=stream.frames_dropped)
        newest = max(composed.context.frames, key=lambda f: f.seq, default=None)
        if newest is not None and newest.sent_unix:
            timings.context_lag_s = max(0.0, time.time() - newest.sent_unix)
        text: list[str] = []
        stream_time = composed.context.newest_pts_s
        # Past the asker's deadline nobody waits for the answer: stop it, in the engine too
        # (cancelling vLLM's generate aborts the request).
        remaining = max(0.0, ask.deadline_unix - time.time()) if ask.deadline_unix else None
        try:
            async with asyncio.timeout(remaining):
                async for delta in composed.generate(f"{ask.request_id}-{uuid.uuid4().hex[:6]}", max_tokens):
                    if delta.first_token_s is not None:
                        timings.ttft_s = delta.first_token_s
                        metrics.TIME_TO_FIRST_TOKEN.observe(delta.first_token_s)
                    text.append(delta.text)
                    if delta.finished:
                        timings.total_s = time.perf_counter() - t0
                        spent = stream.compute
                        timings.prompt_tokens_computed = composed.computed_tokens
                        timings.stream_tokens_computed_per_frame = spent.per("frame")
                        timings.stream_tokens_computed_per_question = spent.per("question")
                        timings.stream_tokens_computed_per_check = spent.per("check")
                        timings.stream_prefix_misses = spent.prefix_misses
                        if cmd.gateway_time_unix:
                            metrics.E2E_ANSWER.observe(max(0.0, time.time() - cmd.gateway_time_unix))
                        self.respond(cmd, text_delta=delta.text, final=True, stream_time_s=stream_time,
                                     timings=timings, retrieved_pts_s=[f.pts_s for f in composed.retrieved])
                    elif delta.text:
                        self.respond(cmd, text_delta=delta.text, stream_time_s=stream_time)
        except TimeoutError:
            self.stats.cancelled += 1
            log.info("question %s on %s stopped after %d tokens: its deadline passed", ask.request_id,
                     key_of(cmd), len(text))
            self.respond(cmd, final=True, code="DEADLINE_EXCEEDED", error="the answer was stopped: its deadline passed",
                         stream_time_s=stream_time)
            return
        except Exception as exc:  # noqa: BLE001 - the asker must hear about any failure
            self.stats.errors += 1
            log.exception("question %s on %s failed", ask.request_id, key_of(cmd))
            self.respond(cmd, final=True, error=f"the model could not answer: {exc}",
                         stream_time_s=stream_time)
            return
        finally:
            self.producer.flush()
        if not ask.proactive and method is ContextMethod.DEFAULT:  # evaluation questions leave no trace
            stream.add_turn(ask.question, "".join(text).strip())
            self.save_checkpoint(stream)

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
        producer = lk.make_producer(k, "livelens-llm-deadletters")

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def gained(partitions: set[Any]) -> None:
            for tp in partitions:  # what we handled when we held it before is not what counts now
                self.handled.pop((tp.topic, tp.partition), None)
            numbers = {tp.partition for tp in partitions if tp.topic == k.tokens_topic}
            for n, item in enumerate(rebuild_items(k, numbers, held=set())):
                put(item)
                while n % 64 == 0 and queue.qsize() > 256 and not self.stop_event.is_set():  # bounded replay
                    time.sleep(0.01)

        def lost(partitions: set[Any]) -> None:
            put(ForgetPartitions({tp.partition for tp in partitions if tp.topic == k.tokens_topic}))

        consumer = lk.make_group_consumer(k, [k.tokens_topic, k.commands_topic], self.cfg.llm.group_id,
                                          auto_commit=False, on_lost=lost, on_gained=gained)
        committed = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if time.monotonic() - committed > 1.0:
                    committed = time.monotonic()
                    self.commit_handled(consumer)
                    record_lag(consumer, "llm")
                polled = consumer.poll(timeout_ms=100)
                if consumer.assignment():
                    self.assigned.set()
                for tp, records in polled.items():
                    for r in records:
                        msg: Any = pb.TokensRecord() if tp.topic == k.tokens_topic else pb.CommandRecord()
                        try:
                            msg.ParseFromString(r.value)
                            if not msg.stream_id or not msg.tenant:
                                raise ValueError("the record names no stream or tenant")
                        except Exception as exc:  # noqa: BLE001 - a foreign or broken record on our topic
                            self.stats.dead_letters += 1
                            lk.dead_letter(producer, k, "llm", r, f"unparseable record: {exc}")
                            continue
                        put(Consumed(msg, r))
        finally:
            self.commit_handled(consumer)
            consumer.close(autocommit=False)
            producer.close()
            put(None)

    def commit_handled(self, consumer: Any) -> None:
        """Commit what the loop has handled (not merely what was polled): a question taken
        by a replica that then crashed is read again by the next owner."""
        assigned = consumer.assignment()
        handled = list(self.handled.items())
        offsets = {tp: OffsetAndMetadata(offset + 1, "", -1) for (topic, partition), offset in handled
                   if (tp := TopicPartition(topic, partition)) in assigned}
        if offsets:
            try:
                consumer.commit(offsets)
            except KafkaError as exc:  # a rebalance under way: the next owner reads them again
                log.info("commit skipped: %s", exc)

    def handle(self, item: Any) -> None:
        if isinstance(item, Consumed):
            r = item.record
            self.handled[(r.topic, r.partition)] = r.offset
            try:
                if isinstance(item.msg, pb.TokensRecord):
                    self.on_tokens(item.msg, r.offset, r.partition)
                else:
                    self.on_command(item.msg, r.partition)
            except Exception as exc:  # noqa: BLE001 - a record that parsed but cannot be used (e.g. a bad token shape)
                self.stats.errors += 1
                self.stats.dead_letters += 1
                log.debug("record %s/%d@%d", r.topic, r.partition, r.offset, exc_info=True)
                lk.dead_letter(self.producer, self.cfg.kafka, "llm", r, f"cannot process: {type(exc).__name__}: {exc}")
        elif isinstance(item, ForgetPartitions):
            self.forget_partitions(item.partitions)
        else:
            self.on_rebuild(item)

    async def run(self) -> None:
        cfg = self.cfg
        health = HealthServer(cfg.llm.health_host, cfg.llm.health_port, "llm.health_port",
                              "livelens.llm").start()
        for root in (cfg.llm.kv_store_dir, cfg.llm.store_disk_dir):
            if root:
                remove_stale_dirs(Path(root))
        kv_dir = None  # this process's own: removed when it ends
        if cfg.llm.materializer == "streaming_kv" and not cfg.llm.kv_shared_dir:
            kv_dir = Path(cfg.llm.kv_store_dir) / f"llm-{os.getpid()}"
        engine, self.res = build_resources(cfg, Path(cfg.llm.kv_shared_dir) if cfg.llm.kv_shared_dir else kv_dir,
                                           on_take=self.take_coalesced)
        res = self.res
        self.checker = InstructionChecker(cfg.llm, YesNo(res.embedder.text_ids), self.publish_alert)
        serve_metrics(cfg.llm.health_host, cfg.llm.metrics_port, "llm.metrics_port",
                      lambda: {"llm": self.stats, "llm_store": res.store.stats,
                               "llm_kv": getattr(res.materializer, "stats", None),
                               "llm_instructions": self.checker.stats if self.checker else None},
                      gauges=frozenset({"ram_bytes", "disk_bytes", "segments_ram", "segments_disk", "streams"}))
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
        idle_check = time.monotonic()
        try:
            while (item := await queue.get()) is not None:
                self.handle(item)
                if time.monotonic() - idle_check > 5.0:
                    idle_check = time.monotonic()
                    self.close_idle()
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
