"""A new owner of a stream's partition rebuilds its context from Kafka.

The LLM service writes a `StreamCheckpoint` of each stream it holds (on open, every
`llm.checkpoint_every_frames` frames, after each dialogue turn; a tombstone on close) to
the compacted checkpoints topic, keyed like the stream's other records so it lands in
the partition of the same number. When a replica is given partitions it did not hold
(a rebalance, a crash, a scale-out), its polling thread reads, before any new record of
those partitions is handed on, the newest checkpoint of each stream there and replays
its tokens records: the sink frames by offset, then everything from `replay_from` up to
the partition's end. The records go to the service's loop in order, bracketed by
`RebuildStart` and `RebuildEnd`, so the questions that arrive meanwhile are answered
after the rebuild, with the history.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from livelens import kafka as lk
from livelens.config import KafkaConfig
from livelens.v1 import messages_pb2 as pb

log = logging.getLogger("livelens.llm.rebuild")


@dataclass
class RebuildStart:
    key: str
    checkpoint: pb.StreamCheckpoint
    partition: int
    started: float = field(default_factory=time.monotonic)


@dataclass
class Replayed:
    key: str
    record: pb.TokensRecord
    offset: int


@dataclass
class RebuildEnd:
    key: str
    started: float
    replayed: int


def latest_checkpoints(consumer: KafkaConsumer, topic: str, partition: int) -> dict[str, pb.StreamCheckpoint]:
    """The newest checkpoint of each stream in one partition (a tombstone: none)."""
    found: dict[str, pb.StreamCheckpoint] = {}
    for r in read_range(consumer, topic, partition, 0, None):
        key = (r.key or b"").decode(errors="replace")
        if r.value is None:
            found.pop(key, None)
            continue
        cp = pb.StreamCheckpoint()
        try:
            cp.ParseFromString(r.value)
        except Exception:  # noqa: BLE001 - a foreign record: no checkpoint
            log.warning("unparseable checkpoint at %s/%d@%d", topic, partition, r.offset)
            continue
        found[key] = cp
    return found


def read_range(consumer: KafkaConsumer, topic: str, partition: int, start: int, end: int | None) -> Iterator[Any]:
    """The records of one partition from offset `start` (clamped to the log's start) up to
    `end` (exclusive; None: the end when called)."""
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    first = consumer.beginning_offsets([tp])[tp]
    last = consumer.end_offsets([tp])[tp] if end is None else end
    position = max(start, first)
    if position >= last:
        return
    consumer.seek(tp, position)
    while position < last:
        for r in consumer.poll(timeout_ms=500).get(tp, []):
            if r.offset >= last:
                return
            position = r.offset + 1
            yield r


def rebuild_items(cfg: KafkaConfig, partitions: set[int], held: set[str]) -> Generator[Any, None, None]:
    """What a new owner of `partitions` replays, for each stream with a checkpoint that it
    does not already hold: RebuildStart, Replayed..., RebuildEnd."""
    consumer = KafkaConsumer(bootstrap_servers=cfg.bootstrap, enable_auto_commit=False,
                             **lk.consumer_limits(cfg))
    try:
        for partition in sorted(partitions):
            checkpoints = {k: cp for k, cp in latest_checkpoints(consumer, cfg.checkpoints_topic, partition).items()
                           if k not in held}
            if not checkpoints:
                continue
            tp = TopicPartition(cfg.tokens_topic, partition)
            end = consumer.end_offsets([tp])[tp]
            starts = {k: RebuildStart(k, cp, partition) for k, cp in checkpoints.items()}
            counts = dict.fromkeys(checkpoints, 0)
            for key, cp in checkpoints.items():
                yield starts[key]
                for offset in cp.sink_offsets:
                    for r in read_range(consumer, cfg.tokens_topic, partition, offset, offset + 1):
                        if (item := _replayed(r, key)) is not None:
                            counts[key] += 1
                            yield item
            start = max(0, min(cp.replay_from for cp in checkpoints.values()))
            for r in read_range(consumer, cfg.tokens_topic, partition, start, end):
                key = (r.key or b"").decode(errors="replace")
                wanted = checkpoints.get(key)
                if wanted is not None and r.offset >= wanted.replay_from and (item := _replayed(r, key)) is not None:
                    counts[key] += 1
                    yield item
            for key in checkpoints:
                yield RebuildEnd(key, starts[key].started, counts[key])
    finally:
        consumer.close()


def _replayed(r: Any, key: str) -> Replayed | None:
    rec = pb.TokensRecord()
    try:
        rec.ParseFromString(r.value)
    except Exception:  # noqa: BLE001 - it went to the dead-letter topic when first consumed
        return None
    if rec.query_request_id:  # a question's example image: not part of the history
        return None
    return Replayed(key, rec, r.offset)
