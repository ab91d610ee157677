"""`livelens bench encoder`: what the feature cache saves and what it costs in fidelity.

Real sample videos, sampled at 2 fps (the product's default rate), go through the
encoder service's own frame path (`EncoderService.process`: decode, preprocess, feature
cache, Triton, token records), with a real tritonserver serving the vision model:

- fidelity, per video, one stream: the tokens the LLM holds for each frame with caching
  on (per grid position, the last token it received) against a full encode of every
  frame: mean cosine; plus the fraction of frames skipped, of tokens dropped, and of
  vision-model runs saved;
- speed: 1, 2, 4 and 8 concurrent streams of the video (each with its own cache, each
  starting at a different point of the video), polled the way the service's Kafka
  consumer hands them over (frames of all streams interleaved, up to `encoder.max_batch`
  per Triton request), as fast as the encoder goes; caching off and on side by side.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from livelens.bench.e2e import machine
from livelens.config import FeatureCacheConfig, LivelensConfig
from livelens.records import encode_jpeg, get_tokens
from livelens.v1 import messages_pb2 as pb
from livelens.video import read_frames, sample_video
from services.encoder.novelty import token_cosines
from services.encoder.service import EncoderService
from services.encoder.triton_client import VisionModelClient

VIDEOS = ["vtest.avi", "tree.avi", "bikes.mp4", "Megamind.avi"]
STREAMS = [1, 2, 4, 8]
FPS = 2.0
OFF = FeatureCacheConfig(skip_frames=False, drop_tokens=False, max_tokens_per_frame=0)


def frame_records(video: str, seconds: float) -> list[bytes]:
    return [encode_jpeg(f.rgb) for f in read_frames(sample_video(video), FPS, max_seconds=seconds)]


def service(cfg: LivelensConfig, cache: FeatureCacheConfig) -> EncoderService:
    return EncoderService(replace(cfg, encoder=replace(cfg.encoder, cache=cache)))


def fidelity(cfg: LivelensConfig, model: VisionModelClient, images: list[bytes]) -> dict[str, Any]:
    """One stream, caching on vs every frame encoded whole."""
    full = service(cfg, OFF)
    cached = service(cfg, cfg.encoder.cache)
    cosines: list[float] = []
    held: np.ndarray | None = None  # what the LLM holds per grid position
    encoded = 0
    for seq, data in enumerate(images):
        rec = pb.FrameRecord(stream_id="s", tenant="t", seq=seq, pts_s=seq / FPS, data=data)
        (truth,) = full.process([rec], model)
        (out,) = cached.process([rec], model)
        true_tokens, _ = get_tokens(truth)
        tokens, kept = get_tokens(out)
        if held is None:
            held = np.zeros_like(true_tokens, dtype=np.float32)
        if not out.unchanged:
            encoded += 1
            held[kept] = tokens
        cosines.append(float(token_cosines(held, true_tokens).mean()))
    stats = cached.cache.total()
    return {"fidelity_cosine": float(np.mean(cosines)), "fidelity_cosine_min": float(np.min(cosines)),
            "frames_skipped": stats.skipped / max(1, stats.frames), "tokens_dropped": stats.tokens_dropped,
            "vision_compute_saved": 1.0 - encoded / max(1, len(images))}


def speed(cfg: LivelensConfig, model: VisionModelClient, images: list[bytes], streams: int,
          cache: FeatureCacheConfig) -> dict[str, Any]:
    svc = service(cfg, cache)
    n = len(images)
    records = []
    for seq in range(n):  # frames of all streams interleaved, as a live poll would hold them
        for s in range(streams):
            records.append(pb.FrameRecord(stream_id=f"s{s}", tenant="t", seq=seq, pts_s=seq / FPS,
                                          data=images[(seq + s * n // streams) % n]))
    poll = cfg.encoder.max_batch
    t0 = time.perf_counter()
    published = 0
    for start in range(0, len(records), poll):
        for rec in svc.process(records[start:start + poll], model):
            published += int(np.frombuffer(rec.kept_mask, np.uint8).sum()) if rec.kept_mask else rec.grid_h * rec.grid_w
    seconds = time.perf_counter() - t0
    stats = svc.cache.total()
    return {"fps_total": len(records) / seconds, "fps_per_stream": len(records) / seconds / streams,
            "frames": len(records), "seconds": seconds, "triton_requests": svc.stats.batches,
            "frames_skipped": stats.skipped / max(1, stats.frames), "tokens_dropped": stats.tokens_dropped}


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    videos = sorted({r["video"] for r in runs})
    fig, axes = plt.subplots(1, len(videos), figsize=(4 * len(videos), 3.6), squeeze=False)
    for ax, video in zip(axes[0], videos, strict=True):
        for caching in ("off", "on"):
            pts = sorted((r["streams"], r["fps_total"]) for r in runs
                         if r["video"] == video and r["caching"] == caching)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"caching {caching}")
        ax.set(title=video, xlabel="concurrent streams", ylabel="frames/s (total)", xscale="log")
        ax.set_xticks(STREAMS, [str(s) for s in STREAMS])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("livelens bench encoder (MobileNetV2 7x7 on Triton, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_encoder(cfg: LivelensConfig, out: Path, seconds: float = 60.0, videos: list[str] | None = None,
                streams: list[int] | None = None) -> int:
    from livelens.infra.ports import free_port
    from livelens.infra.triton import TritonServer

    t_start = time.perf_counter()
    videos = videos or VIDEOS
    streams = streams or STREAMS
    tcfg = replace(cfg.triton, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    runs: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with TritonServer(tcfg, out.parent / "encoder-tritonserver.log") as _server:
        model = VisionModelClient(f"{tcfg.host}:{tcfg.grpc_port}", cfg.encoder.model_name)
        model.wait_ready()
        model.encode(np.zeros((1, 3, cfg.encoder.image_size, cfg.encoder.image_size), np.float32))  # warm-up
        for video in videos:
            images = frame_records(video, seconds)
            fid = fidelity(cfg, model, images)
            print(f"{video}: {len(images)} frames, fidelity {fid['fidelity_cosine']:.4f}, skipped "
                  f"{fid['frames_skipped']:.1%}, tokens dropped {fid['tokens_dropped']:.1%}", flush=True)
            base: dict[int, float] = {}
            for n in streams:
                for caching, cache in (("off", OFF), ("on", cfg.encoder.cache)):
                    row = {"video": video, "streams": n, "caching": caching, "frames_per_stream": len(images),
                           **speed(cfg, model, images, n, cache)}
                    if caching == "on":
                        row.update({k: fid[k] for k in ("fidelity_cosine", "fidelity_cosine_min",
                                                        "vision_compute_saved")})
                        row["speedup"] = row["fps_total"] / base[n]
                    else:
                        base[n] = row["fps_total"]
                        row["fidelity_cosine"] = 1.0
                    runs.append(row)
                    print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in row.items() if k != "video"), flush=True)
            summary[video] = {"speedup_median": float(np.median([r["speedup"] for r in runs
                                                                if r["video"] == video and "speedup" in r])),
                              **fid}
        model.close()
    result = {"runs": runs, "videos": summary, "cache": cfg.encoder.cache.__dict__, "fps_sampled": FPS,
              "seconds_per_video": seconds, "machine": machine(), "model": cfg.encoder.model_id,
              "seconds": time.perf_counter() - t_start}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(runs, out.with_suffix(".png"))
    for video, s in summary.items():
        print(f"{video}: caching on is {s['speedup_median']:.2f}x the frames/s of off (median over stream "
              f"counts) at fidelity {s['fidelity_cosine']:.4f}")
    print(f"written to {out} and {out.with_suffix('.png')}")
    return 0
