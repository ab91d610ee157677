"""The ViT with partial recompute served by the real tritonserver, inside the encoder
service: partial recompute against full recompute, Triton batching frames of several
streams, and a Kafka rebalance rebuilding a stream's cache on its new owner."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace

import numpy as np
import pytest
from kafka.structs import TopicPartition

from devtools.bench.encoder import frame, frame_records
from livelens.config import FeatureCacheConfig, LivelensConfig
from livelens.identity import stream_key
from livelens.records import decode_image, get_tokens
from livelens.subscriber import TopicSubscriber
from livelens.v1 import messages_pb2 as pb
from services.common import kafka as lk
from services.common.malloc import tune_malloc
from services.common.ports import free_port
from services.common.preprocess import FramePreprocessing, preprocess
from services.encoder.feature_cache import patch_differences
from services.encoder.grid import UNKNOWN
from services.encoder.novelty import token_cosines
from services.encoder.service import EncoderService
from services.encoder.triton_client import VisionModelClient

pytestmark = pytest.mark.integration
VIT, VIT_FULL = "vision_vit", "vision_vit_full"


def vit_config(cfg: LivelensConfig) -> LivelensConfig:
    return replace(cfg, encoder=replace(cfg.encoder, model_name=VIT, model_id="vit-test"))


@pytest.fixture(scope="module")
def models(stack):  # type: ignore[no-untyped-def]
    tune_malloc()  # as the encoder service's main() does: requests of several MB each
    on, full = VisionModelClient(stack.cfg.triton.grpc_url, VIT), VisionModelClient(stack.cfg.triton.grpc_url, VIT_FULL)
    on.wait_ready()
    full.wait_ready()
    yield on, full
    on.close()
    full.close()


def pixels_of(image: tuple[bytes, int, int]) -> np.ndarray:
    """The model's input for a frame, decoded as the encoder decodes it (reduced JPEG)."""
    data, width, height = image
    return preprocess(decode_image(data, pb.FrameRecord.JPEG, width, height, min_side=224))


def test_partial_recompute_through_triton_close_to_full_encode(models) -> None:  # type: ignore[no-untyped-def]
    on, full = models
    assert on.partial and not full.partial and on.grid == (14, 14) and on.cache_shape == (6, 196, 384)
    images = frame_records("vtest.avi", 3.0, 2.0)
    a, other = pixels_of(images[0]), pixels_of(images[-1])
    b = a.copy()
    b[:, :32, :48] = other[:, 96:128, 96:144]  # 2 x 3 patches of the 14 x 14 grid change
    tokens_a, (state,), _ = on.encode(a[None])
    truth_a = full.encode(a[None]).tokens
    assert token_cosines(tokens_a[0], truth_a[0]).min() > 0.999  # K = N: the plain model

    unit = FramePreprocessing(224).to_unit_range
    index = np.flatnonzero(patch_differences(unit(b), unit(a), 14, 14).ravel() > 0)
    assert index.tolist() == [0, 1, 2, 14, 15, 16]
    (tokens_b,), state_b = on.encode_partial([(b, index)], state)
    truth_b = full.encode(b[None])[0][0]
    assert token_cosines(tokens_b, truth_b).mean() >= 0.98
    assert token_cosines(tokens_b[index], truth_b[index]).mean() >= 0.98  # where it changed
    assert token_cosines(tokens_a[0][index], truth_b[index]).mean() < 0.9  # the stale tokens are not
    assert state_b.keys.shape == (6, 196, 384) and not np.array_equal(state_b.keys, state.keys)

    # Two frames on the same cache, in flight together: an unchanged frame recomputed in
    # part gives the tokens it had, and the changed one what it gave alone.
    (same, again), last = on.encode_partial([(a, index), (b, index)], state)
    assert token_cosines(same, tokens_a[0]).min() > 0.999
    assert token_cosines(again, tokens_b).min() > 0.999 and np.allclose(last.keys, state_b.keys, atol=1e-2)


def _counts(model: VisionModelClient) -> tuple[int, int]:
    stats = model.client.get_inference_statistics(model.model_name, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_triton_batches_frames_of_several_streams(stack, models) -> None:  # type: ignore[no-untyped-def]
    """Six streams, one frame each per poll: the encoder sends their requests at once and
    Triton's dynamic batcher runs several in one model execution; each stream keeps its
    own cache (the first poll whole frames, then partial recomputes)."""
    on, _ = models
    svc = EncoderService(vit_config(stack.cfg))
    images = frame_records("vtest.avi", 2.0, 2.0)
    streams = [f"batch-{i}" for i in range(6)]
    inferences_before, executions_before = _counts(on)
    for seq, image in enumerate(images):
        polled = [frame(s, seq, 2.0, image) for s in streams]
        records = svc.process(polled, on)
        assert [r.stream_id for r in records] == streams and all(r.seq == seq for r in records)
        assert all(r.grid_h == 14 and r.grid_w == 14 for r in records)
    svc.pool.shutdown()
    inferences_after, executions_after = _counts(on)
    inferences, executions = inferences_after - inferences_before, executions_after - executions_before
    assert inferences == svc.stats.batches and inferences >= len(streams)
    assert executions < inferences, (executions, inferences)  # requests of streams merged
    for s in streams:
        assert svc.streams[stream_key("t", s)].cache.vit_state is not None


def test_backlog_of_one_stream_recomputed_in_flight(stack, models) -> None:  # type: ignore[no-untyped-def]
    """One stream, seven frames in one poll (a backlog): after the whole first frame, the
    partial recomputes go out together on the same cache, so each recomputes every patch
    changed since that cache (more patches than one frame at a time computes), and every
    frame's tokens stay close to a full encode."""
    on, full = models
    cache = FeatureCacheConfig(skip_frames=False, drop_tokens=False, max_tokens_per_frame=0)
    cfg = vit_config(stack.cfg)
    images = frame_records("vtest.avi", 3.0, 2.0)
    records = [frame("backlog", seq, 2.0, image) for seq, image in enumerate(images)]
    backlog, live = (EncoderService(replace(cfg, encoder=replace(cfg.encoder, cache=cache))) for _ in range(2))
    inferences_before, _ = _counts(on)
    out = backlog.process(records, on)
    inferences_after, _ = _counts(on)
    for rec in records:  # the same frames, one poll each: one partial recompute at a time
        live.process([rec], on)
    for svc in (backlog, live):
        svc.pool.shutdown()
    assert [r.seq for r in out] == list(range(len(images)))
    assert inferences_after - inferences_before == len(images)  # the whole first frame, then one per frame
    computed = {name: svc.streams[stream_key("t", "backlog")].cache.stats.patches_computed
                for name, svc in (("backlog", backlog), ("live", live))}
    assert computed["live"] < computed["backlog"] < len(images) * 196, computed
    truth = full.encode(np.stack([pixels_of(image) for image in images])).tokens
    for rec, expected in zip(out, truth, strict=True):
        tokens, kept = get_tokens(rec)
        assert kept.all() and token_cosines(tokens, expected).mean() >= 0.98


def test_revoked_partitions_drop_only_their_streams_caches(stack) -> None:  # type: ignore[no-untyped-def]
    svc = EncoderService(vit_config(stack.cfg))
    for stream_id, partition in (("a", 0), ("b", 1)):
        svc.streams.admit(pb.FrameRecord(tenant="t", stream_id=stream_id, seq=3), UNKNOWN, ("frames", partition))
    svc.forget_partitions({TopicPartition("frames", 1)})
    a = svc.streams[stream_key("t", "a")]
    assert set(svc.streams) == {stream_key("t", "a")} and a.last_seq == 3 and a.partition == ("frames", 0)
    svc.pool.shutdown()


def test_rebalance_rebuilds_a_streams_cache_on_its_new_owner(stack, models) -> None:  # type: ignore[no-untyped-def]
    """Encoder A owns the stream and holds its ViT cache; encoder B joins the group and A
    leaves; the stream's next frame is encoded whole by B (its cache rebuilt from nothing,
    tokens equal to a full encode), and the frame after it partially again."""
    _, full = models
    tag = uuid.uuid4().hex[:8]
    base = vit_config(stack.cfg)
    kafka = replace(base.kafka, frames_topic=f"test-rebalance-frames-{tag}",
                    tokens_topic=f"test-rebalance-tokens-{tag}")
    lk.ensure_topics(kafka)
    images = frame_records("vtest.avi", 3.0, 2.0)

    def encoder() -> tuple[EncoderService, threading.Thread]:
        cfg = replace(base, kafka=kafka, encoder=replace(base.encoder, group_id=f"test-rebalance-{tag}",
                                                         health_port=free_port(), metrics_port=0))
        svc = EncoderService(cfg)
        thread = threading.Thread(target=svc.run, daemon=True)
        thread.start()
        return svc, thread

    producer = lk.make_producer(kafka, "test-rebalance")
    received: dict[int, pb.TokensRecord] = {}

    def send_and_wait(sub: TopicSubscriber, seqs: range) -> None:
        for seq in seqs:
            lk.publish(producer, kafka.frames_topic, frame("s", seq, 2.0, images[seq]))
        producer.flush()
        deadline = time.monotonic() + 60
        while not all(s in received for s in seqs) and time.monotonic() < deadline:
            for r in sub.records(timeout_s=1):
                if isinstance(r, pb.TokensRecord) and r.stream_id == "s":
                    received[r.seq] = r
        assert all(s in received for s in seqs), sorted(received)

    a, thread_a = encoder()
    b, thread_b = None, None
    try:
        with TopicSubscriber(kafka, ["tokens"]) as sub:
            send_and_wait(sub, range(0, 3))
            assert a.streams[stream_key("t", "s")].cache.vit_state is not None and a.stats.frames_encoded >= 1
            b, thread_b = encoder()
            time.sleep(8)  # B joins the group (Tansu settles a join in ~3 s)
            a.stop_event.set()
            thread_a.join(timeout=30)
            assert not thread_a.is_alive()
            send_and_wait(sub, range(3, 5))
            assert stream_key("t", "s") in b.streams and b.stats.frames_encoded >= 1  # B holds the stream now
    finally:
        a.stop_event.set()
        if b is not None and thread_b is not None:
            b.stop_event.set()
            thread_b.join(timeout=30)
        producer.close()
    assert a.stats.frames_in == 3  # A never saw the frames after it left
    rebuilt, after = received[3], received[4]
    tokens, kept = get_tokens(rebuilt)
    assert not rebuilt.unchanged and kept.all()  # the new owner's first frame: whole
    truth = full.encode(pixels_of(images[3])[None])[0][0]
    assert token_cosines(tokens, truth).min() > 0.999
    assert not get_tokens(after)[1].all()  # then cached again: partial or unchanged
