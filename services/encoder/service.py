"""The frame encoder: frames topic -> Triton vision model -> tokens topic.

Frames of many streams are decoded and batched into one Triton request; each frame's
tokens go out keyed by its stream with a novelty score. A frame redelivered by Kafka
(same stream, seq not above the last one seen) is dropped, so it is never counted twice.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from livelens import kafka as lk
from livelens.config import LivelensConfig
from livelens.health import HealthServer
from livelens.models.preprocess import preprocess
from livelens.records import BadImage, decode_image, set_tokens
from livelens.v1 import messages_pb2 as pb
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


class EncoderService:
    def __init__(self, cfg: LivelensConfig) -> None:
        self.cfg = cfg
        self.stats = EncoderStats()
        self.novelty = NoveltyTracker()
        self.last_seq: dict[str, int] = {}
        self.stop_event = threading.Event()

    def process(self, frames: list[pb.FrameRecord], model: VisionModelClient) -> list[pb.TokensRecord]:
        """Encode one poll's worth of frames; returns the token records in input order."""
        fresh: list[pb.FrameRecord] = []
        pixels: list[np.ndarray] = []
        for frame in frames:
            self.stats.frames_in += 1
            is_query = bool(frame.query_request_id)  # a question's example image: no seq, no novelty
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
            fresh.append(frame)
            pixels.append(preprocess(rgb, self.cfg.encoder.image_size))
        out: list[pb.TokensRecord] = []
        step = self.cfg.encoder.max_batch
        for start in range(0, len(fresh), step):
            batch = fresh[start:start + step]
            tokens = model.encode(np.stack(pixels[start:start + step]))
            self.stats.batches += 1
            grid = int(round(tokens.shape[1] ** 0.5))
            for frame, frame_tokens in zip(batch, tokens, strict=True):
                rec = pb.TokensRecord(
                    stream_id=frame.stream_id, tenant=frame.tenant, seq=frame.seq,
                    pts_s=frame.pts_s, grid_h=grid, grid_w=tokens.shape[1] // grid,
                    novelty=0.0 if frame.query_request_id else self.novelty.update(frame.stream_id, frame_tokens),
                    encoder_model=self.cfg.encoder.model_id,
                    gateway_time_unix=frame.gateway_time_unix, encoded_time_unix=time.time(),
                    query_request_id=frame.query_request_id,
                )
                set_tokens(rec, frame_tokens)
                out.append(rec)
                self.stats.frames_encoded += 1
        return out

    def process_with_retry(self, frames: list[pb.FrameRecord],
                           model: VisionModelClient) -> list[pb.TokensRecord]:
        """Triton may be restarting: retry with backoff, then give up (the process exits,
        its offsets uncommitted, and the frames are encoded again after the restart)."""
        seqs = dict(self.last_seq)
        for attempt in range(self.cfg.encoder.triton_retries + 1):
            try:
                return self.process(frames, model)
            except Exception as exc:  # noqa: BLE001 - tritonclient raises many kinds
                self.last_seq = dict(seqs)  # the frames were not encoded: not seen either
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
                                          cfg.encoder.group_id, auto_commit=False)
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


def main(cfg: LivelensConfig) -> None:
    service = EncoderService(cfg)
    signal.signal(signal.SIGTERM, lambda *_: service.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: service.stop_event.set())
    service.run()
