"""Segments of a stream and the tiered store that keeps them after they leave the window.

A segment is one frame (or a configured chunk of consecutive frames): its visual tokens
and its retrieval key (the pooled, normalized visual embedding), so that a question can
bring it back into the context later. Segments live in host RAM up to a byte budget, are
spilled least-recently-used to local disk up to a second budget, and are deleted past
either the disk budget or the per-stream retention limit. Retrieval keys stay in RAM for
every live segment (a few KB each), so scoring never touches the disk.

Disk files carry a SHA-256 of their payload: a corrupt or missing file is reported
(counted and logged) and skipped, never raised into the stream.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from livelens.identity import key_path
from services.llm.context import FrameSegment

log = logging.getLogger("livelens.llm.segments")

MAGIC = b"LLSEG1\n"


@dataclass(frozen=True)
class Segment:
    stream_id: str
    index: int  # position of the segment in its stream (0, 1, 2, ...)
    frames: tuple[FrameSegment, ...]

    @property
    def start_pts_s(self) -> float:
        return self.frames[0].pts_s

    @property
    def nbytes(self) -> int:
        return sum(f.tokens.nbytes + f.kept.nbytes for f in self.frames)


def retrieval_key(frames: tuple[FrameSegment, ...] | list[FrameSegment]) -> np.ndarray:
    """The mean of the segment's visual tokens (over the whole grid where known), L2-normalized."""
    means = [f.pooled for f in frames if f.pooled is not None]
    if len(means) == len(frames):
        pooled = np.mean(means, axis=0).astype(np.float32)
    else:
        pooled = np.concatenate([f.tokens for f in frames]).astype(np.float32).mean(0)
    return pooled / (np.linalg.norm(pooled) + 1e-6)


@dataclass
class StoreStats:
    ram_bytes: int = 0
    disk_bytes: int = 0
    segments_ram: int = 0
    segments_disk: int = 0
    spilled: int = 0
    deleted: int = 0
    corrupt: int = 0
    missing: int = 0


@dataclass
class _Entry:
    key: np.ndarray
    start_pts_s: float
    segment: Segment | None = None  # in RAM
    path: Path | None = None  # on disk
    nbytes: int = 0
    # its frames' tags, each with its highest probability (kept in RAM: retrieval by name)
    tags: dict[str, float] = field(default_factory=dict)


def _tag_scores(frames: tuple[FrameSegment, ...]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for f in frames:
        for tag, score in f.scored_tags():
            scores[tag] = max(score, scores.get(tag, 0.0))
    return scores


def _encode(segment: Segment) -> bytes:
    buf = io.BytesIO()
    arrays: dict[str, np.ndarray] = {}
    for i, f in enumerate(segment.frames):
        arrays[f"tokens{i}"] = f.tokens
        arrays[f"kept{i}"] = f.kept
        arrays[f"meta{i}"] = np.array([f.seq, f.pts_s], np.float64)
        arrays[f"tags{i}"] = np.array(f.tags, dtype=np.str_)
        arrays[f"tag_scores{i}"] = np.array(f.tag_scores, np.float32)
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types allow_pickle here
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def _decode(stream_id: str, index: int, data: bytes) -> Segment:
    if not data.startswith(MAGIC):
        raise ValueError("not a livelens segment file")
    digest, _, payload = data[len(MAGIC):].partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise ValueError("checksum mismatch")
    with np.load(io.BytesIO(payload)) as z:
        n = sum(1 for k in z.files if k.startswith("meta"))
        frames = tuple(FrameSegment(int(z[f"meta{i}"][0]), float(z[f"meta{i}"][1]), z[f"tokens{i}"], z[f"kept{i}"],
                                    tags=tuple(str(t) for t in z[f"tags{i}"]) if f"tags{i}" in z.files else (),
                                    tag_scores=tuple(float(x) for x in z[f"tag_scores{i}"])
                                    if f"tag_scores{i}" in z.files else ())
                       for i in range(n))
    return Segment(stream_id, index, frames)


@dataclass
class TieredSegmentStore:
    """Host RAM → local disk, each with a byte budget; LRU spill; retention per stream."""

    ram_budget_bytes: int
    disk_dir: Path | None
    disk_budget_bytes: int
    retention_segments: int
    stats: StoreStats = field(default_factory=StoreStats)
    _entries: dict[str, OrderedDict[int, _Entry]] = field(default_factory=dict)
    _lru: OrderedDict[tuple[str, int], None] = field(default_factory=OrderedDict)  # RAM residents
    _disk_lru: OrderedDict[tuple[str, int], None] = field(default_factory=OrderedDict)

    def put(self, segment: Segment) -> None:
        entries = self._entries.setdefault(segment.stream_id, OrderedDict())
        if segment.index in entries:
            return  # a replayed segment: already stored
        entries[segment.index] = _Entry(retrieval_key(segment.frames), segment.start_pts_s, segment,
                                        nbytes=segment.nbytes,
                                        tags=_tag_scores(segment.frames))
        self._lru[(segment.stream_id, segment.index)] = None
        self.stats.ram_bytes += segment.nbytes
        self.stats.segments_ram += 1
        while len(entries) > self.retention_segments:
            self._delete(segment.stream_id, next(iter(entries)))
        self._enforce_budgets()

    def keys(self, stream_id: str) -> tuple[list[int], np.ndarray]:
        """(segment indices in time order, their retrieval keys [n, H])."""
        entries = self._entries.get(stream_id)
        if not entries:
            return [], np.zeros((0, 0), np.float32)
        return list(entries), np.stack([e.key for e in entries.values()])

    def tagged(self, stream_id: str, wanted: Callable[[str], bool]) -> list[int]:
        """Indices of the stream's segments with a frame tag `wanted` accepts, the likeliest
        such tag first (ties: the newer first)."""
        scored = []
        for index, e in (self._entries.get(stream_id) or {}).items():
            best = max((score for t, score in e.tags.items() if wanted(t)), default=None)
            if best is not None:
                scored.append((-best, -index))
        return [-index for _, index in sorted(scored)]

    def tags(self, stream_id: str) -> set[str]:
        """Every tag of the stream's stored frames."""
        return set().union(*(e.tags.keys() for e in self._entries.get(stream_id, {}).values()))

    def get(self, stream_id: str, index: int) -> Segment | None:
        """The segment, from RAM or disk; None (counted and logged) if gone or corrupt."""
        entry = self._entry(stream_id, index)
        if entry is None:
            return None
        if entry.segment is not None:
            self._lru.move_to_end((stream_id, index))
            return entry.segment
        assert entry.path is not None
        try:
            data = entry.path.read_bytes()
        except FileNotFoundError:
            self.stats.missing += 1
            log.warning("segment %s/%d: file %s is missing; skipped", stream_id, index, entry.path)
            self._forget(stream_id, index)
            return None
        try:
            return _decode(stream_id, index, data)
        except (ValueError, OSError, KeyError) as exc:
            self.stats.corrupt += 1
            log.warning("segment %s/%d: file %s is corrupt (%s); skipped", stream_id, index, entry.path, exc)
            self._delete(stream_id, index)
            return None

    def drop_stream(self, stream_id: str) -> None:
        for index in list(self._entries.get(stream_id, {})):
            self._delete(stream_id, index)
        self._entries.pop(stream_id, None)

    def close(self) -> None:
        """Delete every stored segment (the store is a cache: Kafka is the durable log)."""
        for stream_id in list(self._entries):
            self.drop_stream(stream_id)

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())

    def _entry(self, stream_id: str, index: int) -> _Entry | None:
        entries = self._entries.get(stream_id)
        return entries.get(index) if entries is not None else None

    # --- tiers -----------------------------------------------------------------------
    def _enforce_budgets(self) -> None:
        while self.stats.ram_bytes > self.ram_budget_bytes and self._lru:
            stream_id, index = next(iter(self._lru))
            self._spill(stream_id, index)
        while self.stats.disk_bytes > self.disk_budget_bytes and self._disk_lru:
            stream_id, index = next(iter(self._disk_lru))
            self._delete(stream_id, index)

    def _spill(self, stream_id: str, index: int) -> None:
        entry = self._entries[stream_id][index]
        assert entry.segment is not None
        self._lru.pop((stream_id, index))
        self.stats.ram_bytes -= entry.nbytes
        self.stats.segments_ram -= 1
        if self.disk_dir is None or self.disk_budget_bytes <= 0:
            self._forget(stream_id, index)
            self.stats.deleted += 1
            return
        path = self.disk_dir / key_path(stream_id) / f"{index:09d}.seg"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _encode(entry.segment)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # never a half-written segment under the final name
        entry.segment, entry.path, entry.nbytes = None, path, len(data)
        self._disk_lru[(stream_id, index)] = None
        self.stats.disk_bytes += len(data)
        self.stats.segments_disk += 1
        self.stats.spilled += 1

    def _delete(self, stream_id: str, index: int) -> None:
        entry = self._entry(stream_id, index)
        if entry is None:
            return
        if entry.segment is not None:
            self._lru.pop((stream_id, index), None)
            self.stats.ram_bytes -= entry.nbytes
            self.stats.segments_ram -= 1
        elif entry.path is not None:
            self._disk_lru.pop((stream_id, index), None)
            self.stats.disk_bytes -= entry.nbytes
            self.stats.segments_disk -= 1
            entry.path.unlink(missing_ok=True)
        self._entries[stream_id].pop(index, None)
        self.stats.deleted += 1

    def _forget(self, stream_id: str, index: int) -> None:
        entry = self._entry(stream_id, index)
        if entry is not None:
            self._entries[stream_id].pop(index)
        if entry is not None and entry.path is not None and (stream_id, index) in self._disk_lru:
            self._disk_lru.pop((stream_id, index))
            self.stats.disk_bytes -= entry.nbytes
            self.stats.segments_disk -= 1


def cosine_scores(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine of `query` with each row of `keys` (rows are normalized when stored)."""
    if keys.size == 0:
        return np.zeros(0, np.float32)
    q = query.astype(np.float32)
    return keys @ (q / (np.linalg.norm(q) + 1e-6))


def top_k_in_time_order(indices: list[int], keys: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """The k segments whose keys are most cosine-similar to `query`, sorted by time."""
    return sorted(best_first(indices, cosine_scores(keys, query), k))


def best_first(indices: list[int], scores: np.ndarray, k: int) -> list[int]:
    """The k best-scoring segment indices, best first (ties: the older first)."""
    if not indices or k <= 0:
        return []
    return [indices[i] for i in np.argsort(-scores, kind="stable")[:k]]


def then_unscored(ranked: list[int], stored: list[int], k: int) -> list[int]:
    """`ranked` (scored, best first), then the `stored` indices it lacks, newest first: the
    top k. Chunks without a score yet (after a rebuild, before their keys are back) still
    reach a question."""
    scored = set(ranked)
    return (ranked + [i for i in sorted(stored, reverse=True) if i not in scored])[:max(k, 0)]
