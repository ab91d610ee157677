"""Which stored KV a stream keeps: the retention ledger of the streaming-KV path.

Each `Stream` owns one `KVLedger`. The materializer tells it what the engine saved (a
frame's KV, with its mean keys) and what a question loaded; the stream tells it which
frames are its sink and which chunks left the window. The ledger answers what may leave
the disk, least recently used first: never the sink, never a frame still in the window,
and at most `llm.store.retention_segments` chunks' worth of out-of-window frames per stream.
`KVDiskBudget` is the one order shared by every stream, for `llm.store.kv_disk_mb` over all.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class KVLedger:
    stream_id: str
    retained_frames: int  # out-of-window frames whose KV the stream keeps (retention)
    sink: set[int] = field(default_factory=set)  # seqs whose KV is never deleted
    evicted_through: int = -1  # frames up to this seq (but the sink) have left the window
    chunks: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)  # stored chunk -> its seqs
    retained_chunks: int = 1 << 62
    # seq -> the frame's mean pre-RoPE keys [layers, kv_heads * head_dim] (from its saved KV)
    frame_keys: dict[int, np.ndarray] = field(default_factory=dict)
    stored: set[int] = field(default_factory=set)  # seqs whose KV is on disk
    # out-of-window stored seqs, least recently used first
    evictable: OrderedDict[int, None] = field(default_factory=OrderedDict)

    def add_sink(self, seq: int) -> None:
        self.sink.add(seq)

    def saved(self, seq: int, mean_keys: np.ndarray | None) -> bool:
        """The engine saved frame `seq`'s KV. True: it is already out of the window (deletable)."""
        self.stored.add(seq)
        if mean_keys is not None:
            self.frame_keys[seq] = mean_keys
        return self._maybe_evictable(seq)

    def evicted(self, index: int, seqs: list[int]) -> list[int]:
        """Chunk `index` left the window: its stored frames become deletable (returned)."""
        self.chunks[index] = seqs
        self.evicted_through = max(self.evicted_through, seqs[-1])
        while len(self.chunks) > self.retained_chunks:
            for seq in self.chunks.popitem(last=False)[1]:
                self.frame_keys.pop(seq, None)
        return [seq for seq in seqs if self._maybe_evictable(seq)]

    def _maybe_evictable(self, seq: int) -> bool:
        if seq in self.stored and seq <= self.evicted_through and seq not in self.sink:
            self.evictable[seq] = None
            return True
        return False

    def used(self, seq: int) -> None:
        """A question loaded frame `seq`: it leaves the disk after those not used since."""
        if seq in self.evictable:
            self.evictable.move_to_end(seq)

    def over_retention(self) -> list[int]:
        """The stream's least recently used deletable frames beyond its retention."""
        extra = len(self.evictable) - self.retained_frames
        return list(self.evictable)[:extra] if extra > 0 else []

    def deleted(self, seq: int) -> None:
        self.stored.discard(seq)
        self.evictable.pop(seq, None)

    def question_keys(self) -> tuple[list[int], np.ndarray]:
        """(chunk indices in time order, their mean keys [n, layers, kv_heads * head_dim]),
        for the chunks whose every frame was prefilled."""
        indices: list[int] = []
        keys: list[np.ndarray] = []
        for index, seqs in self.chunks.items():
            if all(seq in self.frame_keys for seq in seqs):
                indices.append(index)
                keys.append(np.mean([self.frame_keys[seq] for seq in seqs], axis=0))
        if not keys:
            return [], np.zeros((0, 0, 0), np.float32)
        return indices, np.stack(keys)


@dataclass
class KVDiskBudget:
    """Every stream's deletable stored frames, least recently used first, against one byte budget."""

    budget_bytes: int
    order: OrderedDict[tuple[KVLedger, int], None] = field(default_factory=OrderedDict)

    def evictable(self, ledger: KVLedger, seq: int) -> None:
        self.order[(ledger, seq)] = None

    def used(self, ledger: KVLedger, seq: int) -> None:
        ledger.used(seq)
        if (ledger, seq) in self.order:
            self.order.move_to_end((ledger, seq))

    def forget(self, ledger: KVLedger, seq: int) -> None:
        self.order.pop((ledger, seq), None)

    def oldest(self) -> tuple[KVLedger, int] | None:
        return next(iter(self.order), None)
