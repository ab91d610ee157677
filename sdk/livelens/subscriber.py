"""Read livelens topics from outside the stack: decoded records of every stream.

    with TopicSubscriber(KafkaConfig(bootstrap="kafka:9092"), ["tokens", "responses"],
                         tenant="acme") as sub:
        for rec in sub.records(timeout_s=10):
            ...  # pb.TokensRecord / pb.ResponseRecord, with .tenant, .stream_id, .seq, ...

Topic names may be given short ("frames", "tokens", "commands", "responses",
"deadletter") or in full. `tenant` (and `stream_id`) keep only that tenant's (stream's)
records, by the records' keys, before anything is decoded. (This is a filter for a
trusted reader; keeping tenants out of each other's records on the broker is what Kafka
ACLs on the topics are for.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from livelens import kafka as lk
from livelens.config import KafkaConfig
from livelens.identity import stream_key
from livelens.v1 import messages_pb2 as pb


class TopicSubscriber:
    def __init__(self, cfg: KafkaConfig, topics: list[str], from_beginning: bool = False,
                 tenant: str | None = None, stream_id: str | None = None) -> None:
        full = {"frames": cfg.frames_topic, "tokens": cfg.tokens_topic,
                "commands": cfg.commands_topic, "responses": cfg.responses_topic,
                "deadletter": cfg.dead_letter_topic}
        self.types: dict[str, type[Any]] = {
            cfg.frames_topic: pb.FrameRecord, cfg.tokens_topic: pb.TokensRecord,
            cfg.commands_topic: pb.CommandRecord, cfg.responses_topic: pb.ResponseRecord,
            cfg.dead_letter_topic: pb.DeadLetter}
        if stream_id is not None and tenant is None:
            raise ValueError("a stream id names a stream only with its tenant")
        self.key = (stream_key(tenant, stream_id) if stream_id is not None else f"{tenant}/") if tenant else None
        self.exact = stream_id is not None
        self.topics = [full.get(t, t) for t in topics]
        unknown = [t for t in self.topics if t not in self.types]
        if unknown:
            raise ValueError(f"not a livelens topic: {', '.join(unknown)}")
        self.consumer = lk.make_tail_consumer(cfg, self.topics, from_beginning=from_beginning)

    def records(self, timeout_s: float | None = None) -> Iterator[Any]:
        """Decoded records as they arrive; stops after `timeout_s` without a record."""
        last = time.monotonic()
        while timeout_s is None or time.monotonic() - last < timeout_s:
            for tp, batch in self.consumer.poll(timeout_ms=100).items():
                for r in batch:
                    last = time.monotonic()
                    if not self.wanted(r.key or b""):
                        continue
                    msg = self.types[tp.topic]()
                    try:
                        msg.ParseFromString(r.value)
                    except Exception:  # noqa: BLE001 - a foreign record: not ours to decode
                        continue
                    yield msg

    def wanted(self, key: bytes) -> bool:
        if self.key is None:
            return True
        name = key.decode(errors="replace")
        return name == self.key if self.exact else name.startswith(self.key)

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> TopicSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
