"""The frame encoder: frames topic -> Triton vision model -> tokens topic.

Frames of many streams are decoded and batched into one Triton request; each frame's
tokens go out keyed by its stream with a novelty score. A frame redelivered by Kafka
(same stream, seq not above the last one seen) is dropped, so it is never counted twice.

The per-stream feature cache (`feature_cache.py`) decides before the vision model whether
a frame is worth encoding, and after it which tokens are worth publishing. It lives with
the replica that owns the stream's partition; partitions lost in a rebalance drop their
streams' caches (the new owner starts with one full encode).
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from livelens import kafka as lk
from livelens.config import LivelensConfig
from livelens.health import HealthServer
from livelens.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from livelens.records import BadImage, decode_image, set_tokens
from livelens.v1 import messages_pb2 as pb
from services.encoder.feature_cache import FeatureCache, FrameDecision
from services.encoder.novelty import NoveltyTracker
from services.encoder.triton_client import VisionModelClient

log = logging.getLogger("livelens.encoder")


@dataclass
class EncoderStats:
    frames_in: int = 0
    frames_encoded: int = 0
    duplicates: int = 0
    bad_frames: int = 0
    batches: int = 0
    skipped: int = 0  # unchanged: not encoded


class EncoderService:
    def __init__(self, cfg: LivelensConfig) -> None:
        self.cfg = cfg
        self.stats = EncoderStats()
        self.novelty = NoveltyTracker()
        self.cache = FeatureCache(cfg.encoder.cache)
        self.last_seq: dict[str, int] = {}
        self.stop_event = threading.Event()

    def process(self, frames: list[pb.FrameRecord], model: VisionModelClient) -> list[pb.TokensRecord]:
        """Encode one poll's worth of frames; returns the token records in input order."""
        out: dict[int, pb.TokensRecord] = {}  # input index -> record
        todo: list[tuple[int, pb.FrameRecord, np.ndarray, FrameDecision | None]] = []
        unchanged: list[tuple[int, pb.FrameRecord, FrameDecision]] = []
        for i, frame in enumerate(frames):
            self.stats.frames_in += 1
            is_query = bool(frame.query_request_id)  # a question's example image: no seq, no cache
            if not is_query and frame.seq <= self.last_seq.get(frame.stream_id, -1):
                self.stats.duplicates += 1
                continue
            if not is_query:
                self.last_seq[frame.stream_id] = frame.seq
            try:
                rgb = decode_image(frame.data, frame.encoding, frame.width, frame.height)
            except BadImage as exc:  # the gateway validates, so this is a foreign producer
                self.stats.bad_frames += 1
                log.warning("dropping frame %s/%d: %s", frame.stream_id, frame.seq, exc)
                continue
            pixels = preprocess(rgb, self.cfg.encoder.image_size)
            decision = None if is_query else self.cache.stream(frame.stream_id).decide(to_unit_range(pixels))
            if decision is not None and not decision.encode:
                unchanged.append((i, frame, decision))  # published once the grid is known
                continue
            todo.append((i, frame, pixels, decision))
        step = self.cfg.encoder.max_batch
        for start in range(0, len(todo), step):
            batch = todo[start:start + step]
            tokens = model.encode(np.stack([pixels for _, _, pixels, _ in batch]))
            self.stats.batches += 1
            grid = int(round(tokens.shape[1] ** 0.5))
            for (i, frame, pixels, decision), frame_tokens in zip(batch, tokens, strict=True):
                rec = pb.TokensRecord(
                    stream_id=frame.stream_id, tenant=frame.tenant, seq=frame.seq,
                    pts_s=frame.pts_s, grid_h=grid, grid_w=tokens.shape[1] // grid,
                    novelty=0.0 if decision is None else self.novelty.update(frame.stream_id, frame_tokens),
                    encoder_model=self.cfg.encoder.model_id,
                    gateway_time_unix=frame.gateway_time_unix, encoded_time_unix=time.time(),
                    query_request_id=frame.query_request_id,
                )
                kept = None if decision is None else \
                    self.cache.stream(frame.stream_id).kept(decision, to_unit_range(pixels), frame_tokens)
                set_tokens(rec, frame_tokens, kept)
                out[i] = rec
                self.stats.frames_encoded += 1
        for i, frame, decision in unchanged:
            out[i] = self.unchanged_record(frame, decision)
        return [out[i] for i in sorted(out)]

    def unchanged_record(self, frame: pb.FrameRecord, decision: FrameDecision) -> pb.TokensRecord:
        cache = self.cache.stream(frame.stream_id)
        grid = cache.unchanged()
        self.stats.skipped += 1
        rec = pb.TokensRecord(
            stream_id=frame.stream_id, tenant=frame.tenant, seq=frame.seq, pts_s=frame.pts_s,
            grid_h=cache.grid_h, grid_w=cache.grid_w, novelty=decision.changed_fraction,
            encoder_model=self.cfg.encoder.model_id, gateway_time_unix=frame.gateway_time_unix,
            encoded_time_unix=time.time(), unchanged=True)
        hidden = cache.tokens.shape[1] if cache.tokens is not None else 0
        set_tokens(rec, np.zeros((grid, hidden), np.float16), np.zeros(grid, bool))
        return rec

    def forget_partitions(self, partitions: set) -> None:
        """A rebalance took partitions away: their streams' caches are no longer ours."""
        if partitions:
            self.cache.streams.clear()
            self.novelty = NoveltyTracker()

    def process_with_retry(self, frames: list[pb.FrameRecord],
                           model: VisionModelClient) -> list[pb.TokensRecord]:
        """Triton may be restarting: retry with backoff, then give up (the process exits,
        its offsets uncommitted, and the frames are encoded again after the restart)."""
        seqs = dict(self.last_seq)
        caches = copy.deepcopy(self.cache.streams)
        for attempt in range(self.cfg.encoder.triton_retries + 1):
            try:
                return self.process(frames, model)
            except Exception as exc:  # noqa: BLE001 - tritonclient raises many kinds
                # the frames were not encoded: not seen either, and not the cache's reference
                self.last_seq = dict(seqs)
                self.cache.streams = copy.deepcopy(caches)
                if attempt == self.cfg.encoder.triton_retries:
                    raise
                log.warning("Triton call failed (%s); retry %d", exc, attempt + 1)
                time.sleep(min(5.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def run(self) -> None:
        cfg = self.cfg
        health = HealthServer(cfg.encoder.health_host, cfg.encoder.health_port,
                              "encoder.health_port", "livelens.encoder").start()
        model = VisionModelClient(cfg.triton_url, cfg.encoder.model_name)
        model.wait_ready()
        lk.ensure_topics(cfg.kafka)
        producer = lk.make_producer(cfg.kafka, "livelens-encoder")
        consumer = lk.make_group_consumer(cfg.kafka, [cfg.kafka.frames_topic],
                                          cfg.encoder.group_id, auto_commit=False,
                                          on_revoked=self.forget_partitions)
        # Serving means owning partitions (Tansu takes seconds to settle a group join).
        deadline = time.monotonic() + 60
        pending: dict = {}
        while not consumer.assignment() and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                pending.setdefault(tp, []).extend(records)
        health.set(True)
        log.info("encoder ready: triton %s model %s", cfg.triton_url, cfg.encoder.model_name)
        try:
            while not self.stop_event.is_set():
                polled = pending or consumer.poll(timeout_ms=cfg.encoder.poll_timeout_ms)
                pending = {}
                frames = []
                for records in polled.values():
                    for r in records:
                        frame = pb.FrameRecord()
                        try:
                            frame.ParseFromString(r.value)
                        except Exception:  # noqa: BLE001 - a foreign record on our topic
                            self.stats.bad_frames += 1
                            continue
                        frames.append(frame)
                if not frames:
                    continue
                for rec in self.process_with_retry(frames, model):
                    lk.publish(producer, cfg.kafka.tokens_topic, rec.stream_id, rec)
                producer.flush()
                consumer.commit()  # only now: a crash before this replays the frames
        finally:
            health.set(False)
            consumer.close()
            producer.close()
            model.close()
            health.stop()


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """ImageNet-normalized [3, H, W] back to 0..1 (what the cache's thresholds are in)."""
    return pixels * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]


def main(cfg: LivelensConfig) -> None:
    service = EncoderService(cfg)
    signal.signal(signal.SIGTERM, lambda *_: service.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: service.stop_event.set())
    service.run()
