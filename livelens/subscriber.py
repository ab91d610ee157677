"""Read livelens topics from outside the stack: decoded records of every stream.

    with TopicSubscriber(KafkaConfig(bootstrap="kafka:9092"), ["tokens", "responses"]) as sub:
        for rec in sub.records(timeout_s=10):
            ...  # pb.TokensRecord / pb.ResponseRecord, with .stream_id, .seq, ...

Topic names may be given short ("frames", "tokens", "commands", "responses") or in full.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from livelens import kafka as lk
from livelens.config import KafkaConfig
from livelens.v1 import messages_pb2 as pb


class TopicSubscriber:
    def __init__(self, cfg: KafkaConfig, topics: list[str], from_beginning: bool = False) -> None:
        full = {"frames": cfg.frames_topic, "tokens": cfg.tokens_topic,
                "commands": cfg.commands_topic, "responses": cfg.responses_topic}
        self.types: dict[str, type[Any]] = {
            cfg.frames_topic: pb.FrameRecord, cfg.tokens_topic: pb.TokensRecord,
            cfg.commands_topic: pb.CommandRecord, cfg.responses_topic: pb.ResponseRecord}
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
                    msg = self.types[tp.topic]()
                    msg.ParseFromString(r.value)
                    last = time.monotonic()
                    yield msg

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> TopicSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
