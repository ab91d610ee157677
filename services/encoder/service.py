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

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from livelens import kafka as lk
from livelens.config import LivelensConfig
from livelens.health import HealthServer
from livelens.identity import key_of
from livelens.labels import imagenet_names
from livelens.malloc import tune_malloc
from livelens.metrics import record_lag, serve_metrics
from livelens.models.preprocess import FramePreprocessing
from livelens.records import BadImage, decode_image, set_tokens
from livelens.v1 import messages_pb2 as pb
from services.encoder import metrics
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
    dead_letters: int = 0
    batches: int = 0
    skipped: int = 0  # unchanged: not encoded


@dataclass
class _Frame:
    """A frame of the poll being encoded: its place in the poll, record and pixels."""

    index: int
    record: pb.FrameRecord
    pixels: np.ndarray  # preprocessed [3, S, S]


# (poll index, record) pairs, Triton calls, frames not decodable
_Encoded = tuple[list[tuple[int, pb.TokensRecord]], int, list[tuple[int, str]]]  # records, calls, rejected


class EncoderService:
    def __init__(self, cfg: LivelensConfig) -> None:
        self.cfg = cfg
        self._preprocessing: dict[str, FramePreprocessing] = {}  # per served model
        self.stats = EncoderStats()
        self.novelty = NoveltyTracker()
        self.cache = FeatureCache(cfg.encoder.cache)
        # Per stream key ("tenant/stream_id"):
        self.last_seq: dict[str, int] = {}
        self.stream_partitions: dict[str, tuple[str, int]] = {}  # where each stream's frames come from
        self.sessions: dict[str, str] = {}  # the session of the stream's state
        self.rejected: list[tuple[int, str]] = []  # the last `process`'s frames that could not be encoded
        self.stop_event = threading.Event()
        # Streams are encoded concurrently, so several Triton requests are in flight and
        # its dynamic batcher can merge them; a stream's own frames stay in order.
        self.pool = ThreadPoolExecutor(max(1, cfg.encoder.max_in_flight), thread_name_prefix="encode")

    def process(self, frames: list[pb.FrameRecord], model: VisionModelClient) -> list[pb.TokensRecord]:
        """Encode one poll's worth of frames; returns the token records in input order
        (the frames that could not be decoded are left out, in `rejected`)."""
        if model.grid[0] and not self.cache.grid[0]:
            self.cache.grid = model.grid
        streams: dict[str, list[tuple[int, pb.FrameRecord]]] = {}
        queries: list[tuple[int, pb.FrameRecord]] = []
        self.rejected = []
        for i, frame in enumerate(frames):
            self.stats.frames_in += 1
            is_query = bool(frame.query_request_id)  # a question's example image: no seq, no cache
            key = key_of(frame)
            if not is_query and frame.session_id != self.sessions.setdefault(key, frame.session_id):
                self.forget(key)  # the stream id was opened anew: its state starts afresh
                self.sessions[key] = frame.session_id
            if not is_query and frame.seq <= self.last_seq.get(key, -1):
                self.stats.duplicates += 1
                continue
            if is_query:
                queries.append((i, frame))
            else:
                self.last_seq[key] = frame.seq
                self.cache.stream(key)  # created here, not in the worker threads
                streams.setdefault(key, []).append((i, frame))
        # Each stream's share of the requests in flight: a lone stream's backlog of partial
        # recomputes goes out together; with many streams, Triton is fed by the streams.
        share = max(1, self.cfg.encoder.max_in_flight // max(1, len(streams)))
        futures = [self.pool.submit(self._encode_stream, items, model, share) for items in streams.values()]
        if queries:
            futures.append(self.pool.submit(self._encode_queries, queries, model))
        wait(futures)  # all of them, even when one failed: no thread may touch a cache after
        out: dict[int, pb.TokensRecord] = {}
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
        return [out[i] for i in sorted(out)]

    def preprocessing(self, model: VisionModelClient) -> FramePreprocessing:
        """The served model's preprocessing (an imported model's comes with its Triton config)."""
        prep = self._preprocessing.get(model.model_name)
        if prep is None:
            prep = self._preprocessing[model.model_name] = FramePreprocessing.of_model(
                model.preprocessing, self.cfg.encoder.image_size)
        return prep

    def _prepare(self, frames: list[tuple[int, pb.FrameRecord]],
                 model: VisionModelClient) -> tuple[list[_Frame], list[tuple[int, str]]]:
        """Decode and preprocess (in the worker threads: OpenCV releases the GIL, so one
        stream's frames are prepared while another's are in Triton). Returns the frames
        and those that were not decodable, with the reason."""
        out: list[_Frame] = []
        bad: list[tuple[int, str]] = []
        prep = self.preprocessing(model)
        size = prep.size
        for i, frame in frames:
            try:
                rgb = decode_image(frame.data, frame.encoding, frame.width, frame.height, min_side=size)
            except BadImage as exc:  # the gateway validates, so this is a foreign producer
                bad.append((i, f"frame {frame.seq} cannot be decoded: {exc}"))
                continue
            out.append(_Frame(i, frame, prep(rgb)))
        return out, bad

    def _encode_stream(self, frames: list[tuple[int, pb.FrameRecord]], model: VisionModelClient,
                       in_flight: int) -> _Encoded:
        """One stream's frames of the poll, in order, through its feature cache. Every frame
        is decided first (the reference is the last frame sent to the model); then runs of
        whole frames go to the model in one request each, and up to `in_flight` partial
        recomputes at a time on the cache the frame before them left."""
        items, bad = self._prepare(frames, model)
        if not items:
            return [], 0, bad
        cache = self.cache.stream(key_of(items[0].record))
        unit = self.preprocessing(model).to_unit_range
        decided = [(item, cache.decide(unit(item.pixels), partial=model.partial)) for item in items]
        out: list[tuple[int, pb.TokensRecord]] = []
        calls = 0
        i = 0
        while i < len(decided):
            item, decision = decided[i]
            if not decision.encode:
                out.append((item.index, self.unchanged_record(item.record, decision)))
                i += 1
            elif decision.recompute is not None and cache.vit_state is not None:
                # Up to `in_flight` partial recomputes before the next whole frame, all on the
                # cache before the first: each recomputes every patch changed since then, so
                # they do not wait for each other (one request each, in flight together).
                j, changed = i, np.zeros(0, np.int64)
                batch: list[tuple[int, np.ndarray]] = []
                while j < len(decided) and len(batch) < in_flight and \
                        (decided[j][1].recompute is not None or not decided[j][1].encode):
                    later = decided[j][1]
                    if later.recompute is not None:
                        changed = later.recompute = np.union1d(changed, later.recompute)
                        batch.append((j, changed))
                    j += 1
                tokens_list, cache.vit_state = model.encode_partial(
                    [(decided[k][0].pixels, index) for k, index in batch], cache.vit_state)
                calls += len(batch)
                out += self._records(decided[i:j], {decided[k][0].index: t
                                                    for (k, _), t in zip(batch, tokens_list, strict=True)})
                i = j
            else:  # whole frames up to the next partial recompute: one request
                run = [i]
                while run[-1] + 1 < len(decided) and len(run) < self.cfg.encoder.max_batch and \
                        decided[run[-1] + 1][1].recompute is None:
                    run.append(run[-1] + 1)
                run_items = [decided[j] for j in run]
                encoded = [it for it, d in run_items if d.encode]
                # Only the run's last frame leaves a cache that a later frame can use.
                head, last = (encoded[:-1], encoded[-1:]) if model.partial else (encoded, [])
                by_index: dict[int, np.ndarray] = {}
                probs: dict[int, np.ndarray] = {}
                for part, with_cache in ((head, False), (last, True)):
                    if part:
                        enc = model.encode(np.stack([it.pixels for it in part]), with_cache)
                        calls += 1
                        by_index.update({it.index: t for it, t in zip(part, enc.tokens, strict=True)})
                        if enc.class_probs is not None:
                            probs.update({it.index: p for it, p in zip(part, enc.class_probs, strict=True)})
                        if enc.states:
                            cache.vit_state = enc.states[-1]
                out += self._records(run_items, by_index, probs)
                i = run[-1] + 1
        return out, calls, bad

    def _records(self, decided: list[tuple[_Frame, FrameDecision]], tokens: dict[int, np.ndarray],
                 probs: dict[int, np.ndarray] | None = None) -> list[tuple[int, pb.TokensRecord]]:
        """Records of decided frames in order (the first frame's tokens teach the grid):
        the encoded ones with their `tokens` and class `probs` (by poll index), the others unchanged."""
        probs = probs or {}
        return [(it.index, self.tokens_record(it, tokens[it.index], d, probs.get(it.index)) if d.encode
                 else self.unchanged_record(it.record, d)) for it, d in decided]

    def _encode_queries(self, frames: list[tuple[int, pb.FrameRecord]], model: VisionModelClient) -> _Encoded:
        """Example images of questions: encoded whole, no cache, no novelty."""
        items, bad = self._prepare(frames, model)
        if not items:
            return [], 0, bad
        enc = model.encode(np.stack([item.pixels for item in items]))
        probs = enc.class_probs if enc.class_probs is not None else [None] * len(items)
        return [(item.index, self.tokens_record(item, t, None, p))
                for item, t, p in zip(items, enc.tokens, probs, strict=True)], 1, bad

    def tokens_record(self, item: _Frame, tokens: np.ndarray, decision: FrameDecision | None,
                      class_probs: np.ndarray | None = None) -> pb.TokensRecord:
        frame = item.record
        grid = int(round(tokens.shape[0] ** 0.5))
        rec = pb.TokensRecord(
            stream_id=frame.stream_id, tenant=frame.tenant, session_id=frame.session_id, seq=frame.seq,
            pts_s=frame.pts_s, grid_h=grid, grid_w=tokens.shape[0] // grid,
            novelty=0.0 if decision is None else self.novelty.update(key_of(frame), tokens),
            encoder_model=self.cfg.encoder.model_id,
            gateway_time_unix=frame.gateway_time_unix, encoded_time_unix=time.time(),
            query_request_id=frame.query_request_id,
        )
        kept = None if decision is None else \
            self.cache.stream(key_of(frame)).kept(decision, tokens)
        set_tokens(rec, tokens, kept)
        if class_probs is not None:
            for name, p in frame_tags(class_probs, self.cfg.encoder.frame_tags, self.cfg.encoder.tag_min_prob):
                rec.tags.append(name)
                rec.tag_scores.append(p)
        return rec

    def unchanged_record(self, frame: pb.FrameRecord, decision: FrameDecision) -> pb.TokensRecord:
        cache = self.cache.stream(key_of(frame))
        grid = cache.unchanged()
        rec = pb.TokensRecord(
            stream_id=frame.stream_id, tenant=frame.tenant, session_id=frame.session_id, seq=frame.seq,
            pts_s=frame.pts_s, grid_h=cache.grid_h, grid_w=cache.grid_w, novelty=decision.changed_fraction,
            encoder_model=self.cfg.encoder.model_id, gateway_time_unix=frame.gateway_time_unix,
            encoded_time_unix=time.time(), unchanged=True)
        hidden = cache.tokens.shape[1] if cache.tokens is not None else 0
        set_tokens(rec, np.zeros((grid, hidden), np.float16), np.zeros(grid, bool))
        return rec

    def forget(self, key: str) -> None:
        self.cache.forget(key)
        self.novelty.forget(key)
        self.last_seq.pop(key, None)
        self.stream_partitions.pop(key, None)
        self.sessions.pop(key, None)

    def forget_partitions(self, partitions: set) -> None:
        """A rebalance took partitions away: their streams' caches are no longer ours (the
        new owner starts each with one full encode). Called in the polling thread, between
        two `process` calls; a closing consumer loses nothing (its caches go with it)."""
        lost = {(tp.topic, tp.partition) for tp in partitions}
        for key in [s for s, tp in self.stream_partitions.items() if tp in lost]:
            self.forget(key)
        if lost:
            log.info("partitions %s lost: caches of their streams dropped", sorted(lost))

    def process_with_retry(self, frames: list[pb.FrameRecord],
                           model: VisionModelClient) -> list[pb.TokensRecord]:
        """Triton may be restarting: retry with backoff, then give up (the process exits,
        its offsets uncommitted, and the frames are encoded again after the restart)."""
        seqs, sessions = dict(self.last_seq), dict(self.sessions)
        caches = self.cache.snapshot()
        for attempt in range(self.cfg.encoder.triton_retries + 1):
            try:
                return self.process(frames, model)
            except Exception as exc:  # noqa: BLE001 - tritonclient raises many kinds
                # the frames were not encoded: not seen either, and not the cache's reference
                self.last_seq, self.sessions = dict(seqs), dict(sessions)
                self.cache.streams = {sid: c.snapshot() for sid, c in caches.items()}
                if attempt == self.cfg.encoder.triton_retries:
                    raise
                log.warning("Triton call failed (%s); retry %d", exc, attempt + 1)
                time.sleep(min(5.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def run(self) -> None:
        cfg = self.cfg
        health = HealthServer(cfg.encoder.health_host, cfg.encoder.health_port,
                              "encoder.health_port", "livelens.encoder").start()
        serve_metrics(cfg.encoder.health_host, cfg.encoder.metrics_port, "encoder.metrics_port",
                      lambda: {"encoder": self.stats, "encoder_cache": self.cache.total()})
        model = VisionModelClient(cfg.triton_url, cfg.encoder.model_name)
        model.wait_ready()
        lk.ensure_topics(cfg.kafka)
        producer = lk.make_producer(cfg.kafka, "livelens-encoder")
        consumer = lk.make_group_consumer(cfg.kafka, [cfg.kafka.frames_topic],
                                          cfg.encoder.group_id, auto_commit=False,
                                          on_lost=self.forget_partitions)
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
                frames, sources = [], []
                for records in polled.values():
                    for r in records:
                        frame = pb.FrameRecord()
                        try:
                            frame.ParseFromString(r.value)
                            if not frame.stream_id or not frame.tenant:
                                raise ValueError("the record names no stream or tenant")
                        except Exception as exc:  # noqa: BLE001 - a foreign record on our topic
                            self.stats.bad_frames += 1
                            self.stats.dead_letters += 1
                            lk.dead_letter(producer, cfg.kafka, "encoder", r, f"unparseable frame record: {exc}")
                            continue
                        frames.append(frame)
                        sources.append(r)
                        if not frame.query_request_id:
                            self.stream_partitions[key_of(frame)] = (r.topic, r.partition)
                if not frames:
                    continue
                for rec in self.process_with_retry(frames, model):
                    lk.publish(producer, cfg.kafka.tokens_topic, rec)
                    if not rec.query_request_id:
                        metrics.TENANT_FRAMES.labels(rec.tenant).inc()
                        if rec.gateway_time_unix:
                            metrics.FRAME_TO_TOKENS.observe(max(0.0, rec.encoded_time_unix - rec.gateway_time_unix))
                for i, reason in self.rejected:
                    self.stats.dead_letters += 1
                    lk.dead_letter(producer, cfg.kafka, "encoder", sources[i], reason)
                producer.flush()
                consumer.commit()  # only now: a crash before this replays the frames
                record_lag(consumer, "encoder")
        finally:
            health.set(False)
            consumer.close()
            producer.close()
            model.close()
            self.pool.shutdown()
            health.stop()


def frame_tags(class_probs: np.ndarray, most: int, min_prob: float) -> list[tuple[str, float]]:
    """The names of the `most` likeliest ImageNet classes at least `min_prob` likely."""
    if most <= 0:
        return []
    names = imagenet_names()
    p = class_probs.astype(np.float32)
    top = np.argsort(-p)[:most]
    return [(names[int(c)], round(float(p[c]), 4)) for c in top if p[c] >= min_prob]


def main(cfg: LivelensConfig) -> None:
    tune_malloc()  # the ViT's per-stream cache travels with every request
    service = EncoderService(cfg)
    signal.signal(signal.SIGTERM, lambda *_: service.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: service.stop_event.set())
    service.run()
