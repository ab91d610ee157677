"""`livelens bench encoder`: what the feature cache saves and what it costs in fidelity.

Real sample videos, sampled at `--fps` (2, the product's default rate), go through the
encoder service's own frame path (`EncoderService.process`: decode, preprocess, feature
cache, Triton requests in flight, token records), with a real tritonserver serving the
vision model. Backbones: the ViT (`vision_vit` with partial recompute for caching on,
the same weights served plain as `vision_vit_full` for caching off) or MobileNetV2
(`vision_encoder` both ways; no partial recompute).

- fidelity, per video, one stream: the tokens the LLM holds for each frame (per grid
  position, the last token it received) against a full encode of every frame by the
  plain model: mean cosine, for each level alone and for all of them (the default
  configuration); plus the fraction of frames skipped, of tokens dropped, and of
  vision-model work saved (patches not computed, over every patch of every frame);
- speed: 1, 2, 4 and 8 concurrent streams of the video (each with its own cache, each
  starting at a different point of the video, the video repeated to at least
  `MIN_FRAMES` frames), polled the way the service's Kafka consumer hands them over
  (frames of all streams interleaved, `encoder.max_batch` per stream per poll), as fast
  as the encoder goes; caching off and on side by side, in alternation.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from devtools.bench.common import machine
from livelens.config import FeatureCacheConfig, LivelensConfig
from livelens.records import encode_jpeg, get_tokens
from livelens.v1 import messages_pb2 as pb
from livelens.video import read_frames, sample_video
from services.encoder.novelty import token_cosines
from services.encoder.service import EncoderService
from services.encoder.triton_client import VisionModelClient

VIDEOS = ["vtest.avi", "tree.avi", "Megamind.avi", "bikes.mp4"]
STREAMS = [1, 2, 4, 8]
MIN_FRAMES = 60  # per stream in the speed runs, so a short video still gives a steady rate
# backbone -> (model with caching on, model with caching off)
BACKBONES = {"vit": ("vision_vit", "vision_vit_full"), "mobilenet": ("vision_encoder", "vision_encoder")}
OFF = FeatureCacheConfig(skip_frames=False, drop_tokens=False, partial_recompute=False, max_tokens_per_frame=0)
# Each level alone: the other levels switched off in the configured cache.
LEVELS: dict[str, dict[str, Any]] = {
    "skip": {"drop_tokens": False, "partial_recompute": False, "max_tokens_per_frame": 0},
    "drop": {"skip_frames": False, "partial_recompute": False, "max_tokens_per_frame": 0},
    "partial": {"skip_frames": False, "drop_tokens": False, "max_tokens_per_frame": 0},
    "budget": {"skip_frames": False, "drop_tokens": False, "partial_recompute": False},
    "all": {},
}


Image = tuple[bytes, int, int]  # a frame as the gateway publishes it: JPEG, width, height


def frame_records(video: str, seconds: float, fps: float) -> list[Image]:
    """JPEG bytes, width and height of each frame (the gateway records the size)."""
    return [(encode_jpeg(f.rgb), f.rgb.shape[1], f.rgb.shape[0])
            for f in read_frames(sample_video(video), fps, max_seconds=seconds)]


def frame(stream_id: str, seq: int, fps: float, image: Image) -> pb.FrameRecord:
    data, width, height = image
    return pb.FrameRecord(stream_id=stream_id, tenant="t", seq=seq, pts_s=seq / fps, data=data,
                          encoding=pb.FrameRecord.JPEG, width=width, height=height)


def service(cfg: LivelensConfig, cache: FeatureCacheConfig) -> EncoderService:
    return EncoderService(replace(cfg, encoder=replace(cfg.encoder, cache=cache)))


def full_encodes(cfg: LivelensConfig, model: VisionModelClient, images: list[Image], fps: float) -> list[np.ndarray]:
    """Every frame encoded whole by the plain model: the truth fidelity is measured against."""
    svc = service(cfg, OFF)
    records = [frame("s", seq, fps, image) for seq, image in enumerate(images)]
    out = []
    for start in range(0, len(records), cfg.encoder.max_batch):
        out += [get_tokens(rec)[0] for rec in svc.process(records[start:start + cfg.encoder.max_batch], model)]
    svc.pool.shutdown()
    return out


def fidelity(cfg: LivelensConfig, model: VisionModelClient, images: list[Image], truth: list[np.ndarray],
             cache: FeatureCacheConfig, fps: float, poll: int = 1) -> dict[str, Any]:
    """One stream with `cache`: what the LLM holds after each frame vs the full encode.
    `poll`: frames per poll (1: live; more: a backlog, where partial recomputes of one poll
    go out together on the same cache)."""
    svc = service(cfg, cache)
    cosines: list[float] = []
    held: np.ndarray | None = None  # what the LLM holds per grid position
    records = [frame("s", seq, fps, image) for seq, image in enumerate(images)]
    for start in range(0, len(records), poll):
        for out in svc.process(records[start:start + poll], model):
            tokens, kept = get_tokens(out)
            if held is None:
                held = np.zeros_like(truth[out.seq], dtype=np.float32)
            if not out.unchanged:
                held[kept] = tokens
            cosines.append(float(token_cosines(held, truth[out.seq]).mean()))
    svc.pool.shutdown()
    stats = svc.streams.cache_stats()
    return {"fidelity_cosine": float(np.mean(cosines)), "fidelity_cosine_min": float(np.min(cosines)),
            "frames_skipped": stats.skipped / max(1, stats.frames), "tokens_dropped": stats.tokens_dropped,
            "vision_compute_saved": stats.compute_saved}


def speed(cfg: LivelensConfig, model: VisionModelClient, images: list[Image], streams: int,
          cache: FeatureCacheConfig, fps: float) -> dict[str, Any]:
    svc = service(cfg, cache)
    n = len(images)
    per_stream = max(n, MIN_FRAMES)
    records = []
    for seq in range(per_stream):  # frames of all streams interleaved, as a live poll would hold them
        for s in range(streams):
            records.append(frame(f"s{s}", seq, fps, images[(seq + s * n // streams) % n]))
    poll = cfg.encoder.max_batch * streams
    t0 = time.perf_counter()
    for start in range(0, len(records), poll):
        svc.process(records[start:start + poll], model)
    seconds = time.perf_counter() - t0
    svc.pool.shutdown()
    stats = svc.streams.cache_stats()
    return {"fps_total": len(records) / seconds, "fps_per_stream": len(records) / seconds / streams,
            "frames": len(records), "seconds": seconds, "triton_requests": svc.stats.batches,
            "frames_skipped": stats.skipped / max(1, stats.frames), "tokens_dropped": stats.tokens_dropped,
            "vision_compute_saved": stats.compute_saved}


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    videos = list(dict.fromkeys(r["video"] for r in runs))
    fig, axes = plt.subplots(1, len(videos), figsize=(4 * len(videos), 3.6), squeeze=False)
    for ax, video in zip(axes[0], videos, strict=True):
        for caching in ("off", "on"):
            pts = sorted((r["streams"], r["fps_total"]) for r in runs
                         if r["video"] == video and r["caching"] == caching)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"caching {caching}")
        ax.set(title=video, xlabel="concurrent streams", ylabel="frames/s (total)", xscale="log")
        ax.set_xticks(STREAMS, [str(s) for s in STREAMS])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _row(row: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "video")


def run_encoder(cfg: LivelensConfig, out: Path, seconds: float = 60.0, videos: list[str] | None = None,
                streams: list[int] | None = None, fps: float = 2.0, backbone: str = "vit") -> int:
    from devtools.infra.triton import TritonServer
    from services.common.malloc import tune_malloc
    from services.common.ports import free_port

    tune_malloc()  # as the encoder service does
    t_start = time.perf_counter()
    videos = videos or VIDEOS
    streams = streams or STREAMS
    on_model, off_model = BACKBONES[backbone]
    tcfg = replace(cfg.triton, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    runs: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(tcfg, on_model, out.parent / "encoder-tritonserver.log"):
        models = {}
        for name in dict.fromkeys((on_model, off_model)):
            models[name] = VisionModelClient(tcfg.grpc_url, name)
            models[name].wait_ready()
        on, off = models[on_model], models[off_model]
        print(f"backbone {backbone}: caching on -> {on_model} (partial recompute: {on.partial}), "
              f"off -> {off_model}; grid {on.grid}", flush=True)
        for video in videos:
            images = frame_records(video, seconds, fps)
            truth = full_encodes(cfg, off, images, fps)
            levels = {}
            for level, fields in LEVELS.items():
                if level == "partial" and not on.partial:
                    continue
                levels[level] = fidelity(cfg, on, images, truth, replace(cfg.encoder.cache, **fields), fps)
                print(f"{video}: {len(images)} frames, level {level}: " + _row(levels[level]), flush=True)
            fid = levels["all"]
            # the speed runs' polling: a backlog of max_batch frames per stream and poll
            batched = fidelity(cfg, on, images, truth, cfg.encoder.cache, fps, poll=cfg.encoder.max_batch)
            fid["fidelity_cosine_backlog"] = batched["fidelity_cosine"]
            fid["vision_compute_saved_backlog"] = batched["vision_compute_saved"]
            print(f"{video}: level all, {cfg.encoder.max_batch} frames per poll: " + _row(batched), flush=True)
            base: dict[int, float] = {}
            for n in streams:
                for caching, model, cache in (("off", off, OFF), ("on", on, cfg.encoder.cache)):
                    row = {"video": video, "streams": n, "caching": caching, "model": model.model_name,
                           **speed(cfg, model, images, n, cache, fps)}
                    if caching == "on":
                        row.update({k: fid[k] for k in ("fidelity_cosine", "fidelity_cosine_min",
                                                        "fidelity_cosine_backlog")})
                        row["speedup"] = row["fps_total"] / base[n]
                    else:
                        base[n] = row["fps_total"]
                        row["fidelity_cosine"] = 1.0
                    runs.append(row)
                    print("  " + _row(row), flush=True)
            speedups = [r["speedup"] for r in runs if r["video"] == video and "speedup" in r]
            summary[video] = {"frames": len(images), "speedup_median": float(np.median(speedups)),
                              "speedup_min": float(np.min(speedups)), "levels": levels}
        for model in models.values():
            model.close()
    result = {"runs": runs, "videos": summary, "backbone": backbone, "models": {"on": on_model, "off": off_model},
              "cache": asdict(cfg.encoder.cache), "fps_sampled": fps, "seconds_per_video": seconds,
              "max_in_flight": cfg.encoder.max_in_flight, "machine": machine(),
              "seconds": time.perf_counter() - t_start}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, out.with_suffix(".png"), f"livelens bench encoder ({backbone}: {on_model} vs {off_model}, "
                                        f"Triton on CPU, {fps:g} fps)")
    print("\nvideo            frames  fidelity(all live/backlog)  partial  skipped  dropped  compute saved  "
          "speedup median (min)")
    for video, s in summary.items():
        a = s["levels"]["all"]
        part = s["levels"].get("partial", {}).get("fidelity_cosine", float("nan"))
        print(f"{video:16s} {s['frames']:6d}  {a['fidelity_cosine']:12.4f} / {a['fidelity_cosine_backlog']:.4f}  "
              f"{part:7.4f}  {a['frames_skipped']:7.1%}  {a['tokens_dropped']:7.1%}  "
              f"{a['vision_compute_saved']:13.1%}  {s['speedup_median']:.2f}x ({s['speedup_min']:.2f}x)")
    print(f"written to {out} and {out.with_suffix('.png')}")
    return 0
