"""`livelens bench streams`: many live streams at once through the whole running stack.

For each stream count (1, 2, 4, 8, 16 by default) every stream sends its own footage (the
sample videos, each stream at another offset) at 2 fps for `seconds`, with a question
every `question_every_s`, through the gateway, as a client would. Measured per run:

- frames per second into the context, all streams (the LLM service's prefilled frames);
- frame-to-context lag p50/p99: the gateway took a frame -> its KV was prefilled (the LLM
  service's `livelens_llm_frame_to_kv_seconds` histogram, read before and after the run;
  percentiles interpolated within its buckets, as Prometheus' histogram_quantile does);
- time to first token p50/p99 as the client sees it (question sent -> first text), next
  to the engine's own (submit -> first token) and the rest of the service's part (queue,
  frame wait) from the answers' timings;
- frames coalesced by the LLM's backpressure (`llm.backpressure.max_context_lag_s`) and folded by the
  encoder's (`encoder.max_frame_age_s`);
- CPU seconds of the stack's processes (broker, Triton, services, vLLM's engine core) per
  stream-second.

The same stream counts run again with cross-stream batching off (`llm.backpressure.prefill_concurrency`
1: one prefill request at a time) on a fresh stack, in the
same command; the ratio of context frames/s is the figure. Then two replicas of the encoder and of the LLM service
(8 partitions) against one at the same load, and one LLM replica leaving mid-run: its
streams move to the other and are answered there.

Written to bench/results/streams.json (+ PNG).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from devtools.bench.common import TopicWatcher, machine, percentile
from devtools.stack import Stack, use_free_ports
from livelens.client import Answer, Client, ItemError
from livelens.config import LivelensConfig, Materializer, with_settings
from livelens.records import encode_jpeg
from livelens.video import read_frames, sample_video

VIDEOS = ("vtest.avi", "bikes.mp4", "Megamind.avi", "bigbuckbunny.mp4", "tree.avi")
QUESTION = "What is happening right now?"
ANSWER_TOKENS = 16  # short answers: the load is the frames; an answer's decode shares the engine
LAG_LIMIT_S = TTFT_LIMIT_S = 2.0  # what a stream count must meet to count as held


@dataclass
class StreamLoad:
    """One stream's side of a run, as its client saw it."""

    name: str
    frames_sent: int = 0
    asked: dict[str, float] = field(default_factory=dict)  # request id -> unix time sent
    first_text: dict[str, float] = field(default_factory=dict)  # request id -> first text delta
    engine_ttft: dict[str, float] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)
    answered_after: dict[str, float] = field(default_factory=dict)  # request id -> unix time answered


def clips(fps: float, seconds: float, streams: int) -> list[list[bytes]]:
    """Each stream's JPEG frames: a sample video, each stream using it at another offset."""
    decoded = {}
    for name in VIDEOS[:min(streams, len(VIDEOS))]:
        decoded[name] = [encode_jpeg(f.rgb) for f in read_frames(sample_video(name), fps, max_seconds=seconds + 30)]
    out = []
    for i in range(streams):
        frames = decoded[VIDEOS[i % len(decoded)]]
        shift = (i // len(decoded)) * 7 % len(frames)  # the same video, offset by 3.5 s per reuse
        out.append(frames[shift:] + frames[:shift])
    return out


async def drive(target: str, token: str, load: StreamLoad, frames: list[bytes], seconds: float, fps: float,
                every_s: float, offset_s: float) -> None:
    """Frames at their stream time and a question every `every_s`, then the answers still due."""
    period = 1.0 / fps
    async with Client(target, token) as client, client.watch(load.name) as s:
        async def listen() -> None:
            async for e in s.events():
                if isinstance(e, Answer):
                    if e.text and e.request_id not in load.first_text:
                        load.first_text[e.request_id] = time.time()
                    if e.final:
                        load.done.add(e.request_id)
                        load.answered_after[e.request_id] = time.time()
                        if e.ttft_s:
                            load.engine_ttft[e.request_id] = e.ttft_s
                elif isinstance(e, ItemError) and e.request_id:
                    load.done.add(e.request_id)
                    load.errors[e.status] += 1

        listener = asyncio.create_task(listen())
        start = time.monotonic()
        next_question = start + offset_s  # streams ask at different moments
        seq = 0
        while (due := start + seq * period) < start + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await s.send_frame(seq, seq * period, frames[seq % len(frames)])
            load.frames_sent += 1
            seq += 1
            if time.monotonic() >= next_question:
                next_question += every_s
                request_id = f"{load.name}-q{len(load.asked)}"
                load.asked[request_id] = time.time()
                await s.ask(QUESTION, max_tokens=ANSWER_TOKENS, request_id=request_id, timeout_s=60)
        deadline = time.monotonic() + 60
        while set(load.asked) - load.done and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        listener.cancel()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
_last_seen: dict[str, Samples] = {}  # url -> its last scrape


def scrape(urls: list[str]) -> Samples:
    """Every sample of the LLM replicas' /metrics, summed over the replicas. A replica that
    left counts with its last scrape: its counters stop there rather than drop to zero (a
    run's deltas would go negative)."""
    out: Samples = {}
    for url in urls:
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            pass  # a replica that left
        else:
            _last_seen[url] = {(s.name, tuple(sorted(s.labels.items()))): s.value
                               for family in text_string_to_metric_families(text) for s in family.samples}
        for key, value in _last_seen.get(url, {}).items():
            out[key] = out.get(key, 0.0) + value
    return out


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items()
               if k[0] == name and all(dict(k[1]).get(n) == want for n, want in labels.items()))


def computed_per(before: dict, after: dict, purpose: str) -> float | None:
    """Prompt tokens the engine computed per frame (purpose "frame") or per request, in the
    run: vLLM's own counts (prompt minus what it took from its cache), as the service exports them."""
    items = delta(before, after, "livelens_llm_prompt_items_total", purpose=purpose)
    computed = delta(before, after, "livelens_llm_prompt_tokens_computed_total", purpose=purpose)
    return round(computed / items, 1) if items else None


def kv_bytes_per_token(cfg: LivelensConfig) -> int:
    """Bytes of KV a token holds in the engine: keys and values of every layer, in its dtype."""
    from services.llm.engine import resolve_dtype

    model = json.loads((Path(cfg.llm.engine.model_path) / "config.json").read_text())
    heads = model.get("num_key_value_heads", model["num_attention_heads"])
    head_dim = model.get("head_dim", model["hidden_size"] // model["num_attention_heads"])
    width = 4 if resolve_dtype(cfg.llm.engine.dtype) == "float32" else 2
    return 2 * model["num_hidden_layers"] * heads * head_dim * width


def histogram_quantile(before: dict, after: dict, name: str, q: float) -> float:
    """The q-quantile of a histogram's observations between two scrapes, interpolated
    linearly within the bucket it falls in."""
    buckets = sorted((float(dict(k[1])["le"]), v - before.get(k, 0.0)) for k, v in after.items()
                     if k[0] == f"{name}_bucket")
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    low_edge, low_count = 0.0, 0.0
    for edge, count in buckets:
        if count >= rank:
            if edge == float("inf"):
                return low_edge  # beyond the last bound: the bound is all that is known
            return low_edge + (edge - low_edge) * (rank - low_count) / max(count - low_count, 1e-9)
        low_edge, low_count = edge, count
    return low_edge


def stack_cpu_s(stack: Stack) -> float:
    """CPU seconds (user + system) of the stack's processes and their children so far."""
    total = 0.0
    for p in stack.processes:
        if p.proc is None:
            continue
        try:
            root = psutil.Process(p.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            continue
    return total


class Timings(TopicWatcher):
    """The answers' timings (`AnswerTimings`, on their final records in livelens.responses)."""

    def __init__(self, stack: Stack, tenant: str) -> None:
        self.by_request: dict[str, Any] = {}
        super().__init__(stack.cfg, ["responses"], tenant=tenant)

    def seen(self, rec: Any) -> None:
        if rec.final and rec.HasField("timings"):
            self.by_request[rec.request_id] = rec.timings


@dataclass
class Bench:
    stack: Stack
    token: str
    llm_urls: list[str]
    seconds: float
    fps: float
    every_s: float
    frames: list[list[bytes]]
    timings: Timings
    kv_bytes_per_token: int = 0

    async def run(self, streams: int, label: str, during: Any = None) -> tuple[dict[str, Any], list[StreamLoad]]:
        """`streams` streams for `seconds`; `during(t0)`: a coroutine run alongside (a replica leaving)."""
        before, cpu0, t0 = scrape(self.llm_urls), stack_cpu_s(self.stack), time.monotonic()
        loads = [StreamLoad(f"{label}-{streams}-{i}") for i in range(streams)]
        jobs = [drive(self.stack.gateway_target, self.token, load, self.frames[i], self.seconds, self.fps,
                      self.every_s, offset_s=self.every_s * (1 + i / max(1, streams)))
                for i, load in enumerate(loads)]
        await asyncio.gather(*jobs, *([during(t0)] if during else []))
        elapsed = time.monotonic() - t0
        after, cpu1 = scrape(self.llm_urls), stack_cpu_s(self.stack)
        await asyncio.sleep(3)  # the closed streams' state leaves the services
        return self.summary(streams, loads, before, after, cpu1 - cpu0, elapsed), loads

    def summary(self, streams: int, loads: list[StreamLoad], before: dict, after: dict, cpu_s: float,
                elapsed: float) -> dict[str, Any]:
        ttfts = [ld.first_text[r] - ld.asked[r] for ld in loads for r in ld.asked if r in ld.first_text]
        engine = [v for ld in loads for v in ld.engine_ttft.values()]
        timed = [self.timings.by_request[r] for ld in loads for r in ld.asked if r in self.timings.by_request]
        ingested = delta(before, after, "livelens_llm_kv_frames_ingested_total")
        requests = delta(before, after, "livelens_llm_kv_ingest_requests_total")
        errors: Counter[str] = Counter()
        for ld in loads:
            errors.update(ld.errors)
        lag = "livelens_llm_frame_to_kv_seconds"
        return {
            "streams": streams,
            "seconds": round(elapsed, 1),
            "frames_sent": sum(ld.frames_sent for ld in loads),
            "context_fps": round(ingested / self.seconds, 3),
            "lag_p50_s": round(histogram_quantile(before, after, lag, 0.50), 3),
            "lag_p99_s": round(histogram_quantile(before, after, lag, 0.99), 3),
            # the encoder's and Kafka's part of the lag: gateway -> the LLM service has the tokens
            "arrival_p50_s": round(histogram_quantile(before, after, "livelens_llm_frame_arrival_seconds", 0.50), 3),
            "arrival_p99_s": round(histogram_quantile(before, after, "livelens_llm_frame_arrival_seconds", 0.99), 3),
            "ttft_p50_s": round(percentile(ttfts, 50), 3),
            "ttft_p99_s": round(percentile(ttfts, 99), 3),
            "engine_ttft_p50_s": round(percentile(engine, 50), 3),
            "queue_p50_s": round(percentile([t.queue_s for t in timed], 50), 3),
            "frame_wait_p50_s": round(percentile([t.frame_wait_s for t in timed], 50), 3),
            "compose_p50_s": round(percentile([t.compose_s for t in timed], 50), 3),
            # the service's part of the first token (queue, frame wait, compose, engine); the
            # rest of the client's is Kafka, the gateway and the client
            "service_ttft_p50_s": round(percentile([t.queue_s + t.frame_wait_s + t.compose_s + t.ttft_s
                                                    for t in timed], 50), 3),
            "questions": sum(len(ld.asked) for ld in loads),
            "answered": len(ttfts),
            "errors": dict(errors),
            # frames folded into others by the LLM's backpressure and by the encoder's
            "dropped": int(delta(before, after, "livelens_llm_coalesced_total")
                           + delta(before, after, "livelens_llm_folded_total")
                           + delta(before, after, "livelens_llm_dropped_total")),
            "encoder_folded": int(delta(before, after, "livelens_llm_folded_total")
                                  + delta(before, after, "livelens_llm_dropped_total")),
            "prefill_s_per_frame": round(delta(before, after, "livelens_llm_kv_ingest_s") / ingested, 3)
            if ingested else None,
            "prefill_requests_in_flight": round(delta(before, after, "livelens_llm_kv_ingest_in_flight_sum_total")
                                                / requests, 2) if requests else None,
            "cpu_s_per_stream_s": round(cpu_s / (streams * elapsed), 3),
            # vLLM's counts; prefix misses: frame prefills that found less of their stream's
            # prefix cached than the request before left (engine_cache: the LRU took its pages)
            "tokens_computed_per_frame": computed_per(before, after, "frame"),
            "tokens_computed_per_question": computed_per(before, after, "question"),
            "tokens_computed_per_check": computed_per(before, after, "check"),
            "prefix_misses": int(delta(before, after, "livelens_llm_prefix_misses_total")),
            # what the streams' contexts hold in the engine's KV pages: streams x a question's
            # context tokens (head, sink, window, retrieved, tail) x bytes of KV a token
            "context_tokens_p50": int(percentile([t.context_tokens for t in timed], 50)) if timed else None,
            "kv_budget_mb": round(streams * percentile([t.context_tokens for t in timed], 50)
                                  * self.kv_bytes_per_token / 2**20, 1) if timed else None,
        }


def _llm_urls(cfgs: list[LivelensConfig]) -> list[str]:
    return [f"http://{c.llm.health_host}:{c.llm.metrics_port}/metrics" for c in cfgs]


def _print_run(run: dict[str, Any]) -> None:
    print(f"  {run.get('materializer', ''):>12} {run['streams']:>3} streams  replicas {run['replicas']}"
          f"  batching {'on ' if run['batching'] else 'off'}"
          f"  context {run['context_fps']:5.2f} fps  lag p50/p99 {run['lag_p50_s']:5.2f}/{run['lag_p99_s']:5.2f} s"
          f" (arrival {run['arrival_p50_s']:.2f}/{run['arrival_p99_s']:.2f})"
          f"  ttft p50/p99 {run['ttft_p50_s']:5.2f}/{run['ttft_p99_s']:5.2f} s (engine {run['engine_ttft_p50_s']:.2f})"
          f"  coalesced {run['dropped']}  answered {run['answered']}/{run['questions']}"
          f"  cpu {run['cpu_s_per_stream_s']:.2f} s/stream-s  computed/frame {run['tokens_computed_per_frame']}"
          f" /question {run['tokens_computed_per_question']}  prefix misses {run['prefix_misses']}", flush=True)


def _start(cfg: LivelensConfig, progress: Any) -> Stack:
    stack = Stack(cfg, Path(tempfile.mkdtemp(prefix="livelens-streams-")))
    stack.start(progress=progress)
    return stack


async def _session(stack: Stack, cfg: LivelensConfig, counts: list[int], seconds: float, fps: float,
                   every_s: float, batching: bool, replicas: bool, frames: list[list[bytes]],
                   runs: list[dict[str, Any]], spread: dict[str, Any]) -> None:
    token = next(iter(cfg.gateway.tokens))
    timings = Timings(stack, cfg.gateway.tokens[token])
    bench = Bench(stack, token, _llm_urls([cfg]), seconds, fps, every_s, frames, timings, kv_bytes_per_token(cfg))
    try:
        # Not measured: one stream's first frames and questions (first-call set-up in the
        # engine and the services), so the 1-stream run is not the one that pays it.
        warm = Bench(stack, token, bench.llm_urls, min(seconds, 2.5 * every_s), fps, every_s, frames, timings)
        await warm.run(1, "warm-up")
        for n in counts:
            run, _ = await bench.run(n, "on" if batching else "off")
            run.update(replicas=1, batching=batching, materializer=cfg.llm.context.materializer)
            runs.append(run)
            _print_run(run)
        if not replicas:
            return
        n = max(c for c in counts if c <= 8) if any(c <= 8 for c in counts) else counts[0]
        print(f"==> adding a second encoder and LLM replica ({cfg.kafka.partitions} partitions)", flush=True)
        await asyncio.to_thread(stack.add_replica, "encoder")
        _, llm2 = await asyncio.to_thread(stack.add_replica, "llm")
        bench.llm_urls = _llm_urls([cfg, llm2])
        await asyncio.sleep(10)  # the groups settle

        async def sample(t0: float) -> None:  # while every stream is open
            await asyncio.sleep(seconds * 0.8)
            spread["streams_per_llm_replica"] = await asyncio.to_thread(per_replica, bench.llm_urls)

        run, _ = await bench.run(n, "two", during=sample)
        run.update(replicas=2, batching=batching, materializer=cfg.llm.context.materializer)
        runs.append(run)
        _print_run(run)

        async def leave(t0: float) -> None:  # one LLM replica leaves mid-run
            await asyncio.sleep(seconds / 2)
            # (this scrape is also the leaving replica's last: its counters as it leaves)
            spread["before_leave"] = await asyncio.to_thread(per_replica, bench.llm_urls)
            spread["left_at_s"] = round(time.monotonic() - t0, 1)
            await asyncio.to_thread(stack.remove_replica, "llm-2")
            await asyncio.sleep(max(0.0, seconds * 0.9 - (time.monotonic() - t0)))
            spread["after_leave"] = await asyncio.to_thread(per_replica, bench.llm_urls[:1])

        left_unix = time.time() + seconds / 2
        run, loads = await bench.run(n, "leave", during=leave)
        spread["answered_after_leave"] = sum(1 for ld in loads for r in ld.answered_after if ld.asked[r] > left_unix)
        spread["asked_after_leave"] = sum(1 for ld in loads for t in ld.asked.values() if t > left_unix)
        spread["leave_run"] = run
        print(f"==> replica left at {spread['left_at_s']}s: streams per LLM replica {spread['before_leave']} -> "
              f"{spread['after_leave']}; questions asked after it {spread['asked_after_leave']}, "
              f"answered {spread['answered_after_leave']}", flush=True)
    finally:
        timings.close()


def per_replica(urls: list[str]) -> list[int]:
    """Streams each LLM replica holds now (its `livelens_llm_streams` gauge)."""
    return [int(sum(v for (name, _), v in scrape([u]).items() if name == "livelens_llm_streams")) for u in urls]


def run_streams(cfg: LivelensConfig, out: Path, counts: list[int], seconds: float = 60.0, fps: float = 2.0,
                question_every_s: float = 10.0, batching_off: bool = True, replicas: bool = True,
                materializers: tuple[Materializer, ...] = ()) -> int:
    """`materializers`: after the configured one's runs (batching on, the replicas, batching
    off), the same stream counts on a stack running each of these (batching on)."""
    g = cfg.gateway
    cfg = with_settings(cfg, {
        "kafka.partitions": max(cfg.kafka.partitions, 8),  # room for two replicas to share the streams
        "gateway.proactive_alerts": False,  # the questions asked are the load
        "gateway.max_streams_per_tenant": max(g.max_streams_per_tenant, max(counts)),
        "gateway.tenant_max_fps": max(g.tenant_max_fps, 2 * fps * max(counts)),
        "gateway.tenant_questions_per_minute": max(g.tenant_questions_per_minute, 10 * max(counts))})
    print(f"==> decoding {max(counts)} streams' footage at {fps:g} fps", flush=True)
    frames = clips(fps, seconds, max(counts))
    runs: list[dict[str, Any]] = []
    spread: dict[str, Any] = {}
    progress = lambda m: print(f"==> {m}", flush=True)  # noqa: E731
    own = cfg.llm.context.materializer
    sessions = [(own, True, replicas)] + ([(own, False, False)] if batching_off else [])
    sessions += [(m, True, False) for m in materializers if m != own]
    for materializer, batching, with_replicas in sessions:
        c = with_settings(use_free_ports(cfg), {"llm.context.materializer": materializer})
        if not batching:  # one prefill request at a time
            c = with_settings(c, {"llm.backpressure.prefill_concurrency": 1})
        print(f"==> {materializer}, cross-stream batching {'on' if batching else 'off'} "
              f"(llm.backpressure.prefill_concurrency {c.llm.backpressure.prefill_concurrency})", flush=True)
        stack = _start(c, progress)
        try:
            asyncio.run(_session(stack, c, counts, seconds, fps, question_every_s, batching, with_replicas,
                                 frames, runs, spread))
        finally:
            stack.stop()
    result = summarize(cfg, runs, spread, counts, seconds, fps, question_every_s)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out.with_suffix(".png"))
    print(f"\nlivelens bench streams ({seconds:g} s a run at {fps:g} fps a stream, {result['machine']})")
    for run in runs:
        _print_run(run)
    print(f"  most streams with lag p99 <= {LAG_LIMIT_S:g} s and ttft p99 <= {TTFT_LIMIT_S:g} s: "
          f"{result['max_streams']}")
    for key, text in (("batching_ratio_at_8", "context fps, batching on / off at 8 streams"),
                      ("ttft_p99_ratio_8_to_1", "ttft p99, 8 streams / 1 stream")):
        if result.get(key) is not None:
            print(f"  {text}: {result[key]:.2f}")
    print(f"  written to {out}")
    return 0


def summarize(cfg: LivelensConfig, runs: list[dict[str, Any]], spread: dict[str, Any], counts: list[int],
              seconds: float, fps: float, every_s: float) -> dict[str, Any]:
    own = cfg.llm.context.materializer

    def run_of(streams: int, batching: bool, replicas: int = 1) -> dict[str, Any] | None:
        return next((r for r in runs if (r["streams"], r["batching"], r["replicas"], r["materializer"])
                     == (streams, batching, replicas, own)), None)

    def held_by(materializer: str) -> int:
        return max((r["streams"] for r in runs if r["batching"] and r["replicas"] == 1
                    and r["materializer"] == materializer
                    and r["lag_p99_s"] <= LAG_LIMIT_S and r["ttft_p99_s"] <= TTFT_LIMIT_S), default=0)

    on8, off8, one = run_of(8, True), run_of(8, False), run_of(1, True)
    return {
        "runs": runs,
        "max_streams": held_by(own),
        "max_streams_by_materializer": {m: held_by(m) for m in dict.fromkeys(r["materializer"] for r in runs)},
        "kv_bytes_per_token": kv_bytes_per_token(cfg),
        "batching_ratio_at_8": round(on8["context_fps"] / off8["context_fps"], 2)
        if on8 and off8 and off8["context_fps"] else None,
        "ttft_p99_ratio_8_to_1": round(on8["ttft_p99_s"] / one["ttft_p99_s"], 2) if on8 and one else None,
        "replicas": spread,
        "settings": {"seconds": seconds, "fps": fps, "question_every_s": every_s, "answer_tokens": ANSWER_TOKENS,
                     "partitions": cfg.kafka.partitions, **dataclasses.asdict(cfg.llm.backpressure),
                     "max_frame_age_s": cfg.encoder.max_frame_age_s,
                     "fetch_max_wait_ms": cfg.kafka.fetch_max_wait_ms, "window_frames": cfg.llm.context.window_frames,
                     "llm": Path(cfg.llm.engine.model_path).name, "vision": cfg.encoder.model_id},
        "machine": machine(),
        "unix_time": int(time.time()),
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for batching, style in ((True, "-o"), (False, "--s")):
        rows = sorted((r for r in result["runs"] if r["batching"] is batching and r["replicas"] == 1),
                      key=lambda r: r["streams"])
        if not rows:
            continue
        label = f"batching {'on' if batching else 'off'}"
        n = [r["streams"] for r in rows]
        axes[0].plot(n, [r["context_fps"] for r in rows], style, label=label)
        axes[1].plot(n, [r["lag_p99_s"] for r in rows], style, label=f"{label}: p99")
        axes[1].plot(n, [r["lag_p50_s"] for r in rows], style, alpha=0.4, label=f"{label}: p50")
        axes[2].plot(n, [r["ttft_p99_s"] for r in rows], style, label=f"{label}: p99")
        axes[2].plot(n, [r["ttft_p50_s"] for r in rows], style, alpha=0.4, label=f"{label}: p50")
    for ax, title in zip(axes, ("frames/s into context (all streams)", "frame -> context lag, s",
                                "time to first token (client), s"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("streams at 2 fps")
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax in axes[1:]:
        ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    fig.suptitle(f"livelens bench streams ({result['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
