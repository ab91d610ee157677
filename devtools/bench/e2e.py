"""`livelens bench e2e`: one stream through the whole local stack.

Phase 1 (live): the video is sent at its stream time (2 fps for 60 s by default) with a
question every `question_every_s` of stream time. Measures frames per second sustained,
frame-to-token latency (client sends a frame -> its tokens reach a Kafka subscriber of
`livelens.tokens`) and time to first answer token as the client sees it.
Phase 2 (burst): the same frames sent as fast as the gateway takes them, to show the
capacity of the encoder path on this machine.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devtools.bench.common import TopicWatcher, machine, percentile
from devtools.stack import Stack, use_free_ports
from livelens.client import Client
from livelens.config import LivelensConfig, with_settings
from livelens.video import sample_video
from livelens.watcher import ScheduledQuestion, WatchReport, watch_video


class TokenArrivals(TopicWatcher):
    """Records when each (stream, seq)'s tokens reach a subscriber: a record the encoder
    folded several frames into arrives for each of them (`TokensRecord.folded`)."""

    def __init__(self, cfg: LivelensConfig) -> None:
        self.arrivals: dict[tuple[str, int], float] = {}
        super().__init__(cfg, ["tokens"])

    def seen(self, rec: Any) -> None:
        now = time.time()
        seqs = range(rec.folded.from_seq, rec.folded.to_seq + 1) if rec.HasField("folded") else (rec.seq,)
        for seq in seqs:
            self.arrivals.setdefault((rec.stream_id, seq), now)


@dataclass
class PhaseResult:
    fps: float
    frames: int
    frame_to_token_p50_s: float
    frame_to_token_p99_s: float


def measure(report: WatchReport, stream_id: str, arrivals: dict[tuple[str, int], float]) -> PhaseResult:
    latencies = [arrivals[(stream_id, seq)] - sent for seq, sent in report.send_unix.items()
                 if (stream_id, seq) in arrivals]
    done = [arrivals[(stream_id, seq)] for seq in report.send_unix if (stream_id, seq) in arrivals]
    span = (max(done) - min(report.send_unix.values())) if done else float("nan")
    return PhaseResult(fps=len(done) / span if span and span > 0 else float("nan"), frames=len(done),
                       frame_to_token_p50_s=percentile(latencies, 50),
                       frame_to_token_p99_s=percentile(latencies, 99))


def answer_records(report: WatchReport) -> list[dict[str, Any]]:
    """Every question asked, in the order asked, with what came back: the answer's text,
    the stream time it is about, the client-measured time to first token (None when no
    delta came), whether it finished, and the error it got, if any."""
    errors = {e.request_id: e.message for e in report.errors if e.request_id}
    return [{"question": a.question, "asked_at_s": a.asked_at_s, "stream_time_s": a.stream_time_s,
             "text": a.text, "ttft_s": a.ttft_s or None,
             "done": a.done, "error": errors.get(request_id)}
            for request_id, a in report.answers.items()]


async def _phases(cfg: LivelensConfig, target: str, token: str, video: str, seconds: float,
                  fps: float, arrivals: TokenArrivals, every_s: float) -> dict[str, Any]:
    questions = [ScheduledQuestion(t, "What is happening in the video right now?")
                 for t in range(int(every_s), int(seconds) + 1, int(every_s))]
    async with Client(target, token) as client:
        print(f"phase 1: live, {seconds:g} s at {fps:g} fps, {len(questions)} questions", flush=True)
        live = await watch_video(client, video, "bench-live", fps, questions, realtime=True,
                                 max_seconds=seconds)
        print("phase 2: burst, same frames as fast as accepted", flush=True)
        burst = await watch_video(client, video, "bench-burst", fps, [], realtime=False,
                                  max_seconds=seconds)
    # Wait for every acknowledged frame's tokens (the burst queues frames faster than they are
    # encoded; frames over gateway.tenant_max_fps are refused, never acknowledged).
    deadline = time.monotonic() + 300
    expected = [("bench-live", seq) for seq in live.ack_unix] + [("bench-burst", seq) for seq in burst.ack_unix]
    while time.monotonic() < deadline and not all(key in arrivals.arrivals for key in expected):
        await asyncio.sleep(0.2)
    live_r = measure(live, "bench-live", arrivals.arrivals)
    burst_r = measure(burst, "bench-burst", arrivals.arrivals)
    ttfts = [a.ttft_s for a in live.answers.values() if a.done and a.ttft_s]
    server_ttfts = [a.server_ttft_s for a in live.answers.values() if a.done and a.server_ttft_s]
    return {
        "fps": live_r.fps,
        "frame_to_token_p50_s": live_r.frame_to_token_p50_s,
        "frame_to_token_p99_s": live_r.frame_to_token_p99_s,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "engine_ttft_p50_s": percentile(server_ttfts, 50),
        "questions": len(questions),
        "answered": len(ttfts),
        "frames_sent": live.frames_sent,
        "frames_tokenized": live_r.frames,
        "burst": asdict(burst_r),
        "sample_answer": next((a.text for a in live.answers.values() if a.done), ""),
        "answers": answer_records(live),
        "burst_refused": len(burst.errors),  # over the tenant's frame rate (gateway.tenant_max_fps)
        "errors": [e.message for e in live.errors],
    }


def run_e2e(cfg: LivelensConfig, seconds: float, fps: float, video: str | None, out: Path,
            question_every_s: float = 5.0) -> int:
    video = video or str(sample_video("vtest.avi"))
    # free ports: never collides with a running `livelens up`; no alerts: they would compete
    # with the measured questions
    cfg = with_settings(use_free_ports(cfg), {"gateway.proactive_alerts": False})
    stack = Stack(cfg, Path(tempfile.mkdtemp(prefix="livelens-bench-")))
    stack.start(progress=lambda m: print(f"==> {m}", flush=True))
    try:
        arrivals = TokenArrivals(cfg)
        try:
            result = asyncio.run(_phases(cfg, stack.gateway_target, next(iter(cfg.gateway.tokens)),
                                         video, seconds, fps, arrivals, question_every_s))
        finally:
            arrivals.close()
    finally:
        stack.stop()
    result.update(video=Path(video).name, video_seconds=seconds, target_fps=fps, machine=machine(),
                  llm=Path(cfg.llm.engine.model_path).name, vision=cfg.encoder.model_id,
                  window_frames=cfg.llm.context.window_frames, sink_frames=cfg.llm.context.sink_frames,
                  unix_time=int(time.time()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nlivelens bench e2e ({result['video']}, {seconds:g} s at {fps:g} fps, {result['machine']})")
    print(f"  frames/s sustained     {result['fps']:.2f}  (burst capacity {result['burst']['fps']:.2f})")
    print(f"  frame->tokens p50/p99  {result['frame_to_token_p50_s']:.3f} / {result['frame_to_token_p99_s']:.3f} s")
    print(f"  ttft p50/p99           {result['ttft_p50_s']:.3f} / {result['ttft_p99_s']:.3f} s "
          f"({result['answered']}/{result['questions']} answered)")
    print(f"  written to {out}")
    return 0 if result["answered"] == result["questions"] else 1
