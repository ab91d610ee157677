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


def test_gained_partitions_give_no_record_until_the_service_releases_them(stack):
    """The LLM service rebuilds the streams of a partition it takes off the polling thread:
    meanwhile the partition is paused, and its records come once it is released."""
    suffix = time.monotonic_ns()
    k = dataclasses.replace(stack.cfg.kafka, frames_topic=f"consume-paused-{suffix}", partitions=1)
    lk.ensure_topics(k)
    topology = Topology("consume-test", f"consume-paused-{suffix}", {k.frames_topic: pb.FrameRecord}, (), "none")
    producer = lk.make_producer(k, "consume-test")
    for seq in range(3):
        producer.send(k.frames_topic, key=b"acme/consume", value=frame(seq).SerializeToString())
    producer.flush()
    producer.close()
    gained: list[set[int]] = []
    loop = ConsumeLoop(k, topology, on_gained=lambda ps: gained.append({tp.partition for tp in ps}))
    stop = threading.Event()
    got: list[Consumed] = []
    thread = threading.Thread(target=loop.run, args=(got.extend, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not gained and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gained == [{0}]
        time.sleep(2)  # several polls
        assert got == [], "records of a partition not released yet"
        loop.release({0})
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [c.msg.seq for c in got] == [0, 1, 2]
    finally:
        stop.set()
        thread.join(30)


def test_an_evicted_member_that_gets_its_partitions_back_has_gained_them():
    """kafka-python calls `on_partitions_lost` when this member's session expired (another
    member may have consumed its partitions since): what it held is dropped at once, and
    the same partitions assigned again are gained (rebuilt), not kept. A plain rebalance
    that gives a partition back to the same member changes nothing for it. (The listener
    alone: an eviction cannot be forced on the real broker in a test's time.)"""
    from kafka import TopicPartition

    events: list[tuple[str, set[int]]] = []
    changes = lk.RebalanceChanges(lambda ps: events.append(("lost", {tp.partition for tp in ps})),
                                  lambda ps: events.append(("gained", {tp.partition for tp in ps})))
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    changes.on_partitions_assigned({p0, p1})
    changes.on_partitions_revoked({p0, p1})
    changes.on_partitions_assigned({p0})
    assert events == [("gained", {0, 1}), ("lost", {1})]
    events.clear()
    changes.on_partitions_lost({p0})
    changes.on_partitions_assigned({p0})
    assert events == [("lost", {0}), ("gained", {0})]
