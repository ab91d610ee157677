"""A directory store of KV segments, keyed by explicit ids that the LLM service chooses.

One segment = the K and V of `num_tokens` consecutive tokens, for every attention layer,
as they were computed at positions [pos_start, pos_start + num_tokens):

    <dir>/<id>.safetensors   tensors "<layer_name>.k" / "<layer_name>.v", each [n, kv_heads, head_dim]
    <dir>/<id>.json          {"id", "pos_start", "num_tokens", "layers", "dtype", ...}

The JSON is written last (atomic rename), so a segment is visible to the scheduler only
once its tensors are complete. Keys are stored post-RoPE (as vLLM caches them), in the
store's dtype (float16 halves the disk of float32 KV; float32 keeps it bit-exact). The
JSON may carry small per-segment summaries (the mean pre-RoPE key of chosen layers, for
retrieval by the LLM service).

Segments recently saved or loaded stay in RAM (`ram_bytes`, least recently used out):
a frame's KV is loaded again and again while it is in a stream's window. That RAM is one
arena reserved when the store is made (`services.llm.kv.arena`); a segment served from it
is a set of views into the arena, valid until the store's next save, load or delete.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.llm.kv.arena import RamArena, aligned

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_id(seg_id: str) -> str:
    if not isinstance(seg_id, str) or not _ID.match(seg_id) or ".." in seg_id:
        raise ValueError(f"invalid segment id {seg_id!r}: use [A-Za-z0-9_.-], at most 128 characters")
    return seg_id


@dataclass(frozen=True)
class SegmentMeta:
    id: str
    pos_start: int
    num_tokens: int


def segment_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class _Cached:
    start: int  # its span in the arena
    nbytes: int
    tensors: dict[str, torch.Tensor]  # views into that span


class SegmentStore:
    def __init__(self, root: str | os.PathLike[str], dtype: torch.dtype | None = None, ram_bytes: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype  # None: as given
        self.ram_bytes = ram_bytes
        self._arena = RamArena(ram_bytes) if ram_bytes > 0 else None
        self._ram: OrderedDict[str, _Cached] = OrderedDict()

    def _paths(self, seg_id: str) -> tuple[Path, Path]:
        check_id(seg_id)
        return self.root / f"{seg_id}.safetensors", self.root / f"{seg_id}.json"

    def meta(self, seg_id: str) -> SegmentMeta | None:
        _, meta_path = self._paths(seg_id)
        try:
            d = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        return SegmentMeta(id=d["id"], pos_start=int(d["pos_start"]), num_tokens=int(d["num_tokens"]))

    def save(self, seg_id: str, pos_start: int, layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
             summary: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        tensor_path, meta_path = self._paths(seg_id)
        tensors: dict[str, torch.Tensor] = {}
        num_tokens = -1
        for name, (k, v) in layers.items():
            tensors[f"{name}.k"] = k.to(self.dtype or k.dtype).contiguous()
            tensors[f"{name}.v"] = v.to(self.dtype or v.dtype).contiguous()
            num_tokens = k.shape[0]
        tmp = tensor_path.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, tensor_path)
        meta = {
            "id": seg_id,
            "pos_start": pos_start,
            "num_tokens": num_tokens,
            "layers": sorted(layers),
            "dtype": str(next(iter(tensors.values())).dtype) if tensors else None,
            "bytes": segment_bytes(tensors),
            "saved_at": time.time(),
            **(summary or {}),
        }
        tmp_meta = meta_path.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_path)
        self._remember(seg_id, tensors)

    def summary(self, seg_id: str) -> dict[str, Any] | None:
        """The segment's whole JSON metadata, or None if it is not (or no longer) stored."""
        _, meta_path = self._paths(seg_id)
        try:
            return dict(json.loads(meta_path.read_text()))
        except (OSError, ValueError):
            return None

    def load(self, seg_id: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        cached = self._ram.get(seg_id)
        if cached is not None:
            self._ram.move_to_end(seg_id)
            return cached.tensors
        tensor_path, _ = self._paths(seg_id)
        tensors = load_file(str(tensor_path))
        self._remember(seg_id, tensors)
        return tensors

    def delete(self, seg_id: str) -> None:
        """Remove a segment (metadata first, so it is never half visible)."""
        tensor_path, meta_path = self._paths(seg_id)
        meta_path.unlink(missing_ok=True)
        tensor_path.unlink(missing_ok=True)
        self._evict(seg_id)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every segment whose id starts with `prefix`; how many there were."""
        ids = [m.name.removesuffix(".json") for m in self.root.glob(f"{check_id(prefix)}*.json")]
        for seg_id in ids:
            self.delete(seg_id)
        return len(ids)

    @property
    def ram_used(self) -> int:
        return sum(c.nbytes for c in self._ram.values())

    def _remember(self, seg_id: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the segment into the arena, evicting the least recently used until it fits."""
        if self._arena is None:
            return
        self._evict(seg_id)
        spans = [aligned(t.numel() * t.element_size()) for t in tensors.values()]
        nbytes = sum(spans)
        if nbytes > self._arena.capacity:
            return
        while (start := self._arena.alloc(nbytes)) is None:
            self._evict(next(iter(self._ram)))  # never empty here: an empty arena fits it
        views: dict[str, torch.Tensor] = {}
        at = start
        for (name, t), span in zip(tensors.items(), spans, strict=True):
            views[name] = self._arena.view(at, t)
            views[name].copy_(t)
            at += span
        self._ram[seg_id] = _Cached(start, nbytes, views)

    def _evict(self, seg_id: str) -> None:
        cached = self._ram.pop(seg_id, None)
        if cached is not None and self._arena is not None:
            self._arena.free(cached.start, cached.nbytes)

    def log_event(self, **event: object) -> None:
        """Append one JSON line to <dir>/events.jsonl (what was saved/loaded, for tests and docs)."""
        with open(self.root / "events.jsonl", "a") as f:
            f.write(json.dumps({"t": time.time(), **event}) + "\n")

    def events(self) -> list[dict]:
        try:
            lines = (self.root / "events.jsonl").read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]
