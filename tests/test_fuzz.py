"""Bad input, generated (`hypothesis`), against the running stack: random and mutated
`WatchRequest`s (every item and field: frames, questions, instructions, a second open, an
empty item) and unary calls get a status each, never INTERNAL, and a good frame after
them goes through; random and mutated records on every topic go to the dead-letter topic
(those no consumer can use); no service dies, and another stream streaming all along keeps
its ack latency while the gateway's memory stays bounded (the last test).

`make test` runs 25 examples of each; `LIVELENS_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py`
runs a long fuzz."""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from livelens import health
from livelens.client import Ack, Answer, Client, ItemError
from livelens.subscriber import TopicSubscriber
from livelens.v1 import api_pb2, api_pb2_grpc
from livelens.v1 import messages_pb2 as pb
from services.common import kafka as lk
from tests.test_integration import TOKEN, collect, frames_of
from tests.test_validation import sized_jpeg, sized_png

pytestmark = pytest.mark.integration

GOOD = frames_of("vtest.avi", 2.0)
# A failing case is reported as generated: shrinking it against a live stack takes longer than CI has.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
# `make test` runs a short fuzz; LIVELENS_FUZZ_EXAMPLES=500 (say) runs a long one.
EXAMPLES = int(os.environ.get("LIVELENS_FUZZ_EXAMPLES", "25"))
NEVER = {"INTERNAL", "UNKNOWN"}  # what no input may cause


def _bomb(width: int, height: int, png: bool) -> bytes:
    """A small image whose header says width x height (a JPEG's sides wrap at 16 bits)."""
    return sized_png(width, height) if png else sized_jpeg(width & 0xFFFF, height & 0xFFFF)


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1, 1000),
                   st.sampled_from([1e308, -0.0, 86400.5]))
seqs = st.one_of(st.integers(-3, 40), st.sampled_from([2**53 - 1, 2**53, 2**63 - 1, -(2**63), 1_000_041]))
ids = st.one_of(st.just(""), st.text(max_size=20), st.sampled_from(["ok-id", "nl\n", "..", "a/b", "x" * 200]))
images = st.one_of(st.sampled_from(GOOD), st.binary(max_size=64), st.sampled_from(GOOD).map(lambda b: b[: len(b) // 2]),
                   st.builds(_bomb, st.integers(0, 70000), st.integers(0, 70000), st.booleans()))
texts = st.one_of(st.text(max_size=300), st.just("What do you see?"), st.text(st.characters(min_codepoint=0x1F600,
                                                                                          max_codepoint=0x1F64F),
                                                                          min_size=90, max_size=120))
frame_items = st.builds(
    lambda seq, pts, image: api_pb2.WatchRequest(frame=api_pb2.Frame(seq=seq, pts_s=pts, image=image)),
    seqs, floats, images)
question_items = st.builds(
    lambda text, max_tokens, method, timeout, request_id, example: api_pb2.WatchRequest(question=api_pb2.Question(
        text=text, max_tokens=max_tokens, context_method=method, timeout_s=timeout, request_id=request_id,
        example_image=example)),
    texts, st.integers(-5, 2), st.sampled_from(["", "window", "full", "bogus", "recompute"]),
    st.one_of(st.just(0.0), floats), ids, st.one_of(st.just(b""), images))
instruction_items = st.one_of(
    st.builds(lambda text, i: api_pb2.WatchRequest(instruction=api_pb2.Instruction(text=text,
                                                                                         instruction_id=i)),
              texts, ids),
    st.builds(lambda i: api_pb2.WatchRequest(cancel_instruction=api_pb2.CancelInstruction(instruction_id=i)), ids))
other_items = st.sampled_from([api_pb2.WatchRequest(), api_pb2.WatchRequest(open=api_pb2.OpenRequest(stream_id="x"))])
items = st.lists(st.one_of(frame_items, frame_items, question_items, instruction_items, other_items),
                 min_size=1, max_size=12)


def outcomes(stack, requests: list[api_pb2.WatchRequest]) -> tuple[int, list]:
    """Send the requests on a fresh stream, and once each has its outcome a good frame after
    the last one acknowledged (the stream goes on); returns how many frames were sent and
    everything that came back."""
    frames = sum(r.WhichOneof("item") == "frame" for r in requests) + 1
    pts = {r.frame.seq: r.frame.pts_s for r in requests if r.WhichOneof("item") == "frame"}

    async def run() -> list:
        async with Client(stack.gateway_target, TOKEN) as client, client.watch(f"fuzz-{time.monotonic_ns()}") as s:
            asked = set()
            for i, r in enumerate(requests):
                if r.WhichOneof("item") == "question":
                    r.question.request_id = f"q{i}-{r.question.request_id}"
                    asked.add(r.question.request_id)
                await s._outgoing.put(r)  # as it was generated, unchecked by the SDK

            def settled(ev: list, n: int) -> bool:
                told = sum(isinstance(e, Ack) or (isinstance(e, ItemError) and e.item == "frame") for e in ev)
                answered = {e.request_id for e in ev if isinstance(e, ItemError | Answer)
                            and (isinstance(e, ItemError) or e.final)}
                return told >= n and answered >= asked

            events = await collect(s, lambda ev: settled(ev, frames - 1), 120)
            last = max((e.seq for e in events if isinstance(e, Ack)), default=-1)
            await s.send_frame(last + 1, pts.get(last, 0.0), GOOD[0])
            return await collect(s, lambda ev: settled(ev, frames), 120)

    return frames, asyncio.run(run())


@pytest.fixture(scope="module")
def bystander(stack) -> Iterator[Bystander]:
    """Another stream, 2 frames a second for as long as the module's tests run: its acks'
    latencies, and the gateway's memory."""
    b = Bystander(stack)
    b.start()
    yield b
    b.stop()


class Bystander(threading.Thread):
    def __init__(self, stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.latencies: list[float] = []
        self.rss: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        gateway = psutil.Process(self.stack.process("gateway").proc.pid)
        sent: dict[int, float] = {}
        async with Client(self.stack.gateway_target, TOKEN) as client, client.watch("fuzz-bystander") as s:
            async def listen() -> None:
                async for e in s.events():
                    if isinstance(e, Ack):
                        self.latencies.append(time.monotonic() - sent[e.seq])

            listener = asyncio.create_task(listen())
            seq = 0
            while not self.stopping.is_set():
                sent[seq] = time.monotonic()
                await s.send_frame(seq, seq * 0.5, GOOD[seq % len(GOOD)])
                seq += 1
                if seq % 20 == 0:
                    self.rss.append(gateway.memory_info().rss)
                await asyncio.sleep(0.5)
            await asyncio.sleep(1)
            listener.cancel()

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=NO_SHRINK)
@given(requests=items)
def test_random_watch_items_each_get_a_status(stack, bystander, requests: list[api_pb2.WatchRequest]) -> None:
    frames, events = outcomes(stack, requests)
    settled = [e for e in events if isinstance(e, Ack) or (isinstance(e, ItemError) and e.item == "frame")]
    assert len(settled) == frames, events
    assert isinstance(settled[-1], Ack)  # the good frame after them went through: the stream goes on
    refused = [e for e in events if isinstance(e, ItemError)]
    assert all(e.status and e.message and e.status not in NEVER for e in refused), refused
    assert all(health.check(t) for t in _targets(stack))


rpc_calls = st.one_of(
    st.builds(lambda stream_id, q, n, t, example: ("Ask", api_pb2.AskRequest(
        stream_id=stream_id, question=q, max_tokens=n, timeout_s=t, example_image=example)),
        ids, texts, st.integers(-2, 100), st.sampled_from([0.0, -1.0, 0.001, float("nan"), 1e9]),
        st.one_of(st.just(b""), images)),
    st.builds(lambda stream_id, text, i: ("AddInstruction", api_pb2.AddInstructionRequest(
        stream_id=stream_id, text=text, instruction_id=i)), ids, texts, ids),
    st.builds(lambda stream_id: ("ListInstructions", api_pb2.ListInstructionsRequest(stream_id=stream_id)), ids),
    st.builds(lambda stream_id, i: ("CancelInstruction", api_pb2.CancelInstructionRequest(
        stream_id=stream_id, instruction_id=i)), ids, ids))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=NO_SHRINK)
@given(calls=st.lists(rpc_calls, min_size=1, max_size=6))
def test_random_unary_calls_each_get_a_status(stack, bystander, calls: list) -> None:
    """Ask and the instruction RPCs with any field: an answer, or a status with its sentence
    (most name no open stream: NOT_FOUND), never INTERNAL."""
    async def run() -> list[tuple[str, str]]:
        out = []
        async with grpc.aio.insecure_channel(stack.gateway_target) as channel:
            stub = api_pb2_grpc.LiveLensStub(channel)
            for method, request in calls:
                try:
                    await getattr(stub, method)(request, metadata=(("authorization", f"Bearer {TOKEN}"),),
                                                timeout=90)
                    out.append(("OK", ""))
                except grpc.aio.AioRpcError as exc:
                    out.append((exc.code().name, exc.details() or ""))
        return out

    for status, details in asyncio.run(run()):
        assert status not in NEVER and (status == "OK" or details), (status, details)


def _targets(stack) -> list[str]:
    return [stack.gateway_target, f"127.0.0.1:{stack.cfg.encoder.health_port}",
            f"127.0.0.1:{stack.cfg.llm.health_port}"]


def _unusable(topic: str, value: bytes, cfg) -> bool:
    """Whether a consumer of `topic` must dead-letter this value as unparseable."""
    msg = {cfg.frames_topic: pb.FrameRecord, cfg.tokens_topic: pb.TokensRecord,
           cfg.commands_topic: pb.CommandRecord}[topic]()
    try:
        msg.ParseFromString(value)
    except Exception:  # noqa: BLE001
        return True
    return not (msg.stream_id and msg.tenant)


records = st.lists(st.tuples(
    st.sampled_from(["frames", "tokens", "commands", "responses"]),
    st.one_of(st.binary(max_size=200),
              # parses, names a stream, but its tokens are 3 wide: no model takes them
              st.builds(lambda n: pb.TokensRecord(stream_id="fuzz-kafka", tenant="acme", seq=n, grid_h=7, grid_w=7,
                                                  hidden_size=3, dtype=pb.TokensRecord.FLOAT16,
                                                  embeddings=b"\0" * 2 * 3 * 49).SerializeToString(),
                        st.integers(0, 5)))), min_size=20, max_size=40)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=NO_SHRINK)
@given(sent=records)
def test_poison_records_go_to_the_dead_letter_topic(stack, sent: list[tuple[str, bytes]]) -> None:
    k = stack.cfg.kafka
    topics = {"frames": k.frames_topic, "tokens": k.tokens_topic, "commands": k.commands_topic,
              "responses": k.responses_topic}
    key = f"acme/fuzz-{time.monotonic_ns()}"
    producer = lk.make_producer(k, "fuzz")
    expected = 0
    with TopicSubscriber(k, ["deadletter"]) as sub:
        for name, value in sent:
            producer.send(topics[name], key=key.encode(), value=value)
            expected += name != "responses" and _unusable(topics[name], value, k)
        producer.flush()
        producer.close()

        async def still_answers() -> str:
            async with Client(stack.gateway_target, TOKEN) as client, client.watch("after-fuzz") as s:
                for i, image in enumerate(GOOD[:3]):
                    await s.send_frame(i, i * 0.5, image)
                await s.ask("What do you see?", request_id="after")
                events = await collect(s, lambda ev: any(isinstance(e, Answer) and e.final and e.request_id == "after"
                                                         for e in ev))
                return "".join(e.text for e in events if isinstance(e, Answer) and e.request_id == "after")

        assert asyncio.run(still_answers()).strip()
        letters = [r for r in sub.records(timeout_s=5) if r.key == key.encode() or r.stream_id == "fuzz-kafka"]
    assert len(letters) >= expected, (len(letters), expected)
    assert all(r.reason and r.service in ("encoder", "llm") and r.source_topic in topics.values() for r in letters)
    if any(name == "tokens" and b"fuzz-kafka" in value for name, value in sent):
        assert any("width 3" in r.reason for r in letters)  # parsed, but tokens the model cannot take
    assert all(health.check(t) for t in _targets(stack))


def test_the_fuzz_left_other_streams_and_the_gateway_alone(bystander) -> None:
    """Runs last in this module: while everything above was sent, another stream's acks
    kept coming fast and the gateway's memory stayed bounded."""
    assert len(bystander.latencies) >= 20
    p99 = statistics.quantiles(bystander.latencies, n=100)[98]
    assert p99 < 2.0, sorted(bystander.latencies)[-10:]
    assert max(bystander.rss) - bystander.rss[0] < 128 * 2**20, bystander.rss
