"""`livelens bench soak`: the whole local stack under faults, for a long run.

`streams` streams (sample videos, looped) are sent at `fps` for `minutes`, each asking a
question every `question_every_s`. Every `kill_every_s` one service is killed with
SIGKILL, in turn the LLM service, the encoder and the gateway; the supervisor restarts
it, and the time until it serves again is its recovery time. A stream whose Watch
breaks (the gateway died) waits for the gateway and resumes its session after its last
acknowledged frame. At the end every stream is asked once more, and its answer's
timings say how many frames the LLM service took for it (each frame once) and holds.

Written to bench/results/soak.json (+ a PNG of the services' memory over time).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from livelens import health
from livelens.client import Ack, Answer, Client, ItemError, WatchSession
from livelens.config import LivelensConfig
from livelens.dev.bench.e2e import machine
from livelens.dev.stack import Stack, use_free_ports
from livelens.records import encode_jpeg
from livelens.subscriber import TopicSubscriber
from livelens.v1 import messages_pb2 as pb
from livelens.video import read_frames, sample_video

VIDEOS = ("vtest.avi", "Megamind.avi", "bikes.mp4", "vtest.avi")
KILL_ORDER = ("llm", "encoder", "gateway")


@dataclass
class StreamTally:
    name: str
    acked: set[int] = field(default_factory=set)
    questions: int = 0
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    resumes: int = 0


@dataclass
class Soak:
    stack: Stack
    token: str
    minutes: float
    fps: float
    question_every_s: float
    kill_every_s: float
    kills: list[dict[str, Any]] = field(default_factory=list)
    rss: list[dict[str, Any]] = field(default_factory=list)

    @property
    def targets(self) -> dict[str, str]:
        c = self.stack.cfg
        return {"llm": f"{c.llm.health_host}:{c.llm.health_port}",
                "encoder": f"{c.encoder.health_host}:{c.encoder.health_port}", "gateway": self.stack.gateway_target}

    def service_rss_mb(self) -> dict[str, float]:
        """Resident memory of each service with its children (vLLM's engine core)."""
        out = {}
        for name in KILL_ORDER:
            proc = self.stack.process(name).proc
            try:
                root = psutil.Process(proc.pid) if proc else None
                tree = [root, *root.children(recursive=True)] if root else []
                out[name] = sum(p.memory_info().rss for p in tree) / 2**20
            except psutil.Error:
                out[name] = float("nan")
        return out

    async def sample_memory(self, t0: float, end: float) -> None:
        while time.monotonic() < end:
            self.rss.append({"t_s": round(time.monotonic() - t0, 1), **self.service_rss_mb()})
            await asyncio.sleep(30)

    async def kill_in_turn(self, t0: float, end: float) -> None:
        turn = 0
        while (due := t0 + (turn + 1) * self.kill_every_s) < end:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            name = KILL_ORDER[turn % len(KILL_ORDER)]
            turn += 1
            pid = self.stack.process(name).proc.pid  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            print(f"==> soak: killed {name} (pid {pid}) at {killed - t0:.0f}s", flush=True)
            while True:
                proc = self.stack.process(name).proc
                if proc is not None and proc.pid != pid and await asyncio.to_thread(health.check, self.targets[name]):
                    break
                await asyncio.sleep(0.5)
            recovery = time.monotonic() - killed
            self.kills.append({"service": name, "at_s": round(killed - t0, 1), "recovery_s": round(recovery, 2)})
            print(f"==> soak: {name} serving again after {recovery:.1f}s", flush=True)

    async def run_stream(self, tally: StreamTally, frames: list[bytes], end: float) -> None:
        """Frames at their stream time, a question every question_every_s; through gateway
        deaths, resumed after the last acknowledged frame."""
        session_id = ""
        period = 1.0 / self.fps
        started = time.monotonic()
        pending: set[str] = set()
        while time.monotonic() < end:
            async with Client(self.stack.gateway_target, self.token) as client:
                try:
                    async with client.watch(tally.name, resume_session_id=session_id) as s:
                        session_id = s.session_id
                        await self._stream_until_broken(s, tally, frames, started, period, end, pending)
                except Exception as exc:  # noqa: BLE001 - a refused or broken call: the gateway is restarting
                    tally.errors[type(exc).__name__] += 1
            if time.monotonic() < end:
                tally.errors["UNAVAILABLE"] += len(pending)  # questions lost with their gateway
                pending.clear()
                tally.resumes += 1
                while not await asyncio.to_thread(health.check, self.stack.gateway_target):
                    await asyncio.sleep(0.5)

    async def _stream_until_broken(self, s: WatchSession, tally: StreamTally, frames: list[bytes], started: float,
                                   period: float, end: float, pending: set[str]) -> None:
        async def listen() -> None:
            async for e in s.events():
                if isinstance(e, Ack):
                    tally.acked.add(e.seq)
                elif isinstance(e, ItemError) and e.request_id in pending:
                    pending.discard(e.request_id)
                    tally.errors[e.status] += 1
                elif isinstance(e, Answer) and e.final and e.request_id in pending:
                    pending.discard(e.request_id)
                    tally.answered += 1

        listener = asyncio.create_task(listen())
        seq = max(tally.acked, default=-1) + 1  # after the last acknowledged frame
        next_question = time.monotonic() + self.question_every_s
        try:
            while time.monotonic() < end and not s.ended:
                due = started + seq * period
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await s.send_frame(seq, seq * period, frames[seq % len(frames)])
                seq += 1
                if time.monotonic() >= next_question:
                    next_question += self.question_every_s
                    request_id = f"{tally.name}-q{tally.questions}"
                    tally.questions += 1
                    pending.add(request_id)
                    await s.ask("What do you see now?", request_id=request_id, timeout_s=120)
            if not s.ended:  # the end: the answers still coming, then the frames' count
                await asyncio.sleep(5)  # the last frames into the context
                await s.ask("What happened?", request_id=f"{tally.name}-final", max_tokens=4, timeout_s=300)
                pending.add(f"{tally.name}-final")
                tally.questions += 1
                deadline = time.monotonic() + 300
                while pending and time.monotonic() < deadline and not s.ended:
                    await asyncio.sleep(0.5)
        finally:
            listener.cancel()


async def _soak(soak: Soak, streams: int) -> tuple[list[StreamTally], dict[str, pb.AnswerTimings]]:
    names = [f"soak-{i}" for i in range(streams)]
    clips = {n: [encode_jpeg(f.rgb) for f in read_frames(sample_video(VIDEOS[i % len(VIDEOS)]), soak.fps,
                                                         max_seconds=min(300.0, soak.minutes * 60))]
             for i, n in enumerate(names)}
    tallies = [StreamTally(n) for n in names]
    t0 = time.monotonic()
    end = t0 + soak.minutes * 60
    timings: dict[str, pb.AnswerTimings] = {}
    tenant = soak.stack.cfg.gateway.tokens[soak.token]
    with TopicSubscriber(soak.stack.cfg.kafka, ["responses"], tenant=tenant) as sub:
        await asyncio.gather(soak.sample_memory(t0, end), soak.kill_in_turn(t0, end),
                             *(soak.run_stream(t, clips[t.name], end) for t in tallies))
        for rec in await asyncio.to_thread(lambda: list(sub.records(timeout_s=5))):
            if rec.final and rec.request_id == f"{rec.stream_id}-final":  # each stream's last question
                timings[rec.stream_id] = rec.timings
    soak.rss.append({"t_s": round(time.monotonic() - t0, 1), **soak.service_rss_mb()})
    return tallies, timings


def run_soak(cfg: LivelensConfig, out: Path, minutes: float = 30.0, streams: int = 4, fps: float = 0.5,
             question_every_s: float = 30.0, kill_every_s: float = 300.0) -> int:
    use_free_ports(cfg)
    cfg.gateway.proactive_alerts = False  # the questions asked are the ones counted
    stack = Stack(cfg, Path(tempfile.mkdtemp(prefix="livelens-soak-")))
    stack.start(progress=lambda m: print(f"==> {m}", flush=True))
    token = next(iter(cfg.gateway.tokens))
    soak = Soak(stack, token, minutes, fps, question_every_s, kill_every_s)
    try:
        tallies, timings = asyncio.run(_soak(soak, streams))
    finally:
        stack.stop()
    errors: Counter[str] = Counter()
    for t in tallies:
        errors.update(t.errors)
    recoveries = [k["recovery_s"] for k in soak.kills]
    first, last = soak.rss[0], soak.rss[-1]
    result = {
        "minutes": minutes, "streams": streams, "fps": fps, "question_every_s": question_every_s,
        "frames_acked": sum(len(t.acked) for t in tallies),
        "frames_in_context": sum(timings[t.name].frames_seen for t in tallies if t.name in timings),
        "frames_held": sum(timings[t.name].held_frames for t in tallies if t.name in timings),
        "questions": sum(t.questions for t in tallies), "answered": sum(t.answered for t in tallies),
        "errors": dict(errors), "resumes": sum(t.resumes for t in tallies),
        "kills": len(soak.kills), "kill_log": soak.kills,
        "recovery_s_p50": round(statistics.median(recoveries), 2) if recoveries else None,
        "recovery_s_max": max(recoveries) if recoveries else None,
        "rss_mb_start": round(sum(v for k, v in first.items() if k != "t_s"), 1),
        "rss_mb_end": round(sum(v for k, v in last.items() if k != "t_s"), 1),
        "rss": soak.rss, "per_stream": [{"stream": t.name, "acked": len(t.acked),
                                         "in_context": timings[t.name].frames_seen if t.name in timings else None,
                                         "questions": t.questions, "answered": t.answered} for t in tallies],
        "machine": machine(), "unix_time": int(time.time()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out.with_suffix(".png"))
    print(f"\nlivelens bench soak ({minutes:g} min, {streams} streams at {fps:g} fps, {result['machine']})")
    print(f"  frames acked / in context   {result['frames_acked']} / {result['frames_in_context']}")
    print(f"  questions / answered        {result['questions']} / {result['answered']}  errors {result['errors']}")
    print(f"  kills {result['kills']}, recovery p50 / max   {result['recovery_s_p50']} / {result['recovery_s_max']} s")
    print(f"  RSS start / end             {result['rss_mb_start']} / {result['rss_mb_end']} MB")
    print(f"  written to {out}")
    return 0 if result["frames_acked"] == result["frames_in_context"] else 1


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in KILL_ORDER:
        ax.plot([r["t_s"] / 60 for r in result["rss"]], [r[name] for r in result["rss"]], label=name)
    for k in result["kill_log"]:
        ax.axvline(k["at_s"] / 60, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("minutes (dotted: a kill -9)")
    ax.set_ylabel("RSS, MB (with children)")
    ax.set_title(f"livelens soak: {result['streams']} streams, {result['minutes']:g} min")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
