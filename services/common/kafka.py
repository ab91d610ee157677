"""Kafka plumbing shared by every service: topics, producers, group consumers, records.

All records are protobuf messages keyed by their stream key ("tenant/stream_id",
`livelens.identity`). The producer and topic size limits come from
`kafka.max_message_bytes`, because a frame's tokens can be larger than Kafka's 1 MiB
default. The TLS/SASL settings of `kafka.*` (`livelens.kafka.security`) go to every client
made here, and services make their clients nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from livelens.config import KafkaConfig
from livelens.identity import Keyed, key_of, split_key
from livelens.kafka import consumer_limits, security
from livelens.v1 import messages_pb2 as pb

log = logging.getLogger(__name__)


def all_topics(cfg: KafkaConfig) -> list[str]:
    return [cfg.frames_topic, cfg.tokens_topic, cfg.commands_topic, cfg.responses_topic,
            cfg.dead_letter_topic, cfg.checkpoints_topic]


def _topic_configs(cfg: KafkaConfig, name: str) -> dict[str, str]:
    configs = {"max.message.bytes": str(cfg.max_message_bytes)}
    if name == cfg.checkpoints_topic:  # the newest checkpoint of each stream is what counts
        configs["cleanup.policy"] = "compact"
    else:
        configs["retention.ms"] = str(cfg.retention_ms)
    return configs


def ensure_topics(cfg: KafkaConfig, timeout_s: float = 30.0) -> None:
    """Create the topics (same partition count, so a stream key maps to the same
    partition number in each; the LLM group then owns a stream's tokens, commands and
    checkpoints together)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap, client_id="livelens-admin",
                                     **security(cfg))
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
                topic_configs=_topic_configs(cfg, name),
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
    probe = KafkaConsumer(bootstrap_servers=cfg.bootstrap, **security(cfg))
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
        **security(cfg),
    )


def make_group_consumer(cfg: KafkaConfig, topics: list[str], group_id: str,
                        auto_commit: bool = True,
                        on_lost: Callable[[set[Any]], None] | None = None,
                        on_gained: Callable[[set[Any]], None] | None = None) -> KafkaConsumer:
    """A member of a consumer group: partition ownership decides which replica holds a
    stream. With `auto_commit=False` the caller commits after a record's results are
    published (at-least-once; consumers dedupe by (stream, seq)). `on_lost` and
    `on_gained` are called (in the polling thread, inside `poll`, before any record of a
    gained partition is returned) with the partitions this member loses or newly gets
    (`RebalanceChanges`). They must return quickly: they run on the consumer's own loop,
    which sends no heartbeat meanwhile."""
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
        **consumer_limits(cfg),
    )
    listener = RebalanceChanges(on_lost, on_gained) if on_lost is not None or on_gained is not None else None
    consumer.subscribe(topics, listener=listener)
    return consumer


class RebalanceChanges(ConsumerRebalanceListener):  # type: ignore[misc]
    """What a rebalance changed for this member: the partitions it lost and those it
    newly got. Kafka's eager protocol revokes every partition and then assigns, so a
    partition given back to the same member is neither (its state stays valid: no one else
    consumed it meanwhile). A member evicted from the group (its session expired) has lost
    its partitions at once: another member may have consumed them since, so what it held
    of them is stale, and getting them back is a gain. At the first assignment every
    partition is gained."""

    def __init__(self, on_lost: Callable[[set[Any]], None] | None,
                 on_gained: Callable[[set[Any]], None] | None) -> None:
        self.on_lost, self.on_gained = on_lost, on_gained
        self.revoked: set[Any] = set()

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.revoked = set(revoked)

    def on_partitions_lost(self, lost: Any) -> None:
        self.revoked = set()
        if lost and self.on_lost is not None:
            self.on_lost(set(lost))

    def on_partitions_assigned(self, assigned: Any) -> None:
        lost, gained = self.revoked - set(assigned), set(assigned) - self.revoked
        self.revoked = set()
        if lost and self.on_lost is not None:
            self.on_lost(lost)
        if gained and self.on_gained is not None:
            self.on_gained(gained)


def dead_letter(producer: KafkaProducer, cfg: KafkaConfig, service: str, record: Any, reason: str) -> None:
    """Send a consumed record that could not be parsed or processed to the dead-letter
    topic, with the reason, so the consumer can go on without losing it."""
    key = record.key or b""
    tenant, stream_id = split_key(key.decode(errors="replace"))
    letter = pb.DeadLetter(source_topic=record.topic, partition=record.partition, offset=record.offset,
                           key=key, value=record.value or b"", reason=reason[:2000], service=service,
                           time_unix=time.time(), tenant=tenant, stream_id=stream_id)
    producer.send(cfg.dead_letter_topic, key=key or None, value=letter.SerializeToString())
    log.warning("%s: record %s/%d@%d to %s: %s", service, record.topic, record.partition, record.offset,
                cfg.dead_letter_topic, reason)


def publish(producer: KafkaProducer, topic: str, message: Keyed) -> Any:
    """Send one protobuf record keyed by its stream key; returns the send future."""
    return producer.send(topic, key=key_of(message).encode(),
                         value=message.SerializeToString())  # type: ignore[attr-defined]
