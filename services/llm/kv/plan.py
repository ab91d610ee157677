"""Scheduler-side planning of the connector, in plain Python (no vLLM): which stored
segments fill which token range of a new request, and with which RoPE position delta.

A request asks for segments through `SamplingParams(extra_args={"kv_transfer_params": ...})`:

    {"load": [{"id": "sink", "dst_start": 0},
              {"id": "seg-17", "dst_start": 64, "src_offset": 0, "num_tokens": 96}, ...],
     "save": [{"id": "frame-42", "start": 160, "num_tokens": 64}]}

- load: segments laid end to end from token 0 of the prompt (vLLM only accepts an
  external hit as a *prefix* of the prompt: tokens [0, L) are "already computed").
  `num_tokens` defaults to the rest of the stored segment after `src_offset`.
  Token i of a slice was computed at position `pos_start + src_offset + i` and is placed
  at `dst_start + i`; its key is re-rotated by `delta = dst_start - (pos_start + src_offset)`.
- save: after the step in which tokens [start, start + num_tokens) of this request have
  been computed, their K/V are written to the store under `id`, with pos_start = start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.llm.kv.store import SegmentMeta, check_id


@dataclass(frozen=True)
class LoadSlice:
    seg_id: str
    src_offset: int  # first row of the stored tensors
    dst_start: int  # first token index (= position) in the new request
    num_tokens: int
    delta: int  # RoPE position delta applied to the keys

    @property
    def dst_end(self) -> int:
        return self.dst_start + self.num_tokens


@dataclass(frozen=True)
class SaveSpec:
    seg_id: str
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


def parse_save(params: dict | None) -> list[SaveSpec]:
    out = []
    for s in (params or {}).get("save", []) or []:
        spec = SaveSpec(check_id(s["id"]), int(s.get("start", 0)), int(s["num_tokens"]))
        if spec.start < 0 or spec.num_tokens <= 0:
            raise ValueError(f"bad save spec {s!r}")
        out.append(spec)
    return out


def plan_load(
    params: dict | None, lookup: Callable[[str], SegmentMeta | None], num_prompt_tokens: int
) -> list[LoadSlice] | None:
    """The slices to load for a request, contiguous from token 0, or None when the request
    asks for nothing or a segment is missing (then nothing is loaded and vLLM computes all).

    The plan is cut so that at least the last prompt token is computed by the engine
    (vLLM needs one scheduled token to produce logits).
    """
    specs = (params or {}).get("load") or []
    if not specs:
        return None
    limit = num_prompt_tokens - 1
    slices: list[LoadSlice] = []
    cursor = 0
    for s in specs:
        meta = lookup(check_id(s["id"]))
        if meta is None:
            return None
        src_offset = int(s.get("src_offset", 0))
        n = int(s.get("num_tokens", meta.num_tokens - src_offset))
        dst = int(s.get("dst_start", cursor))
        if dst != cursor:
            raise ValueError(f"load segments must be contiguous from token 0: {s['id']} starts at {dst}, not {cursor}")
        if src_offset < 0 or n <= 0 or src_offset + n > meta.num_tokens:
            raise ValueError(f"segment {s['id']} has {meta.num_tokens} tokens; asked [{src_offset}, {src_offset + n})")
        n = min(n, limit - cursor)
        if n <= 0:
            break
        slices.append(LoadSlice(meta.id, src_offset, dst, n, dst - (meta.pos_start + src_offset)))
        cursor += n
    return slices or None


def clip_slices(slices: list[LoadSlice], lo: int, hi: int) -> list[LoadSlice]:
    """The parts of `slices` inside token range [lo, hi) (tokens below lo are already in the
    engine, e.g. from its own prefix cache)."""
    out = []
    for s in slices:
        a, b = max(s.dst_start, lo), min(s.dst_end, hi)
        if a < b:
            out.append(LoadSlice(s.seg_id, s.src_offset + (a - s.dst_start), a, b - a, s.delta))
    return out
