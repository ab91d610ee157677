"""The LLM service's Kafka adapter: tokens + commands in, responses and checkpoints out.

One consumer group reads the tokens and commands topics; both are keyed by stream key
("tenant/stream_id") and have the same partition count, so the replica that owns a
stream's partition holds its context and receives its questions. A replica given a
partition it did not hold rebuilds its streams' contexts from their checkpoints
(`services.llm.rebuild`). The services' consume loop (`services.common.consume`) polls in a
thread (poll, parse, dead-letter); the records go in order to the service's `LLMCore`
(`services.llm.core`: streams, commands, answers) on one asyncio loop; offsets are
committed once the core has handled them; what the core says is published by `KafkaSink`.
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

from livelens.config import KafkaConfig, LivelensConfig
from livelens.v1 import messages_pb2 as pb
from services.common import kafka as lk
from services.common.consume import Consumed, ConsumeLoop, Topology
from services.common.health import HealthServer
from services.common.metrics import serve_metrics
from services.llm.core import LLMCore
from services.llm.instructions import InstructionChecker, YesNo
from services.llm.rebuild import rebuild_items
from services.llm.resources import build_resources, remove_stale_dirs

log = logging.getLogger("livelens.llm")


@dataclass
class ForgetPartitions:
    partitions: set[int]


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
        self.consume: ConsumeLoop | None = None  # the polling thread's, once it runs

    def topology(self) -> Topology:
        k = self.cfg.kafka
        return Topology("llm", self.cfg.llm.group_id,
                        {k.tokens_topic: pb.TokensRecord, k.commands_topic: pb.CommandRecord},
                        (k.responses_topic, k.checkpoints_topic),
                        "per stream: its context (sink, window, dialogue), its segment and KV stores, its standing "
                        "instructions (`stream.Stream`); checkpointed to the checkpoints topic")

    def poll_kafka(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        k = self.cfg.kafka

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def put_all(batch: list[Consumed]) -> None:  # handled on the loop: `handle`
            for c in batch:
                put(c)

        # A partition's streams are rebuilt (their records replayed onto the queue) by a
        # thread of their own, while the partition stays paused (`ConsumeLoop.on_gained`):
        # in the rebalance callback, a rebuild that outlasts the session timeout got this
        # replica evicted, and the partitions it then got back unrebuilt missed what the
        # other replica had consumed meanwhile. Each holding of a partition has a number
        # (`holding`): a rebuild stops, and its partition stays paused, once the partition
        # was lost after it started.
        holding: dict[int, int] = {}
        lock = threading.Lock()  # holding, and what is put on the queue for a partition

        def rebuild(numbers: dict[int, int]) -> None:
            for partition, held in sorted(numbers.items()):
                items = rebuild_items(k, {partition}, held=set())
                try:
                    for n, item in enumerate(items):
                        with lock:
                            if holding.get(partition) != held or self.stop_event.is_set():
                                break
                            put(item)
                        while n % 64 == 0 and queue.qsize() > 256 and not self.stop_event.is_set():  # bounded
                            time.sleep(0.01)
                except Exception:  # noqa: BLE001 - the broker failed us: serve on, the streams start afresh
                    log.exception("partition %d: rebuilding its streams failed; they go on from new records",
                                  partition)
                finally:
                    items.close()
                with lock:
                    if holding.get(partition) == held:
                        consume.release({partition})

        def gained(partitions: set[Any]) -> None:
            with lock:
                numbers = {tp.partition: holding.setdefault(tp.partition, 0) for tp in partitions}
            threading.Thread(target=rebuild, args=(numbers,), name="rebuild", daemon=True).start()

        def lost(partitions: set[Any]) -> None:
            numbers = {tp.partition for tp in partitions}
            with lock:
                for n in numbers:
                    holding[n] = holding.get(n, 0) + 1
                put(ForgetPartitions(numbers))

        consume = self.consume = ConsumeLoop(k, self.topology(), on_lost=lost, on_gained=gained, commit_every_s=1.0)
        try:
            pending = consume.wait_assigned()
            self.assigned.set()
            consume.run(put_all, self.stop_event, pending=pending)
        finally:
            put(None)

    def handle(self, item: Any) -> None:
        consume = self.consume
        assert consume is not None
        if isinstance(item, Consumed):
            r = item.record
            try:
                if isinstance(item.msg, pb.TokensRecord):
                    self.core.on_tokens(item.msg, r.offset, r.partition)
                elif item.msg is not None:
                    self.core.on_command(item.msg, r.partition)
            except Exception as exc:  # noqa: BLE001 - a record that parsed but cannot be used (e.g. a bad token shape)
                self.core.stats.errors += 1
                log.debug("record %s/%d@%d", r.topic, r.partition, r.offset, exc_info=True)
                consume.dead_letter(r, f"cannot process: {type(exc).__name__}: {exc}")
            consume.handled(r)
        elif isinstance(item, ForgetPartitions):
            self.core.forget_partitions(item.partitions)
        else:
            self.core.on_rebuild(item)

    async def run(self) -> None:
        cfg = self.cfg
        health = HealthServer(cfg.llm.health_host, cfg.llm.health_port, "llm.health_port",
                              "livelens.llm").start()
        for root in (cfg.llm.store.kv_dir, cfg.llm.store.segments_disk_dir):
            if root:
                remove_stale_dirs(Path(root))
        kv_dir = None  # this process's own: removed when it ends
        if cfg.llm.context.materializer == "streaming_kv" and not cfg.llm.store.kv_shared_dir:
            kv_dir = Path(cfg.llm.store.kv_dir) / f"llm-{os.getpid()}"
        engine, res = build_resources(cfg, Path(cfg.llm.store.kv_shared_dir) if cfg.llm.store.kv_shared_dir else kv_dir)
        lk.ensure_topics(cfg.kafka)
        self.producer = lk.make_producer(cfg.kafka, "livelens-llm")
        sink = KafkaSink(cfg.kafka, self.producer)
        checker = InstructionChecker(cfg.llm, YesNo(res.embedder.text_ids), lambda msg: sink.response(msg, True))
        self.core = core = LLMCore(cfg, res, sink, checker)
        serve_metrics(cfg.llm.health_host, cfg.llm.metrics_port, "llm.metrics_port",
                      lambda: {"llm": (core.stats, self.consume.stats if self.consume else None),
                               "llm_store": res.store.stats,
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
        log.info("llm service ready: model %s", cfg.llm.engine.model_path)
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
