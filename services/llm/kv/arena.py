"""One block of host memory, reserved and written at start, carved into spans first-fit.

The KV connector's RAM cache lives here (as LMCache keeps its CPU buffer): the engine
worker's memory is at its working size from the moment it starts, so a restarted LLM
service does not grow by the cache's size while it serves, and a budget that does not fit
fails at start-up rather than half an hour into a stream.
"""

from __future__ import annotations

import bisect

import torch

ALIGN = 64  # bytes: every span starts here, so a view as any dtype is aligned


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class RamArena:
    def __init__(self, nbytes: int) -> None:
        self.capacity = nbytes - nbytes % ALIGN
        # torch.zeros writes every page: the memory is resident now, not at first use.
        self.buffer = torch.zeros(self.capacity, dtype=torch.uint8)
        self._free_starts: list[int] = [0] if self.capacity else []
        self._free_sizes: dict[int, int] = {0: self.capacity} if self.capacity else {}

    @property
    def free_bytes(self) -> int:
        return sum(self._free_sizes.values())

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a span of `nbytes` (rounded up to ALIGN), or None if no free span fits."""
        need = aligned(nbytes)
        for start in self._free_starts:
            size = self._free_sizes[start]
            if size < need:
                continue
            self._free_starts.remove(start)
            del self._free_sizes[start]
            if size > need:
                self._insert(start + need, size - need)
            return start
        return None

    def free(self, start: int, nbytes: int) -> None:
        """Give a span back, merged with the free spans beside it."""
        size = aligned(nbytes)
        i = bisect.bisect_left(self._free_starts, start)
        if i < len(self._free_starts) and self._free_starts[i] == start + size:  # the next one
            nxt = self._free_starts.pop(i)
            size += self._free_sizes.pop(nxt)
        if i > 0 and (prev := self._free_starts[i - 1]) + self._free_sizes[prev] == start:  # the previous one
            self._free_sizes[prev] += size
            return
        self._insert(start, size)

    def view(self, start: int, like: torch.Tensor) -> torch.Tensor:
        """A tensor of `like`'s dtype and shape over the span at `start`."""
        nbytes = like.numel() * like.element_size()
        return self.buffer[start:start + nbytes].view(like.dtype).view(like.shape)

    def _insert(self, start: int, size: int) -> None:
        bisect.insort(self._free_starts, start)
        self._free_sizes[start] = size
