"""The services' consume loop (`services.common.consume`) against the real broker: parsed
records reach `process`, a foreign one goes to the dead-letter topic, and only what was
handled is committed (a new member of the group reads the rest again)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from livelens.subscriber import TopicSubscriber
from livelens.v1 import messages_pb2 as pb
from services.common import kafka as lk
from services.common.consume import Consumed, ConsumeLoop, Topology

pytestmark = pytest.mark.integration


def frame(seq: int) -> pb.FrameRecord:
    return pb.FrameRecord(tenant="acme", stream_id="consume", seq=seq)


def run_once(loop: ConsumeLoop, process) -> None:
    """`loop.run` until `process` has had records, then stop it."""
    stop = threading.Event()
    pending = loop.wait_assigned()

    def once(batch: list[Consumed]) -> None:
        process(batch)
        stop.set()

    thread = threading.Thread(target=loop.run, args=(once, stop), kwargs={"pending": pending}, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the loop did not stop"


def test_the_loop_dead_letters_foreign_records_and_commits_only_what_was_handled(stack):
    suffix = time.monotonic_ns()
    k = dataclasses.replace(stack.cfg.kafka, frames_topic=f"consume-test-{suffix}", partitions=1)
    lk.ensure_topics(k)
    topology = Topology("consume-test", f"consume-test-{suffix}", {k.frames_topic: pb.FrameRecord}, (), "none")
    producer = lk.make_producer(k, "consume-test")
    with TopicSubscriber(k, ["deadletter"]) as letters:
        for value in (frame(0).SerializeToString(), b"\xff not a frame", frame(2).SerializeToString()):
            producer.send(k.frames_topic, key=b"acme/consume", value=value)
        producer.flush()

        # Handled as it returns (the encoder's way): all three offsets committed.
        first = ConsumeLoop(k, topology)
        seen: list[Consumed] = []
        run_once(first, seen.extend)
        assert [c.msg.seq if c.msg else None for c in seen] == [0, None, 2]
        assert first.stats.dead_letters == 1 and first.stats.records == 3
        dead = [r for r in letters.records(timeout_s=5) if r.source_topic == k.frames_topic]
        assert len(dead) == 1 and dead[0].offset == 1 and dead[0].service == "consume-test"
        assert "unparseable FrameRecord" in dead[0].reason

    # Handled one by one (the LLM service's way): only the first is marked.
    for value in (frame(3).SerializeToString(), frame(4).SerializeToString()):
        producer.send(k.frames_topic, key=b"acme/consume", value=value)
    producer.flush()
    producer.close()
    second = ConsumeLoop(k, topology, commit_every_s=0.1)
    got: list[Consumed] = []

    def hand_on(batch: list[Consumed]) -> None:
        got.extend(batch)
        second.handled(batch[0].record)

    run_once(second, hand_on)
    assert [c.msg.seq for c in got] == [3, 4]

    third = ConsumeLoop(k, topology)  # the same group: it goes on after what was handled
    again: list[Consumed] = []
    run_once(third, again.extend)
    assert [c.msg.seq for c in again] == [4]
