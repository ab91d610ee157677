"""Planning one poll's encoding, with no I/O (tested without Triton; `execute.py` runs it).

Two levels:

- the poll (`plan_poll`): each stream's new frames (redeliveries dropped), the streams in
  the order they first appear in the poll, the question images apart. Streams are encoded
  concurrently, so several Triton requests are in flight and its dynamic batcher can merge
  them; each stream gets its share of `encoder.max_in_flight`, so a stream with a long
  backlog does not crowd out the others: a lone stream's backlog of partial recomputes
  goes out together; with many streams, Triton is fed by the streams.
- a stream (`plan_stream`): its frames in order, each decided by its feature cache first
  (the reference is the last frame sent to the model, so a frame is decided before the
  ones before it are encoded), as steps: `Unchanged` frames, `Whole` runs of frames in one
  request, and `Partial` recomputes in flight together on the cache the frame before them
  left.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from livelens.v1 import messages_pb2 as pb
from services.encoder.feature_cache import FrameDecision
from services.encoder.grid import Grid
from services.encoder.streams import EncoderStream, Partition, StreamTable

Polled = tuple[int, pb.FrameRecord]  # a frame and its place in the poll


@dataclass
class StreamWork:
    """One stream's part of a poll: its frames in order and its share of the requests in flight."""

    stream: EncoderStream
    frames: list[Polled] = field(default_factory=list)
    in_flight: int = 1
    # Backpressure: the frames too old to encode one by one, folded into one record (the
    # last of them); those of them in `frames` are encoded for the fold.
    fold: list[Polled] = field(default_factory=list)


@dataclass
class PollPlan:
    streams: list[StreamWork]  # in the order they are submitted: as they first appear in the poll
    queries: list[Polled]  # example images of questions: encoded whole, no stream state
    duplicates: int  # frames redelivered by Kafka, dropped


def plan_poll(frames: Sequence[pb.FrameRecord], table: StreamTable, grid: Grid, max_in_flight: int,
              partitions: Sequence[Partition] | None = None, max_age_s: float = 0.0, fold_encoded: int = 4,
              now: float | None = None) -> PollPlan:
    """Admit a poll's `frames` into the streams of `table` (a new stream starts with the
    served model's `grid`; `partitions`: where each frame came from) and split them by stream.

    Backpressure (`max_age_s` > 0): the frames the gateway took more than `max_age_s` before
    `now` (never a stream's newest in the poll), when there are several, are folded into
    one record: `fold_encoded` of them, evenly spaced and the last among them, are encoded,
    and the fold keeps each grid position's newest token. So an encoder that fell behind
    (an outage) catches up in a bounded number of requests, and no frame is lost unsaid."""
    streams: dict[str, StreamWork] = {}
    queries: list[Polled] = []
    duplicates = 0
    for i, frame in enumerate(frames):
        if frame.query_request_id:  # a question's example image: no seq, no cache
            queries.append((i, frame))
            continue
        stream = table.admit(frame, grid, partitions[i] if partitions is not None else None)
        if stream is None:
            duplicates += 1
            continue
        work = streams.setdefault(stream.key, StreamWork(stream))
        work.stream = stream  # opened anew within the poll: all its frames go to the new state
        work.frames.append((i, frame))
    share = max(1, max_in_flight // max(1, len(streams)))
    now = time.time() if now is None else now
    for work in streams.values():
        work.in_flight = share
        if max_age_s > 0:
            *older, _ = work.frames
            stale = [p for p in older if p[1].gateway_time_unix and now - p[1].gateway_time_unix > max_age_s]
            if len(stale) > 1:
                work.fold = stale
                picked = {stale[int(k)][0] for k in np.linspace(0, len(stale) - 1, max(1, fold_encoded)).round()}
                folded = {i for i, _ in stale}
                work.frames = [p for p in work.frames if p[0] not in folded or p[0] in picked]
    return PollPlan(list(streams.values()), queries, duplicates)


@dataclass(frozen=True)
class Unchanged:
    """A frame not worth encoding: published as unchanged (no tokens)."""

    frame: int  # its place among the stream's frames of the poll

    @property
    def frames(self) -> tuple[int, ...]:
        return (self.frame,)

    @property
    def calls(self) -> int:
        return 0


@dataclass(frozen=True)
class Whole:
    """A run of frames up to the next partial recompute (at most `encoder.max_batch`, the
    unchanged ones among them included), the encoded ones whole in one request. For a ViT
    with a cache (`with_cache_last`), only the run's last frame leaves a cache that a later
    frame can use: it goes alone and asks for its cache back, the others without (their
    cache rows, 2 MB a frame, do not travel back)."""

    frames: tuple[int, ...]  # published in this order
    encode: tuple[int, ...]  # those the model gets
    with_cache_last: bool

    @property
    def requests(self) -> list[tuple[tuple[int, ...], bool]]:
        """Each request's frames, and whether it asks for their cache."""
        if not self.with_cache_last:
            return [(self.encode, False)]
        head, last = self.encode[:-1], self.encode[-1:]
        return [(head, False), (last, True)] if head else [(last, True)]

    @property
    def calls(self) -> int:
        return len(self.requests)


@dataclass(frozen=True, eq=False)
class Partial:
    """Partial recomputes before the next whole frame (the unchanged frames among them
    included), all on the cache the frame before them left: each recomputes every patch
    changed since then, so they do not wait for each other (one request each, in flight
    together); the last one's cache is the stream's next."""

    frames: tuple[int, ...]  # published in this order
    recompute: dict[int, np.ndarray]  # per recomputed frame, in order: its patches (row-major)

    @property
    def calls(self) -> int:
        return len(self.recompute)


Step = Unchanged | Whole | Partial


def plan_stream(decisions: Sequence[FrameDecision], *, max_batch: int, in_flight: int, partial: bool,
                has_cache: bool) -> list[Step]:
    """The steps for one stream's decided frames of a poll, in order. `partial`: the model
    is a ViT with a cache; `has_cache`: the stream holds its cache already (a partial
    recompute needs one; a whole run of such a model leaves one); `in_flight`: the most
    partial recomputes in flight together."""
    steps: list[Step] = []
    n, i = len(decisions), 0
    while i < n:
        if not decisions[i].encode:
            steps.append(Unchanged(i))
            i += 1
        elif decisions[i].recompute is not None and has_cache:
            j, changed = i, np.zeros(0, np.int64)
            recompute: dict[int, np.ndarray] = {}
            while j < n and len(recompute) < in_flight and \
                    (decisions[j].recompute is not None or not decisions[j].encode):
                later = decisions[j].recompute
                if later is not None:
                    changed = recompute[j] = np.union1d(changed, later)
                j += 1
            steps.append(Partial(tuple(range(i, j)), recompute))
            i = j
        else:  # whole frames up to the next partial recompute
            j = i + 1
            while j < n and j - i < max_batch and decisions[j].recompute is None:
                j += 1
            run = tuple(range(i, j))
            steps.append(Whole(run, tuple(k for k in run if decisions[k].encode), partial))
            has_cache = has_cache or partial
            i = j
    return steps
