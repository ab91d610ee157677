"""Backpressure in the LLM service (`llm.backpressure.max_context_lag_s`): while a stream's prefill is
behind, its new frames are held back, and go in folded into one when its next prefill
request starts; through the service's own handlers (`LLMCore.on_tokens`, and
`take_coalesced`, which the materializer calls back as the `take` it was given in `hold`).

How far behind the prefill is is the materializer's to say (`backlog_s`); here a recompute
materializer without an engine says what each test sets, so the policy is tested on its
own. The streaming-KV materializer's side (when it takes held frames, the slots) is in
tests/test_materializer.py; the running stack's figures (lag, frames coalesced, with a
real engine behind) are `livelens bench streams`'s."""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np

from livelens.config import load_config, with_settings
from livelens.records import set_tokens
from livelens.v1 import messages_pb2 as pb
from services.llm.context import TextPart, frame_block
from services.llm.core import LLMCore, NoSink
from services.llm.materializer import RecomputeMaterializer
from services.llm.resources import frames_only_resources
from services.llm.stream import Added

KEY = "acme/cam"
GRID, HIDDEN = 49, 576


@dataclass
class BehindMaterializer(RecomputeMaterializer):
    """A recompute materializer whose prefill is `behind` seconds behind, and that records
    which streams asked to be taken (`hold`)."""

    behind: float = 0.0
    holding: list[str] = field(default_factory=list)

    def backlog_s(self, stream_id: str) -> float:
        return self.behind

    def hold(self, stream_id: str, take: Callable[[], None]) -> None:
        self.holding.append(stream_id)


def record(seq: int, positions: list[int], value: float, tags: dict[str, float] | None = None,
           unchanged: bool = False) -> pb.TokensRecord:
    """A frame whose tokens changed at `positions` only (each set to `value`)."""
    tags = tags or {}
    rec = pb.TokensRecord(stream_id="cam", tenant="acme", session_id="s1", seq=seq, pts_s=seq * 0.5,
                          grid_h=7, grid_w=7, tags=list(tags), tag_scores=list(tags.values()),
                          gateway_time_unix=1000.0 + seq, unchanged=unchanged)
    kept = np.zeros(GRID, bool)
    kept[positions] = True
    tokens = np.zeros((GRID, HIDDEN), np.float16)
    tokens[positions] = value
    set_tokens(rec, tokens, kept)
    return rec


class Published(NoSink):
    """What the core published (a Kafka sink's place)."""

    def __init__(self) -> None:
        self.responses: list[pb.ResponseRecord] = []

    def response(self, msg: pb.ResponseRecord, flush: bool = False) -> None:
        self.responses.append(msg)


def service(tmp_path: Path, lag_s: float = 1.0) -> tuple[LLMCore, BehindMaterializer]:
    cfg = with_settings(load_config(None), {"llm.store.segments_disk_dir": str(tmp_path),
                                            "llm.backpressure.max_context_lag_s": lag_s})
    res = frames_only_resources(cfg)  # as the service builds them, with a materializer that is behind
    materializer = BehindMaterializer(None, res.embedder)
    return LLMCore(cfg, replace(res, materializer=materializer, recompute=materializer), Published()), materializer


def test_frames_held_back_while_behind_go_in_folded_into_one(tmp_path):
    svc, m = service(tmp_path)
    svc.on_tokens(record(0, list(range(GRID)), 0.0))  # the first frame: the whole grid
    m.behind = 1.5  # over llm.backpressure.max_context_lag_s (1 s)
    svc.on_tokens(record(1, [1, 2], 1.0, {"cat": 0.4}))
    svc.on_tokens(record(2, [2, 3], 2.0, {"cat": 0.7, "dog": 0.2}))
    svc.on_tokens(record(3, [3], 3.0))
    stream = svc.streams[KEY]
    assert [f.seq for f in stream.context.sink + list(stream.context.window)] == [0]
    assert m.holding == [KEY] * 3  # each asked the materializer to take them with the next request
    newest = stream.newest_frame()  # what instruction checks read: the held frames, by their tags
    assert newest is not None and newest.seq == 3 and newest.tags == ("cat", "dog")
    svc.take_coalesced(KEY)  # what the materializer calls when the stream's next request starts
    frames = stream.context.sink + list(stream.context.window)
    assert [f.seq for f in frames] == [0, 3]  # frames 1-3 went in as one, the newest's
    taken = frames[-1]
    assert list(np.flatnonzero(taken.kept)) == [1, 2, 3]  # every position any of them changed
    assert taken.tokens[:, 0].tolist() == [1.0, 2.0, 3.0]  # the newest token at each
    tags = {t: round(p, 3) for t, p in taken.scored_tags()}
    assert tags == {"cat": 0.7, "dog": 0.2} and taken.tags == ("cat", "dog")  # at their likeliest
    assert taken.sent_unix == 1003.0
    assert stream.context.frames_seen == 4  # each frame taken once
    assert stream.frames_coalesced == 2 and svc.stats.coalesced == 2  # two folded into the third
    assert svc.stats.frames == 2 and stream.coalesced is None
    (told,) = [r for r in cast(Published, svc.sink).responses if r.HasField("folded")]  # the client hears of it
    f = told.folded
    assert (told.tenant, told.stream_id, f.from_seq, f.to_seq, f.from_pts_s, f.to_pts_s, f.frames, f.reason) == \
        ("acme", "cam", 1, 3, 0.5, 1.5, 3, "context_behind")
    assert taken.folded_from_s == 0.5  # and the context's label says which span it stands for
    m.behind = 0.3
    svc.on_tokens(record(4, [4], 4.0))  # within the bound: straight in
    assert [f.seq for f in stream.context.window][-1] == 4 and stream.coalesced is None


def test_a_held_frame_stands_for_the_unchanged_ones_after_it(tmp_path):
    svc, m = service(tmp_path)
    svc.on_tokens(record(0, list(range(GRID)), 0.0))
    m.behind = 1.5  # over llm.backpressure.max_context_lag_s (1 s)
    svc.on_tokens(record(1, [4], 1.0, {"cat": 0.9}))
    svc.on_tokens(record(1, [4], 1.0))  # redelivered while held: not taken twice
    svc.on_tokens(record(2, [], 0.0, unchanged=True))  # the same picture, later
    stream = svc.streams[KEY]
    assert svc.stats.duplicates == 1 and stream.coalesced is not None and stream.coalesced.through_seq == 2
    m.behind = 0.3
    svc.take_coalesced(KEY)
    frames = stream.context.sink + list(stream.context.window)
    assert [(f.seq, f.tags) for f in frames] == [(0, ()), (1, ("cat",))]  # labelled as the frame it showed
    assert stream.context.frames_seen == 3 and stream.context.last_seq == 2
    assert stream.frames_coalesced == 0  # one frame with tokens: nothing was folded into another
    svc.on_tokens(record(2, [5], 2.0))
    assert svc.stats.duplicates == 2  # still a redelivery after it went in
    svc.take_coalesced(KEY)  # nothing held: nothing changes
    assert [f.seq for f in stream.context.sink + list(stream.context.window)] == [0, 1]


def test_frames_the_encoder_dropped_count_as_seen(tmp_path):
    svc, _ = service(tmp_path)
    svc.on_tokens(record(0, list(range(GRID)), 0.0))
    dropped = pb.TokensRecord(stream_id="cam", tenant="acme", session_id="s1", seq=1, pts_s=0.5, grid_h=7,
                              grid_w=7, gateway_time_unix=1001.0, dropped=True)
    svc.on_tokens(dropped)
    svc.on_tokens(dropped)  # redelivered
    svc.on_tokens(record(2, [3], 2.0))
    stream = svc.streams[KEY]
    assert [f.seq for f in stream.context.sink + list(stream.context.window)] == [0, 2]
    assert stream.frames_dropped == 1 and svc.stats.dropped == 1 and stream.context.frames_seen == 3


def test_a_record_the_encoder_folded_counts_each_frame_it_stands_for(tmp_path):
    """After an outage the encoder folds its backlog into one record (`TokensRecord.folded`):
    each acknowledged frame it stands for counts as seen, once, and its label names the span."""
    svc, _ = service(tmp_path)
    svc.on_tokens(record(0, list(range(GRID)), 0.0))
    folded = record(24, [1, 2], 5.0, {"tabby": 0.8})
    folded.folded.CopyFrom(pb.FoldNotice(from_seq=1, to_seq=24, from_pts_s=0.5, to_pts_s=12.0, frames=24, encoded=4,
                                         reason="encoder_behind"))
    svc.on_tokens(folded)
    svc.on_tokens(folded)  # redelivered
    svc.on_tokens(record(25, [3], 2.0))
    stream = svc.streams[KEY]
    frames = stream.context.sink + list(stream.context.window)
    assert [f.seq for f in frames] == [0, 24, 25] and frames[1].folded_from_s == 0.5
    assert stream.context.frames_seen == 26 and stream.frames_folded == 23 and stream.newest == (25, 12.5)
    assert svc.stats.folded == 23  # livelens_llm_folded_total
    label = frame_block(frames[1]).parts[0]
    assert isinstance(label, TextPart) and label.text == '<frame t=12.0s seen="tabby" folded="0.5-12.0s">'


def test_no_frame_is_held_back_without_a_bound_or_on_a_replay(tmp_path):
    svc, m = service(tmp_path, lag_s=0.0)
    m.behind = 1.5  # over llm.backpressure.max_context_lag_s (1 s)
    for seq in range(3):
        assert svc.streams.get(KEY) is None or svc.streams[KEY].coalesced is None
        svc.on_tokens(record(seq, list(range(GRID)), float(seq)))
    assert svc.stats.coalesced == 0 and svc.stats.frames == 3

    svc, m = service(tmp_path / "replay")
    m.behind = 1.5  # over llm.backpressure.max_context_lag_s (1 s)
    stream = svc.stream(KEY, "s1")
    stream.replaying = True  # a new owner rebuilding: every frame the last owner took is replayed
    assert stream.add(0, 0.0, np.ones((GRID, HIDDEN), np.float16), np.ones(GRID, bool)) is Added.FRAME
    assert stream.add(1, 0.5, np.ones((GRID, HIDDEN), np.float16), np.ones(GRID, bool)) is Added.FRAME
