"""Kafka clients that read livelens topics from outside the services: the connection
settings of `kafka.*` (TLS/SASL, size limits) and a group-less consumer of every partition
(`TopicSubscriber`, the gateway). The services' own plumbing is `services.common.kafka`.

The consumer size limits come from `kafka.max_message_bytes`, because a frame's tokens can
be larger than Kafka's 1 MiB default.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from livelens.config import KafkaConfig


def security(cfg: KafkaConfig) -> dict[str, Any]:
    """The TLS/SASL arguments of every kafka-python client."""
    args: dict[str, Any] = {"security_protocol": cfg.security_protocol}
    if "SSL" in cfg.security_protocol:
        args.update(ssl_cafile=cfg.ssl_cafile or None, ssl_certfile=cfg.ssl_certfile or None,
                    ssl_keyfile=cfg.ssl_keyfile or None)
    if cfg.security_protocol.startswith("SASL"):
        args.update(sasl_mechanism=cfg.sasl_mechanism, sasl_plain_username=cfg.sasl_username,
                    sasl_plain_password=cfg.sasl_password)
    return args


def consumer_limits(cfg: KafkaConfig) -> dict[str, Any]:
    return {
        "fetch_max_bytes": max(52428800, cfg.max_message_bytes),
        "max_partition_fetch_bytes": cfg.max_message_bytes,
        "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
        **security(cfg),
    }


def make_tail_consumer(cfg: KafkaConfig, topics: list[str], from_beginning: bool = False) -> KafkaConsumer:
    """Reads every partition of `topics` without a group (no join delay, no rebalance):
    what a gateway or an outside subscriber uses to see all streams' records."""
    consumer = KafkaConsumer(bootstrap_servers=cfg.bootstrap, enable_auto_commit=False,
                             **consumer_limits(cfg))
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
