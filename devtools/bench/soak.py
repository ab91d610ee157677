"""`livelens bench soak`: the whole local stack under faults, for a long run.

`streams` streams (sample videos, looped) are sent at `fps` for `minutes`, each asking a
question every `question_every_s`. Every `kill_every_s` one service replica is killed
with SIGKILL, in turn the LLM service, the encoder, the gateway (with `replicas`, each
service's replicas in turn) and, when its log is on disk, the broker; the supervisor
restarts it, and the time until it serves again is its recovery time. A stream whose
Watch breaks (its gateway died) resumes its session through a gateway that serves,
after its last acknowledged frame. At the end every stream is asked once more, and its
answer's timings account for every frame the client got an ack for: in the context as
itself, folded into another (the client was told), or dropped; `unaccounted` is what is
left, and must be 0. A question is counted per stream as answered or not, and apart when
it was asked during an outage (between a kill and the killed replica serving again).

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

from devtools.bench.common import machine
from devtools.infra.broker import TansuBroker
from devtools.infra.object_store import ObjectStore
from devtools.stack import Stack, health_target, use_free_ports
from livelens import health
from livelens.client import Ack, Answer, Client, Folded, ItemError, WatchSession
from livelens.config import LivelensConfig, with_settings
from livelens.records import encode_jpeg
from livelens.subscriber import TopicSubscriber
from livelens.v1 import messages_pb2 as pb
from livelens.video import read_frames, sample_video

VIDEOS = ("vtest.avi", "Megamind.avi", "bikes.mp4", "vtest.avi")
FINAL_QUESTIONS, FINAL_QUESTIONS_EVERY_S = 3, 10.0
SETTLE_S = 300.0  # an LLM service this long after its start is warm (its caches full)
SERVICES = ("llm", "encoder", "gateway")


@dataclass
class StreamTally:
    name: str
    acked: set[int] = field(default_factory=set)
    asked: dict[str, float] = field(default_factory=dict)  # request id -> when (s into the run)
    outcome: dict[str, str] = field(default_factory=dict)  # request id -> "answered" or the status
    folds_told: int = 0  # frames the client was told went in folded into another
    encoded: set[int] = field(default_factory=set)  # seqs the tokens topic carries at the end
    errors: Counter[str] = field(default_factory=Counter)
    resumes: int = 0

    @property
    def questions(self) -> int:
        return len(self.asked)

    @property
    def answered(self) -> int:
        return sum(o == "answered" for o in self.outcome.values())


@dataclass
class Soak:
    stack: Stack
    token: str
    minutes: float
    fps: float
    question_every_s: float
    kill_every_s: float
    # service process name -> its health target; "llm", "llm-2", ... with replicas
    targets: dict[str, str] = field(default_factory=dict)
    kill_order: tuple[str, ...] = SERVICES
    kills: list[dict[str, Any]] = field(default_factory=list)
    rss: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    @property
    def gateways(self) -> list[str]:
        return [t for name, t in self.targets.items() if name.startswith("gateway")]

    def outage(self, at_s: float) -> bool:
        """Whether a question asked at `at_s` was asked while a killed replica was down."""
        return any(k["at_s"] <= at_s <= k["at_s"] + k["recovery_s"] for k in self.kills)

    def service_rss_mb(self) -> dict[str, float]:
        """Resident memory of each service (its replicas together) with their children
        (vLLM's engine core), and of the bundled broker (with its object store). The LLM
        service's is also split: its own process and its children, and anonymous memory
        (the heap: caches, tensors) against file-backed pages (mapped libraries and files)."""
        out = dict.fromkeys((*SERVICES, "broker", "llm_main", "llm_children", "llm_anon", "llm_file"), 0.0)
        broker = [p.name for p in self.stack.processes if isinstance(p, (TansuBroker, ObjectStore))]
        for name in [*self.targets, *broker]:
            part = "broker" if name in broker else name.split("-")[0]
            proc = self.stack.process(name).proc
            try:
                root = psutil.Process(proc.pid) if proc else None
                tree = [root, *root.children(recursive=True)] if root else []
                rss = [p.memory_info().rss / 2**20 for p in tree]
                out[part] += sum(rss)
                if part == "llm" and tree:
                    out["llm_main"] += rss[0]
                    out["llm_children"] += sum(rss[1:])
                    anon, file = zip(*(_anon_file_mb(p.pid) for p in tree), strict=True)
                    out["llm_anon"] += sum(anon)
                    out["llm_file"] += sum(file)
            except (psutil.Error, OSError):
                out[part] = float("nan")
        return out

    async def sample_memory(self, t0: float, end: float) -> None:
        while time.monotonic() < end:
            self.rss.append({"t_s": round(time.monotonic() - t0, 1), **self.service_rss_mb()})
            await asyncio.sleep(30)

    async def kill_in_turn(self, t0: float, end: float) -> None:
        turn = 0
        while (due := t0 + (turn + 1) * self.kill_every_s) < end:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            part = self.kill_order[turn % len(self.kill_order)]
            replicas = [n for n in self.targets if n.split("-")[0] == part] or [part]
            name = replicas[(turn // len(self.kill_order)) % len(replicas)]
            turn += 1
            process = self.stack.process(name)
            pid = process.proc.pid  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            print(f"==> soak: killed {name} (pid {pid}) at {killed - t0:.0f}s", flush=True)
            while True:
                proc = process.proc
                if proc is not None and proc.pid != pid and await asyncio.to_thread(process.is_ready):
                    break
                await asyncio.sleep(0.5)
            recovery = time.monotonic() - killed
            self.kills.append({"service": name, "at_s": round(killed - t0, 1), "recovery_s": round(recovery, 2)})
            print(f"==> soak: {name} serving again after {recovery:.1f}s", flush=True)

    async def run_stream(self, tally: StreamTally, frames: list[bytes], end: float, gateway: int) -> None:
        """Frames at their stream time, a question every question_every_s; through gateway
        deaths, resumed through a gateway that serves, after the last acknowledged frame."""
        session_id = ""
        period = 1.0 / self.fps
        started = time.monotonic()
        pending: set[str] = set()
        while time.monotonic() < end:
            async with Client(self.gateways[gateway % len(self.gateways)], self.token) as client:
                try:
                    async with client.watch(tally.name, resume_session_id=session_id) as s:
                        session_id = s.session_id
                        await self._stream_until_broken(s, tally, frames, started, period, end, pending)
                except Exception as exc:  # noqa: BLE001 - a refused or broken call: the gateway is restarting
                    tally.errors[type(exc).__name__] += 1
            if time.monotonic() < end:
                for request_id in pending:  # questions lost with their gateway
                    tally.outcome[request_id] = "UNAVAILABLE"
                pending.clear()
                tally.resumes += 1
                while True:  # the next gateway that serves
                    gateway += 1
                    if await asyncio.to_thread(health.check, self.gateways[gateway % len(self.gateways)]):
                        break
                    await asyncio.sleep(0.5 / len(self.gateways))

    async def _stream_until_broken(self, s: WatchSession, tally: StreamTally, frames: list[bytes], started: float,
                                   period: float, end: float, pending: set[str]) -> None:
        async def listen() -> None:
            async for e in s.events():
                if isinstance(e, Ack):
                    tally.acked.add(e.seq)
                elif isinstance(e, Folded):
                    tally.folds_told += e.frames - 1
                elif isinstance(e, ItemError) and e.request_id in pending:
                    pending.discard(e.request_id)
                    tally.outcome[e.request_id] = e.status
                    tally.errors[e.status] += 1
                elif isinstance(e, Answer) and e.final and e.request_id in pending:
                    pending.discard(e.request_id)
                    tally.outcome.setdefault(e.request_id, "answered")

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
                    tally.asked[request_id] = time.monotonic() - self.t0
                    pending.add(request_id)
                    await s.ask("What do you see now?", request_id=request_id, timeout_s=120)
            if not s.ended:  # the end: the answers still coming, then the frames' count
                # A question waits for its frames at most llm.backpressure.frame_wait_s: a
                # stream whose context is still behind at the end (a replica rebuilding it)
                # is counted by the last of a few final questions, FINAL_QUESTIONS_EVERY_S apart.
                for i in range(FINAL_QUESTIONS):
                    await asyncio.sleep(FINAL_QUESTIONS_EVERY_S)
                    request_id = f"{tally.name}-final-{i}"
                    tally.asked[request_id] = time.monotonic() - self.t0
                    pending.add(request_id)
                    await s.ask("What happened?", request_id=request_id, max_tokens=4, timeout_s=300)
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
    t0 = soak.t0 = time.monotonic()
    end = t0 + soak.minutes * 60
    timings: dict[str, pb.AnswerTimings] = {}
    tenant = soak.stack.cfg.gateway.tokens[soak.token]
    with TopicSubscriber(soak.stack.cfg.kafka, ["responses"], tenant=tenant) as sub:
        await asyncio.gather(soak.sample_memory(t0, end), soak.kill_in_turn(t0, end),
                             *(soak.run_stream(t, clips[t.name], end, i) for i, t in enumerate(tallies)))
        last: dict[str, int] = {}
        for rec in await asyncio.to_thread(lambda: list(sub.records(timeout_s=5))):
            prefix = f"{rec.stream_id}-final-"
            if rec.final and not rec.error and rec.request_id.startswith(prefix):  # each stream's last answered
                i = int(rec.request_id[len(prefix):])
                if i >= last.get(rec.stream_id, -1):
                    last[rec.stream_id], timings[rec.stream_id] = i, rec.timings
    soak.rss.append({"t_s": round(time.monotonic() - t0, 1), **soak.service_rss_mb()})
    encoded = await asyncio.to_thread(encoded_seqs, soak.stack.cfg, tenant, names)
    for t in tallies:
        t.encoded = encoded[t.name]
    return tallies, timings


def encoded_seqs(cfg: LivelensConfig, tenant: str, names: list[str]) -> dict[str, set[int]]:
    """Per stream, the seqs the tokens topic carries (a folded record: every seq it stands
    for): an acknowledged frame missing here was lost before the LLM service; one here but
    unaccounted, in the LLM service."""
    out: dict[str, set[int]] = {n: set() for n in names}
    with TopicSubscriber(cfg.kafka, ["tokens"], from_beginning=True, tenant=tenant) as sub:
        for rec in sub.records(timeout_s=5):
            if rec.stream_id in out:
                out[rec.stream_id].add(rec.seq)
                if rec.HasField("folded"):
                    out[rec.stream_id].update(range(rec.folded.from_seq, rec.folded.to_seq + 1))
    return out


def run_soak(cfg: LivelensConfig, out: Path, minutes: float = 30.0, streams: int = 4, fps: float = 0.5,
             question_every_s: float = 30.0, kill_every_s: float = 300.0, replicas: int = 1) -> int:
    cfg = with_settings(use_free_ports(cfg), {"gateway.proactive_alerts": False})  # the questions asked are counted
    stack = Stack(cfg, Path(tempfile.mkdtemp(prefix="livelens-soak-")))
    stack.start(progress=lambda m: print(f"==> {m}", flush=True))
    token = next(iter(cfg.gateway.tokens))
    soak = Soak(stack, token, minutes, fps, question_every_s, kill_every_s)
    try:
        soak.targets = {service: health_target(cfg, service) for service in SERVICES}
        if cfg.broker.enabled and cfg.broker.storage == "s3":
            # A broker whose log is on disk is killed in its turn too; one whose log is in
            # memory is not: its restart loses the log by design.
            soak.kill_order = (*SERVICES, next(p.name for p in stack.processes if isinstance(p, TansuBroker)))
        for service in SERVICES:
            for _ in range(replicas - 1):
                print(f"==> starting another {service} replica", flush=True)
                process, replica_cfg = stack.add_replica(service)
                soak.targets[process.name] = health_target(replica_cfg, service)
        tallies, timings = asyncio.run(_soak(soak, streams))
    finally:
        stack.stop()
    result = soak_result(soak, tallies, timings, streams, replicas)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out.with_suffix(".png"))
    print(f"\nlivelens bench soak ({minutes:g} min, {streams} streams at {fps:g} fps, {replicas} replica(s) of each "
          f"service, {result['machine']})")
    print(f"  frames acked / accounted for {result['frames_acked']} / {result['frames_accounted']}  "
          f"(unaccounted {result['frames_unaccounted']})")
    print(f"  questions / answered        {result['questions']} / {result['answered']}  errors {result['errors']}")
    print(f"  answered outside outages    {result['answered_outside_outages']} / {result['questions_outside_outages']}"
          f"  (lowest stream {result['answer_rate_outside_outages_min']})")
    for row in result["per_stream"]:
        print(f"    {row['stream']}: acked {row['acked']} = in context {row['in_context']} + folded {row['folded']} "
              f"+ dropped {row['dropped']} + unaccounted {row['unaccounted']} (not encoded: "
              f"{row['acked_not_encoded'] or 'none'});  answered {row['answered']}/"
              f"{row['questions']}, outside outages {row['answered_outside_outages']}/"
              f"{row['questions_outside_outages']}")
        if row["missed"]:
            print("      not answered: " + ", ".join(f"{m['request_id']} asked at {m['asked_at_s']:g} s "
                                                 f"({m['outcome']}{', in an outage' if m['in_outage'] else ''})"
                                                 for m in row["missed"]))
    print(f"  kills {result['kills']}, recovery p50 / max   {result['recovery_s_p50']} / {result['recovery_s_max']} s")
    print(f"  RSS start / end             {result['rss_mb_start']} / {result['rss_mb_end']} MB;  LLM over the last 20 "
          f"min: {result['llm_rss_mb_last_20min']} MB (change {result['llm_rss_change_last_20min']})")
    print(f"  LLM over the last 20 min, while serving: {result['llm_rss_serving_mb_last_20min']} MB (change "
          f"{result['llm_rss_serving_change_last_20min']});  at least {SETTLE_S:g} s after serving again: "
          f"{result['llm_rss_settled_mb_last_20min']} MB (change {result['llm_rss_settled_change_last_20min']})")
    print(f"  written to {out}")
    return 0 if result["frames_unaccounted"] == 0 else 1


def soak_result(soak: Soak, tallies: list[StreamTally], timings: dict[str, pb.AnswerTimings], streams: int,
                replicas: int) -> dict[str, Any]:
    """The run's figures: per stream, every acknowledged frame accounted for (from the LLM
    service's own counts in the last answer's timings) and its questions answered."""
    errors: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    for t in tallies:
        errors.update(t.errors)
        timing = timings.get(t.name)
        seen = timing.frames_seen if timing else 0
        folded = (timing.frames_folded + timing.frames_coalesced) if timing else 0
        dropped = timing.frames_dropped if timing else 0
        outside = [r for r, at in t.asked.items() if not soak.outage(at)]
        answered_outside = sum(t.outcome.get(r) == "answered" for r in outside)
        rows.append({"stream": t.name, "acked": len(t.acked), "in_context": seen - folded - dropped,
                     "folded": folded, "folds_told_to_client": t.folds_told, "dropped": dropped,
                     "unaccounted": len(t.acked) - seen,
                     # where the unaccounted went: acknowledged but never encoded (the first 20)
                     "acked_not_encoded": sorted(t.acked - t.encoded)[:20],
                     "questions": t.questions, "answered": t.answered,
                     "questions_outside_outages": len(outside), "answered_outside_outages": answered_outside,
                     "answer_rate_outside_outages": round(answered_outside / len(outside), 3) if outside else None,
                     "outcomes": dict(Counter(t.outcome.values())), "resumes": t.resumes,
                     # the questions not answered: when asked, and what came back instead
                     "missed": [{"request_id": r, "asked_at_s": round(at, 1), "outcome": t.outcome.get(r, "no reply"),
                                 "in_outage": soak.outage(at)}
                                for r, at in t.asked.items() if t.outcome.get(r) != "answered"],
                     "final_answer": timing is not None})
    recoveries = [k["recovery_s"] for k in soak.kills]
    first, last = soak.rss[0], soak.rss[-1]
    # The LLM service's memory over the last 20 min, three ways: every sample it is running
    # in (a process still loading its model included), only those once it serves again after
    # a kill, and only those once it has been serving for SETTLE_S (its caches full to their
    # budgets: growth by design, not a leak).
    llm_kills = [(0.0, 0.0)] + [(k["at_s"], k["recovery_s"]) for k in soak.kills if k["service"].startswith("llm")]

    def serving_for(t_s: float) -> float:
        killed, recovery = max(k for k in llm_kills if k[0] <= t_s)
        return t_s - killed - recovery

    late = [r for r in soak.rss if r["t_s"] >= last["t_s"] - 20 * 60 and r["llm"] == r["llm"]]  # NaN: not running
    llm_late = [r["llm"] for r in late]
    serving = [r["llm"] for r in late if serving_for(r["t_s"]) >= 0]
    settled = [r["llm"] for r in late if serving_for(r["t_s"]) >= SETTLE_S]
    rates = [r["answer_rate_outside_outages"] for r in rows if r["answer_rate_outside_outages"] is not None]
    return {
        "minutes": soak.minutes, "streams": streams, "replicas": replicas, "fps": soak.fps,
        "question_every_s": soak.question_every_s, "kill_every_s": soak.kill_every_s,
        "frames_acked": sum(r["acked"] for r in rows),
        "frames_accounted": sum(r["acked"] - r["unaccounted"] for r in rows),
        "frames_unaccounted": sum(abs(r["unaccounted"]) for r in rows),
        "frames_folded": sum(r["folded"] for r in rows), "frames_dropped": sum(r["dropped"] for r in rows),
        "frames_held": sum(timings[t.name].held_frames for t in tallies if t.name in timings),
        "questions": sum(r["questions"] for r in rows), "answered": sum(r["answered"] for r in rows),
        "questions_outside_outages": sum(r["questions_outside_outages"] for r in rows),
        "answered_outside_outages": sum(r["answered_outside_outages"] for r in rows),
        "answer_rate_outside_outages_min": min(rates) if rates else None,
        "errors": dict(errors), "resumes": sum(t.resumes for t in tallies),
        "kills": len(soak.kills), "kill_log": soak.kills,
        "recovery_s_p50": round(statistics.median(recoveries), 2) if recoveries else None,
        "recovery_s_max": max(recoveries) if recoveries else None,
        "rss_mb_start": round(sum(first[k] for k in (*SERVICES, "broker")), 1),
        "rss_mb_end": round(sum(last[k] for k in (*SERVICES, "broker")), 1),
        **_spread("llm_rss", llm_late), **_spread("llm_rss_serving", serving),
        **_spread("llm_rss_settled", settled),
        "settle_s": SETTLE_S,
        "rss": soak.rss, "per_stream": rows,
        "machine": machine(), "unix_time": int(time.time()),
    }


def _spread(name: str, mb: list[float]) -> dict[str, Any]:
    """`<name>_mb_last_20min`: [min, max]; `<name>_change_last_20min`: max / min - 1."""
    return {f"{name}_mb_last_20min": [round(min(mb), 1), round(max(mb), 1)] if mb else None,
            f"{name}_change_last_20min": round(max(mb) / min(mb) - 1, 3) if mb else None}


def _anon_file_mb(pid: int) -> tuple[float, float]:
    """A process's resident anonymous and file-backed memory, MB (Linux /proc; 0 for a
    process that has died and is not reaped yet: its status has no memory lines)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    anon, file = (int(fields.get(f, "0 kB").split()[0]) / 1024 for f in ("RssAnon", "RssFile"))
    return anon, file


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in (*SERVICES, "broker"):
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
