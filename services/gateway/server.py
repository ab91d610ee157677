"""The gateway: the only thing clients talk to.

`Watch` takes frames and questions and returns acks, answer deltas, alerts and per-item
errors; a bad item is answered with an `ItemError` carrying its gRPC status while the
stream goes on. Stream-level problems (authentication, limits) end the call with the
status itself. Frames and commands go to Kafka; answers come back through `KafkaRouter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from livelens.config import LivelensConfig
from livelens.v1 import api_pb2, api_pb2_grpc
from livelens.v1 import messages_pb2 as pb
from services.common import kafka as lk
from services.common.metrics import serve_metrics
from services.common.ports import ensure_free
from services.gateway import metrics
from services.gateway.decider import ResponseTimingDecider
from services.gateway.router import KafkaRouter
from services.gateway.sessions import Session, SessionRegistry
from services.gateway.validation import (
    CheckedImage,
    InvalidItem,
    check_context_method,
    check_frame,
    check_image,
    check_instruction,
    check_instruction_id,
    check_max_tokens,
    check_question,
    check_session_id,
    check_stream_id,
    check_timeout,
)

log = logging.getLogger("livelens.gateway")

ResponseHandler = Callable[[pb.ResponseRecord], None]


class AnswerTiming:
    """What a client waits for an answer, from the moment its question was accepted."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.first = False

    def relayed(self, rec: pb.ResponseRecord) -> None:
        if rec.error:
            return
        if rec.text_delta and not self.first:
            self.first = True
            metrics.TIME_TO_FIRST_TOKEN.observe(time.monotonic() - self.t0)
        if rec.final:
            metrics.E2E_ANSWER.observe(time.monotonic() - self.t0)


def response_status(rec: pb.ResponseRecord) -> grpc.StatusCode:
    """The status an LLM service's error answer is relayed with (INTERNAL if it named none)."""
    return getattr(grpc.StatusCode, rec.code, grpc.StatusCode.INTERNAL) if rec.code else grpc.StatusCode.INTERNAL


def instruction_list(rec: pb.ResponseRecord, added_id: str = "", cancelled_id: str = "") -> api_pb2.InstructionList:
    return api_pb2.InstructionList(
        instructions=[api_pb2.Instruction(instruction_id=i.instruction_id, text=i.text) for i in rec.instructions],
        added_id=added_id, cancelled_id=cancelled_id)


def item_error(exc: InvalidItem, item: str, seq: int = 0, request_id: str = "") -> api_pb2.WatchResponse:
    return api_pb2.WatchResponse(error=api_pb2.ItemError(
        code=exc.code.value[0], status=exc.code.name, message=exc.message, seq=seq,
        request_id=request_id, item=item))


def remark_delta(rec: pb.ResponseRecord) -> api_pb2.WatchResponse:
    """An alert's remark (what the model says about it), as answer deltas under its id."""
    return api_pb2.WatchResponse(answer=api_pb2.AnswerDelta(
        request_id=rec.request_id, text=rec.text_delta, final=rec.final, stream_time_s=rec.stream_time_s))


async def refuse(context: grpc.aio.ServicerContext, items: AsyncIterator[api_pb2.WatchRequest],
                 exc: InvalidItem, drain_s: float = 1.0) -> None:
    """End a Watch that cannot open with its status. The items the client sent after its
    `open` are read first (for up to `drain_s`): a client still writing when the call
    ends sees its write fail, and grpc reports that as INTERNAL instead of our status."""
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
        async with asyncio.timeout(drain_s):
            async for _ in items:
                pass
    await context.abort(exc.code, exc.message)


class LiveLensServicer(api_pb2_grpc.LiveLensServicer):
    def __init__(self, cfg: LivelensConfig, producer: Any) -> None:
        self.cfg = cfg
        self.producer = producer
        self.sessions = SessionRegistry(cfg.gateway)
        self.handlers: dict[tuple[str, str], ResponseHandler] = {}  # (tenant, request id) -> its relay
        self.tasks: set[asyncio.Task[None]] = set()  # Watch items answered in the background
        # Image decodes, off the event loop. Two at a time bounds their memory: each is at
        # most gateway.max_frame_pixels x 3 bytes, known from the header before it starts.
        self.decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")

    # --- Kafka side ------------------------------------------------------------------
    def on_response(self, rec: pb.ResponseRecord) -> None:
        if rec.HasField("folded"):  # the LLM service folded frames of a stream: its Watch hears it
            self.relay_fold(rec.tenant, rec.stream_id, rec.folded)
            return
        handler = self.handlers.get((rec.tenant, rec.request_id))
        if handler is not None:
            handler(rec)
            if rec.final:
                self.handlers.pop((rec.tenant, rec.request_id), None)
        elif rec.instruction_id:  # a standing instruction fired, or its remark: to the stream's Watch, if here
            session = self.sessions.get(rec.tenant, rec.stream_id)
            if session is None:
                return
            if rec.remark:
                session.send(remark_delta(rec))
                return
            metrics.ALERTS.labels("instruction").inc()
            session.send(api_pb2.WatchResponse(alert=api_pb2.Alert(
                request_id=rec.request_id, stream_time_s=rec.stream_time_s, reason="instruction",
                score=rec.score, text=rec.text_delta, instruction_id=rec.instruction_id, matched=rec.matched)))

    def relay_fold(self, tenant: str, stream_id: str, fold: pb.FoldNotice) -> None:
        session = self.sessions.get(tenant, stream_id)
        if session is not None:  # the replica its Watch is on: each fold told, and counted, once
            metrics.FRAMES_FOLDED.labels(tenant, fold.reason).inc(max(0, fold.frames - 1))
            session.send(api_pb2.WatchResponse(folded=api_pb2.Folded(
                from_seq=fold.from_seq, to_seq=fold.to_seq, from_pts_s=fold.from_pts_s, to_pts_s=fold.to_pts_s,
                frames=fold.frames, encoded=fold.encoded, reason=fold.reason)))

    def on_tokens(self, rec: pb.TokensRecord) -> None:
        if rec.HasField("folded") and not rec.query_request_id:
            self.relay_fold(rec.tenant, rec.stream_id, rec.folded)
        session = self.sessions.get(rec.tenant, rec.stream_id)
        if session is None or rec.query_request_id or not self.cfg.gateway.proactive_alerts:
            return
        before = session.tags
        if rec.tags:
            session.tags = tuple(rec.tags)
        decision = session.decider.observe(rec.pts_s, rec.novelty)
        if decision is not None:
            self.raise_alert(session, decision.reason, decision.score, decision.pts_s, before, session.tags)

    def raise_alert(self, session: Session, reason: str, score: float, pts_s: float,
                    before: tuple[str, ...] = (), after: tuple[str, ...] = ()) -> None:
        """The alert goes out now, saying what changed (the classifier's tags before and
        after, where the frames have tags); the model's remark follows as AnswerDeltas with
        the alert's request id."""
        request_id = f"alert-{uuid.uuid4().hex[:12]}"
        matched = f"{', '.join(before[:2]) or 'nothing named'} -> {', '.join(after[:2]) or 'nothing named'}"
        text = f"The scene changed at {pts_s:.1f}s" + (f": {matched}" if before or after else ".")
        session.send(api_pb2.WatchResponse(alert=api_pb2.Alert(
            request_id=request_id, stream_time_s=pts_s, reason=reason, score=score, text=text,
            matched=matched if before or after else "")))

        def relay(rec: pb.ResponseRecord) -> None:
            if rec.final:
                session.pending.discard(request_id)
            if not rec.error:
                session.send(remark_delta(rec))
            elif rec.final:  # the remark failed: its end still reaches the client
                session.send(remark_delta(pb.ResponseRecord(request_id=request_id, final=True,
                                                            stream_time_s=rec.stream_time_s)))

        self.handlers[(session.tenant, request_id)] = relay
        session.pending.add(request_id)
        metrics.ALERTS.labels(reason).inc()
        self.publish_ask(session.tenant, session.stream_id, session.last_seq, request_id,
                         self.cfg.gateway.alert_prompt, 0, proactive=True, session_id=session.session_id)

    def publish_ask(self, tenant: str, stream_id: str, after_seq: int, request_id: str, question: str,
                    max_tokens: int, proactive: bool = False,
                    example: tuple[pb.FrameRecord.Encoding, bytes] | None = None,
                    context_method: str = "", deadline_unix: float = 0.0, session_id: str = "") -> None:
        """The question on the commands topic; an example image first, on the frames topic
        (the encoder turns it into the retrieval query)."""
        if example is not None:
            rec = pb.FrameRecord(stream_id=stream_id, tenant=tenant, session_id=session_id, seq=-1,
                                 encoding=example[0], data=example[1], gateway_time_unix=time.time(),
                                 query_request_id=request_id)
            lk.publish(self.producer, self.cfg.kafka.frames_topic, rec)
        ask = pb.AskCommand(request_id=request_id, question=question, max_tokens=max_tokens, proactive=proactive,
                            after_seq=after_seq, has_example=example is not None, context_method=context_method,
                            deadline_unix=deadline_unix)
        cmd = pb.CommandRecord(stream_id=stream_id, tenant=tenant, session_id=session_id,
                               gateway_time_unix=time.time(), ask=ask)
        lk.publish(self.producer, self.cfg.kafka.commands_topic, cmd)

    def publish_cancel(self, tenant: str, stream_id: str, request_id: str) -> None:
        cmd = pb.CommandRecord(stream_id=stream_id, tenant=tenant, gateway_time_unix=time.time(),
                               cancel=pb.CancelAsk(request_id=request_id))
        lk.publish(self.producer, self.cfg.kafka.commands_topic, cmd)

    async def check_example(self, data: bytes) -> tuple[pb.FrameRecord.Encoding, bytes] | None:
        if not data:
            return None
        image = check_image(data, self.cfg.gateway, "the example image")
        await self.decodes(image)
        return image.encoding, data

    # --- auth ------------------------------------------------------------------------
    async def tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant: from its client certificate (mTLS, `gateway.cert_tenants`),
        else from its bearer token."""
        g = self.cfg.gateway
        if g.tls_client_ca:
            for name in context.auth_context().get("x509_common_name", []):
                if (tenant := g.cert_tenants.get(name.decode(errors="replace"))) is not None:
                    return tenant
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, token = str(header).partition(" ")
        found = self.token_tenant(token) if scheme.lower() == "bearer" else None
        if found is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or unknown bearer token (metadata 'authorization: Bearer <token>')")
        return str(found)

    def token_tenant(self, token: str) -> str | None:
        """Compared with every known token in constant time, so timing tells nothing."""
        found = None
        for known, tenant in self.cfg.gateway.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = tenant
        return found

    # --- Watch -----------------------------------------------------------------------
    async def Watch(self, request_iterator: AsyncIterator[api_pb2.WatchRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[api_pb2.WatchResponse]:
        tenant = await self.tenant(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("item") != "open":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the first message of Watch must be `open` with a stream id")
        assert first is not None  # abort() raised otherwise
        stream_id = first.open.stream_id
        resume = first.open.resume_session_id
        g = self.cfg.gateway
        session = Session(stream_id, tenant, ResponseTimingDecider(g.alert_novelty_threshold, g.alert_cooldown_s),
                          session_id=resume or uuid.uuid4().hex)
        try:
            check_stream_id(stream_id)
            if resume:
                check_session_id(resume)
            self.sessions.open(session)
        except InvalidItem as exc:
            await refuse(context, request_iterator, exc)
        if resume:
            try:
                await self.resume(session)
            except InvalidItem as exc:
                self.sessions.refuse(session)
                await refuse(context, request_iterator, exc)
        else:
            self.publish_command(session, pb.CommandRecord(open=pb.OpenStream()))
        log.info("stream %s %s by tenant %s (session %s)", stream_id, "resumed" if resume else "opened", tenant,
                 session.session_id)
        metrics.OPEN_STREAMS.labels(tenant).inc()
        session.send(api_pb2.WatchResponse(opened=api_pb2.Opened(stream_id=stream_id, tenant=tenant,
                                                                 session_id=session.session_id,
                                                                 last_seq=session.last_seq)))
        reader = asyncio.create_task(self.read_items(session, request_iterator))
        ended = False
        try:
            while True:
                if reader.done() and not session.pending and session.outbox.empty():
                    break
                try:
                    yield await asyncio.wait_for(session.outbox.get(), timeout=0.2)
                except TimeoutError:
                    continue
            reader.result()  # surface a reader failure as the call's status
            ended = True
        finally:
            reader.cancel()
            for request_id in session.pending:  # nobody is left to hear them: stop them in the engine
                if self.handlers.pop((tenant, request_id), None) is not None:
                    self.publish_cancel(tenant, stream_id, request_id)
            self.sessions.close(session, ended=ended)
            metrics.OPEN_STREAMS.labels(tenant).dec()
            # The client closed its side: the stream ends. A broken call leaves the stream
            # open (resumable with its session id, closed by the LLM service when idle).
            if ended:
                self.publish_command(session, pb.CommandRecord(close=pb.CloseStream()))
            log.info("stream %s %s", stream_id, "closed" if ended else "detached: its Watch broke")

    async def resume(self, session: Session) -> None:
        """The stream's owner in the LLM service holds the session (NOT_FOUND if not) and
        says how far it got; where this replica served the session before, it knows the
        last frame it acknowledged, which may not have reached the owner yet."""
        known = self.sessions.detached.pop(session.session_id, None)
        if known is not None and known.key != (session.tenant, session.stream_id):
            self.sessions.detached[session.session_id] = known  # another stream's: not this caller's to take
            known = None
        rec = await self.owner_reply(session.tenant, session.stream_id, session.session_id,
                                     open=pb.OpenStream(resume=True))
        session.last_seq, session.last_pts = rec.last_seq, rec.stream_time_s
        if known is not None and known.last_seq > session.last_seq:
            session.last_seq, session.last_pts = known.last_seq, known.last_pts
        session.newest_pts = session.last_pts

    def publish_command(self, session: Session, cmd: pb.CommandRecord) -> None:
        cmd.stream_id, cmd.tenant, cmd.session_id = session.stream_id, session.tenant, session.session_id
        cmd.gateway_time_unix = time.time()
        lk.publish(self.producer, self.cfg.kafka.commands_topic, cmd)

    async def read_items(self, session: Session, items: AsyncIterator[api_pb2.WatchRequest]) -> None:
        loop = asyncio.get_running_loop()
        async for item in items:
            kind = item.WhichOneof("item")
            if kind == "frame":
                await self.accept_frame(session, item.frame, loop)
            elif kind == "question":
                await self.accept_question(session, item.question)
            elif kind in ("instruction", "cancel_instruction"):
                task = asyncio.create_task(self.watch_instruction(session, item))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                message = ("the stream is already open: `open` comes once, as the first item" if kind == "open" else
                           "the WatchRequest is empty: set one of frame, question, instruction, cancel_instruction")
                session.send(item_error(InvalidItem(grpc.StatusCode.INVALID_ARGUMENT, message), kind or ""))

    async def decodes(self, image: CheckedImage) -> None:
        """The image's pixels decode (InvalidItem if not), checked on the decoder threads:
        the event loop, and so every other stream's acks, never waits for a decode."""
        await asyncio.get_running_loop().run_in_executor(self.decoder, image.decodes)

    async def accept_frame(self, session: Session, frame: api_pb2.Frame,
                           loop: asyncio.AbstractEventLoop) -> None:
        try:
            image = check_frame(frame, self.cfg.gateway, session.last_seq, session.last_pts)
            self.sessions.admit_frame(session.tenant)
            await self.decodes(image)
        except InvalidItem as exc:
            metrics.REFUSED.labels(session.tenant, exc.code.name).inc()
            session.send(item_error(exc, "frame", seq=frame.seq))
            return
        metrics.FRAMES.labels(session.tenant).inc()
        session.last_seq, session.last_pts = frame.seq, frame.pts_s
        session.newest_pts = frame.pts_s
        rec = pb.FrameRecord(stream_id=session.stream_id, tenant=session.tenant, session_id=session.session_id,
                             seq=frame.seq, pts_s=frame.pts_s, encoding=image.encoding, data=frame.image,
                             width=image.width, height=image.height, gateway_time_unix=time.time())
        future = lk.publish(self.producer, self.cfg.kafka.frames_topic, rec)
        ack = api_pb2.WatchResponse(ack=api_pb2.Ack(seq=frame.seq))

        def done(_: Any) -> None:
            loop.call_soon_threadsafe(session.send, ack)

        def failed(exc: BaseException) -> None:
            err = InvalidItem(grpc.StatusCode.UNAVAILABLE, f"frame {frame.seq} not queued: {exc}")
            loop.call_soon_threadsafe(session.send, item_error(err, "frame", seq=frame.seq))

        future.add_callback(done)
        future.add_errback(failed)

    async def accept_question(self, session: Session, question: api_pb2.Question) -> None:
        request_id = question.request_id or f"q-{uuid.uuid4().hex[:12]}"
        try:
            text = check_question(question.text, self.cfg.gateway)
            check_max_tokens(question.max_tokens, self.cfg.llm.engine.max_answer_tokens)
            method = check_context_method(question.context_method)
            timeout = check_timeout(question.timeout_s, self.cfg.gateway)
            example = await self.check_example(question.example_image)
            if (session.tenant, request_id) in self.handlers:
                raise InvalidItem(grpc.StatusCode.ALREADY_EXISTS,
                                  f"request id {request_id!r} is already being answered")
            self.sessions.admit_question(session.tenant)
        except InvalidItem as exc:
            metrics.REFUSED.labels(session.tenant, exc.code.name).inc()
            session.send(item_error(exc, "question", request_id=request_id))
            return
        metrics.QUESTIONS.labels(session.tenant).inc()
        timing = AnswerTiming()

        def relay(rec: pb.ResponseRecord) -> None:
            timing.relayed(rec)
            if rec.error:
                session.send(item_error(InvalidItem(response_status(rec), rec.error), "question",
                                        request_id=request_id))
            session.send(api_pb2.WatchResponse(answer=api_pb2.AnswerDelta(
                request_id=request_id, text=rec.text_delta, final=rec.final,
                stream_time_s=rec.stream_time_s, ttft_s=rec.timings.ttft_s,
                retrieved_pts_s=rec.retrieved_pts_s)))
            if rec.final:
                session.pending.discard(request_id)

        def expire() -> None:
            """No final answer in time (e.g. its LLM replica crashed with the question): say so."""
            if self.handlers.pop((session.tenant, request_id), None) is None:
                return
            self.publish_cancel(session.tenant, session.stream_id, request_id)
            session.send(item_error(InvalidItem(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                f"no complete answer within {timeout:g}s"), "question",
                                    request_id=request_id))
            session.send(api_pb2.WatchResponse(answer=api_pb2.AnswerDelta(request_id=request_id, final=True)))
            session.pending.discard(request_id)

        self.handlers[(session.tenant, request_id)] = relay
        session.pending.add(request_id)
        asyncio.get_running_loop().call_later(timeout, expire)
        self.publish_ask(session.tenant, session.stream_id, session.last_seq, request_id, text,
                         question.max_tokens, example=example, context_method=method,
                         session_id=session.session_id, deadline_unix=time.time() + timeout)

    # --- standing instructions ---------------------------------------------------------
    async def watch_instruction(self, session: Session, item: api_pb2.WatchRequest) -> None:
        """An instruction item of a Watch: the reply (the stream's instructions) or an
        ItemError with the instruction's id, on the same Watch."""
        adding = item.WhichOneof("item") == "instruction"
        instruction_id = item.instruction.instruction_id if adding else item.cancel_instruction.instruction_id
        if adding and not instruction_id:
            instruction_id = f"i-{uuid.uuid4().hex[:8]}"
        marker = f"instruction:{instruction_id}"  # the Watch ends only after the reply
        session.pending.add(marker)
        try:
            if adding:
                reply = await self.add_instruction(session.tenant, session.stream_id, item.instruction.text,
                                                   instruction_id, session.session_id)
            else:
                reply = await self.cancel_instruction(session.tenant, session.stream_id, instruction_id,
                                                      session.session_id)
            session.send(api_pb2.WatchResponse(instructions=reply))
        except InvalidItem as exc:
            metrics.REFUSED.labels(session.tenant, exc.code.name).inc()
            session.send(item_error(exc, item.WhichOneof("item") or "", request_id=instruction_id))
        finally:
            session.pending.discard(marker)

    async def add_instruction(self, tenant: str, stream_id: str, text: str, instruction_id: str,
                              session_id: str = "") -> api_pb2.InstructionList:
        text = check_instruction(text, instruction_id, self.cfg.gateway)
        self.sessions.admit_instruction(tenant)
        instruction = pb.StandingInstruction(instruction_id=instruction_id, text=text, created_unix=time.time())
        rec = await self.instruction_command(tenant, stream_id, session_id,
                                             add_instruction=pb.AddInstructionCommand(instruction=instruction))
        log.info("stream %s of tenant %s: instruction %s added: %s", stream_id, tenant, instruction_id, text)
        return instruction_list(rec, added_id=instruction_id)

    async def cancel_instruction(self, tenant: str, stream_id: str, instruction_id: str,
                                 session_id: str = "") -> api_pb2.InstructionList:
        check_instruction_id(instruction_id)
        rec = await self.instruction_command(
            tenant, stream_id, session_id,
            cancel_instruction=pb.CancelInstructionCommand(instruction_id=instruction_id))
        return instruction_list(rec, cancelled_id=instruction_id)

    async def instruction_command(self, tenant: str, stream_id: str, session_id: str,
                                  **command: Any) -> pb.ResponseRecord:
        """An instruction command to the stream's owner, and its reply: the stream's instructions."""
        rec = await self.owner_reply(tenant, stream_id, session_id, **command)
        self.sessions.instructions[(tenant, stream_id)] = len(rec.instructions)
        return rec

    async def owner_reply(self, tenant: str, stream_id: str, session_id: str, **command: Any) -> pb.ResponseRecord:
        """A command to the stream's owner in the LLM service (through any gateway replica,
        as for `Ask`), and its reply; InvalidItem with the reply's status if it is an error."""
        request_id = f"cmd-{uuid.uuid4().hex[:12]}"
        kind, body = next(iter(command.items()))
        body.request_id = request_id
        reply: asyncio.Future[pb.ResponseRecord] = asyncio.get_running_loop().create_future()

        def arrived(rec: pb.ResponseRecord) -> None:
            if not reply.done():
                reply.set_result(rec)

        self.handlers[(tenant, request_id)] = arrived
        cmd = pb.CommandRecord(stream_id=stream_id, tenant=tenant, session_id=session_id,
                               gateway_time_unix=time.time(), **{kind: body})
        lk.publish(self.producer, self.cfg.kafka.commands_topic, cmd)
        timeout = self.cfg.gateway.ask_timeout_s
        try:
            async with asyncio.timeout(timeout):
                rec = await reply
        except TimeoutError:
            raise InvalidItem(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no reply from the stream's owner within {timeout:g}s (gateway.ask_timeout_s)") from None
        finally:
            self.handlers.pop((tenant, request_id), None)
        if rec.error:
            raise InvalidItem(response_status(rec), rec.error)
        return rec

    async def AddInstruction(self, request: api_pb2.AddInstructionRequest,
                             context: grpc.aio.ServicerContext) -> api_pb2.InstructionList:
        tenant = await self.tenant(context)
        try:
            check_stream_id(request.stream_id)
            return await self.add_instruction(tenant, request.stream_id, request.text,
                                              request.instruction_id or f"i-{uuid.uuid4().hex[:8]}")
        except InvalidItem as exc:
            metrics.REFUSED.labels(tenant, exc.code.name).inc()
            await context.abort(exc.code, exc.message)
            raise  # abort raised already

    async def ListInstructions(self, request: api_pb2.ListInstructionsRequest,
                               context: grpc.aio.ServicerContext) -> api_pb2.InstructionList:
        tenant = await self.tenant(context)
        try:
            check_stream_id(request.stream_id)
            return instruction_list(await self.instruction_command(
                tenant, request.stream_id, "", list_instructions=pb.ListInstructionsCommand()))
        except InvalidItem as exc:
            await context.abort(exc.code, exc.message)
            raise

    async def CancelInstruction(self, request: api_pb2.CancelInstructionRequest,
                                context: grpc.aio.ServicerContext) -> api_pb2.InstructionList:
        tenant = await self.tenant(context)
        try:
            check_stream_id(request.stream_id)
            return await self.cancel_instruction(tenant, request.stream_id, request.instruction_id)
        except InvalidItem as exc:
            await context.abort(exc.code, exc.message)
            raise

    # --- Ask -------------------------------------------------------------------------
    async def Ask(self, request: api_pb2.AskRequest,
                  context: grpc.aio.ServicerContext) -> api_pb2.AskResponse:
        tenant = await self.tenant(context)
        try:
            check_stream_id(request.stream_id)
            text = check_question(request.question, self.cfg.gateway)
            check_max_tokens(request.max_tokens, self.cfg.llm.engine.max_answer_tokens)
            timeout = check_timeout(request.timeout_s, self.cfg.gateway)
            method = check_context_method(request.context_method)
            example = await self.check_example(request.example_image)
            self.sessions.admit_question(tenant)
        except InvalidItem as exc:
            metrics.REFUSED.labels(tenant, exc.code.name).inc()
            await context.abort(exc.code, exc.message)
        metrics.QUESTIONS.labels(tenant).inc()
        timing = AnswerTiming()
        # The stream may be watched through another gateway replica: its owner in the LLM
        # service answers (NOT_FOUND where the tenant has no such stream open).
        session = self.sessions.get(tenant, request.stream_id)
        after_seq = session.last_seq if session is not None else -1
        request_id = f"ask-{uuid.uuid4().hex[:12]}"
        queue: asyncio.Queue[pb.ResponseRecord] = asyncio.Queue()
        self.handlers[(tenant, request_id)] = queue.put_nowait
        self.publish_ask(tenant, request.stream_id, after_seq, request_id, text, request.max_tokens,
                         example=example, context_method=method, deadline_unix=time.time() + timeout)
        parts: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    rec = await queue.get()
                    timing.relayed(rec)
                    parts.append(rec.text_delta)
                    if rec.final:
                        break
        except TimeoutError:
            self.handlers.pop((tenant, request_id), None)
            # the LLM service stops it at the deadline anyway
            self.publish_cancel(tenant, request.stream_id, request_id)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no complete answer within {timeout:g}s")
        except asyncio.CancelledError:  # the client went away
            self.handlers.pop((tenant, request_id), None)
            self.publish_cancel(tenant, request.stream_id, request_id)
            raise
        if rec.error:
            await context.abort(response_status(rec), rec.error)
        return api_pb2.AskResponse(request_id=request_id, text="".join(parts).strip(),
                                   stream_time_s=rec.stream_time_s, ttft_s=rec.timings.ttft_s,
                                   retrieved_pts_s=rec.retrieved_pts_s)


async def serve(cfg: LivelensConfig, stop: asyncio.Event) -> None:
    g = cfg.gateway
    ensure_free(g.host, g.port, "gateway.port")
    lk.ensure_topics(cfg.kafka)
    producer = lk.make_producer(cfg.kafka, "livelens-gateway")
    serve_metrics(g.host, g.metrics_port, "gateway.metrics_port", lambda: {})
    servicer = LiveLensServicer(cfg, producer)
    router = KafkaRouter(cfg.kafka, asyncio.get_running_loop(), servicer.on_response,
                         servicer.on_tokens)
    server = grpc.aio.server(options=[
        # Room above the frame limit, so an oversized frame gets its own ItemError
        # instead of gRPC ending the whole stream.
        ("grpc.max_receive_message_length", 4 * g.max_frame_bytes + 1024 * 1024),
    ])
    api_pb2_grpc.add_LiveLensServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([
        api_pb2.DESCRIPTOR.services_by_name["LiveLens"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ], server)
    address = f"{g.host}:{g.port}"
    if g.tls_cert:
        creds = grpc.ssl_server_credentials(
            [(Path(g.tls_key).read_bytes(), Path(g.tls_cert).read_bytes())],
            root_certificates=Path(g.tls_client_ca).read_bytes() if g.tls_client_ca else None,
            require_client_auth=bool(g.tls_client_ca))
        server.add_secure_port(address, creds)
    else:
        server.add_insecure_port(address)
    await server.start()
    router.start()
    for name in ("", "livelens.v1.LiveLens"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gateway serving on %s (%s)", address,
             "mTLS" if g.tls_client_ca else "TLS" if g.tls_cert else "plaintext")
    try:
        await stop.wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2)
        router.stop()
        producer.close()
