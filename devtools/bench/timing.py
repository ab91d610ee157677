"""`livelens bench timing`: does the service speak up at the right moment, about the
right thing, and stay quiet otherwise?

Footage with known ground truth: a real video at `fps`, looped to `minutes`, with still
images the model recognises cut in at known times for 3-10 s (a cat, a squirrel, ...),
and the events list (onset, end, label) that says so. `--video FILE --events FILE` scores
any footage with its own events instead.

Each method watches the same footage through the whole running stack, in real time, on a
stream of its own, one after another:

- `decider`: the standing instruction "a <label> appears" per label, registered before
  the stream starts; its alerts.
- `novelty`: the encoder's scene-change alerts (the gateway's novelty decider) on the
  decider's stream; an alert counts for the labels its remark names.
- `commentary`: a question every `interval_s` ("What do you see now?"), StreamingVLM's
  per-chunk commentary; an answer counts for the labels it names.
- `poll`: each label's instruction as a question every `interval_s` ("Does the newest
  frame show a cat? Answer Yes or No."); a Yes counts for that label.

Scoring, as the anchors do: an alert is a hit when it names an event's label and comes
within `window_s` (2 s, StreamingBench) after the event's onset; each event takes its
first hit. An alert's time is, as in the benchmarks, the stream time of the frame it was
decided on; the same scores are also given with an alert timed by when the client got
it ("arrival": the remark's generation and the relay on top, what a user of the live
service waits for; the stream runs in real time). Precision (hits over alerts), recall
(events hit), F1; the delay of each hit from its event's onset (TimeDiff: median and
mean); the other alerts per 10 minutes;
PAUC (ProactiveBench's area under the response curve): per event, the share of its span
[onset, end] after its first correct alert (exact match of the label), averaged over events.

The decider's cost, from the LLM service's own counters: its checks' milliseconds per
frame per instruction, next to a frame's prefill milliseconds.

Written to bench/results/timing.json and a PNG timeline.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devtools.bench.common import machine
from devtools.stack import Stack, use_free_ports
from livelens.client import Alert, Answer, Client
from livelens.config import LivelensConfig
from livelens.records import encode_jpeg
from livelens.video import read_frames, sample_video
from services.common.labels import names_label, with_article

# Images whose class the vision model's classifier names (its top classes that the label
# names sum to 0.9-1.0 over the cut-in frames; a scooter's to 0.4 and a coffee cup's to 0:
# left out), and the everyday words a remark may use for them.
EVENT_IMAGES = {
    "cat": ("skimage:chelsea.png", ("cat", "kitten")),
    "squirrel": ("opencv:squirrel_cls.jpg", ("squirrel",)),
    "baboon": ("opencv:baboon.jpg", ("baboon", "monkey")),
    "orange": ("opencv:orange.jpg", ("orange",)),
}
METHODS = ("decider", "novelty", "commentary", "poll")
COMMENTARY_QUESTION = "What do you see now? Answer in a few words."
POLL_QUESTION = "Does the newest frame show {what}? Answer Yes or No."


@dataclass(frozen=True, order=True)
class Event:
    onset_s: float
    end_s: float
    label: str


@dataclass(frozen=True)
class Said:
    """Something a method said about these labels: `t` is when the client got it, in
    stream time (the seconds since the stream's first frame was sent, in real time);
    `frame_t` the stream time of the frame it was decided on."""

    t: float
    labels: tuple[str, ...]
    text: str
    frame_t: float


@dataclass
class Footage:
    name: str
    frames: list[bytes]  # JPEG, at `fps`
    fps: float
    events: list[Event]


def load_events(path: str | Path) -> list[Event]:
    """A JSON list of {"onset": s, "end": s, "label": "..."}, or CSV lines onset,end,label."""
    text = Path(path).read_text()
    try:
        rows = json.loads(text)
        return sorted(Event(float(r["onset"]), float(r["end"]), str(r["label"])) for r in rows)
    except json.JSONDecodeError:
        out = []
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and not line.lstrip().startswith("#"):
                try:
                    out.append(Event(float(parts[0]), float(parts[1]), parts[2]))
                except ValueError:
                    continue  # a header
        return sorted(out)


def make_footage(video: str, minutes: float, fps: float, seed: int = 0) -> Footage:
    """`video` looped to `minutes`, with an event image cut in every 30-60 s for 3-10 s."""
    from devtools.train.data import image_path, needle_frames

    background = [f.rgb for f in read_frames(sample_video(video), fps)]
    n = int(minutes * 60 * fps)
    frames = [background[i % len(background)] for i in range(n)]
    rng = random.Random(seed)
    labels = list(EVENT_IMAGES)
    rng.shuffle(labels)
    events: list[Event] = []
    t = 20.0 + rng.uniform(0, 10)
    while True:
        length = rng.uniform(3.0, 10.0)
        if t + length > n / fps - 5:
            break
        label = labels[len(events) % len(labels)]
        first, count = int(round(t * fps)), int(round(length * fps))
        zoom = needle_frames(image_path(EVENT_IMAGES[label][0]), 6)  # a slow zoom in and out again
        frames[first:first + count] = [zoom[5 - abs(5 - i % 10)] for i in range(count)]
        events.append(Event(first / fps, (first + count) / fps, label))
        t += length + rng.uniform(30.0, 60.0)
    return Footage(video, [encode_jpeg(f) for f in frames], fps, events)


def footage_from(video: str, events_file: str, fps: float, minutes: float | None) -> Footage:
    frames = [encode_jpeg(f.rgb) for f in read_frames(video, fps, max_seconds=minutes * 60 if minutes else None)]
    return Footage(Path(video).name, frames, fps, load_events(events_file))


def words_of(label: str) -> tuple[str, ...]:
    return EVENT_IMAGES[label][1] if label in EVENT_IMAGES else (label,)


def named(text: str, labels: list[str]) -> tuple[str, ...]:
    return tuple(label for label in labels if any(names_label(text, w) for w in words_of(label)))


# --------------------------------------------------------------------------- scoring


def score(events: list[Event], said: list[Said], minutes: float, window_s: float = 2.0,
          by: str = "frame") -> dict[str, Any]:
    """The anchors' scores, each alert timed `by` the stream time of the frame it was
    decided on ("frame": the benchmarks' own way, where the model answers at a frame of
    the video) or by when the client got it ("arrival": also the remark's generation and
    the relay, what a user of the live service waits for)."""
    def at(s: Said) -> float:
        return s.frame_t if by == "frame" else s.t

    first_hit: dict[int, float] = {}
    hits = 0
    for s in sorted(said, key=at):
        matched = False
        for i, e in enumerate(events):
            if e.label in s.labels and e.onset_s <= at(s) <= e.onset_s + window_s:
                matched = True
                first_hit.setdefault(i, at(s))
        hits += matched
    precision = hits / len(said) if said else 0.0
    recall = len(first_hit) / len(events) if events else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    delays = [first_hit[i] - events[i].onset_s for i in sorted(first_hit)]
    pauc = []
    for e in events:
        correct = [at(s) for s in said if e.label in s.labels and e.onset_s <= at(s) <= e.end_s]
        span = max(e.end_s - e.onset_s, 1e-6)
        pauc.append(max(0.0, e.end_s - min(correct)) / span if correct else 0.0)
    return {"precision": precision, "recall": recall, "f1": f1,
            "delay_median_s": statistics.median(delays) if delays else None,
            "delay_mean_s": statistics.fmean(delays) if delays else None,
            "false_alerts_per_10min": (len(said) - hits) / minutes * 10 if minutes else None,
            "pauc": statistics.fmean(pauc) if pauc else 0.0, "alerts": len(said), "hits": hits}


def scores(events: list[Event], said: list[Said], minutes: float, window_s: float = 2.0) -> dict[str, Any]:
    """Timed by the decided frame, with the same timed by arrival under "arrival"."""
    return {**score(events, said, minutes, window_s), "arrival": score(events, said, minutes, window_s, "arrival")}


# --------------------------------------------------------------------------- running


@dataclass
class Run:
    said: dict[str, list[Said]] = field(default_factory=dict)  # method -> what it said
    wall_s: float = 0.0
    lag_s: float = 0.0  # how far behind real time the sending fell (the stack kept up when ~0)


async def stream_footage(client: Client, name: str, footage: Footage, labels: list[str], method: str,
                         interval_s: float) -> Run:
    run = Run(said={method: []} if method != "decider" else {"decider": [], "novelty": []})
    async with client.watch(name) as session:
        ids: dict[str, str] = {}
        if method == "decider":
            for label in labels:
                ids[await session.add_instruction(f"{with_article(label)} appears")] = label
        polls: dict[str, tuple[str, float]] = {}  # request id -> (label or "", asked at)

        t0 = time.monotonic()  # reset when the first frame goes

        async def listen() -> None:
            texts: dict[str, str] = {}
            async for e in session.events():
                now = time.monotonic() - t0
                if isinstance(e, Alert) and e.reason == "instruction" and e.instruction_id in ids:
                    run.said["decider"].append(Said(now, (ids[e.instruction_id],), e.text, e.stream_time_s))
                elif isinstance(e, Alert) and e.reason == "scene_change" and "novelty" in run.said:
                    run.said["novelty"].append(Said(now, named(e.text, labels), e.text, e.stream_time_s))
                elif isinstance(e, Answer) and e.request_id in polls:
                    texts[e.request_id] = texts.get(e.request_id, "") + e.text
                    if e.final:
                        label, _ = polls.pop(e.request_id)
                        text = texts.pop(e.request_id).strip()
                        if method == "poll":
                            if text.lower().lstrip("\"'").startswith("yes"):
                                run.said["poll"].append(Said(now, (label,), text, e.stream_time_s))
                        else:
                            run.said["commentary"].append(Said(now, named(text, labels), text, e.stream_time_s))

        listener = asyncio.create_task(listen())
        t0 = time.monotonic()
        next_poll = interval_s
        for seq, image in enumerate(footage.frames):
            pts = seq / footage.fps
            run.lag_s = max(run.lag_s, time.monotonic() - (t0 + pts))
            await asyncio.sleep(max(0.0, t0 + pts - time.monotonic()))
            await session.send_frame(seq, pts, image)
            if method in ("commentary", "poll") and pts >= next_poll:
                next_poll += interval_s
                questions = ([("", COMMENTARY_QUESTION)] if method == "commentary" else
                             [(label, POLL_QUESTION.format(what=with_article(label))) for label in labels])
                for label, question in questions:
                    rid = await session.ask(question, max_tokens=2 if method == "poll" else 16, timeout_s=60)
                    polls[rid] = (label, pts)
        await asyncio.sleep(10)  # the last frames' checks and answers
        run.wall_s = time.monotonic() - t0
        listener.cancel()
    for said in run.said.values():
        said[:] = [s for s in said if s.labels] if method != "decider" else said
    return run


def llm_counters(cfg: LivelensConfig) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{cfg.llm.health_host}:{cfg.llm.metrics_port}/metrics",
                                  timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def print_table(methods: list[dict[str, Any]]) -> None:
    def secs(v: float | None) -> str:
        return f"{v:.2f}" if v is not None else "-"

    print(f"\n{'':10s} {'timed by the decided frame':^48s} | {'timed by arrival':^22s}")
    print(f"{'method':10s} {'P':>5s} {'R':>5s} {'F1':>5s} {'delay p50':>9s} {'mean':>6s} {'false/10m':>9s} "
          f"{'PAUC':>5s} | {'F1':>5s} {'delay p50':>9s} {'false/10m':>9s}")
    for m in methods:
        a = m["arrival"]
        print(f"{m['name']:10s} {m['precision']:5.2f} {m['recall']:5.2f} {m['f1']:5.2f} "
              f"{secs(m['delay_median_s']):>9s} {secs(m['delay_mean_s']):>6s} {m['false_alerts_per_10min']:9.1f} "
              f"{m['pauc']:5.2f} | {a['f1']:5.2f} {secs(a['delay_median_s']):>9s} {a['false_alerts_per_10min']:9.1f}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    videos = result["videos"]
    fig, axes = plt.subplots(len(videos), 1, figsize=(12, 2.2 + 1.2 * len(METHODS) * len(videos) / 2),
                             squeeze=False)
    for ax, video in zip(axes[:, 0], videos, strict=True):
        for e in video["events"]:
            ax.axvspan(e["onset_s"], e["end_s"], color="tab:green", alpha=0.25)
            ax.text(e["onset_s"], len(METHODS) - 0.4, e["label"], fontsize=7)
        for row, method in enumerate(METHODS):
            said = video["said"].get(method, [])
            color = f"C{row}"
            ax.scatter([s["frame_t"] for s in said], [row + 0.2] * len(said), marker="v", s=18, color=color)
            ax.scatter([s["t"] for s in said], [row] * len(said), marker="|", s=120, color=color)
        ax.set_yticks(range(len(METHODS)), METHODS)
        ax.set_xlabel("stream time (s): ▼ the frame it was decided on, | when the client got it")
        ax.set_title(f"{video['name']}: events (green) and what each method said")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_timing(cfg: LivelensConfig, out: Path, videos: list[str], minutes: float, fps: float = 2.0,
               events_file: str | None = None, interval_s: float = 2.0, window_s: float = 2.0,
               methods: tuple[str, ...] = METHODS) -> int:
    cfg = use_free_ports(cfg)
    token = next(iter(cfg.gateway.tokens), "")
    all_footage = ([footage_from(videos[0], events_file, fps, minutes)] if events_file else
                   [make_footage(v, minutes, fps, seed=i) for i, v in enumerate(videos)])
    runs = [m for m in ("decider", "commentary", "poll") if m in methods or (m == "decider" and "novelty" in methods)]
    result: dict[str, Any] = {"machine": machine(), "fps": fps, "minutes": minutes, "window_s": window_s,
                              "scorer": cfg.llm.instructions.scorer,
                              "interval_s": interval_s, "videos": []}
    with tempfile.TemporaryDirectory(prefix="livelens-timing-") as tmp:
        stack = Stack(cfg, Path(tmp))
        stack.start(progress=lambda m: print(f"==> {m}", flush=True))
        try:
            before = llm_counters(cfg)
            for footage in all_footage:
                labels = sorted({e.label for e in footage.events})
                said: dict[str, list[Said]] = {}
                lag = {}
                print(f"==> {footage.name}: {len(footage.frames) / fps / 60:.1f} min, {len(footage.events)} events "
                      f"({', '.join(labels)})", flush=True)

                async def one(method: str, footage: Footage = footage, labels: list[str] = labels) -> Run:
                    async with Client(stack.gateway_target, token) as client:
                        return await stream_footage(client, f"timing-{method}-{time.time_ns()}", footage, labels,
                                                    method, interval_s)

                for method in runs:
                    print(f"==>   {method} ...", flush=True)
                    r = asyncio.run(one(method))
                    said.update(r.said)
                    lag[method] = r.lag_s
                video_minutes = len(footage.frames) / fps / 60
                per_method = {m: scores(footage.events, said.get(m, []), video_minutes, window_s) for m in methods}
                for m, s in per_method.items():
                    print(f"      {m:10s} F1 {s['f1']:.2f} (P {s['precision']:.2f}, R {s['recall']:.2f}), delay "
                          f"median {s['delay_median_s']}, false/10 min {s['false_alerts_per_10min']:.1f}, "
                          f"PAUC {s['pauc']:.2f}", flush=True)
                result["videos"].append({"name": footage.name, "events": [asdict(e) for e in footage.events],
                                         "scores": per_method, "send_lag_s": lag,
                                         "said": {m: [asdict(s) for s in v] for m, v in said.items()}})
            after = llm_counters(cfg)
        finally:
            stack.stop()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    checks = delta("livelens_llm_instructions_checks_total")
    check_frames = delta("livelens_llm_instructions_frames_total")
    ingested = delta("livelens_llm_kv_frames_ingested_total")
    verify_ms = 1000 * delta("livelens_llm_instructions_check_s") / checks if checks else None
    prefill_ms = 1000 * delta("livelens_llm_kv_ingest_s") / ingested if ingested else None
    # All videos scored as one: each video's times after the previous ones'.
    events: list[Event] = []
    pooled: dict[str, list[Said]] = {m: [] for m in methods}
    offset = 0.0
    for footage, video in zip(all_footage, result["videos"], strict=True):
        events += [Event(e.onset_s + offset, e.end_s + offset, e.label) for e in footage.events]
        for m in methods:
            pooled[m] += [Said(x["t"] + offset, tuple(x["labels"]), x["text"], x["frame_t"] + offset)
                          for x in video["said"].get(m, [])]
        offset += len(footage.frames) / fps + 1000.0
    total_minutes = sum(len(f.frames) / fps / 60 for f in all_footage)
    result["methods"] = [{"name": m, **scores(events, pooled[m], total_minutes, window_s)} for m in methods]
    result["events"] = len(events)
    result["verify_ms_per_frame"] = verify_ms  # per instruction
    result["checks_per_frame"] = checks / check_frames if check_frames else None
    result["prefill_ms_per_frame"] = prefill_ms
    result["verify_share_of_prefill"] = verify_ms / prefill_ms if verify_ms and prefill_ms else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print_table(result["methods"])
    if verify_ms is not None and prefill_ms is not None:
        print(f"\ndecider: {verify_ms:.1f} ms a check (per frame per instruction; {result['checks_per_frame']:.1f} "
              f"checks a frame) vs a frame's prefill {prefill_ms:.1f} ms: {100 * verify_ms / prefill_ms:.0f}%")
    print(f"written to {out} and {out.with_suffix('.png')}")
    return 0
