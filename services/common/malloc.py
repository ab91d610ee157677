"""glibc malloc settings for processes that move megabytes per request.

Every Triton request of the ViT carries the stream's cache (~2 MB) through several
buffers (protobuf, gRPC, the backend's shared memory). With glibc's defaults those
buffers come from fresh mmap()s or a heap that is trimmed back after each request, so
each one costs page faults: measured here, 8.0 ms of client CPU per request, 2.9 ms with
the settings below (`livelens bench encoder`'s notes in docs/encoder.md). Keeping freed
memory for reuse costs at most `TOP_PAD + TRIM_THRESHOLD` of resident memory per arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util

MMAP_THRESHOLD = 64 << 20  # allocations below this come from the heap, reused
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap top before returning it
TOP_PAD = 64 << 20  # extra memory taken whenever the heap grows

# mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def malloc_env() -> dict[str, str]:
    """The same settings for a child process (glibc reads them at start-up)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
            "MALLOC_TOP_PAD_": str(TOP_PAD)}


def tune_malloc() -> bool:
    """Apply the settings to this process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
