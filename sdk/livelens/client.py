"""The livelens client SDK.

    async with Client("127.0.0.1:50051", token="dev-token") as client:
        async with client.watch("cam-1") as session:
            await session.send_frame(seq=0, pts_s=0.0, image=jpeg_bytes)
            request_id = await session.ask("What is on the table?")
            async for answer in session.answers():
                print(answer.text, end="")

`session.events()` yields every event (acks, answers, alerts, errors) in arrival order;
`answers()` and `alerts()` are filtered views. Each iterator gets its own copy of the
events, so they can run concurrently.

Standing instructions: the service speaks up when the stream shows what one names.

            instruction_id = await session.add_instruction("a car appears")
            async for alert in session.alerts():
                print(alert.stream_time_s, alert.instruction_id, alert.text)
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from livelens.v1 import api_pb2, api_pb2_grpc


@dataclass(frozen=True)
class Ack:
    seq: int


@dataclass(frozen=True)
class Answer:
    request_id: str
    text: str  # this delta's text
    final: bool
    stream_time_s: float
    ttft_s: float
    retrieved_pts_s: tuple[float, ...] = ()  # older moments brought back (final delta)


@dataclass(frozen=True)
class Alert:
    request_id: str
    stream_time_s: float
    reason: str  # "instruction" or "scene_change"
    score: float
    text: str
    instruction_id: str = ""  # the standing instruction it answers
    # What matched: tags with their probabilities, P(yes), or a scene change's tags before -> after.
    # The model's remark about the alert follows as `Answer` deltas with its request_id.
    matched: str = ""


@dataclass(frozen=True)
class Instruction:
    instruction_id: str
    text: str


@dataclass(frozen=True)
class Instructions:
    """A stream's standing instructions (oldest first), after an add or a cancel."""

    instructions: tuple[Instruction, ...]
    added_id: str = ""
    cancelled_id: str = ""


class Refused(Exception):
    """The gateway refused an item of a Watch (its ItemError)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ItemError:
    status: str
    message: str
    seq: int
    request_id: str
    item: str = ""  # the kind of item it answers: "frame", "question", "instruction", ...


@dataclass(frozen=True)
class Folded:
    """Acknowledged frames from_seq..to_seq went into the model's context folded into one
    (the stream fell behind): `reason` "encoder_behind" or "context_behind"."""

    from_seq: int
    to_seq: int
    from_pts_s: float
    to_pts_s: float
    frames: int
    encoded: int
    reason: str


@dataclass(frozen=True)
class AskResult:
    request_id: str
    text: str
    stream_time_s: float
    ttft_s: float
    retrieved_pts_s: tuple[float, ...] = ()


Event = Ack | Answer | Alert | ItemError | Instructions | Folded


def _instructions(msg: api_pb2.InstructionList) -> Instructions:
    return Instructions(tuple(Instruction(i.instruction_id, i.text) for i in msg.instructions),
                        msg.added_id, msg.cancelled_id)


def _event(resp: api_pb2.WatchResponse) -> Event | None:
    kind = resp.WhichOneof("item")
    if kind == "ack":
        return Ack(resp.ack.seq)
    if kind == "answer":
        a = resp.answer
        return Answer(a.request_id, a.text, a.final, a.stream_time_s, a.ttft_s, tuple(a.retrieved_pts_s))
    if kind == "alert":
        al = resp.alert
        return Alert(al.request_id, al.stream_time_s, al.reason, al.score, al.text, al.instruction_id, al.matched)
    if kind == "instructions":
        return _instructions(resp.instructions)
    if kind == "folded":
        f = resp.folded
        return Folded(f.from_seq, f.to_seq, f.from_pts_s, f.to_pts_s, f.frames, f.encoded, f.reason)
    if kind == "error":
        e = resp.error
        return ItemError(e.status, e.message, e.seq, e.request_id, e.item)
    return None


_END = object()


class WatchSession:
    """One open `Watch` call: send frames and questions, iterate what comes back."""

    def __init__(self, stub: api_pb2_grpc.LiveLensStub, stream_id: str,
                 metadata: tuple[tuple[str, str], ...], resume_session_id: str = "") -> None:
        self.stream_id = stream_id
        self.session_id = resume_session_id  # the gateway's, once opened: resume with it
        self.last_seq = -1  # once resumed: the last frame acknowledged before the break (send above it)
        self._outgoing: asyncio.Queue[Any] = asyncio.Queue()
        self._subscribers: list[asyncio.Queue[Any]] = []
        self._history: list[Event] = []
        self._stub, self._metadata = stub, metadata
        self._call = stub.Watch(self._requests(), metadata=metadata)
        self._opened = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._dispatch())
        self.status: grpc.StatusCode | None = None
        self.details = ""

    async def _requests(self) -> AsyncIterator[api_pb2.WatchRequest]:
        yield api_pb2.WatchRequest(open=api_pb2.OpenRequest(stream_id=self.stream_id,
                                                            resume_session_id=self.session_id))
        while (item := await self._outgoing.get()) is not _END:
            yield item

    async def _dispatch(self) -> None:
        try:
            async for resp in self._call:
                if resp.WhichOneof("item") == "opened" and not self._opened.done():
                    self.session_id, self.last_seq = resp.opened.session_id, resp.opened.last_seq
                    self._opened.set_result(resp.opened.tenant)
                    continue
                event = _event(resp)
                if event is None:
                    continue
                self._history.append(event)
                for q in self._subscribers:
                    q.put_nowait(event)
            self.status = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            # When the server ends the call before our first message is out (a bad token,
            # a limit), the failed send can surface first: report the server's status.
            code, details = await self._call.code(), await self._call.details()
            if exc.code() == grpc.StatusCode.INTERNAL and code not in (grpc.StatusCode.OK, exc.code()):
                exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
            self.status, self.details = exc.code(), exc.details() or ""
            if not self._opened.done():
                self._opened.set_exception(exc)
        finally:
            for q in self._subscribers:
                q.put_nowait(_END)

    async def opened(self) -> str:
        """Wait until the gateway accepted the stream; returns the tenant."""
        return str(await self._opened)

    async def send_frame(self, seq: int, pts_s: float, image: bytes) -> None:
        await self._outgoing.put(api_pb2.WatchRequest(frame=api_pb2.Frame(seq=seq, pts_s=pts_s,
                                                                          image=image)))

    async def ask(self, question: str, max_tokens: int = 0, request_id: str = "",
                  example_image: bytes = b"", context_method: str = "", timeout_s: float = 0.0) -> str:
        """Ask about the stream; with `example_image` (JPEG/PNG) the moments that look like
        it are brought back into the context ("when did this appear?"). `context_method`
        (evaluation): "recompute", "streaming_kv", "engine_cache", "window" or "full" instead of the
        service's own context. `timeout_s`: how long the answer may take (0: the gateway's
        default); past it, an ItemError DEADLINE_EXCEEDED ends the answer."""
        request_id = request_id or f"q-{uuid.uuid4().hex[:12]}"
        await self._outgoing.put(api_pb2.WatchRequest(question=api_pb2.Question(
            request_id=request_id, text=question, max_tokens=max_tokens, example_image=example_image,
            context_method=context_method, timeout_s=timeout_s)))
        return request_id

    async def add_instruction(self, text: str, instruction_id: str = "", timeout_s: float = 60.0) -> str:
        """Watch for `text` ("a car appears", "someone enters"): an `Alert` with this id
        comes when the stream shows it. Returns the id; raises `Refused` (e.g.
        RESOURCE_EXHAUSTED: too many) or TimeoutError."""
        instruction_id = instruction_id or f"i-{uuid.uuid4().hex[:8]}"
        item = api_pb2.WatchRequest(instruction=api_pb2.Instruction(instruction_id=instruction_id, text=text))
        await self._reply(item, lambda e: isinstance(e, Instructions) and e.added_id == instruction_id,
                          instruction_id, timeout_s)
        return instruction_id

    async def cancel_instruction(self, instruction_id: str, timeout_s: float = 60.0) -> None:
        item = api_pb2.WatchRequest(cancel_instruction=api_pb2.CancelInstruction(instruction_id=instruction_id))
        await self._reply(item, lambda e: isinstance(e, Instructions) and e.cancelled_id == instruction_id,
                          instruction_id, timeout_s)

    async def instructions(self) -> tuple[Instruction, ...]:
        """The stream's standing instructions, oldest first."""
        r = await self._stub.ListInstructions(api_pb2.ListInstructionsRequest(stream_id=self.stream_id),
                                              metadata=self._metadata)
        return _instructions(r).instructions

    async def _reply(self, item: api_pb2.WatchRequest, is_reply: Callable[[Event], bool], request_id: str,
                     timeout_s: float) -> Event:
        """Send `item` and wait for the event `is_reply` accepts, or its ItemError."""
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._subscribers.append(q)  # before the item goes out
        try:
            await self._outgoing.put(item)
            async with asyncio.timeout(timeout_s):
                while (event := await q.get()) is not _END:
                    if is_reply(event):
                        return event
                    if isinstance(event, ItemError) and event.request_id == request_id:
                        raise Refused(event.status, event.message)
            raise Refused(self.status.name if self.status else "UNAVAILABLE", "the Watch ended before the reply")
        finally:
            self._subscribers.remove(q)

    async def close(self) -> None:
        """Half-close: no more frames or questions; answers still pending keep coming. The
        stream ends."""
        await self._outgoing.put(_END)

    def abort(self) -> None:
        """Drop the call without closing the stream, as a broken connection does: the stream
        stays open, to be resumed with `Client.watch(..., resume_session_id=self.session_id)`."""
        self._call.cancel()

    async def events(self, replay: bool = False) -> AsyncIterator[Event]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        if replay:
            for e in self._history:
                q.put_nowait(e)
        if self._pump.done():
            q.put_nowait(_END)
        self._subscribers.append(q)
        try:
            while (event := await q.get()) is not _END:
                yield event
        finally:
            self._subscribers.remove(q)

    async def answers(self) -> AsyncIterator[Answer]:
        async for e in self.events():
            if isinstance(e, Answer):
                yield e

    async def alerts(self) -> AsyncIterator[Alert]:
        async for e in self.events():
            if isinstance(e, Alert):
                yield e

    @property
    def ended(self) -> bool:
        """The call is over (closed, refused, or broken: then `status` says how)."""
        return self._pump.done()

    async def wait_closed(self) -> None:
        await self._pump


class Client:
    def __init__(self, target: str, token: str = "", root_cert: bytes | None = None,
                 client_cert: tuple[bytes, bytes] | None = None) -> None:
        """`token`: the bearer token; `root_cert`: TLS (the gateway's CA); `client_cert`:
        (private key, certificate) for mTLS, where the certificate names the tenant."""
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if root_cert is not None:
            key, chain = client_cert if client_cert is not None else (None, None)
            creds = grpc.ssl_channel_credentials(root_cert, private_key=key, certificate_chain=chain)
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = api_pb2_grpc.LiveLensStub(self.channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    @contextlib.asynccontextmanager
    async def watch(self, stream_id: str, resume_session_id: str = "") -> AsyncIterator[WatchSession]:
        """Open a stream (or resume one whose call broke, with its `session_id`)."""
        session = WatchSession(self.stub, stream_id, self.metadata, resume_session_id)
        try:
            await session.opened()
            yield session
        finally:
            await session.close()
            with contextlib.suppress(asyncio.CancelledError):
                await session.wait_closed()

    async def add_instruction(self, stream_id: str, text: str, instruction_id: str = "") -> Instructions:
        """A standing instruction on an open stream (watched through any gateway replica);
        its alerts come on the stream's Watch."""
        r = await self.stub.AddInstruction(api_pb2.AddInstructionRequest(
            stream_id=stream_id, text=text, instruction_id=instruction_id), metadata=self.metadata)
        return _instructions(r)

    async def list_instructions(self, stream_id: str) -> tuple[Instruction, ...]:
        r = await self.stub.ListInstructions(api_pb2.ListInstructionsRequest(stream_id=stream_id),
                                             metadata=self.metadata)
        return _instructions(r).instructions

    async def cancel_instruction(self, stream_id: str, instruction_id: str) -> Instructions:
        r = await self.stub.CancelInstruction(api_pb2.CancelInstructionRequest(
            stream_id=stream_id, instruction_id=instruction_id), metadata=self.metadata)
        return _instructions(r)

    async def ask(self, stream_id: str, question: str, max_tokens: int = 0,
                  timeout_s: float = 0.0, example_image: bytes = b"", context_method: str = "") -> AskResult:
        r = await self.stub.Ask(api_pb2.AskRequest(stream_id=stream_id, question=question,
                                                   max_tokens=max_tokens, timeout_s=timeout_s,
                                                   example_image=example_image, context_method=context_method),
                                metadata=self.metadata)
        return AskResult(r.request_id, r.text, r.stream_time_s, r.ttft_s, tuple(r.retrieved_pts_s))
