"""A directory store of KV segments, keyed by explicit ids that the LLM service chooses.

One segment = the K and V of `num_tokens` consecutive tokens, for every attention layer,
as they were computed at positions [pos_start, pos_start + num_tokens):

    <dir>/<id>.safetensors   tensors "<layer_name>.k" / "<layer_name>.v", each [n, kv_heads, head_dim]
    <dir>/<id>.json          {"id", "pos_start", "num_tokens", "layers", "dtype", ...}

The JSON is written last (atomic rename), so a segment is visible to the scheduler only
once its tensors are complete. Keys are stored post-RoPE (as vLLM caches them).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

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


class SegmentStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

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

    def save(self, seg_id: str, pos_start: int, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        tensor_path, meta_path = self._paths(seg_id)
        tensors: dict[str, torch.Tensor] = {}
        num_tokens = -1
        for name, (k, v) in layers.items():
            tensors[f"{name}.k"] = k.contiguous()
            tensors[f"{name}.v"] = v.contiguous()
            num_tokens = k.shape[0]
        tmp = tensor_path.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, tensor_path)
        meta = {
            "id": seg_id,
            "pos_start": pos_start,
            "num_tokens": num_tokens,
            "layers": sorted(layers),
            "dtype": str(next(iter(layers.values()))[0].dtype) if layers else None,
            "saved_at": time.time(),
        }
        tmp_meta = meta_path.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_path)

    def load(self, seg_id: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        tensor_path, _ = self._paths(seg_id)
        return load_file(str(tensor_path))

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
