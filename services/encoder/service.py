"""The frame encoder: frames topic -> Triton vision model -> tokens topic.

Frames of many streams are decoded and batched into Triton requests; each frame's tokens
go out keyed by its stream with a novelty score. A frame redelivered by Kafka (same
stream, seq not above the last one seen) is dropped, so it is never counted twice.

A poll goes through:
- `streams.py`: each stream's state (session, last seq, partition, feature cache, novelty,
  grid) in one `EncoderStream`. It lives with the replica that owns the stream's
  partition; partitions lost in a rebalance drop their streams (the new owner starts
  each with one full encode);
- `plan.py`: the poll split by stream, each with its share of the requests in flight;
  then, in the stream's worker thread, its frames decided by its feature cache
  (`feature_cache.py`: is a frame worth encoding, and after it which tokens are worth
  publishing) and planned as steps, with no I/O;
- `execute.py`: the steps run against Triton (`triton_client.py`), into tokens records
  (`records.py`).
Kafka in and out is the services' consume loop (`services.common.consume`): the tokens of
a poll are published before its offsets are committed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, NamedTuple

from livelens.config import LivelensConfig
from livelens.records import BadImage, decode_image
from livelens.v1 import messages_pb2 as pb
from services.common import kafka as lk
from services.common.consume import Consumed, ConsumeLoop, Topology
from services.common.health import HealthServer
from services.common.malloc import tune_malloc
from services.common.metrics import serve_metrics
from services.common.preprocess import FramePreprocessing
from services.encoder import metrics
from services.encoder.execute import Frame, Records, run_queries, run_stream
from services.encoder.plan import Polled, StreamWork, plan_poll, plan_stream
from services.encoder.records import fold_records
from services.encoder.streams import Partition, StreamTable
from services.encoder.triton_client import VisionModelClient

log = logging.getLogger("livelens.encoder")


@dataclass
class EncoderStats:
    frames_in: int = 0
    frames_encoded: int = 0
    duplicates: int = 0
    bad_frames: int = 0  # could not be decoded (to the dead-letter topic)
    batches: int = 0
    skipped: int = 0  # unchanged: not encoded
    folded: int = 0  # frames folded into others (older than encoder.max_frame_age_s when polled)
    folds: int = 0  # records that stand for several frames


class Outcome(NamedTuple):
    """What one worker did with its frames of a poll."""

    records: Records
    calls: int  # Triton requests
    rejected: list[tuple[int, str]]  # frames not decodable: poll index, reason


class EncoderService:
    def __init__(self, cfg: LivelensConfig) -> None:
        self.cfg = cfg
        self._preprocessing: dict[str, FramePreprocessing] = {}  # per served model
        self.stats = EncoderStats()
        self.streams = StreamTable(cfg.encoder.cache)
        self.rejected: list[tuple[int, str]] = []  # the last `process`'s frames that could not be encoded
        self.stop_event = threading.Event()
        self.consume: ConsumeLoop | None = None  # while running
        # Streams are encoded concurrently, so several Triton requests are in flight and
        # its dynamic batcher can merge them; a stream's own frames stay in order.
        self.pool = ThreadPoolExecutor(max(1, cfg.encoder.max_in_flight), thread_name_prefix="encode")

    def process(self, frames: list[pb.FrameRecord], model: VisionModelClient,
                partitions: list[Partition] | None = None) -> list[pb.TokensRecord]:
        """Encode one poll's worth of frames (`partitions`: where each came from, for a
        rebalance to drop their streams); returns the token records in input order (the
        frames that could not be decoded are left out, in `rejected`)."""
        self.rejected = []
        self.stats.frames_in += len(frames)
        c = self.cfg.encoder
        poll = plan_poll(frames, self.streams, model.grid, c.max_in_flight, partitions,
                         max_age_s=c.max_frame_age_s, fold_encoded=c.fold_encoded_frames)
        self.stats.duplicates += poll.duplicates
        out: dict[int, pb.TokensRecord] = {}
        futures = [self.pool.submit(self._encode_stream, work, model) for work in poll.streams]
        if poll.queries:
            futures.append(self.pool.submit(self._encode_queries, poll.queries, model))
        wait(futures)  # all of them, even when one failed: no thread may touch a stream after
        for future in futures:
            records, calls, bad = future.result()  # raises the first failure
            self.stats.batches += calls
            self.stats.bad_frames += len(bad)
            self.rejected += bad
            for i, rec in records:
                out[i] = rec
                if rec.unchanged:
                    self.stats.skipped += 1
                else:
                    self.stats.frames_encoded += 1
        for work in poll.streams:
            if work.fold:
                self.fold(work.fold, out)
        return [out[i] for i in sorted(out)]

    def fold(self, stale: list[Polled], out: dict[int, pb.TokensRecord]) -> None:
        """The stale frames' records (those encoded) become one, in the last one's place."""
        encoded = [out.pop(i) for i, _ in stale if i in out]
        rec = fold_records(self.cfg.encoder, [f for _, f in stale], encoded)
        out[stale[-1][0]] = rec
        self.stats.folds += 1
        self.stats.folded += len(stale) - 1
        metrics.FRAMES_FOLDED.labels(rec.tenant).inc(len(stale) - 1)
        log.info("stream %s/%s: frames %d-%d (%.1f-%.1fs) folded into one, %d of them encoded: the encoder was "
                 "behind", rec.tenant, rec.stream_id, rec.folded.from_seq, rec.folded.to_seq, rec.folded.from_pts_s,
                 rec.folded.to_pts_s, len(encoded))

    def preprocessing(self, model: VisionModelClient) -> FramePreprocessing:
        """The served model's preprocessing (an imported model's comes with its Triton config)."""
        prep = self._preprocessing.get(model.model_name)
        if prep is None:
            prep = self._preprocessing[model.model_name] = FramePreprocessing.of_model(
                model.preprocessing, self.cfg.encoder.image_size)
        return prep

    def _prepare(self, frames: list[Polled], model: VisionModelClient) -> tuple[list[Frame], list[tuple[int, str]]]:
        """Decode and preprocess (in the worker threads: OpenCV releases the GIL, so one
        stream's frames are prepared while another's are in Triton). Returns the frames
        and those that were not decodable, with the reason."""
        out: list[Frame] = []
        bad: list[tuple[int, str]] = []
        prep = self.preprocessing(model)
        size = prep.size
        for i, frame in frames:
            try:
                rgb = decode_image(frame.data, frame.encoding, frame.width, frame.height, min_side=size)
            except BadImage as exc:  # the gateway validates, so this is a foreign producer
                bad.append((i, f"frame {frame.seq} cannot be decoded: {exc}"))
                continue
            out.append(Frame(i, frame, prep(rgb)))
        return out, bad

    def _encode_stream(self, work: StreamWork, model: VisionModelClient) -> Outcome:
        """One stream's frames of the poll, in order, through its feature cache: every frame
        is decided first (the reference is the last frame sent to the model), then planned
        and run."""
        frames, bad = self._prepare(work.frames, model)
        if not frames:
            return Outcome([], 0, bad)
        cache = work.stream.cache
        unit = self.preprocessing(model).to_unit_range
        decisions = [cache.decide(unit(f.pixels), partial=model.partial) for f in frames]
        steps = plan_stream(decisions, max_batch=self.cfg.encoder.max_batch, in_flight=work.in_flight,
                            partial=model.partial, has_cache=cache.vit_state is not None)
        records, calls = run_stream(self.cfg.encoder, work.stream, frames, decisions, steps, model)
        return Outcome(records, calls, bad)

    def _encode_queries(self, frames: list[Polled], model: VisionModelClient) -> Outcome:
        items, bad = self._prepare(frames, model)
        if not items:
            return Outcome([], 0, bad)
        records, calls = run_queries(self.cfg.encoder, items, model)
        return Outcome(records, calls, bad)

    def forget_partitions(self, partitions: set) -> None:
        """A rebalance took partitions away: their streams' state is no longer ours (the
        new owner starts each with one full encode). Called in the polling thread, between
        two `process` calls; a closing consumer loses nothing (its caches go with it)."""
        lost = {(tp.topic, tp.partition) for tp in partitions}
        self.streams.forget_partitions(lost)
        if lost:
            log.info("partitions %s lost: caches of their streams dropped", sorted(lost))

    def process_with_retry(self, frames: list[pb.FrameRecord], model: VisionModelClient,
                           partitions: list[Partition] | None = None) -> list[pb.TokensRecord]:
        """Triton may be restarting: retry with backoff, then give up (the process exits,
        its offsets uncommitted, and the frames are encoded again after the restart)."""
        before = self.streams.snapshot()
        for attempt in range(self.cfg.encoder.triton_retries + 1):
            try:
                return self.process(frames, model, partitions)
            except Exception as exc:  # noqa: BLE001 - tritonclient raises many kinds
                # the frames were not encoded: not seen either, and not the cache's reference
                self.streams.restore(before)
                if attempt == self.cfg.encoder.triton_retries:
                    raise
                log.warning("Triton call failed (%s); retry %d", exc, attempt + 1)
                time.sleep(min(5.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def topology(self) -> Topology:
        k = self.cfg.kafka
        return Topology("encoder", self.cfg.encoder.group_id, {k.frames_topic: pb.FrameRecord}, (k.tokens_topic,),
                        "per stream: its feature cache (the last frame sent to the model, the ViT's cache, the "
                        "token grid), its session and last seq (`streams.StreamTable`)")

    def process_batch(self, batch: list[Consumed], model: VisionModelClient, producer: Any) -> None:
        """One poll's frames encoded, their tokens published; frames that cannot be encoded
        go to the dead-letter topic."""
        kept = [c for c in batch if c.msg is not None]
        if not kept:
            return
        partitions = [(c.record.topic, c.record.partition) for c in kept]
        for rec in self.process_with_retry([c.msg for c in kept], model, partitions):
            lk.publish(producer, self.cfg.kafka.tokens_topic, rec)
            if not rec.query_request_id:
                metrics.TENANT_FRAMES.labels(rec.tenant).inc()
                if rec.gateway_time_unix:
                    metrics.FRAME_TO_TOKENS.observe(max(0.0, rec.encoded_time_unix - rec.gateway_time_unix))
        assert self.consume is not None
        for i, reason in self.rejected:
            self.consume.dead_letter(kept[i].record, reason)
        producer.flush()

    def run(self) -> None:
        cfg = self.cfg
        health = HealthServer(cfg.encoder.health_host, cfg.encoder.health_port,
                              "encoder.health_port", "livelens.encoder").start()
        model = VisionModelClient(cfg.triton_url, cfg.encoder.model_name)
        model.wait_ready()
        lk.ensure_topics(cfg.kafka)
        producer = lk.make_producer(cfg.kafka, "livelens-encoder")
        self.consume = consume = ConsumeLoop(cfg.kafka, self.topology(), on_lost=self.forget_partitions)
        serve_metrics(cfg.encoder.health_host, cfg.encoder.metrics_port, "encoder.metrics_port",
                      lambda: {"encoder": (self.stats, consume.stats), "encoder_cache": self.streams.cache_stats()})
        pending = consume.wait_assigned()
        health.set(True)
        log.info("encoder ready: triton %s model %s", cfg.triton_url, cfg.encoder.model_name)
        try:
            consume.run(lambda batch: self.process_batch(batch, model, producer), self.stop_event,
                        poll_timeout_ms=cfg.encoder.poll_timeout_ms, pending=pending)
        finally:
            health.set(False)
            producer.close()
            model.close()
            self.pool.shutdown()
            health.stop()


def main(cfg: LivelensConfig) -> None:
    tune_malloc()  # the ViT's per-stream cache travels with every request
    service = EncoderService(cfg)
    signal.signal(signal.SIGTERM, lambda *_: service.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: service.stop_event.set())
    service.run()
