"""What a careless or hostile client sends, through the running stack (gateway, Kafka,
encoder, Triton, LLM service), written as a client built from `protos/` alone would: raw
gRPC, nothing checked on the client's side. Every item gets its status and a sentence, the
stream goes on, other streams do not notice, and no acknowledged frame is lost unsaid."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psutil
import pytest

from livelens.client import Ack, Answer, Client, Folded
from livelens.subscriber import TopicSubscriber
from livelens.v1 import api_pb2, api_pb2_grpc
from tests.test_integration import TOKEN, collect, final_response, frames_of
from tests.test_validation import sized_jpeg, sized_png

pytestmark = pytest.mark.integration

METADATA = (("authorization", f"Bearer {TOKEN}"),)
GOOD = frames_of("vtest.avi", 3.0)


def open_item(stream_id: str, resume: str = "") -> api_pb2.WatchRequest:
    return api_pb2.WatchRequest(open=api_pb2.OpenRequest(stream_id=stream_id, resume_session_id=resume))


def frame_item(seq: int, pts_s: float, image: bytes = GOOD[0]) -> api_pb2.WatchRequest:
    return api_pb2.WatchRequest(frame=api_pb2.Frame(seq=seq, pts_s=pts_s, image=image))


async def watch(target: str, items: list[api_pb2.WatchRequest], responses: int, hold_s: float = 30.0,
                metadata: tuple = METADATA) -> list[api_pb2.WatchResponse] | tuple[grpc.StatusCode, str]:
    """Send `items` on one Watch and keep it open (writing nothing more) until `responses`
    came back; the call's status instead if it ended."""
    async def requests() -> AsyncIterator[api_pb2.WatchRequest]:
        for item in items:
            yield item
        await asyncio.sleep(hold_s)

    got: list[api_pb2.WatchResponse] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = api_pb2_grpc.LiveLensStub(channel).Watch(requests(), metadata=metadata)
        try:
            async with asyncio.timeout(hold_s):
                async for response in call:
                    got.append(response)
                    if len(got) >= responses:
                        break
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        finally:
            call.cancel()
    return got


def errors(responses: list[api_pb2.WatchResponse] | tuple[grpc.StatusCode, str]) -> list[tuple[str, str]]:
    """The ItemErrors among a Watch's responses (the call must not have failed)."""
    assert isinstance(responses, list), responses
    return [(r.error.status, r.error.message) for r in responses if r.WhichOneof("item") == "error"]


def test_ids_are_matched_whole_and_a_resume_takes_only_its_own_session(stack):
    target = stack.gateway_target

    async def run() -> dict:
        out: dict = {}
        for stream_id in ("nl-test\n", "..", "."):
            out[stream_id] = await watch(target, [open_item(stream_id)], 1)
        out["unknown session"] = await watch(target, [open_item("cam-r", "never-issued-0123")], 1)
        out["empty"] = errors(await watch(target, [open_item("empty-item"), api_pb2.WatchRequest()], 2))
        first = await watch(target, [open_item("resumed"), *(frame_item(i, i * 0.5) for i in range(3))], 4, 10)
        assert isinstance(first, list)
        session_id = first[0].opened.session_id
        out["other stream"] = await watch(target, [open_item("resumed-not", session_id)], 1)
        out["other tenant"] = await watch(target, [open_item("resumed", session_id)], 1,
                                          metadata=(("authorization", "Bearer beta-token"),))
        out["own"] = await watch(target, [open_item("resumed", session_id), frame_item(1, 0.5),
                                          frame_item(2, 1.0), frame_item(3, 1.5)], 4)
        # a duplicate open, while its client goes on writing frames: always ALREADY_EXISTS
        async with Client(target, TOKEN) as client, client.watch("twice") as held:
            await held.opened()
            out["twice"] = [await watch(target, [open_item("twice"), *(frame_item(i, i) for i in range(40))], 1)
                            for _ in range(6)]
        return out

    out = asyncio.run(run())
    for stream_id in ("nl-test\n", "..", "."):
        code, details = out[stream_id]
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "is invalid" in details
    for case in ("unknown session", "other stream", "other tenant"):
        code, details = out[case]
        assert code == grpc.StatusCode.NOT_FOUND and "no session" in details, (case, details)
    assert out["empty"] == [("INVALID_ARGUMENT", "the WatchRequest is empty: set one of frame, question, "
                                                 "instruction, cancel_instruction")]
    own = out["own"]
    assert own[0].opened.last_seq == 2  # how far it got before the break
    assert [s for s, _ in errors(own)] == ["ALREADY_EXISTS"] * 2  # frames 1 and 2: acknowledged once only
    assert [r.ack.seq for r in own if r.WhichOneof("item") == "ack"] == [3]
    assert all(code == grpc.StatusCode.ALREADY_EXISTS for code, _ in out["twice"]), out["twice"]


def test_no_frame_or_question_poisons_a_stream(stack):
    bad = [frame_item(0, 0.0), frame_item(1, 1e308), frame_item(2**63 - 1, 1.0), frame_item(5_000_000, 1.0),
           frame_item(1, float("nan")), frame_item(1, -5.0),
           api_pb2.WatchRequest(question=api_pb2.Question(request_id="emoji", text="\U0001f600" * 150)),
           frame_item(1, 0.5)]
    got = asyncio.run(watch(stack.gateway_target, [open_item("poison"), *bad], 9))
    assert isinstance(got, list)
    refused = errors(got)
    assert [s for s, _ in refused] == ["INVALID_ARGUMENT"] * 6, refused
    for words, (_, message) in zip(("max_pts_step_s", "below 2^53", "max_seq_step", "finite", "non-negative",
                                    "600 bytes in UTF-8, over gateway.max_question_bytes"), refused, strict=True):
        assert words in message, message
    assert [r.ack.seq for r in got if r.WhichOneof("item") == "ack"] == [0, 1]  # the stream went on


def test_pixel_bombs_cost_nothing(stack):
    """Pixel bombs (a few hundred bytes whose headers say 20000x20000 or more), as frames and
    as questions' example images, are refused from their headers: neither the gateway's
    memory nor another stream's ack latency moves while they come in."""
    gateway = psutil.Process(stack.process("gateway").proc.pid)
    bombs = [sized_jpeg(20000, 20000), sized_png(20000, 20000), sized_png(2**31 - 1, 2**31 - 1),
             sized_jpeg(65535, 65535)]

    async def run() -> tuple[list[float], list[float], Any, int, int]:
        latencies: dict[int, float] = {}
        sent: dict[int, float] = {}
        async with Client(stack.gateway_target, TOKEN) as client, client.watch("bystander") as other:
            async def listen() -> None:
                async for e in other.events():
                    if isinstance(e, Ack):
                        latencies[e.seq] = time.monotonic() - sent[e.seq]

            listener = asyncio.create_task(listen())

            async def bystander(lo: int, hi: int) -> None:
                for seq in range(lo, hi):
                    sent[seq] = time.monotonic()
                    await other.send_frame(seq, seq * 0.25, GOOD[seq % len(GOOD)])
                    await asyncio.sleep(0.25)

            await bystander(0, 20)  # 5 s without bombs
            rss_before = gateway.memory_info().rss
            items = [open_item("bombs")]
            for i in range(200):
                items.append(frame_item(i, i * 0.1, bombs[i % len(bombs)]))
                if i % 10 == 0:
                    items.append(api_pb2.WatchRequest(question=api_pb2.Question(
                        request_id=f"bomb-{i}", text="When did this appear?", example_image=bombs[i % len(bombs)])))
            bombing = asyncio.create_task(watch(stack.gateway_target, items, 1 + 220, hold_s=60))
            await bystander(20, 40)  # 5 s with bombs
            refused = await bombing
            rss_after = gateway.memory_info().rss
            await asyncio.sleep(2)
            listener.cancel()
        before = [latencies[s] for s in range(20) if s in latencies]
        during = [latencies[s] for s in range(20, 40) if s in latencies]
        return before, during, refused, rss_before, rss_after

    before, during, refused, rss_before, rss_after = asyncio.run(run())
    assert isinstance(refused, list)
    statuses = errors(refused)
    assert len(statuses) == 220 and {s for s, _ in statuses} == {"INVALID_ARGUMENT"}
    assert all("over gateway.max_frame_pixels" in m for _, m in statuses), statuses[:3]
    assert len(before) == len(during) == 20  # every bystander frame acknowledged
    p99 = lambda xs: statistics.quantiles(xs, n=100)[98]  # noqa: E731
    assert p99(during) <= p99(before) + 0.5, (sorted(before), sorted(during))
    assert rss_after - rss_before < 32 * 2**20, (rss_before, rss_after)


def test_an_encoder_outage_folds_its_backlog_and_every_acknowledged_frame_is_accounted_for(stack):
    """The encoder stops (SIGSTOP) for longer than encoder.max_frame_age_s while a stream
    goes on: once it runs again it folds the backlog into one record instead of dropping
    it, the client is told which seqs went in as one and why, and the LLM service counts
    every acknowledged frame once."""
    frames = frames_of("vtest.avi", 30.0)
    encoder = stack.process("encoder").proc
    outage_s = stack.cfg.encoder.max_frame_age_s + 4.0

    async def run() -> tuple[list, set[int]]:
        async with Client(stack.gateway_target, TOKEN) as client, client.watch("outage") as s:
            for seq in range(6):
                await s.send_frame(seq, seq * 0.5, frames[seq])
            await collect(s, lambda ev: sum(isinstance(e, Ack) for e in ev) == 6, 60)
            os.kill(encoder.pid, signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                seq = 6
                while time.monotonic() - stopped < outage_s:
                    await s.send_frame(seq, seq * 0.5, frames[seq % len(frames)])
                    seq += 1
                    await asyncio.sleep(0.5)
            finally:
                os.kill(encoder.pid, signal.SIGCONT)
            for extra in range(seq, seq + 4):
                await s.send_frame(extra, extra * 0.5, frames[extra % len(frames)])
            await asyncio.sleep(3)
            await s.ask("What happened?", request_id="after-outage", max_tokens=4, timeout_s=240)
            events = await collect(s, lambda ev: any(isinstance(e, Answer) and e.final
                                                     and e.request_id == "after-outage" for e in ev), 240)
            return events, {e.seq for e in events if isinstance(e, Ack)}

    with TopicSubscriber(stack.cfg.kafka, ["responses"], tenant="acme") as sub:
        events, acked = asyncio.run(run())
        final = final_response(sub, "after-outage", timeout_s=30)
    folds = [e for e in events if isinstance(e, Folded)]
    assert folds and all(f.reason == "encoder_behind" and 0 < f.encoded <= f.frames for f in folds), folds
    assert any(f.frames > 1 and f.to_seq >= 6 for f in folds), folds  # those sent while it was stopped
    assert final is not None and not final.error
    t = final.timings
    assert t.frames_seen == len(acked) == max(acked) + 1  # every acknowledged frame, once
    assert t.frames_folded == sum(f.frames - 1 for f in folds) and t.frames_dropped == 0
