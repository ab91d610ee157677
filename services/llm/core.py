"""The LLM service without Kafka: its streams, its commands, its answers, its rebuilds.

`LLMCore` holds the stream registry (one `Stream` per stream key, which owns all of that
stream's state and drops it in `Stream.close`), takes tokens records and commands as
they come (`on_tokens`, `on_command`, `on_rebuild`), and answers questions as async
iterators of response records (`answer`). What it publishes goes to a `ResponseSink`:
the Kafka adapter (`services.llm.service`) publishes to the responses and checkpoints
topics; benchmarks and tests use the core directly, with a sink of their own or none.
Everything runs on one asyncio loop, so a stream is only touched from one place.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
import torch

from livelens.config import LivelensConfig
from livelens.identity import key_of, split_key
from livelens.records import get_tokens
from livelens.v1 import messages_pb2 as pb
from services.llm import metrics
from services.llm.context import FrameSegment, StreamContext
from services.llm.instructions import InstructionChecker, InstructionError
from services.llm.rebuild import RebuildEnd, RebuildStart, Replayed
from services.llm.stream import Added, ContextError, ContextMethod, Stream, StreamResources

log = logging.getLogger("livelens.llm")

MAX_CLOSED = 4096  # closed sessions remembered, so their late frames are ignored


@dataclass
class LLMStats:
    frames: int = 0
    duplicates: int = 0
    unchanged: int = 0  # frames the encoder did not re-encode
    # frames folded into a later one while their stream's prefill was behind
    # (llm.backpressure.max_context_lag_s)
    coalesced: int = 0
    dropped: int = 0  # frames an encoder dropped unencoded (records from before encoders folded)
    folded: int = 0  # frames the encoder folded into a later one (it was behind: encoder.max_frame_age_s)
    after_close: int = 0  # tokens records of a stream's session that had closed: ignored
    questions: int = 0
    errors: int = 0
    cancelled: int = 0  # generations stopped: the asker's deadline passed, it cancelled, or the stream closed
    rebuilds: int = 0  # streams rebuilt from a checkpoint and a replay (a new owner)
    rebuild_s: float = 0.0  # the last one's duration
    streams: int = 0  # held now


class ResponseSink(Protocol):
    def response(self, msg: pb.ResponseRecord, flush: bool = False) -> None:
        """Publish an answer delta, an alert or a reply (`flush`: now, it ends something)."""

    def checkpoint(self, key: str, checkpoint: pb.StreamCheckpoint | None) -> None:
        """Record the stream's checkpoint (None: a tombstone, the stream closed)."""


class NoSink:
    """Publishes nothing (benchmarks and tests that read the streams directly)."""

    def response(self, msg: pb.ResponseRecord, flush: bool = False) -> None:
        return

    def checkpoint(self, key: str, checkpoint: pb.StreamCheckpoint | None) -> None:
        return


class LLMCore:
    def __init__(self, cfg: LivelensConfig, res: StreamResources, sink: ResponseSink | None = None,
                 checker: InstructionChecker | None = None) -> None:
        """`checker`: runs new frames' checks against standing instructions (None: not checked)."""
        self.cfg = cfg
        self.res = res
        self.sink: ResponseSink = sink or NoSink()
        self.checker = checker
        self.streams: dict[str, Stream] = {}  # by stream key "tenant/stream_id"
        self.stats = LLMStats()
        self.closed: OrderedDict[str, str] = OrderedDict()  # stream key -> its last session closed

    # --- state -----------------------------------------------------------------------
    def stream(self, key: str, session_id: str = "", partition: int = -1) -> Stream:
        """The stream of `key`, created if new. A record of another session than the one
        held starts the stream afresh (the stream id was opened anew)."""
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
        if stream is not None and moved and stream.answering:
            # The questions it is answering were taken (their offsets committed): the new
            # owner will not read them again, so they are answered here, then it goes.
            asyncio.get_running_loop().create_task(self._close_after_answers(key, stream))
        elif stream is not None:
            stream.close(moved=moved)  # its answers and checks stop too: nobody is left to hear them
        if tombstone:
            self.sink.checkpoint(key, None)

    async def _close_after_answers(self, key: str, stream: Stream) -> None:
        stream.stop_checks()
        await asyncio.gather(*stream.answering.values(), return_exceptions=True)
        log.info("stream %s: the answers it had begun are done; it goes", key)
        # what it holds is keyed by the stream: taken back here meanwhile, it is the new holder's
        stream.close(moved=True, keep_stores=key in self.streams)

    def save_checkpoint(self, stream: Stream) -> None:
        stream.unsaved_frames = 0
        self.sink.checkpoint(stream.stream_id, stream.checkpoint())

    def on_tokens(self, rec: pb.TokensRecord, offset: int = -1, partition: int = -1) -> None:
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
        coalesced, folded = stream.frames_coalesced, stream.frames_folded
        added = stream.add(rec.seq, rec.pts_s, tokens, kept, unchanged=rec.unchanged, tags=tuple(rec.tags),
                           tag_scores=tuple(rec.tag_scores), offset=offset, sent_unix=rec.gateway_time_unix,
                           dropped=rec.dropped, folded=rec.folded if rec.HasField("folded") else None)
        self.stats.folded += stream.frames_folded - folded
        if stream.folds:  # this frame carried frames held back before it
            self.coalesced(stream, coalesced)
        if added is Added.FRAME:
            self.frame_taken(stream, rec.seq, rec.pts_s, rec.gateway_time_unix)
        elif added is Added.HELD:  # it goes in when the stream's next prefill request starts
            self.res.materializer.hold(key, lambda: self.take_coalesced(key))
            if self.checker is not None:  # its tags came with it: checked now, not when it goes in
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
        stream.unsaved_frames += 1
        # not mid-replay: the checkpoint being replayed says more (and names the KV)
        if stream.unsaved_frames >= self.cfg.llm.checkpoint_every_frames and not stream.replaying:
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
            self.coalesced(stream, before)
            self.frame_taken(stream, frame.seq, frame.pts_s, frame.sent_unix, checked=True)

    def coalesced(self, stream: Stream, before: int) -> None:
        """Held frames went in folded (counted from `before`): counted, and the client hears
        which of its frames went in as one."""
        tenant, stream_id = split_key(stream.stream_id)
        self.stats.coalesced += stream.frames_coalesced - before
        metrics.FRAMES_COALESCED.labels(tenant).inc(stream.frames_coalesced - before)
        for notice in stream.folds:
            self.sink.response(pb.ResponseRecord(stream_id=stream_id, tenant=tenant, folded=notice))
        stream.folds.clear()

    def on_command(self, rec: pb.CommandRecord, partition: int = -1) -> None:
        kind = rec.WhichOneof("command")
        key = key_of(rec)
        if kind == "open" and rec.open.resume:
            self.resume(rec)
        elif kind == "open":
            held = self.streams.get(key)
            if held is None or held.session_id != rec.session_id:
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
            held = self.streams.get(key)
            task = held.answering.get(rec.cancel.request_id) if held is not None else None
            if task is not None:
                task.cancel()
        elif kind in ("add_instruction", "cancel_instruction", "list_instructions"):
            self.on_instruction_command(rec, kind)
        elif kind == "ask":
            self.stats.questions += 1
            metrics.TENANT_QUESTIONS.labels(rec.tenant).inc()
            if key not in self.streams:
                self.sink.response(self.reply(rec, final=True, code="NOT_FOUND",
                                              error=f"no open stream {rec.stream_id!r}"), flush=True)
                return
            stream = self.streams[key]
            stream.last_record_s = time.monotonic()
            task = asyncio.get_running_loop().create_task(self.relay(rec))
            stream.answering[rec.ask.request_id] = task
            task.add_done_callback(lambda t: self.answered(stream, rec, t))

    def resume(self, rec: pb.CommandRecord) -> None:
        """A Watch resumes a session: only the one this stream holds (not an ended one, nor
        another stream's). The reply says how far the stream got, so the gateway never
        acknowledges a frame twice."""
        held = self.streams.get(key_of(rec))
        reply = pb.ResponseRecord(stream_id=rec.stream_id, tenant=rec.tenant, request_id=rec.open.request_id,
                                  final=True)
        if held is None or held.session_id != rec.session_id:
            reply.code = "NOT_FOUND"
            reply.error = (f"stream {rec.stream_id!r} has no session {rec.session_id!r} to resume: it ended (closed, "
                           "or idle for llm.stream_idle_s), or it is another stream's; open the stream anew")
        else:
            held.last_record_s = time.monotonic()
            reply.last_seq, reply.stream_time_s = held.newest
            log.info("stream %s resumed (session %s) after seq %d", held.stream_id, rec.session_id, held.newest[0])
        if rec.open.request_id:
            self.sink.response(reply, flush=True)

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
        self.sink.response(reply, flush=True)

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
    def reply(self, cmd: pb.CommandRecord, **fields: Any) -> pb.ResponseRecord:
        msg = pb.ResponseRecord(stream_id=cmd.stream_id, tenant=cmd.tenant,
                                request_id=cmd.ask.request_id, proactive=cmd.ask.proactive, **fields)
        if msg.error:
            metrics.ANSWER_ERRORS.labels(msg.code or "INTERNAL").inc()
        return msg

    async def relay(self, cmd: pb.CommandRecord) -> None:
        """A question's answer to the sink, as it is generated (flushed at its end)."""
        async for msg in self.answer(cmd):
            self.sink.response(msg, flush=msg.final)

    def answered(self, stream: Stream, cmd: pb.CommandRecord, task: asyncio.Task[None]) -> None:
        """A question's task ended. Cancelled (CancelAsk, its stream closed), at any stage,
        even before it ran: its answer ends with a final record that says so."""
        stream.answering.pop(cmd.ask.request_id, None)
        if task.cancelled():
            self.stats.cancelled += 1
            log.info("question %s on %s cancelled", cmd.ask.request_id, key_of(cmd))
            self.sink.response(self.reply(cmd, final=True, code="CANCELLED",
                                          error="the answer was stopped: it was cancelled"), flush=True)

    async def answer(self, cmd: pb.CommandRecord) -> AsyncIterator[pb.ResponseRecord]:
        """The answer to a question, as the records to publish: deltas, then a final one
        (with the timings, or the error)."""
        c = self.cfg.llm
        picked = time.time()
        stream = self.stream(key_of(cmd))
        ask = cmd.ask
        example_id = ask.request_id if ask.has_example else None
        # The question overtakes the frames sent just before it and its example image
        # (both go through the encoder first, and on the streaming-KV path through their
        # prefill): wait, bounded, until they are here. The stream's own backlog is bounded
        # (llm.backpressure.max_context_lag_s); other streams' frames do not come before it (priority).
        self.take_coalesced(stream.stream_id)  # held-back frames: the question sees them
        waited = time.monotonic()
        deadline = waited + c.backpressure.frame_wait_s
        while not stream.ready(ask.after_seq, example_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        waited = time.monotonic() - waited
        t0 = time.perf_counter()
        # the gateway checks it; a producer writing to the commands topic directly is capped here
        most = c.engine.max_answer_tokens
        max_tokens = min(ask.max_tokens, most) if ask.max_tokens > 0 else most
        try:
            method = ContextMethod(ask.context_method)
            composed = stream.compose(ask.question, max_tokens, method, example_id)
        except (ValueError, ContextError) as exc:  # an unknown method, a context that cannot be built
            self.stats.errors += 1
            yield self.reply(cmd, final=True, error=f"the model could not answer: {exc}")
            return
        timings = pb.AnswerTimings(queue_s=max(0.0, picked - cmd.gateway_time_unix),
                                   frame_wait_s=waited, compose_s=time.perf_counter() - t0,
                                   context_tokens=composed.tokens, context_frames=len(composed.context.frames),
                                   context_seqs=[f.seq for f in composed.context.frames],
                                   frames_seen=stream.context.frames_seen, held_frames=stream.held_frames(),
                                   context_method=method.value or c.context.materializer,
                                   frames_coalesced=stream.frames_coalesced, frames_dropped=stream.frames_dropped,
                                   frames_folded=stream.frames_folded)
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
                        yield self.reply(cmd, text_delta=delta.text, final=True, stream_time_s=stream_time,
                                         timings=timings, retrieved_pts_s=[f.pts_s for f in composed.retrieved])
                    elif delta.text:
                        yield self.reply(cmd, text_delta=delta.text, stream_time_s=stream_time)
        except TimeoutError:
            self.stats.cancelled += 1
            log.info("question %s on %s stopped after %d tokens: its deadline passed", ask.request_id,
                     key_of(cmd), len(text))
            yield self.reply(cmd, final=True, code="DEADLINE_EXCEEDED",
                             error="the answer was stopped: its deadline passed", stream_time_s=stream_time)
            return
        except Exception as exc:  # noqa: BLE001 - the asker must hear about any failure
            self.stats.errors += 1
            log.exception("question %s on %s failed", ask.request_id, key_of(cmd))
            yield self.reply(cmd, final=True, error=f"the model could not answer: {exc}", stream_time_s=stream_time)
            return
        if not ask.proactive and method is ContextMethod.DEFAULT:  # evaluation questions leave no trace
            stream.add_turn(ask.question, "".join(text).strip())
            if self.streams.get(key_of(cmd)) is stream:  # not once another replica holds it
                self.save_checkpoint(stream)

    def warmup_context(self) -> torch.Tensor:
        """A context as long as a full one (sink + window of 7x7-token frames), of
        random visual tokens, distinct from any stream's so it caches nothing useful."""
        c = self.cfg.llm
        ctx = StreamContext("warmup", c.context.sink_frames, c.context.window_frames, 0)
        rng = np.random.default_rng(0)
        for i in range(c.context.sink_frames + c.context.window_frames):
            tokens = rng.standard_normal((49, self.res.embedder.hidden_size)).astype(np.float16)
            ctx.add_frame(FrameSegment(i, i * 0.5, tokens, np.ones(49, bool)))
        return self.res.embedder.embed(ctx.compose(c.context.system_prompt, "warm-up"))
