"""Brings Kafka records back to the asyncio loop of the gateway.

Every gateway replica reads all partitions of the responses and tokens topics (no
group, so no rebalance delay): responses are routed by request id to whoever waits for
them, and each frame's novelty score feeds its session's response-timing decider.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from livelens import kafka as lk
from livelens.config import KafkaConfig
from livelens.v1 import messages_pb2 as pb
from services.common.metrics import record_lag

log = logging.getLogger("livelens.gateway.router")


class KafkaRouter:
    def __init__(self, cfg: KafkaConfig, loop: asyncio.AbstractEventLoop,
                 on_response: Callable[[pb.ResponseRecord], None],
                 on_tokens: Callable[[pb.TokensRecord], None]) -> None:
        self.cfg = cfg
        self.loop = loop
        self.on_response = on_response
        self.on_tokens = on_tokens
        self.stop_event = threading.Event()
        self.skipped = 0
        # Assign and seek in the caller's thread, so nothing produced after start() is missed.
        self.consumer = lk.make_tail_consumer(cfg, [cfg.responses_topic, cfg.tokens_topic])
        self.thread = threading.Thread(target=self._run, name="kafka-router", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        lag_at = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if time.monotonic() - lag_at > 1.0:
                    lag_at = time.monotonic()
                    record_lag(self.consumer, "gateway-router")
                for tp, records in self.consumer.poll(timeout_ms=100).items():
                    for r in records:
                        try:
                            if tp.topic == self.cfg.responses_topic:
                                resp = pb.ResponseRecord()
                                resp.ParseFromString(r.value)
                                self.loop.call_soon_threadsafe(self.on_response, resp)
                            else:
                                tok = pb.TokensRecord()
                                tok.ParseFromString(r.value)
                                tok.ClearField("embeddings")  # the gateway needs the scores only
                                self.loop.call_soon_threadsafe(self.on_tokens, tok)
                        except Exception:  # noqa: BLE001 - not ours to repair: its consumers dead-letter it
                            self.skipped += 1
                            log.warning("skipped an unparseable record at %s/%d@%d", tp.topic, tp.partition,
                                        r.offset)
        except Exception:  # noqa: BLE001
            log.exception("kafka router stopped")
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
