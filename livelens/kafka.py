"""Kafka plumbing shared by every service: topics, producers, consumers, records.

All records are protobuf messages keyed by stream id. The producer, topic and consumer
size limits all come from `kafka.max_message_bytes`, because a frame's tokens can be
larger than Kafka's 1 MiB default.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from livelens.config import KafkaConfig

log = logging.getLogger(__name__)


def all_topics(cfg: KafkaConfig) -> list[str]:
    return [cfg.frames_topic, cfg.tokens_topic, cfg.commands_topic, cfg.responses_topic]


def ensure_topics(cfg: KafkaConfig, timeout_s: float = 30.0) -> None:
    """Create the four topics (same partition count, so a stream id maps to the same
    partition number in each; the LLM group then owns a stream's tokens and commands
    together)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap, client_id="livelens-admin")
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                name,
                num_partitions=cfg.partitions,
                replication_factor=1,
                topic_configs={"max.message.bytes": str(cfg.max_message_bytes)},
            )
            for name in all_topics(cfg)
            if name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # another service was first
                admin.create_topics(new)
    finally:
        admin.close()
    wait_for_partitions(cfg, all_topics(cfg), deadline)


def wait_for_partitions(cfg: KafkaConfig, topics: Iterable[str], deadline: float) -> None:
    probe = KafkaConsumer(bootstrap_servers=cfg.bootstrap)
    try:
        for topic in topics:
            while not probe.partitions_for_topic(topic):
                if time.monotonic() > deadline:
                    raise KafkaError(f"topic {topic} has no partitions after creation")
                time.sleep(0.2)
    finally:
        probe.close()


def make_producer(cfg: KafkaConfig, client_id: str) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=cfg.bootstrap,
        client_id=client_id,
        max_request_size=cfg.max_message_bytes,
        linger_ms=2,
        acks=1,
    )


def _consumer_limits(cfg: KafkaConfig) -> dict[str, Any]:
    return {
        "fetch_max_bytes": max(52428800, cfg.max_message_bytes),
        "max_partition_fetch_bytes": cfg.max_message_bytes,
    }


def make_group_consumer(cfg: KafkaConfig, topics: list[str], group_id: str,
                        auto_commit: bool = True,
                        on_lost: Callable[[set[Any]], None] | None = None) -> KafkaConsumer:
    """A member of a consumer group: partition ownership decides which replica holds a
    stream. With `auto_commit=False` the caller commits after a record's results are
    published (at-least-once; consumers dedupe by (stream, seq)). `on_lost` is called
    (in the polling thread) with the partitions this member loses in a rebalance: kafka's
    eager protocol revokes every partition and then assigns, so a partition given back
    to the same member is not lost (its state stays valid: no one else consumed it)."""
    consumer = KafkaConsumer(
        bootstrap_servers=cfg.bootstrap,
        group_id=group_id,
        client_id=f"{group_id}-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=auto_commit,
        auto_commit_interval_ms=1000,
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        max_poll_records=64,
        **_consumer_limits(cfg),
    )
    listener = None
    if on_lost is not None:
        from kafka import ConsumerRebalanceListener

        lost_cb = on_lost

        class Lost(ConsumerRebalanceListener):  # type: ignore[misc]
            def __init__(self) -> None:
                self.revoked: set[Any] = set()

            def on_partitions_revoked(self, revoked: Any) -> None:
                self.revoked = set(revoked)

            def on_partitions_assigned(self, assigned: Any) -> None:
                lost, self.revoked = self.revoked - set(assigned), set()
                if lost:
                    lost_cb(lost)

        listener = Lost()
    consumer.subscribe(topics, listener=listener)
    return consumer


def make_tail_consumer(cfg: KafkaConfig, topics: list[str], from_beginning: bool = False) -> KafkaConsumer:
    """Reads every partition of `topics` without a group (no join delay, no rebalance):
    what a gateway or an outside subscriber uses to see all streams' records."""
    consumer = KafkaConsumer(bootstrap_servers=cfg.bootstrap, enable_auto_commit=False,
                             **_consumer_limits(cfg))
    parts = []
    for topic in topics:
        deadline = time.monotonic() + 30
        ids = consumer.partitions_for_topic(topic)
        while not ids:
            if time.monotonic() > deadline:
                raise KafkaError(f"topic {topic} does not exist")
            time.sleep(0.2)
            ids = consumer.partitions_for_topic(topic)
        parts += [TopicPartition(topic, p) for p in sorted(ids)]
    consumer.assign(parts)
    if from_beginning:
        consumer.seek_to_beginning(*parts)
    else:
        consumer.seek_to_end(*parts)
        for tp in parts:  # resolve the lazy seek now, so nothing produced later is skipped
            consumer.position(tp)
    return consumer


def publish(producer: KafkaProducer, topic: str, stream_id: str, message: Any) -> Any:
    """Send one protobuf record keyed by its stream id; returns the send future."""
    return producer.send(topic, key=stream_id.encode(), value=message.SerializeToString())
