"""`livelens bench needle`: find a needle clip in a long haystack by an example image.

The V-NIAH idea (LongVA) with real footage: a 3 s needle clip from Megamind.avi is
inserted at several depths into a haystack of vtest.avi (pedestrians; looped, with
synthetic 2 fps timing, to reach 1-60 minutes). Every frame goes through the real vision
model (the ONNX that Triton serves, run here with ONNX Runtime directly) and into the LLM
service's own `Stream` (`services.llm.stream`: context, tiered segment store from
`segment_store`, the real context embedder; a recompute materializer without an engine,
since no question is answered here). The query is another frame of the needle clip
(0.25 s off the sampled ones, so not an inserted image), given as the question's example
image (`Stream.add_example`); the needle frames are looked up with the service's own
retrieval (`Stream.retrieve`: best-first top-k, cut to `llm.retrieval.token_budget`), with
`llm.retrieval.top_k` set to each k in turn. recall@k is the share of needle frames that
end up in the context: retrieved, sink or window.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from devtools.models.settings import VisionBuild
from livelens.config import LivelensConfig, with_settings
from livelens.video import read_frames, sample_video
from services.common.preprocess import preprocess
from services.llm.embedder import ContextEmbedder
from services.llm.resources import frames_only_resources
from services.llm.stream import Stream

FPS = 2.0
NEEDLE_START_S, NEEDLE_SECONDS = 2.0, 3.0
QUESTION = "When did this appear?"  # retrieval scores the example image; the text is not used


class VisionModel:
    def __init__(self, onnx_path: str | Path) -> None:
        import onnxruntime as ort

        if not Path(onnx_path).is_file():
            raise FileNotFoundError(f"{onnx_path} not found: run `make models`")
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def encode(self, frames: list[np.ndarray], batch: int = 16) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(frames), batch):
            pixels = np.stack([preprocess(f) for f in frames[i:i + batch]])
            out.extend(self.session.run(["tokens"], {"pixels": pixels})[0])
        return out


def run_one(cfg: LivelensConfig, haystack: list[np.ndarray], needle: list[np.ndarray], query: np.ndarray,
            minutes: float, depth: float, ks: list[int], disk_dir: Path,
            embedder: ContextEmbedder | None = None) -> list[dict[str, Any]]:
    n = int(minutes * 60 * FPS)
    at = int(depth * (n - len(needle)))
    cfg = with_settings(cfg, {"llm.store.segments_disk_dir": str(disk_dir)})
    res = frames_only_resources(cfg, embedder)
    stream = Stream("needle", res)
    kept = np.ones(needle[0].shape[0], bool)
    needle_seqs = set(range(at, at + len(needle)))
    for seq in range(n + len(needle)):
        if seq in needle_seqs:
            tokens = needle[seq - at]
        else:
            tokens = haystack[(seq if seq < at else seq - len(needle)) % len(haystack)]
        stream.add(seq, seq / FPS, tokens, kept)
    stream.add_example("query", query)
    example = stream.examples["query"]
    indices, _ = res.store.keys("needle")
    in_context = {f.seq for f in stream.context.sink} | {f.seq for f in stream.context.window}
    rows = []
    for k in ks:
        # The same stream and frames, retrieving as a service with llm.retrieval.top_k = k.
        stream.res = replace(res, cfg=replace(res.cfg, retrieval=replace(res.cfg.retrieval, top_k=k)))
        t0 = time.perf_counter()
        retrieved = stream.retrieve(QUESTION, example)
        retrieve_s = time.perf_counter() - t0
        found = in_context | {f.seq for f in retrieved}
        rows.append({"haystack_minutes": minutes, "depth": depth, "k": k,
                     "recall": len(found & needle_seqs) / len(needle_seqs),
                     "retrieved_frames": len(retrieved), "segments": len(indices), "retrieve_s": retrieve_s,
                     "ram_mb": res.store.stats.ram_bytes / 2**20, "disk_mb": res.store.stats.disk_bytes / 2**20})
    stream.res = res
    stream.close()
    res.store.close()
    return rows


def run_needle(cfg: LivelensConfig, out: Path, minutes: list[float], depths: list[float], ks: list[int]) -> int:
    t0 = time.perf_counter()
    model = VisionModel(VisionBuild.of(cfg).onnx_path)
    hay = [f.rgb for f in read_frames(sample_video("vtest.avi"), FPS)]
    clip = [f.rgb for f in read_frames(sample_video("Megamind.avi"), FPS * 2,
                                       max_seconds=NEEDLE_START_S + NEEDLE_SECONDS)
            if f.pts_s >= NEEDLE_START_S]
    needle_frames, query_frame = clip[0::2], clip[len(clip) // 2 | 1]  # odd index: not inserted
    print(f"encoding {len(hay)} haystack + {len(needle_frames)} needle frames + 1 query", flush=True)
    haystack = model.encode(hay)
    needle = model.encode(needle_frames)
    query = model.encode([query_frame])[0]
    embedder = ContextEmbedder(cfg.llm.engine.model_path)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="livelens-needle-") as tmp:
        for m in minutes:
            for d in depths:
                rows = run_one(cfg, haystack, needle, query, m, d, ks, Path(tmp), embedder)
                runs += rows
                print("  " + "  ".join(f"{r['haystack_minutes']:>4g} min depth {r['depth']:.2f} "
                                       f"k={r['k']}: recall {r['recall']:.2f}" for r in rows), flush=True)
    result = {"runs": runs, "needle": f"Megamind.avi {NEEDLE_START_S:g}-{NEEDLE_START_S + NEEDLE_SECONDS:g} s",
              "haystack": "vtest.avi (looped)", "fps": FPS, "needle_frames": len(needle),
              "query": "Megamind.avi frame between two inserted ones", "vision": cfg.encoder.model_id,
              "retrieve_token_budget": cfg.llm.retrieval.token_budget, "chunk_frames": cfg.llm.store.chunk_frames,
              "seconds": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(runs))
    print(f"written to {out}")
    return 0


def table(runs: list[dict[str, Any]]) -> str:
    ks = sorted({r["k"] for r in runs})
    lines = ["| haystack (min) | depth | " + " | ".join(f"recall@{k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    keys = sorted({(r["haystack_minutes"], r["depth"]) for r in runs})
    for m, d in keys:
        cells = [next(r["recall"] for r in runs if (r["haystack_minutes"], r["depth"], r["k"]) == (m, d, k))
                 for k in ks]
        lines.append(f"| {m:g} | {d:.2f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)
