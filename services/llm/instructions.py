"""Standing instructions and the decider that watches for them.

A client registers "tell me when a car appears" on a stream; the stream's owner in the
LLM service holds it (`InstructionSet`, also in the stream's checkpoint) and checks every
new frame against it where the frame's KV already is: one forward pass of a yes/no
question ("Does the newest frame show a car? Answer Yes or No.") after the stream's sink
and window, read as P(yes) from the first answer token's log-probabilities, without
generating (LiveStar's verification, MMDuet's per-frame relevance score). The checks of
one frame, for all its stream's instructions, go to the engine at once, and those of
other streams beside them: vLLM batches the one-token requests into its steps.

An instruction fires when P(yes) reaches `llm.instructions.fire`; it fires again only
after P(yes) fell under `llm.instructions.rearm` (hysteresis) and `llm.instructions.cooldown_s`
of stream time passed. A firing is published at once as a proactive response with the
instruction id, the score and what matched (the gateway turns it into an `Alert`); the
model's short remark about it streams after it under the same request id (`remark`), so
the alert never waits for generation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from livelens.config import LLMConfig
from livelens.identity import split_key
from livelens.v1 import messages_pb2 as pb
from services.common.labels import question_names_tag, words_naming_classes
from services.llm.context import FrameSegment

if TYPE_CHECKING:
    from services.llm.stream import Stream

log = logging.getLogger("livelens.llm.instructions")

# How people phrase an instruction before its subject: "tell me when a truck arrives".
LEAD_INS = ("tell me when", "tell me if", "let me know when", "let me know if", "notify me when", "alert me when",
            "say when", "say if", "warn me when", "watch for", "look out for", "when", "if")
# ... and after it: "a car appears" is checked as "Does the newest frame show a car?"
ARRIVALS = ("appears", "arrives", "shows up", "turns up", "comes in", "comes into view", "enters",
            "is visible", "is seen", "is there", "can be seen")
ANSWER_LOGPROBS = 20  # first-token alternatives read for P(yes)


def subject(text: str) -> str:
    """What an instruction watches for, to go into the check question: its text without
    a lead-in, an arrival verb and final punctuation ("Tell me when a car appears." -> "a car")."""
    what = " ".join(text.split()).rstrip(".!?")
    for lead in LEAD_INS:
        if what.lower().startswith(lead + " "):
            what = what[len(lead) + 1:]
            break
    for arrival in ARRIVALS:
        if what.lower().endswith(" " + arrival):
            return what[:-len(arrival) - 1]
    return what


class InstructionError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Watched:
    """One instruction and where its decider stands."""

    instruction: pb.StandingInstruction
    what: str
    by_tags: bool = False  # scored by the classifier's tags, not the LLM (llm.instructions.scorer)
    armed: bool = True  # P(yes) was under the re-arm level since the last firing (or never fired)
    fired_pts: float | None = None
    score: float = 0.0  # the last P(yes)
    checked_at: float = 0.0  # monotonic time of its last check: the least recently checked go first


@dataclass
class InstructionSet:
    """A stream's standing instructions, oldest first, and its check budget."""

    cfg: LLMConfig
    items: OrderedDict[str, Watched] = field(default_factory=OrderedDict)
    budget: float = 0.0  # checks available now (a token bucket of instruction_checks_per_s)
    refilled: float = field(default_factory=time.monotonic)

    def add(self, instruction: pb.StandingInstruction) -> None:
        if instruction.instruction_id in self.items:
            raise InstructionError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"instruction id {instruction.instruction_id!r} exists on this stream")
        if len(self.items) >= self.cfg.instructions.max_per_stream:
            raise InstructionError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the stream has {len(self.items)} instructions, the most "
                                   "llm.instructions.max_per_stream allows: cancel one first")
        self.items[instruction.instruction_id] = self._watched(instruction)
        self.budget = max(self.budget, 1.0)  # checked from the next frame on

    def cancel(self, instruction_id: str) -> None:
        if self.items.pop(instruction_id, None) is None:
            raise InstructionError(grpc.StatusCode.NOT_FOUND, f"no instruction {instruction_id!r} on this stream")

    def protos(self) -> list[pb.StandingInstruction]:
        return [w.instruction for w in self.items.values()]

    def restore(self, instructions: list[pb.StandingInstruction]) -> None:
        self.items = OrderedDict((i.instruction_id, self._watched(i)) for i in instructions)

    def _watched(self, instruction: pb.StandingInstruction) -> Watched:
        what = subject(instruction.text)
        scorer = self.cfg.instructions.scorer
        return Watched(instruction, what, by_tags=scorer == "tags" or (scorer == "auto" and
                                                                       bool(words_naming_classes(what))))

    def due(self, now: float) -> list[Watched]:
        """The instructions to check on a new frame, within the budget: the least recently
        checked first (with more instructions than checks a second, they take turns)."""
        rate = self.cfg.instructions.checks_per_s
        self.budget = min(max(rate, len(self.items)), self.budget + (now - self.refilled) * rate)
        self.refilled = now
        n = min(len(self.items), math.floor(self.budget + 1e-9))
        picked = sorted(self.items.values(), key=lambda w: w.checked_at)[:n]
        self.budget -= n
        for w in picked:
            w.checked_at = now
        return picked

    def observe(self, w: Watched, score: float, pts_s: float) -> bool:
        """The check of `w` on the frame at `pts_s` said P(yes) = `score`: fire?"""
        c = self.cfg
        w.score = score
        if not w.armed:
            w.armed = score < c.instructions.rearm
            return False
        cooling = w.fired_pts is not None and pts_s - w.fired_pts < c.instructions.cooldown_s
        if score >= c.instructions.fire and not cooling:
            w.armed, w.fired_pts = False, pts_s
            return True
        return False


def tag_evidence(frame: FrameSegment | None, what: str) -> float:
    """The classifier's probability that `frame` shows `what`: the summed probability of
    its top classes that `what` names ("a cat": Egyptian cat, tabby cat, ...)."""
    if frame is None:
        return 0.0
    return min(1.0, sum(p for tag, p in frame.scored_tags() if question_names_tag(what, tag)))


class YesNo:
    """P(yes) of a yes/no answer from the first token's top log-probabilities: the mass of
    the tokens spelling "Yes" against that of those spelling "No" (other tokens ignored)."""

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self.yes = {encode(w)[0] for w in ("Yes", " Yes", "yes", " yes", "YES")}
        self.no = {encode(w)[0] for w in ("No", " No", "no", " no", "NO")}

    def p_yes(self, logprobs: dict[int, float]) -> float:
        yes = sum(math.exp(lp) for t, lp in logprobs.items() if t in self.yes)
        no = sum(math.exp(lp) for t, lp in logprobs.items() if t in self.no)
        return yes / (yes + no) if yes + no > 0 else 0.0


@dataclass
class CheckStats:
    frames: int = 0  # frames checked (each against all its due instructions at once)
    checks: int = 0  # instruction checks
    check_s: float = 0.0  # wall time of the frames' checks, all instructions of a frame together
    skipped: int = 0  # new frames not checked: their stream's checks were still running (coalesced)
    alerts: int = 0
    remark_s: float = 0.0  # generating the firings' remarks
    errors: int = 0


class InstructionChecker:
    """Runs the checks of new frames and the remarks of firings, one task per stream (the
    stream holds it: `Stream.check_task`, `Stream.check_next`): a
    frame that arrives while its stream's checks run waits as the stream's next one (a
    newer frame replaces it, counted as skipped), so checks never queue up behind video."""

    def __init__(self, cfg: LLMConfig, yes_no: YesNo, publish: Callable[[pb.ResponseRecord], None]) -> None:
        self.cfg = cfg
        self.yes_no = yes_no
        self.publish = publish
        self.stats = CheckStats()

    def frame_added(self, stream: Stream, seq: int, pts_s: float) -> None:
        if not stream.instructions.items:
            return
        if stream.check_next is not None:
            self.stats.skipped += 1
        stream.check_next = (seq, pts_s)
        if stream.check_task is None or stream.check_task.done():
            stream.check_task = asyncio.get_running_loop().create_task(self._run(stream))

    async def _run(self, stream: Stream) -> None:
        key = stream.stream_id
        while (frame := stream.check_next) is not None:
            stream.check_next = None
            try:
                await self.check(stream, *frame)
            except Exception:  # noqa: BLE001 - a failed check costs one frame's alert, not the stream
                self.stats.errors += 1
                log.exception("stream %s: the instruction checks of frame %d failed", key, frame[0])

    async def check(self, stream: Stream, seq: int, pts_s: float) -> None:
        # The LLM's P(yes) reads the frame's KV: wait for its prefill (streaming KV). The
        # classifier's tags came with the frame: checked at once, so a firing is not held
        # back by the prefill queue (the remark computes what it lacks).
        if any(not w.by_tags for w in stream.instructions.items.values()):
            deadline = time.monotonic() + self.cfg.backpressure.frame_wait_s
            while not stream.ready(seq) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        due = stream.instructions.due(time.monotonic())
        newest = stream.newest_frame()  # the frame checked: `seq`, or a newer one already in
        if not due or newest is None:
            return
        seq, pts_s = newest.seq, newest.pts_s
        t0 = time.perf_counter()
        scores = await asyncio.gather(*(self.p_yes(stream, w) if not w.by_tags else
                                        asyncio.sleep(0, tag_evidence(newest, w.what)) for w in due))
        self.stats.check_s += time.perf_counter() - t0
        self.stats.frames += 1
        self.stats.checks += len(due)
        fired = []
        for w, score in zip(due, scores, strict=True):
            log.debug("stream %s frame %d (%.1fs): %s %s %.3f", stream.stream_id, seq, pts_s, w.what,
                      "tags" if w.by_tags else "P(yes)", score)
            if stream.instructions.observe(w, score, pts_s):
                fired.append((w, score))
        alerts = [(w, score, self.alert(stream, w, score, newest)) for w, score in fired]  # sent now
        for w, score, alert_id in alerts:
            await self.remark(stream, w, score, pts_s, alert_id)

    async def p_yes(self, stream: Stream, w: Watched) -> float:
        composed = stream.compose_check(self.cfg.instructions.check_prompt.format(what=w.what), 1)
        first: dict[int, float] = {}
        async for delta in composed.generate(f"check-{uuid.uuid4().hex[:12]}", 1, logprobs=ANSWER_LOGPROBS):
            if delta.logprobs and not first:
                first = delta.logprobs[0]
        return self.yes_no.p_yes(first)

    def alert(self, stream: Stream, w: Watched, score: float, frame: FrameSegment) -> str:
        """Publish the alert the moment its check fires, saying what matched; returns its id
        (its remark follows under it)."""
        alert_id = f"alert-{uuid.uuid4().hex[:12]}"
        if w.by_tags:
            matched = ", ".join(f"{t} {p:.2f}" for t, p in frame.scored_tags() if question_names_tag(w.what, t))
        else:
            matched = f"P(yes) {score:.2f}"
        tenant, stream_id = split_key(stream.stream_id)
        self.stats.alerts += 1
        self.publish(pb.ResponseRecord(stream_id=stream_id, tenant=tenant, request_id=alert_id, proactive=True,
                                       final=True, text_delta=f"{w.what} at {frame.pts_s:.1f}s: {matched}",
                                       stream_time_s=frame.pts_s, instruction_id=w.instruction.instruction_id,
                                       score=score, matched=matched))
        log.info("stream %s: instruction %s (%s) fired at %.1fs, score %.2f (%s: %s)", stream.stream_id,
                 w.instruction.instruction_id, w.what, frame.pts_s, score, "tags" if w.by_tags else "P(yes)", matched)
        return alert_id

    async def remark(self, stream: Stream, w: Watched, score: float, pts_s: float, alert_id: str) -> None:
        """What the model says about a firing, streamed after its alert (same request id)."""
        c = self.cfg
        composed = stream.compose_check(c.instructions.remark_prompt.format(what=w.what), c.instructions.remark_tokens,
                                        purpose="remark")
        tenant, stream_id = split_key(stream.stream_id)
        t0, tokens = time.perf_counter(), 0

        def send(text: str, final: bool, error: str = "") -> None:
            self.publish(pb.ResponseRecord(stream_id=stream_id, tenant=tenant, request_id=alert_id, proactive=True,
                                           remark=True, final=final, text_delta=text, stream_time_s=pts_s,
                                           instruction_id=w.instruction.instruction_id, score=score, error=error))

        try:
            async for delta in composed.generate(f"{alert_id}-remark", c.instructions.remark_tokens):
                tokens = delta.num_tokens
                if delta.text or delta.finished:
                    send(delta.text, delta.finished)
        except Exception as exc:  # the alert is out: its remark ends, saying why
            send("", True, f"the remark could not be generated: {exc}")
            raise
        took = time.perf_counter() - t0
        self.stats.remark_s += took
        log.info("stream %s: the remark of %s: %d tokens in %.2fs", stream.stream_id, alert_id, tokens, took)
