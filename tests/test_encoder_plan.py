"""The encoder's plan, without Triton: a poll split by stream (each stream its share of the
requests in flight, a backlog crowding out no one), a stream's decided frames as steps
(whole runs up to encoder.max_batch, unchanged frames, partial recomputes in flight
together), the stream table; and a poll through the service on a fake vision model."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, cast

import numpy as np
import pytest

from livelens.config import EncoderConfig, FeatureCacheConfig, LivelensConfig
from livelens.identity import stream_key
from livelens.records import get_tokens
from livelens.v1 import messages_pb2 as pb
from services.encoder.feature_cache import FrameDecision, ViTState
from services.encoder.grid import UNKNOWN, Grid
from services.encoder.plan import Partial, Step, Unchanged, Whole, plan_poll, plan_stream
from services.encoder.records import fold_records, tokens_record, unchanged_record
from services.encoder.service import EncoderService
from services.encoder.streams import StreamTable
from services.encoder.triton_client import Encoded, VisionModelClient

GRID = Grid(7, 7)


def whole(reason: str = "changed") -> FrameDecision:
    return FrameDecision(True, 0.5, reason)


def same() -> FrameDecision:
    return FrameDecision(False, 0.0, "unchanged")


def part(*patches: int) -> FrameDecision:
    return FrameDecision(True, 0.05, "partial", np.array(patches, np.int64))


def described(steps: list[Step]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for s in steps:
        if isinstance(s, Unchanged):
            out.append(("unchanged", s.frame))
        elif isinstance(s, Whole):
            out.append(("whole", s.frames, s.encode, s.with_cache_last))
        else:
            out.append(("partial", s.frames, {k: v.tolist() for k, v in s.recompute.items()}))
    return out


def plan(decisions: list[FrameDecision], max_batch: int = 8, in_flight: int = 8, partial: bool = False,
         has_cache: bool = False) -> list[Step]:
    return plan_stream(decisions, max_batch=max_batch, in_flight=in_flight, partial=partial, has_cache=has_cache)


def test_a_run_of_whole_frames_is_one_request_up_to_max_batch() -> None:
    steps = plan([whole("first")] + [whole() for _ in range(9)], max_batch=4)
    assert described(steps) == [("whole", (0, 1, 2, 3), (0, 1, 2, 3), False),
                                ("whole", (4, 5, 6, 7), (4, 5, 6, 7), False),
                                ("whole", (8, 9), (8, 9), False)]
    assert [s.calls for s in steps] == [1, 1, 1]


def test_unchanged_frames_go_with_the_run_around_them_or_alone() -> None:
    # inside a run they count towards max_batch and are published in their place
    steps = plan([same(), same(), whole(), same(), whole(), same(), same(), whole()], max_batch=4)
    assert described(steps) == [("unchanged", 0), ("unchanged", 1),
                                ("whole", (2, 3, 4, 5), (2, 4), False), ("unchanged", 6),
                                ("whole", (7,), (7,), False)]
    assert sum(s.calls for s in steps) == 2


def test_a_cached_vit_run_leaves_its_cache_from_its_last_frame() -> None:
    """Only the run's last frame asks for its cache back; the others go in one request without."""
    run, alone = plan([whole("first"), same(), whole(), whole()], partial=True)[0], \
        plan([whole("first")], partial=True)[0]
    assert isinstance(run, Whole) and isinstance(alone, Whole)
    assert run.requests == [((0, 2), False), ((3,), True)] and run.calls == 2
    assert alone.requests == [((0,), True)] and alone.calls == 1


def test_partial_recomputes_in_flight_together_on_one_cache() -> None:
    """Up to `in_flight` at a time, each recomputing every patch changed since the cache
    they share; a whole frame ends them, and its cache is the next ones'."""
    steps = plan([part(1), same(), part(2), part(1, 3), part(4), same(), part(5), whole(), part(6)],
                 in_flight=2, partial=True, has_cache=True)
    assert described(steps) == [("partial", (0, 1, 2), {0: [1], 2: [1, 2]}),
                                ("partial", (3, 4), {3: [1, 3], 4: [1, 3, 4]}),
                                ("unchanged", 5),
                                ("partial", (6,), {6: [5]}),
                                ("whole", (7,), (7,), True),
                                ("partial", (8,), {8: [6]})]
    assert [s.calls for s in steps] == [2, 2, 0, 1, 1, 1]


def test_a_partial_recompute_needs_a_cache() -> None:
    """A new stream's first frame goes whole and leaves the cache the partial ones use;
    without a cached model, a frame decided partial is encoded whole."""
    assert described(plan([whole("first"), part(3), part(4)], partial=True)) == [
        ("whole", (0,), (0,), True), ("partial", (1, 2), {1: [3], 2: [3, 4]})]
    assert described(plan([part(3), same(), part(4)])) == [
        ("whole", (0, 1), (0,), False), ("whole", (2,), (2,), False)]


@pytest.mark.parametrize("seed", range(20))
def test_every_frame_is_planned_once_in_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    kinds = [whole, same, lambda: part(*rng.choice(49, int(rng.integers(1, 5)), replace=False))]
    decisions = [kinds[int(k)]() for k in rng.integers(0, 3, 40)]
    max_batch, in_flight = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    steps = plan(decisions, max_batch, in_flight, partial=True, has_cache=bool(rng.integers(2)))
    assert [k for s in steps for k in s.frames] == list(range(len(decisions)))
    for s in steps:
        if isinstance(s, Whole):
            assert len(s.frames) <= max_batch and s.encode == tuple(k for k in s.frames if decisions[k].encode)
        elif isinstance(s, Partial):
            assert s.calls <= in_flight and list(s.recompute) == [k for k in s.frames if decisions[k].encode]
            union: set[int] = set()
            for k, index in s.recompute.items():
                own = decisions[k].recompute
                assert own is not None
                union |= set(own.tolist())
                assert index.tolist() == sorted(union)


def frame(stream_id: str, seq: int, session: str = "", pixels: np.ndarray | None = None,
          query: str = "") -> pb.FrameRecord:
    rgb = np.zeros((56, 56, 3), np.uint8) if pixels is None else pixels
    return pb.FrameRecord(stream_id=stream_id, tenant="t", seq=seq, session_id=session, data=rgb.tobytes(),
                          encoding=pb.FrameRecord.RAW_RGB, width=56, height=56, query_request_id=query)


def test_each_stream_of_a_poll_gets_its_share_a_backlog_crowds_out_no_one() -> None:
    """A stream with a backlog comes first in the poll: the others are still planned, each
    as its own task with the same share of the requests in flight (submitted in the order
    the streams first appear); the backlog's partial recomputes never take more."""
    table = StreamTable(FeatureCacheConfig())
    frames = [frame("long", seq) for seq in range(30)] + [frame("b", 0), frame("c", 0), frame("b", 1)]
    poll = plan_poll(frames, table, GRID, max_in_flight=8)
    assert [w.stream.key for w in poll.streams] == [stream_key("t", s) for s in ("long", "b", "c")]
    assert [[i for i, _ in w.frames] for w in poll.streams] == [list(range(30)), [30, 32], [31]]
    assert [w.in_flight for w in poll.streams] == [2, 2, 2]  # 8 // 3 each: at most 6 in flight
    long = poll.streams[0]
    steps = plan([whole("first")] + [part(i % 49) for i in range(29)], in_flight=long.in_flight,
                 partial=True, has_cache=False)
    assert max(s.calls for s in steps) == 2 and sum(len(s.frames) for s in steps) == 30

    alone = plan_poll([frame("long", seq) for seq in range(30, 60)], table, GRID, max_in_flight=8)
    assert [w.in_flight for w in alone.streams] == [8]  # a lone stream's backlog goes out together
    many = plan_poll([frame(f"s{i}", 0) for i in range(12)], table, GRID, max_in_flight=8)
    assert len(many.streams) == 12 and {w.in_flight for w in many.streams} == {1}


def test_an_encoder_behind_folds_the_stale_frames_and_encodes_a_few_of_them() -> None:
    """Backpressure (encoder.max_frame_age_s): a stream's frames older than the bound (never
    its newest in the poll), when there are several, are folded into one record; a few of
    them, evenly spaced and the last among them, are encoded for it. Fresh frames all stay."""
    table = StreamTable(FeatureCacheConfig())
    now = 1000.0

    def sent(stream_id: str, seq: int, age_s: float) -> pb.FrameRecord:
        f = frame(stream_id, seq)
        f.gateway_time_unix = now - age_s
        return f

    frames = [sent("a", 0, 3.0), sent("a", 1, 2.5), sent("b", 0, 2.9), sent("a", 2, 0.2), sent("a", 3, 0.1),
              sent("b", 1, 2.4), sent("c", 0, 5.0)]
    poll = plan_poll(frames, table, GRID, 8, max_age_s=1.0, now=now)
    encoded = {w.stream.key: [f.seq for _, f in w.frames] for w in poll.streams}
    folded = {w.stream.key: [f.seq for _, f in w.fold] for w in poll.streams}
    assert encoded == {stream_key("t", "a"): [0, 1, 2, 3], stream_key("t", "b"): [0, 1], stream_key("t", "c"): [0]}
    # one stale frame is encoded as it is; a stream's newest is never folded
    assert folded == {stream_key("t", "a"): [0, 1], stream_key("t", "b"): [], stream_key("t", "c"): []}
    backlog = plan_poll([sent("d", i, 20.0 - i) for i in range(20)] + [sent("d", 20, 0.0)], table, GRID, 8,
                        max_age_s=1.0, fold_encoded=4, now=now)
    (work,) = backlog.streams
    assert [f.seq for _, f in work.fold] == list(range(19))  # the 20th is 1 s old: not stale
    assert [f.seq for _, f in work.frames] == [0, 6, 12, 18, 19, 20]
    assert table[stream_key("t", "d")].last_seq == 20  # a folded frame counts as taken: never encoded later
    unbounded = plan_poll([sent("e", 0, 9.0), sent("e", 1, 9.0), sent("e", 2, 9.0)], table, GRID, 8, max_age_s=0.0,
                          now=now)
    assert [len(w.frames) for w in unbounded.streams] == [3] and not unbounded.streams[0].fold


def test_a_fold_keeps_each_positions_newest_token_and_each_tag_at_its_likeliest() -> None:
    cfg = EncoderConfig(frame_tags=3)
    stale = [frame("s", seq) for seq in range(5)]
    for i, f in enumerate(stale):
        f.pts_s = 10.0 + i
    grid = Grid(2, 2)
    first = tokens_record(cfg, stale[0], np.full((4, 3), 1.0, np.float32), grid, novelty=0.2)
    first.tags[:], first.tag_scores[:] = ["tabby", "tiger cat"], [0.6, 0.3]
    partial = np.zeros(4, bool)
    partial[2] = True
    later = tokens_record(cfg, stale[2], np.full((4, 3), 2.0, np.float32), grid, novelty=0.5, kept=partial)
    later.tags[:], later.tag_scores[:] = ["tiger cat", "lynx"], [0.7, 0.2]
    unchanged = unchanged_record(cfg, stale[4], grid, 3, novelty=0.0)
    rec = fold_records(cfg, stale, [first, later, unchanged])
    tokens, kept = get_tokens(rec)
    assert (rec.seq, rec.pts_s, rec.novelty) == (4, 14.0, pytest.approx(0.5)) and kept.all()
    assert tokens[:, 0].tolist() == [1.0, 1.0, 2.0, 1.0]
    assert list(rec.tags) == ["tiger cat", "tabby", "lynx"] and list(rec.tag_scores) == pytest.approx([0.7, 0.6, 0.2])
    f = rec.folded
    assert (f.from_seq, f.to_seq, f.from_pts_s, f.to_pts_s, f.frames, f.encoded, f.reason) == \
        (0, 4, 10.0, 14.0, 5, 3, "encoder_behind")
    nothing = fold_records(cfg, stale, [])  # none of them decoded: still told, with no tokens
    assert nothing.unchanged and nothing.folded.frames == 5 and nothing.folded.encoded == 0


def test_a_poll_drops_redeliveries_and_starts_a_reopened_stream_afresh() -> None:
    table = StreamTable(FeatureCacheConfig())
    key = stream_key("t", "s")
    first = plan_poll([frame("s", 0, "a"), frame("s", 1, "a")], table, GRID, 8, [("frames", 0)] * 2)
    old = table[key]
    assert first.duplicates == 0 and old.last_seq == 1 and old.partition == ("frames", 0) and old.grid == GRID
    poll = plan_poll([frame("s", 1, "a"), frame("s", 2, "a"), frame("x", 0, query="q1"), frame("s", 0, "b")],
                     table, GRID, 8, [("frames", 0)] * 4)
    assert poll.duplicates == 1 and [i for i, _ in poll.queries] == [2] and stream_key("t", "x") not in table
    # the stream id opened anew (session b) in the same poll: all its frames go to its new state
    (work,) = poll.streams
    assert [i for i, _ in work.frames] == [1, 3] and work.stream is table[key] is not old
    assert work.stream.session_id == "b" and work.stream.last_seq == 0 and work.stream.partition == ("frames", 0)


def test_lost_partitions_drop_their_streams_and_a_failed_poll_is_undone() -> None:
    table = StreamTable(FeatureCacheConfig())
    plan_poll([frame("a", 3), frame("b", 3)], table, UNKNOWN, 8, [("frames", 0), ("frames", 1)])
    before = table.snapshot()
    plan_poll([frame("a", 4), frame("c", 0)], table, UNKNOWN, 8, [("frames", 0), ("frames", 1)])
    table[stream_key("t", "a")].novelty.update(np.ones((49, 4), np.float32))
    for _ in range(2):  # the same snapshot restores every failed attempt
        table.restore(before)
        assert set(table) == {stream_key("t", "a"), stream_key("t", "b")}
        assert table[stream_key("t", "a")].last_seq == 3 and table[stream_key("t", "a")].novelty.last is None
        table[stream_key("t", "a")].last_seq = 9
    assert table.forget_partitions({("frames", 1)}) == [stream_key("t", "b")]
    assert set(table) == {stream_key("t", "a")}


class FakeViT:
    """A cached ViT's client without Triton: a patch's token is its mean pixel; counts the
    requests and the most partial recomputes one stream had in flight together."""

    model_name = "fake"
    preprocessing = None
    partial = True
    grid = GRID

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.largest_partial = 0

    def grid_of(self, tokens: np.ndarray) -> Grid:
        return self.grid

    def _tokens(self, pixels: np.ndarray) -> np.ndarray:
        patches = pixels.reshape(3, 7, 8, 7, 8).mean(axis=(2, 4)).reshape(3, 49).T
        return np.concatenate([patches, np.ones((49, 1))], 1).astype(np.float16)

    def encode(self, pixels: np.ndarray, with_cache: bool = True) -> Encoded:
        with self.lock:
            self.requests += 1
        tokens = np.stack([self._tokens(p) for p in pixels])
        zeros = np.zeros((1, 49, 2), np.float16)
        return Encoded(tokens, [ViTState(zeros, zeros, t) for t in tokens] if with_cache else None, None)

    def encode_partial(self, frames: list[tuple[np.ndarray, np.ndarray]],
                       state: ViTState) -> tuple[list[np.ndarray], ViTState]:
        with self.lock:
            self.requests += len(frames)
            self.largest_partial = max(self.largest_partial, len(frames))
        out = []
        for pixels, index in frames:
            tokens = state.tokens.copy()
            tokens[index] = self._tokens(pixels)[index]
            out.append(tokens)
        return out, ViTState(state.keys, state.values, out[-1])


def test_a_poll_through_the_service_runs_its_plan() -> None:
    """A backlog of one stream and a frame each of two others, on a fake cached ViT: every
    frame's record in input order, the requests the plan made, each stream within its share."""
    cfg = LivelensConfig()
    cfg = replace(cfg, encoder=replace(cfg.encoder, image_size=56, max_in_flight=6, max_batch=8))
    svc = EncoderService(cfg)
    model = FakeViT()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    frames: list[pb.FrameRecord] = []
    for seq in range(12):  # one patch changed a frame: partial recomputes after the first
        image = base.copy()
        y, x = divmod(seq % 49, 7)
        image[y * 8:(y + 1) * 8, x * 8:(x + 1) * 8] = 255 - image[y * 8:(y + 1) * 8, x * 8:(x + 1) * 8]
        frames.append(frame("long", seq, pixels=image))
    frames += [frame("b", 0, pixels=base), frame("c", 0, pixels=base)]
    records = svc.process(frames, cast(VisionModelClient, model))
    svc.pool.shutdown()
    assert [(r.stream_id, r.seq) for r in records] == [(f.stream_id, f.seq) for f in frames]
    assert all((r.grid_h, r.grid_w) == (7, 7) and not r.unchanged for r in records)
    # long: the whole first frame, then 11 partial recomputes, 2 (6 // 3 streams) at a time
    assert model.largest_partial == 2 and svc.stats.batches == model.requests == 1 + 11 + 2
    assert svc.stats.frames_encoded == 14 and svc.streams[stream_key("t", "long")].cache.vit_state is not None
