"""The LLM service's Kafka adapter: tokens + commands in, responses and checkpoints out.

One consumer group reads the tokens and commands topics; both are keyed by stream key
("tenant/stream_id") and have the same partition count, so the replica that owns a
stream's partition holds its context and receives its questions. A replica given a
partition it did not hold rebuilds its streams' contexts from their checkpoints
(`services.llm.rebuild`). Kafka polling runs in a thread (poll, parse, dead-letter); the
records go in order to the service's `LLMCore` (`services.llm.core`: streams, commands,
answers) on one asyncio loop; offsets are committed once the core has handled them; what
the core says is published by `KafkaSink`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from livelens.config import KafkaConfig, LivelensConfig
from livelens.v1 import messages_pb2 as pb
from services.common import kafka as lk
from services.common.health import HealthServer
from services.common.metrics import record_lag, serve_metrics
from services.llm.core import LLMCore
from services.llm.instructions import InstructionChecker, YesNo
from services.llm.rebuild import rebuild_items
from services.llm.resources import build_resources, remove_stale_dirs

log = logging.getLogger("livelens.llm")


@dataclass
class ForgetPartitions:
    partitions: set[int]


@dataclass
class Consumed:
    """A record from the polling thread, parsed, with where it came from."""

    msg: pb.TokensRecord | pb.CommandRecord
    record: Any  # kafka's ConsumerRecord: topic, partition, offset, key, value


@dataclass
class KafkaSink:
    """The core's responses to the responses topic, its checkpoints to the compacted
    checkpoints topic (keyed by stream key: a tombstone when a stream closes)."""

    cfg: KafkaConfig
    producer: Any

    def response(self, msg: pb.ResponseRecord, flush: bool = False) -> None:
        lk.publish(self.producer, self.cfg.responses_topic, msg)
        if flush:
            self.producer.flush()

    def checkpoint(self, key: str, checkpoint: pb.StreamCheckpoint | None) -> None:
        self.producer.send(self.cfg.checkpoints_topic, key=key.encode(),
                           value=checkpoint.SerializeToString() if checkpoint is not None else None)


class LLMService:
    def __init__(self, cfg: LivelensConfig) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.assigned = threading.Event()  # the group gave us partitions: we hold streams
        self.producer: Any = None
        self.core: LLMCore  # built with the engine, in `run`
        self.handled: dict[tuple[str, int], int] = {}  # (topic, partition) -> the last offset handled

    def poll_kafka(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        k = self.cfg.kafka
        producer = lk.make_producer(k, "livelens-llm-deadletters")

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def gained(partitions: set[Any]) -> None:
            for tp in partitions:  # what we handled when we held it before is not what counts now
                self.handled.pop((tp.topic, tp.partition), None)
            numbers = {tp.partition for tp in partitions if tp.topic == k.tokens_topic}
            for n, item in enumerate(rebuild_items(k, numbers, held=set())):
                put(item)
                while n % 64 == 0 and queue.qsize() > 256 and not self.stop_event.is_set():  # bounded replay
                    time.sleep(0.01)

        def lost(partitions: set[Any]) -> None:
            put(ForgetPartitions({tp.partition for tp in partitions if tp.topic == k.tokens_topic}))

        consumer = lk.make_group_consumer(k, [k.tokens_topic, k.commands_topic], self.cfg.llm.group_id,
                                          auto_commit=False, on_lost=lost, on_gained=gained)
        committed = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if time.monotonic() - committed > 1.0:
                    committed = time.monotonic()
                    self.commit_handled(consumer)
                    record_lag(consumer, "llm")
                polled = consumer.poll(timeout_ms=100)
                if consumer.assignment():
                    self.assigned.set()
                for tp, records in polled.items():
                    for r in records:
                        msg: Any = pb.TokensRecord() if tp.topic == k.tokens_topic else pb.CommandRecord()
                        try:
                            msg.ParseFromString(r.value)
                            if not msg.stream_id or not msg.tenant:
                                raise ValueError("the record names no stream or tenant")
                        except Exception as exc:  # noqa: BLE001 - a foreign or broken record on our topic
                            self.core.stats.dead_letters += 1
                            lk.dead_letter(producer, k, "llm", r, f"unparseable record: {exc}")
                            continue
                        put(Consumed(msg, r))
        finally:
            self.commit_handled(consumer)
            consumer.close(autocommit=False)
            producer.close()
            put(None)

    def commit_handled(self, consumer: Any) -> None:
        """Commit what the loop has handled (not merely what was polled): a question taken
        by a replica that then crashed is read again by the next owner."""
        assigned = consumer.assignment()
        handled = list(self.handled.items())
        offsets = {tp: OffsetAndMetadata(offset + 1, "", -1) for (topic, partition), offset in handled
                   if (tp := TopicPartition(topic, partition)) in assigned}
        if offsets:
            try:
                consumer.commit(offsets)
            except KafkaError as exc:  # a rebalance under way: the next owner reads them again
                log.info("commit skipped: %s", exc)

    def handle(self, item: Any) -> None:
        if isinstance(item, Consumed):
            r = item.record
            self.handled[(r.topic, r.partition)] = r.offset
            try:
                if isinstance(item.msg, pb.TokensRecord):
                    self.core.on_tokens(item.msg, r.offset, r.partition)
                else:
                    self.core.on_command(item.msg, r.partition)
            except Exception as exc:  # noqa: BLE001 - a record that parsed but cannot be used (e.g. a bad token shape)
                self.core.stats.errors += 1
                self.core.stats.dead_letters += 1
                log.debug("record %s/%d@%d", r.topic, r.partition, r.offset, exc_info=True)
                lk.dead_letter(self.producer, self.cfg.kafka, "llm", r, f"cannot process: {type(exc).__name__}: {exc}")
        elif isinstance(item, ForgetPartitions):
            self.core.forget_partitions(item.partitions)
        else:
            self.core.on_rebuild(item)

    async def run(self) -> None:
        cfg = self.cfg
        health = HealthServer(cfg.llm.health_host, cfg.llm.health_port, "llm.health_port",
                              "livelens.llm").start()
        for root in (cfg.llm.kv_store_dir, cfg.llm.store_disk_dir):
            if root:
                remove_stale_dirs(Path(root))
        kv_dir = None  # this process's own: removed when it ends
        if cfg.llm.materializer == "streaming_kv" and not cfg.llm.kv_shared_dir:
            kv_dir = Path(cfg.llm.kv_store_dir) / f"llm-{os.getpid()}"
        engine, res = build_resources(cfg, Path(cfg.llm.kv_shared_dir) if cfg.llm.kv_shared_dir else kv_dir)
        lk.ensure_topics(cfg.kafka)
        self.producer = lk.make_producer(cfg.kafka, "livelens-llm")
        sink = KafkaSink(cfg.kafka, self.producer)
        checker = InstructionChecker(cfg.llm, YesNo(res.embedder.text_ids), lambda msg: sink.response(msg, True))
        self.core = core = LLMCore(cfg, res, sink, checker)
        serve_metrics(cfg.llm.health_host, cfg.llm.metrics_port, "llm.metrics_port",
                      lambda: {"llm": core.stats, "llm_store": res.store.stats,
                               "llm_kv": getattr(res.materializer, "stats", None),
                               "llm_instructions": checker.stats},
                      gauges=frozenset({"ram_bytes", "disk_bytes", "segments_ram", "segments_disk", "streams"}))
        warm = core.warmup_context()
        log.info("engine warm-up (%d tokens) took %.1fs", warm.shape[0],
                 await engine.warmup(warm))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        poller = threading.Thread(target=self.poll_kafka, args=(loop, queue), daemon=True)
        poller.start()
        # Serving means owning partitions: before that, questions would find no frames.
        await asyncio.to_thread(self.assigned.wait, 60)
        health.set(True)
        log.info("llm service ready: model %s", cfg.llm.model_path)
        idle_check = time.monotonic()
        try:
            while (item := await queue.get()) is not None:
                self.handle(item)
                if time.monotonic() - idle_check > 5.0:
                    idle_check = time.monotonic()
                    core.close_idle()
        finally:
            health.set(False)
            self.stop_event.set()
            poller.join(5)
            self.producer.close()
            res.store.close()
            engine.shutdown()
            if kv_dir is not None:  # stored KV is a cache of this process
                shutil.rmtree(kv_dir, ignore_errors=True)
            health.stop()



def main(cfg: LivelensConfig) -> None:
    service = LLMService(cfg)

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop_event.set)
        await service.run()

    asyncio.run(runner())
