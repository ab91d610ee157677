"""Standing instructions: the decider's state (pure), and, through the running stack, the
instructions' life (Watch items and unary RPCs), their alerts, and their checks."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace

import grpc
import pytest

from devtools.train.data import image_path, needle_frames
from livelens.client import Alert, Answer, Client, Refused
from livelens.config import load_config, with_settings
from livelens.records import encode_jpeg
from livelens.subscriber import TopicSubscriber
from livelens.v1 import messages_pb2 as pb
from services.llm.instructions import InstructionError, InstructionSet, YesNo, subject
from tests.test_integration import TOKEN, collect, frames_of


def instruction(i: int, text: str = "a car appears") -> pb.StandingInstruction:
    return pb.StandingInstruction(instruction_id=f"i-{i}", text=text)


def test_the_subject_of_an_instruction():
    assert subject("Tell me when a car appears.") == "a car"
    assert subject("a truck") == "a truck"
    assert subject("When a dog barks?") == "a dog barks"
    assert subject("a car appears") == "a car"  # the check asks "Does the newest frame show a car?"
    assert subject("say when someone enters") == "someone"


def test_instructions_are_added_cancelled_and_limited():
    cfg = with_settings(load_config(env={}), {"llm.instructions.max_per_stream": 2}).llm
    s = InstructionSet(cfg)
    s.add(instruction(1))
    with pytest.raises(InstructionError) as same:
        s.add(instruction(1, "a dog"))
    s.add(instruction(2, "a dog"))
    with pytest.raises(InstructionError) as full:
        s.add(instruction(3))
    assert same.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "llm.instructions.max_per_stream" in full.value.message
    s.cancel("i-1")
    with pytest.raises(InstructionError) as gone:
        s.cancel("i-1")
    assert gone.value.code == grpc.StatusCode.NOT_FOUND
    assert [i.instruction_id for i in s.protos()] == ["i-2"]
    restored = InstructionSet(cfg)
    restored.restore(s.protos())
    assert restored.protos() == s.protos() and restored.items["i-2"].what == "a dog"


def test_fires_once_per_event_with_hysteresis_and_cooldown():
    cfg = with_settings(load_config(env={}), {"llm.instructions.fire": 0.6, "llm.instructions.rearm": 0.4,
                                              "llm.instructions.cooldown_s": 10.0}).llm
    s = InstructionSet(cfg)
    s.add(instruction(1))
    w = s.items["i-1"]
    scores = [0.1, 0.7, 0.9, 0.5, 0.8, 0.3, 0.9, 0.2, 0.2, 0.9]  # one frame a second
    fired = [t for t, p in enumerate(scores) if s.observe(w, p, float(t))]
    # 1 fires; 2-4: not re-armed (not under 0.4); 5 re-arms; 6 and 9: within the cooldown
    assert fired == [1]
    assert s.observe(w, 0.9, 12.0)  # re-armed at 7-8 and past the cooldown
    assert not s.observe(w, 0.9, 13.0)


def test_checks_take_turns_within_the_budget():
    cfg = with_settings(load_config(env={}), {"llm.instructions.checks_per_s": 2.0}).llm
    s = InstructionSet(cfg)
    for i in range(4):
        s.add(instruction(i, f"thing {i}"))
    t = s.refilled + 10.0  # a full bucket: max(rate, instructions) = 4 checks
    assert len(s.due(t)) == 4
    first = s.due(t + 0.5)  # one check earned in 0.5 s at 2 a second
    second = s.due(t + 1.0)
    assert len(first) == len(second) == 1 and first[0] is not second[0]  # the least recently checked
    assert s.due(t + 1.0) == []


def test_tag_evidence_and_which_instructions_it_scores():
    import numpy as np

    from services.llm.context import FrameSegment
    from services.llm.instructions import tag_evidence

    cat = FrameSegment(0, 0.0, np.zeros((1, 4), np.float16), np.ones(1, bool),
                       tags=("Egyptian cat", "tabby cat", "street sign"), tag_scores=(0.5, 0.3, 0.1))
    assert tag_evidence(cat, "a cat") == pytest.approx(0.8)
    assert tag_evidence(cat, "a dog") == 0.0 and tag_evidence(None, "a cat") == 0.0
    cfg = load_config(env={}).llm
    s = InstructionSet(cfg)
    s.add(instruction(1, "tell me when a cat appears"))
    s.add(instruction(2, "say when someone waves"))  # no class names it: the LLM checks it
    assert s.items["i-1"].by_tags and not s.items["i-2"].by_tags
    cfg = replace(cfg, instructions=replace(cfg.instructions, scorer="verify"))
    assert not InstructionSet(cfg)._watched(instruction(3, "a cat")).by_tags


def test_p_yes_reads_the_yes_and_no_tokens():
    from services.llm.embedder import ContextEmbedder

    cfg = load_config(env={})
    yes_no = YesNo(ContextEmbedder(cfg.llm.engine.model_path).text_ids)
    yes, no = next(iter(yes_no.yes)), next(iter(yes_no.no))
    assert yes_no.p_yes({yes: math.log(0.6), no: math.log(0.2), 12345: math.log(0.2)}) == pytest.approx(0.75)
    assert yes_no.p_yes({12345: 0.0}) == 0.0
    assert not yes_no.yes & yes_no.no


# --------------------------------------------------------------------------- the running stack


@pytest.mark.integration
def test_instructions_are_registered_listed_cancelled_and_checked(stack):
    """Through Watch items and the unary RPCs, on the stack's limits (conftest: 3 a stream,
    5 a tenant); bad ones get their status."""
    frames = frames_of("vtest.avi", 1.0)

    async def run():
        async with Client(stack.gateway_target, TOKEN) as client, client.watch("told-1") as one, \
                client.watch("told-2") as two:
            await one.send_frame(0, 0.0, frames[0])
            first = await one.add_instruction("Tell me when a cat appears")
            second = (await client.add_instruction("told-1", "say when a dog shows up", "dog")).added_id
            listed = await one.instructions()
            refused = {}
            for name, call in {
                "empty": one.add_instruction("   "),
                "too long": one.add_instruction("a cat " * 100),
                "bad id": one.add_instruction("a cat", instruction_id="no spaces"),
                "same id": one.add_instruction("a horse", instruction_id="dog"),
            }.items():
                with pytest.raises(Refused) as info:
                    await call
                refused[name] = info.value
            horse = await one.add_instruction("a horse")
            with pytest.raises(Refused) as per_stream:
                await one.add_instruction("a bird")
            await two.add_instruction("a car")
            await two.add_instruction("a bus")
            with pytest.raises(Refused) as per_tenant:
                await two.add_instruction("a tram")
            cancelled = await client.cancel_instruction("told-1", second)
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await client.cancel_instruction("told-1", second)
            with pytest.raises(grpc.aio.AioRpcError) as no_stream:
                await client.list_instructions("nobody-has-this")
            after = await client.list_instructions("told-1")
            return first, second, horse, listed, refused, per_stream.value, per_tenant.value, cancelled, \
                unknown.value, no_stream.value, after

    first, second, horse, listed, refused, per_stream, per_tenant, cancelled, unknown, no_stream, after = \
        asyncio.run(run())
    assert [i.text for i in listed] == ["Tell me when a cat appears", "say when a dog shows up"]
    assert [i.instruction_id for i in listed] == [first, "dog"] and second == "dog"
    assert {k: e.status for k, e in refused.items()} == {
        "empty": "INVALID_ARGUMENT", "too long": "INVALID_ARGUMENT", "bad id": "INVALID_ARGUMENT",
        "same id": "ALREADY_EXISTS"}
    assert "gateway.max_instruction_chars" in refused["too long"].message
    assert per_stream.status == "RESOURCE_EXHAUSTED" and "llm.instructions.max_per_stream" in per_stream.message
    assert per_tenant.status == "RESOURCE_EXHAUSTED" and "gateway.max_instructions_per_tenant" in per_tenant.message
    assert cancelled.cancelled_id == "dog" and "dog" not in [i.instruction_id for i in cancelled.instructions]
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and no_stream.code() == grpc.StatusCode.NOT_FOUND
    assert [i.instruction_id for i in after] == [first, horse]


@pytest.mark.integration
def test_an_alert_when_the_event_is_certain_and_none_on_a_static_stream(stack):
    """A cut from a street scene to a cat for 3 s: one alert for "a cat appears", with the
    instruction's id, soon after the cut. The same instruction on a still scene: none."""
    street = frames_of("vtest.avi", 6.0)
    cat = [encode_jpeg(f) for f in needle_frames(image_path("skimage:chelsea.png"), 6)]
    onset = 6.0
    cut = street[:12] + cat + street[12:16]  # 2 fps: the cat from 6.0 s to 9.0 s
    still = [street[0]] * len(cut)

    async def stream(client: Client, name: str, frames: list[bytes]) -> list[Alert]:
        async with client.watch(name) as s:
            await s.add_instruction("tell me when a cat appears", instruction_id="cat")
            t0 = time.monotonic()
            for i, image in enumerate(frames):  # at 2 frames a second, as a camera sends them
                await asyncio.sleep(max(0.0, t0 + i * 0.5 - time.monotonic()))
                await s.send_frame(i, i * 0.5, image)
            await asyncio.sleep(8)  # the last frames' checks

            def remarks_done(ev: list) -> bool:  # every alert's remark has ended
                ids = {e.request_id for e in ev if isinstance(e, Alert) and e.reason == "instruction"}
                return ids <= {e.request_id for e in ev if isinstance(e, Answer) and e.final}

            deadline = time.monotonic() + 60
            events = await collect(s, lambda ev: False, 0.5)  # all so far (replayed)
            while not remarks_done(events) and time.monotonic() < deadline:
                await asyncio.sleep(1)
                events = await collect(s, lambda ev: False, 0.5)
            alerts = [e for e in events if isinstance(e, Alert) and e.reason == "instruction"]  # not scene changes
            for a in alerts:  # the remark streams after its alert, under the alert's id
                at = events.index(a)
                deltas = [e for e in events if isinstance(e, Answer) and e.request_id == a.request_id]
                assert deltas and deltas[-1].final and "".join(d.text for d in deltas).strip(), (a, deltas)
                assert all(events.index(d) > at for d in deltas)
            return alerts

    async def run():
        async with Client(stack.gateway_target, TOKEN) as client:
            # one after the other: two streams' frames at 2 fps are more than these 2 cores prefill
            return await stream(client, "cat-cut", cut), await stream(client, "cat-still", still)

    with TopicSubscriber(stack.cfg.kafka, ["responses"], tenant="acme") as sub:
        on_cut, on_still = asyncio.run(run())
        published = [r for r in sub.records(timeout_s=3)
                     if isinstance(r, pb.ResponseRecord) and r.instruction_id and not r.remark]
    print("alerts:", [(a.stream_time_s, round(a.score, 2), a.text) for a in on_cut + on_still])
    assert len(on_cut) == 1 and not on_still, (on_cut, on_still)
    alert = on_cut[0]
    assert alert.reason == "instruction" and alert.instruction_id == "cat" and alert.text
    assert "cat" in alert.matched and alert.matched in alert.text  # what matched: a cat tag and its probability
    assert onset <= alert.stream_time_s <= onset + 2.0 and alert.score >= stack.cfg.llm.instructions.fire
    assert [(r.stream_id, r.instruction_id) for r in published] == [("cat-cut", "cat")]  # topic subscribers too
