"""The encoder's per-stream state: one `EncoderStream` per stream key ("tenant/stream_id").

A stream's state (its session, last seq, feature cache with the ViT's cache, novelty and
token grid) lives with the replica that owns the stream's partition: partitions lost in a
rebalance drop their streams (the new owner starts each with one full encode). A stream id
opened anew (another session) starts afresh too.

The `StreamTable` is changed only by the polling thread (admitting a poll's frames, a
rebalance, undoing a failed poll); while a poll is encoded, each stream is touched by
its own worker thread alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from livelens.config import FeatureCacheConfig
from livelens.identity import key_of
from livelens.v1 import messages_pb2 as pb
from services.encoder.feature_cache import CacheStats, StreamCache
from services.encoder.grid import Grid
from services.encoder.novelty import Novelty

Partition = tuple[str, int]  # (topic, partition)


@dataclass
class EncoderStream:
    key: str
    session_id: str  # the session its state belongs to
    cache: StreamCache
    last_seq: int = -1  # the newest frame taken: a frame not above it is a redelivery
    partition: Partition | None = None  # where its frames come from (None: not from Kafka)
    novelty: Novelty = field(default_factory=Novelty)

    @property
    def grid(self) -> Grid:
        """Its token grid: the served model's, or learned from its first tokens (the cache's)."""
        return self.cache.grid

    def snapshot(self) -> EncoderStream:
        return replace(self, cache=self.cache.snapshot(), novelty=self.novelty.snapshot())


class StreamTable(Mapping[str, EncoderStream]):
    """The streams of one encoder replica, by key (read as a mapping; changed by its methods)."""

    def __init__(self, cfg: FeatureCacheConfig) -> None:
        self.cfg = cfg
        self._streams: dict[str, EncoderStream] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._streams)

    def __len__(self) -> int:
        return len(self._streams)

    def __getitem__(self, key: str) -> EncoderStream:
        return self._streams[key]

    def admit(self, frame: pb.FrameRecord, grid: Grid, partition: Partition | None = None) -> EncoderStream | None:
        """The stream of a frame, which becomes its last seq; None when the frame was taken
        already (Kafka redelivered it, so it is not counted twice). A new stream starts with
        the served model's `grid`."""
        key = key_of(frame)
        stream = self._streams.get(key)
        if stream is None or stream.session_id != frame.session_id:
            # a new stream, or its id was opened anew: its state starts afresh
            stream = self._streams[key] = EncoderStream(key, frame.session_id, StreamCache(self.cfg, grid))
        if partition is not None:
            stream.partition = partition
        if frame.seq <= stream.last_seq:
            return None
        stream.last_seq = frame.seq
        return stream

    def forget(self, key: str) -> None:
        self._streams.pop(key, None)

    def forget_partitions(self, lost: set[Partition]) -> list[str]:
        """Drop the streams whose frames come from the `lost` partitions; returns their keys."""
        keys = [key for key, s in self._streams.items() if s.partition in lost]
        for key in keys:
            self.forget(key)
        return keys

    def snapshot(self) -> dict[str, EncoderStream]:
        """A copy of every stream's state, to `restore` after a failed model call."""
        return {key: s.snapshot() for key, s in self._streams.items()}

    def restore(self, snapshot: dict[str, EncoderStream]) -> None:
        # copied again: the same snapshot may be restored after the next attempt too
        self._streams = {key: s.snapshot() for key, s in snapshot.items()}

    def cache_stats(self) -> CacheStats:
        """The feature caches' stats, summed over the streams."""
        out = CacheStats()
        for s in list(self._streams.values()):  # read by the metrics thread too
            out.frames += s.cache.stats.frames
            out.skipped += s.cache.stats.skipped
            out.tokens_total += s.cache.stats.tokens_total
            out.tokens_published += s.cache.stats.tokens_published
            out.patches_computed += s.cache.stats.patches_computed
        return out
