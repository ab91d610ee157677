"""The consume loop the services run, after Kafka Streams' processor: a service states its
`Topology` (what it consumes, what it produces, the keyed state it keeps per stream), and
`ConsumeLoop` polls its source topics in a consumer group, parses and validates each
record, sends the records no one can use to the dead-letter topic, hands the rest to the
service's `process`, and commits only offsets the service has handled (at-least-once: a
crash before the commit replays the records, and consumers drop duplicates by (stream,
seq)).

Two ways to say what was handled, one per kind of service:
- `commit_every_s=0` (the encoder): `process` handles its batch before it returns; the
  whole batch's offsets are committed after it.
- `commit_every_s>0` (the LLM service): `process` hands the batch on (to an asyncio loop)
  and the service calls `handled(record)` as it finishes each one, in order; what was
  handled is committed every `commit_every_s`. A dead-lettered record comes in the batch
  too, with `msg=None`, so its offset is marked in order with the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from livelens.config import KafkaConfig
from services.common import kafka as lk
from services.common.metrics import record_lag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    """One service's place in the data flow."""

    service: str  # "encoder", "llm": in dead letters, client ids and lag metrics
    group_id: str
    consumes: Mapping[str, type]  # topic -> its protobuf record type
    produces: tuple[str, ...]
    state: str  # the keyed state it keeps per stream, in words (docs/architecture.md)


@dataclass
class Consumed:
    """A record from the source: `msg` parsed, or None when it went to the dead-letter
    topic (its offset is still handled in order with the others)."""

    msg: Any
    record: Any  # kafka's ConsumerRecord: topic, partition, offset, key, value


@dataclass
class ConsumeStats:
    """Exported with the service's own stats (`livelens_encoder_dead_letters_total`)."""

    records: int = 0  # consumed, parsed or not
    dead_letters: int = 0  # sent to the dead-letter topic: unparseable, or not processable


@dataclass
class ConsumeLoop:
    cfg: KafkaConfig
    topology: Topology
    on_lost: Callable[[set[Any]], None] | None = None  # partitions taken away (polling thread)
    # Partitions given (polling thread, before their records). They stay paused until the
    # service `release`s their numbers: it prepares their state (the LLM service rebuilds
    # the streams it takes) off the polling thread, which must return to the consumer
    # quickly: a rebalance callback that runs past the session timeout gets the member
    # evicted (kafka-python sends no heartbeat meanwhile).
    on_gained: Callable[[set[Any]], None] | None = None
    commit_every_s: float = 0.0  # 0: commit after each batch `process` returned from
    stats: ConsumeStats = field(default_factory=ConsumeStats)
    consumer: Any = field(init=False)
    producer: Any = field(init=False)  # for dead letters
    _handled: dict[tuple[str, int], int] = field(init=False, default_factory=dict)
    _released: set[int] = field(init=False, default_factory=set)  # partition numbers to resume
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        t = self.topology
        self.producer = lk.make_producer(self.cfg, f"livelens-{t.service}-deadletters")
        self.consumer = lk.make_group_consumer(self.cfg, list(t.consumes), t.group_id, auto_commit=False,
                                               on_lost=self.on_lost, on_gained=self._gained)

    def _gained(self, partitions: set[Any]) -> None:
        with self._lock:  # what we handled when we held them before is not what counts now
            for tp in partitions:
                self._handled.pop((tp.topic, tp.partition), None)
                self._released.discard(tp.partition)  # a release meant for an earlier holding
        if self.on_gained is not None:
            self.consumer.pause(*partitions)
            self.on_gained(partitions)

    def release(self, numbers: set[int]) -> None:
        """The service is ready for the records of these partitions (their numbers, in every
        source topic); from any thread. The polling thread resumes them before its next poll."""
        with self._lock:
            self._released |= numbers

    def _resume_released(self) -> None:
        with self._lock:
            numbers, self._released = self._released, set()
        if numbers:
            paused = [tp for tp in self.consumer.paused() if tp.partition in numbers]
            if paused:
                self.consumer.resume(*paused)

    def dead_letter(self, record: Any, reason: str) -> None:
        """A record that parsed but could not be processed (the service says why)."""
        self.stats.dead_letters += 1
        lk.dead_letter(self.producer, self.cfg, self.topology.service, record, reason)

    def handled(self, record: Any) -> None:
        """The service is done with `record` (and, in its partition, all before it)."""
        with self._lock:
            self._handled[(record.topic, record.partition)] = record.offset

    def parse(self, polled: Mapping[Any, list[Any]]) -> list[Consumed]:
        out = []
        for tp, records in polled.items():
            kind = self.topology.consumes[tp.topic]
            self.stats.records += len(records)
            for r in records:
                msg = kind()
                try:
                    msg.ParseFromString(r.value)
                    if not msg.stream_id or not msg.tenant:
                        raise ValueError("the record names no stream or tenant")
                except Exception as exc:  # noqa: BLE001 - a foreign or broken record on our topic
                    self.dead_letter(r, f"unparseable {kind.__name__}: {exc}")
                    msg = None
                out.append(Consumed(msg, r))
        return out

    def wait_assigned(self, timeout_s: float = 60.0) -> list[Consumed]:
        """Poll until the group gives this member partitions (serving means owning some:
        Tansu takes seconds to settle a join); the records polled meanwhile."""
        pending: list[Consumed] = []
        deadline = time.monotonic() + timeout_s
        while not self.consumer.assignment() and time.monotonic() < deadline:
            self._resume_released()
            pending += self.parse(self.consumer.poll(timeout_ms=200))
        return pending

    def run(self, process: Callable[[list[Consumed]], None], stop: threading.Event, poll_timeout_ms: int = 100,
            pending: list[Consumed] | None = None) -> None:
        """Until `stop` is set. `pending`: records polled before (`wait_assigned`)."""
        committed = time.monotonic()
        try:
            while not stop.is_set():
                if self.commit_every_s and time.monotonic() - committed > self.commit_every_s:
                    committed = time.monotonic()
                    self.commit_handled()
                self._resume_released()
                batch = pending or self.parse(self.consumer.poll(timeout_ms=poll_timeout_ms))
                pending = None
                if not batch:
                    continue
                process(batch)
                if not self.commit_every_s:
                    for c in batch:
                        self.handled(c.record)
                    self.commit_handled()  # only now: a crash before this replays the batch
        finally:
            self.commit_handled()
            self.consumer.close(autocommit=False)
            self.producer.close()

    def commit_handled(self) -> None:
        """Commit what the service has handled (not merely what was polled), and record the lag."""
        assigned = self.consumer.assignment()
        with self._lock:
            handled = list(self._handled.items())
        offsets = {tp: OffsetAndMetadata(offset + 1, "", -1) for (topic, partition), offset in handled
                   if (tp := TopicPartition(topic, partition)) in assigned}
        if offsets:
            try:
                self.consumer.commit(offsets)
            except KafkaError as exc:  # a rebalance under way: the next owner reads them again
                log.info("%s: commit skipped: %s", self.topology.service, exc)
        record_lag(self.consumer, self.topology.service)
