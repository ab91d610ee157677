"""Stream a video through the gateway, ask questions at stream times, collect what comes back.

Shared by `livelens watch`, the `livelens up` demo, the e2e benchmark and the tests, so
all of them exercise the same client path.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from livelens.client import Ack, Alert, Answer, Client, Event, Folded, ItemError
from livelens.records import encode_jpeg
from livelens.video import CutIn, read_frames


@dataclass(frozen=True)
class ScheduledQuestion:
    at_s: float
    text: str

    @staticmethod
    def parse(spec: str) -> ScheduledQuestion:
        """"SECONDS:QUESTION", e.g. "12.5:What is the man holding?"."""
        at, sep, text = spec.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1.0
        if not sep or seconds < 0 or not text.strip():
            raise ValueError(f"--ask expects SECONDS:QUESTION (e.g. 10:What happened?), got {spec!r}")
        return ScheduledQuestion(seconds, text.strip())


@dataclass
class AnswerRecord:
    question: str
    asked_at_s: float
    asked_unix: float
    text: str = ""
    stream_time_s: float = 0.0
    ttft_s: float = 0.0  # measured by the client: question sent -> first delta received
    server_ttft_s: float = 0.0  # the engine's own submit -> first token
    done: bool = False


@dataclass
class WatchReport:
    frames_sent: int = 0
    frames_acked: int = 0
    wall_s: float = 0.0
    answers: dict[str, AnswerRecord] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    remarks: dict[str, str] = field(default_factory=dict)  # alert request id -> the model's remark about it
    errors: list[ItemError] = field(default_factory=list)
    folds: list[Folded] = field(default_factory=list)  # acknowledged frames that went in folded into one
    instructions: dict[str, str] = field(default_factory=dict)  # id -> text, registered before the first frame
    send_unix: dict[int, float] = field(default_factory=dict)
    ack_unix: dict[int, float] = field(default_factory=dict)


class ConsolePrinter:
    """Prints answers as they stream and alerts as they come, under a progress bar.

    While an answer streams, the bar is cleared and its updates held back, so the
    answer's deltas form one clean line in the terminal."""

    def __init__(self, total_frames: int | None, quiet: bool = False) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_frames, unit="frame", desc="streaming", disable=quiet,
                        file=sys.stderr, dynamic_ncols=True)
        self.open_answer: str | None = None
        self.held_frames = 0
        self.skipped: set[str] = set()

    def _line(self, text: str) -> None:
        with self.bar.external_write_mode():
            sys.stdout.write(text)
            sys.stdout.flush()

    def frame_sent(self) -> None:
        if self.open_answer is None:
            self.bar.update(1)
        else:
            self.held_frames += 1

    def notice(self, text: str) -> None:
        self._line(f"==> {text}\n")

    def asked(self, q: AnswerRecord) -> None:
        self._line(f"[{q.asked_at_s:6.1f}s] Q: {q.question}\n")

    def event(self, event: Event, report: WatchReport) -> None:
        if isinstance(event, Answer) and event.request_id in report.remarks:  # what the model says of an alert
            if event.final:
                self._line(f"[{event.stream_time_s:6.1f}s]   ...  {report.remarks[event.request_id].strip()}\n")
            return
        if isinstance(event, Answer):
            rec = report.answers.get(event.request_id)
            if rec is None:
                return
            if self.open_answer not in (None, event.request_id):
                self.skipped.add(event.request_id)  # overlaps the answer on screen
            if event.request_id in self.skipped:
                if event.final:  # it overlapped another answer: print it whole now
                    self.skipped.discard(event.request_id)
                    self._line(f"[{event.stream_time_s:6.1f}s] A: {rec.text.strip()}\n")
                return
            if self.open_answer is None:
                self.bar.clear()
                sys.stdout.write(f"[{event.stream_time_s:6.1f}s] A: ")
                self.open_answer = event.request_id
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if event.final:
                sys.stdout.write(f"\n          (about stream time {event.stream_time_s:.1f}s; "
                                 f"first token after {rec.ttft_s:.2f}s)\n")
                self.open_answer = None
                self.bar.update(self.held_frames)
                self.held_frames = 0
                self.bar.refresh()
        elif isinstance(event, Alert):
            what = report.instructions.get(event.instruction_id, event.reason)
            self._line(f"[{event.stream_time_s:6.1f}s] ALERT ({what}, score {event.score:.2f}): {event.text}\n")
        elif isinstance(event, ItemError):
            self._line(f"[error] {event.status}: {event.message}\n")
        elif isinstance(event, Folded):
            why = "the encoder was behind" if event.reason == "encoder_behind" else "the context was behind"
            self._line(f"[{event.to_pts_s:6.1f}s] frames {event.from_seq}-{event.to_seq} "
                       f"({event.from_pts_s:.1f}-{event.to_pts_s:.1f}s) went in folded into one: {why}\n")

    def close(self) -> None:
        self.bar.close()


async def watch_video(
    client: Client,
    source: str | os.PathLike[str],
    stream_id: str,
    fps: float,
    questions: list[ScheduledQuestion],
    realtime: bool = True,
    max_seconds: float | None = None,
    printer: ConsolePrinter | None = None,
    on_event: Callable[[Event], None] | None = None,
    answer_timeout_s: float = 120.0,
    notify: list[str] | None = None,
    linger_s: float = 0.0,
    cut_in: CutIn | None = None,
) -> WatchReport:
    """`notify`: standing instructions registered before the first frame ("a car appears");
    their alerts are in the report. `linger_s`: seconds to keep listening after the last
    frame (an alert for the last frames comes after them). `cut_in`: a still image sent
    instead of the video for a while."""
    report = WatchReport()
    pending = sorted(questions, key=lambda q: q.at_s)
    async with client.watch(stream_id) as session:
        for text in notify or []:
            report.instructions[await session.add_instruction(text)] = text
            if printer:
                printer.notice(f"watching for: {text}")
        start = time.monotonic()
        events = session.events()

        async def consume() -> None:
            async for event in events:
                now = time.time()
                if isinstance(event, Answer) and event.request_id in report.remarks:
                    report.remarks[event.request_id] += event.text
                elif isinstance(event, Answer):
                    rec = report.answers.get(event.request_id)
                    if rec is not None:
                        if not rec.text and not rec.ttft_s:
                            rec.ttft_s = now - rec.asked_unix
                        rec.text += event.text
                        rec.stream_time_s = event.stream_time_s
                        if event.final:
                            rec.done = True
                            rec.server_ttft_s = event.ttft_s
                elif isinstance(event, Alert):
                    report.alerts.append(event)
                    report.remarks.setdefault(event.request_id, "")
                elif isinstance(event, ItemError):
                    report.errors.append(event)
                    if event.request_id in report.answers:
                        report.answers[event.request_id].done = True
                elif isinstance(event, Folded):
                    report.folds.append(event)
                elif isinstance(event, Ack):
                    report.frames_acked += 1
                    report.ack_unix[event.seq] = now
                if printer:
                    printer.event(event, report)
                if on_event:
                    on_event(event)

        consumer = asyncio.create_task(consume())

        async def ask(q: ScheduledQuestion) -> None:
            rec = AnswerRecord(q.text, q.at_s, time.time())
            request_id = f"q-{len(report.answers)}-{int(rec.asked_unix * 1000) % 100000}"
            report.answers[request_id] = rec
            if printer:
                printer.asked(rec)
            await session.ask(q.text, request_id=request_id)

        frames = read_frames(source, fps, max_seconds=max_seconds)
        for seq, frame in enumerate(cut_in.apply(frames) if cut_in else frames):
            while pending and pending[0].at_s <= frame.pts_s:
                await ask(pending.pop(0))
            if realtime:
                delay = start + frame.pts_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            report.send_unix[seq] = time.time()
            await session.send_frame(seq, frame.pts_s, encode_jpeg(frame.rgb))
            report.frames_sent += 1
            if printer:
                printer.frame_sent()
        for q in pending:  # asked after the end of the video: about everything seen
            await ask(q)
        deadline = time.monotonic() + answer_timeout_s
        while time.monotonic() < deadline and (
            report.frames_acked + len([e for e in report.errors if e.seq]) < report.frames_sent
            or not all(a.done for a in report.answers.values())
        ):
            await asyncio.sleep(0.05)
        await asyncio.sleep(linger_s)
    await asyncio.wait_for(consumer, 10)
    report.wall_s = time.monotonic() - start
    return report
