"""One live stream's state in the LLM service, under one owner.

`Stream` holds everything the service knows about a stream, named by its key
"tenant/stream_id" (`livelens.identity`) and its session: its context (sink, window,
dialogue, `services.llm.context`), the last token received at each grid position (the
encoder drops tokens that did not change), the example images of questions still to
come, the ledger of its stored KV (`services.llm.kv_ledger`), and, through the shared
segment store, its stored segments. Everything that changes a stream goes through `add`, `add_example`,
`add_turn` and `close`; what a question sees comes from `retrieve` and `compose`.
`checkpoint` says where the context can be rebuilt from (the offsets of its frames'
tokens records); a new owner of the stream replays them (`begin_replay`, `add`,
`end_replay`).

The LLM service, the benchmarks and the tests all build this same object, so a figure
or an assertion about a context is about the one the service composes.

Context methods (`ContextMethod`): the service's own materializer with retrieval
(`default`), or, for evaluation, an explicit one: `recompute`, `streaming_kv` and
`engine_cache` (with retrieval; the last two only on a service started with them),
`window` (sink + window only, recomputed) and `full` (every frame the stream still holds,
recomputed; only where it fits the engine's length).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livelens.config import LLMConfig, window_slide
from livelens.identity import split_key
from livelens.v1 import messages_pb2 as pb
from services.common.labels import question_names_tag, words_naming_classes
from services.common.model_spec import DEFAULT_CHAT, ChatLayout
from services.llm.context import ComposedContext, FrameSegment, Sighting, StreamContext, recall_note
from services.llm.embedder import ContextEmbedder
from services.llm.engine import Delta
from services.llm.engine_cache import EngineCacheMaterializer
from services.llm.instructions import InstructionSet
from services.llm.kv_ledger import KVLedger
from services.llm.materializer import Materializer, RecomputeMaterializer, StreamingKVMaterializer
from services.llm.prompt_compute import PromptCompute, Purpose
from services.llm.question_retrieval import QuestionQueries, question_scores
from services.llm.segments import Segment, TieredSegmentStore, best_first, cosine_scores, then_unscored
from services.llm.yes_no import is_yes_no


class ContextMethod(enum.StrEnum):
    DEFAULT = ""
    RECOMPUTE = "recompute"
    STREAMING_KV = "streaming_kv"
    ENGINE_CACHE = "engine_cache"
    WINDOW = "window"
    FULL = "full"


class ContextError(ValueError):
    """A question whose context cannot be built (e.g. a full context longer than the engine takes)."""


class Added(enum.Enum):
    FRAME = "frame"  # new visual tokens entered the context
    UNCHANGED = "unchanged"  # the encoder found the frame unchanged: seen, nothing new to add
    DUPLICATE = "duplicate"  # redelivered or stale: ignored
    HELD = "held"  # held back while the stream's prefill is behind: it goes in with its next request


@dataclass
class Coalesced:
    """Frames held back while their stream's prefill was behind, folded into one: at each
    grid position any of them changed, the newest token (the encoder sends only changed
    positions, so nothing they showed is lost), their tags at their likeliest, and the
    newest one's seq and time."""

    seq: int
    pts_s: float
    sent_unix: float
    offset: int  # the first one's: a checkpoint's replay must start there
    tokens: np.ndarray  # [grid, hidden]
    kept: np.ndarray  # bool [grid]
    tags: dict[str, float] = field(default_factory=dict)
    frames: int = 0  # the frames it stands for, those without tokens after it included
    folded: int = 0  # those of them with tokens
    through_seq: int = -1  # the newest of them
    first: tuple[int, float] = (-1, 0.0)  # (seq, pts) of the first of them

    def fold(self, frame: FrameSegment) -> None:
        if self.first[0] < 0:
            self.first = (frame.seq, frame.folded_from_s if frame.folded_from_s is not None else frame.pts_s)
        self.tokens[frame.kept] = frame.tokens
        self.kept |= frame.kept
        self.seq, self.pts_s, self.sent_unix = frame.seq, frame.pts_s, frame.sent_unix or self.sent_unix
        for tag, score in frame.scored_tags():
            self.tags[tag] = max(score, self.tags.get(tag, 0.0))
        self.folded += 1
        self.note(frame.seq)

    def note(self, seq: int) -> None:
        """A frame it stands for: one folded in, or one without tokens after them."""
        self.frames += 1
        self.through_seq = seq

    def frame(self, pooled: np.ndarray | None) -> FrameSegment:
        tags = sorted(self.tags.items(), key=lambda t: -t[1])
        return FrameSegment(self.seq, self.pts_s, self.tokens[self.kept], self.kept.copy(), pooled=pooled,
                            tags=tuple(t for t, _ in tags), tag_scores=tuple(p for _, p in tags),
                            offset=self.offset, sent_unix=self.sent_unix,
                            folded_from_s=self.first[1] if self.frames > 1 else None)

    def notice(self) -> pb.FoldNotice:
        """What the client is told about this fold."""
        return pb.FoldNotice(from_seq=self.first[0], to_seq=self.through_seq, from_pts_s=self.first[1],
                             to_pts_s=self.pts_s, frames=self.frames, encoded=self.folded, reason="context_behind")


@dataclass
class StreamResources:
    """What every stream of one LLM service shares."""

    cfg: LLMConfig
    embedder: ContextEmbedder
    store: TieredSegmentStore
    materializer: Materializer  # the service's own: every frame goes through it
    recompute: RecomputeMaterializer  # for the methods that recompute their context
    queries: QuestionQueries | None = None  # question-text retrieval (streaming_kv)
    chat: ChatLayout = DEFAULT_CHAT  # the served model's chat layout (`model.spec`)
    after_frames: np.ndarray | None = None  # its vector after the last frame, if it has one

    def materializer_for(self, method: ContextMethod) -> Materializer:
        if method is ContextMethod.DEFAULT:
            return self.materializer
        if method in (ContextMethod.STREAMING_KV, ContextMethod.ENGINE_CACHE):
            wanted = StreamingKVMaterializer if method is ContextMethod.STREAMING_KV else EngineCacheMaterializer
            if not isinstance(self.materializer, wanted):
                raise ContextError(f"context method {method.value} needs a service started with "
                                   f"llm.context.materializer: {method.value}")
            return self.materializer
        return self.recompute


@dataclass
class Composed:
    """A question's (or check's, or remark's) context, on the materializer that answers it."""

    context: ComposedContext
    retrieved: list[FrameSegment]
    materializer: Materializer
    tokens: int  # the composed context's length in tokens
    purpose: Purpose = "question"
    compute: PromptCompute | None = None  # its stream's account: what the engine computed is recorded there
    computed_tokens: int = 0  # of the prompt, once generating (the rest came from the engine's cache)
    # A yes/no question's "Yes" and "No" tokens: its first token is one of them (`yes_no`).
    first_token_ids: tuple[int, ...] = ()

    async def generate(self, request_id: str, max_tokens: int, logprobs: int | None = None) -> AsyncIterator[Delta]:
        recorded = False
        async for delta in self.materializer.generate(self.context, request_id, max_tokens, logprobs=logprobs,
                                                      first_token_ids=self.first_token_ids):
            if not recorded and (delta.num_tokens or delta.finished):  # the prompt is done: its cache hits are known
                recorded = True
                cached = delta.cached_tokens
                self.computed_tokens = max(0, self.tokens - cached)
                if self.compute is not None:
                    self.compute.record(self.purpose, self.tokens, cached)
            yield delta


class _TagMatcher:
    """Whether a question names a frame tag; a stream repeats few tags over many frames,
    so each distinct tag is matched once."""

    def __init__(self, question: str) -> None:
        self.question = question
        self.seen: dict[str, bool] = {}

    def __call__(self, tag: str) -> bool:
        if tag not in self.seen:
            self.seen[tag] = question_names_tag(self.question, tag)
        return self.seen[tag]


MAX_EXAMPLES = 64  # example images whose question never came, per stream
MAX_NOTE_TAGS = 3  # tags a note names per thing the question asks about


@dataclass
class Stream:
    stream_id: str  # the stream key "tenant/stream_id"
    res: StreamResources
    session_id: str = ""
    partition: int = -1  # of its tokens and commands: who owns it
    context: StreamContext = field(init=False)
    # The last token received at each grid position [grid, hidden]: the pooled view of
    # what the stream shows (the encoder drops tokens that did not change).
    held: np.ndarray | None = None
    examples: dict[str, np.ndarray] = field(default_factory=dict)  # request id -> pooled example
    kv: KVLedger = field(init=False)  # which stored KV the stream keeps (streaming KV)
    # retained stored chunk index -> (its first frame's tokens offset, its frame count)
    chunks: OrderedDict[int, tuple[int, int]] = field(default_factory=OrderedDict)
    replaying: bool = False  # a new owner replays the tokens: frames skip the materializer
    # on a replay: (the checkpoint's frames_seen, its last_seq) and the frames taken after that seq
    replay_base: tuple[int, int] = (0, -1)
    replayed_beyond: int = 0
    replay_kv_tag: str = ""  # the last owner's stored-KV ids (the checkpoint's)
    instructions: InstructionSet = field(init=False)  # standing instructions, checked on each frame
    last_record_s: float = field(default_factory=time.monotonic)  # idle streams are closed
    # Backpressure (llm.backpressure.max_context_lag_s): the frames held back while its prefill is behind,
    # and how many were folded into another so far.
    coalesced: Coalesced | None = None
    frames_coalesced: int = 0
    folds: list[pb.FoldNotice] = field(default_factory=list)  # those not told to the client yet
    frames_dropped: int = 0  # by an encoder that dropped frames when it was behind (before folding)
    frames_folded: int = 0  # by the encoder, which was behind (encoder.max_frame_age_s): into another
    newest: tuple[int, float] = (-1, 0.0)  # (seq, pts) of the newest frame it got: a resume goes on after it
    compute: PromptCompute = field(init=False)  # what the engine computed for it, by purpose
    unsaved_frames: int = 0  # frames taken since its last checkpoint
    answering: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # request id -> its answer
    # Instruction checks (`InstructionChecker`): the frame waiting for its stream's checks
    # (seq, pts; a newer one replaces it) and the task running them.
    check_next: tuple[int, float] | None = None
    check_task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        c = self.res.cfg
        x = c.context
        self.context = StreamContext(self.stream_id, x.sink_frames, x.window_frames, x.dialogue_turns,
                                     chunk_frames=c.store.chunk_frames, window_slide=window_slide(c),
                                     on_evict=self._evicted, chat=self.res.chat, after_frames=self.res.after_frames)
        self.compute = PromptCompute(tenant=split_key(self.stream_id)[0] if "/" in self.stream_id else "")
        self.kv = KVLedger(self.stream_id, retained_frames=c.store.retention_segments * c.store.chunk_frames,
                           retained_chunks=c.store.retention_segments)
        self.instructions = InstructionSet(c)

    # --- frames in -------------------------------------------------------------------
    def add(self, seq: int, pts_s: float, tokens: np.ndarray, kept: np.ndarray, unchanged: bool = False,
            tags: tuple[str, ...] = (), tag_scores: tuple[float, ...] = (), offset: int = -1,
            sent_unix: float = 0.0, dropped: bool = False, folded: pb.FoldNotice | None = None) -> Added:
        """A frame's tokens (kept positions only, `kept` over the whole grid) and tags (with
        their probabilities), in order; `offset`: its tokens record's; `sent_unix`: when the
        gateway took it. `unchanged` (the encoder found nothing new) and `dropped` (the encoder
        was behind and dropped it) frames have no tokens: they count as seen. A `folded`
        record stands for that many frames the encoder folded into one: each counts as seen.

        Backpressure (`llm.backpressure.max_context_lag_s`): while the stream's oldest frame not prefilled
        yet has waited longer than that, a new frame is held back (`Added.HELD`); the frames
        held go in when the stream's next prefill request starts, folded into one
        (`Coalesced`, `take_coalesced`). So a burst is prefilled frame by frame, and when the
        engine cannot keep up what enters the context is the newest the stream showed, in
        fewer, fuller frames."""
        self.last_record_s = time.monotonic()
        since = folded.from_pts_s if folded is not None and folded.frames > 1 else None
        added = self._add(seq, pts_s, tokens, kept, unchanged or dropped, tags, tag_scores, offset, sent_unix, since)
        # a replayed frame the checkpoint counted already counts once (`begin_replay`)
        counted = self.replaying and seq <= self.replay_base[1]
        if since is not None and added is not Added.DUPLICATE:
            assert folded is not None
            self.context.frames_seen += folded.frames - 1
            if not counted:
                self.frames_folded += folded.frames - 1
        if added is not Added.DUPLICATE and seq > self.newest[0]:
            self.newest = (seq, pts_s)
        if dropped and added is not Added.DUPLICATE and not counted:
            self.frames_dropped += 1
        if self.replaying and added is not Added.DUPLICATE and seq > self.replay_base[1]:
            self.replayed_beyond += folded.frames if since is not None and folded is not None else 1
        return added

    def _add(self, seq: int, pts_s: float, tokens: np.ndarray, kept: np.ndarray, unchanged: bool,
             tags: tuple[str, ...], tag_scores: tuple[float, ...], offset: int, sent_unix: float,
             folded_from_s: float | None) -> Added:
        c = self.coalesced
        if unchanged or not tokens.shape[0]:
            if c is not None and seq > c.through_seq:  # no tokens: the held frames stand for it
                c.note(seq)
                return Added.UNCHANGED
            return Added.UNCHANGED if self.context.note_unchanged(seq) else Added.DUPLICATE
        if seq <= max(self.context.last_seq, c.through_seq if c is not None else -1):
            return Added.DUPLICATE
        if self.held is None or self.held.shape != (kept.size, tokens.shape[1]):
            self.held = np.zeros((kept.size, tokens.shape[1]), np.float32)
        self.held[kept] = tokens
        frame = FrameSegment(seq, pts_s, tokens, kept, pooled=self.held.mean(0), tags=tags, tag_scores=tag_scores,
                             offset=offset, sent_unix=sent_unix, folded_from_s=folded_from_s)
        lag = self.res.cfg.backpressure.max_context_lag_s
        if not self.replaying and lag > 0 and self.res.materializer.backlog_s(self.stream_id) > lag:
            self._hold(frame)  # its owner asks the materializer to take it with the next request
            return Added.HELD
        if c is not None:  # this frame carries those held back before it
            self._hold(frame)
            self.take_coalesced()
        else:
            self._enter(frame)
        return Added.FRAME

    def _hold(self, frame: FrameSegment) -> None:
        if self.coalesced is None:
            self.coalesced = Coalesced(frame.seq, frame.pts_s, frame.sent_unix, frame.offset,
                                       np.zeros((frame.kept.size, frame.tokens.shape[1]), frame.tokens.dtype),
                                       np.zeros(frame.kept.size, bool))
        self.coalesced.fold(frame)

    def take_coalesced(self) -> FrameSegment | None:
        """The frames held back go into the context, as one frame; None when none are held."""
        c, self.coalesced = self.coalesced, None
        if c is None:
            return None
        frame = c.frame(pooled=self.held.mean(0) if self.held is not None else None)
        if c.folded > 1:  # frames that showed something went in as one (not only unchanged ones after one)
            self.folds.append(c.notice())
        self._enter(frame)
        self.context.frames_seen += c.frames - 1  # each frame it stands for is taken once
        self.context.last_seq = max(self.context.last_seq, c.through_seq)
        self.frames_coalesced += c.folded - 1
        return frame

    def _enter(self, frame: FrameSegment) -> None:
        self.context.add_frame(frame)
        if any(f is frame for f in self.context.sink):
            self.kv.add_sink(frame.seq)
        if not self.replaying:
            self.res.materializer.frame_added(self.context, frame, self.kv, compute=self.compute)

    def _evicted(self, stream_id: str, index: int, frames: list[FrameSegment]) -> None:
        self.res.store.put(Segment(stream_id, index, tuple(frames)))
        self.chunks[index] = (frames[0].offset, len(frames))
        while len(self.chunks) > self.res.cfg.store.retention_segments:
            self.chunks.popitem(last=False)
        self.res.materializer.frames_evicted(self.kv, index, frames)  # on a replay: the ledger's books

    # --- checkpoints -----------------------------------------------------------------
    def checkpoint(self) -> pb.StreamCheckpoint:
        """Where a new owner rebuilds this context from: the sink frames' offsets, then a
        replay of the tokens from the oldest retained chunk (else the window) on, which
        re-forms the same chunks; and the dialogue."""
        ctx = self.context
        tenant, stream_id = split_key(self.stream_id)
        held = [f.offset for f in ctx.evicted + list(ctx.window) if f.offset >= 0]
        sink = [f.offset for f in ctx.sink if f.offset >= 0]
        if self.chunks:
            replay_chunk, (replay_from, _) = next(iter(self.chunks.items()))
        else:
            replay_chunk = ctx.chunks_evicted
            replay_from = min(held) if held else max(sink, default=-1) + 1
        return pb.StreamCheckpoint(
            stream_id=stream_id, tenant=tenant, session_id=self.session_id, sink_offsets=sink,
            replay_from=replay_from, replay_chunk=replay_chunk, last_seq=ctx.last_seq, frames_seen=ctx.frames_seen,
            frames_folded=self.frames_folded, frames_coalesced=self.frames_coalesced,
            frames_dropped=self.frames_dropped,
            turns=[pb.StreamCheckpoint.Turn(question=t.question, answer=t.answer) for t in ctx.dialogue],
            time_unix=time.time(), kv_tag=self.res.materializer.kv_tag(self.stream_id),
            instructions=self.instructions.protos())

    def begin_replay(self, checkpoint: pb.StreamCheckpoint) -> None:
        """Rebuild from `checkpoint`: its sink frames and then the replayed ones come through
        `add`, without the materializer, until `end_replay`."""
        self.replaying = True
        self.session_id = checkpoint.session_id
        self.replay_base, self.replayed_beyond = (int(checkpoint.frames_seen), int(checkpoint.last_seq)), 0
        self.frames_folded, self.frames_coalesced, self.frames_dropped = (
            int(checkpoint.frames_folded), int(checkpoint.frames_coalesced), int(checkpoint.frames_dropped))
        self.newest = max(self.newest, (int(checkpoint.last_seq), 0.0))
        self.replay_kv_tag = checkpoint.kv_tag
        self.instructions.restore(list(checkpoint.instructions))
        for turn in checkpoint.turns:
            self.context.add_turn(turn.question, turn.answer)
        # The sink frames come first and never leave; the replayed frames after them
        # form the chunks they formed before, from the checkpoint's index on.
        self.context.chunks_evicted = int(checkpoint.replay_chunk)

    def end_replay(self) -> None:
        """The replay is over: the context counts the frames the checkpoint counted, and
        those after it once."""
        self.replaying = False
        self.context.frames_seen = self.replay_base[0] + self.replayed_beyond
        c = self.res.cfg
        self.res.materializer.rebuilt(self.context, self.kv,
                                      self.stored_frames(newest_chunks=c.backfill_frames // c.store.chunk_frames),
                                      self.replay_kv_tag, compute=self.compute)

    def add_example(self, request_id: str, tokens: np.ndarray) -> None:
        """A question's example image (its tokens): the retrieval query of that question."""
        self.examples[request_id] = tokens.astype(np.float32).mean(0)
        while len(self.examples) > MAX_EXAMPLES:
            self.examples.pop(next(iter(self.examples)))

    def ready(self, after_seq: int, example_request_id: str | None = None) -> bool:
        """Whether frame `after_seq` (and that example) is in the context with its KV."""
        return (self.res.materializer.ready_seq(self.context) >= after_seq
                and (example_request_id is None or example_request_id in self.examples))

    def add_turn(self, question: str, answer: str) -> None:
        self.context.add_turn(question, answer)

    def close(self, moved: bool = False, keep_stores: bool = False) -> None:
        """Closed, or (`moved`) another replica owns the stream now: everything it holds goes
        (but what the stores keep under its id with `keep_stores`), its answers and checks stop."""
        for task in self.answering.values():
            task.cancel()
        self.stop_checks()
        if not keep_stores:
            self.res.store.drop_stream(self.stream_id)
            self.res.materializer.drop_stream(self.stream_id, moved=moved)

    def stop_checks(self) -> None:
        if self.check_task is not None:
            self.check_task.cancel()
        self.check_next = None

    # --- questions -------------------------------------------------------------------
    def retrieve(self, question: str, example: np.ndarray | None,
                 named: _TagMatcher | None = None) -> list[FrameSegment]:
        """Stored segments for a question, in time order. Segments with a frame whose tags
        the question names come first (the likeliest named tag first, then the newest);
        then the best scored by the example image's pooled embedding when the question has
        one, else (streaming KV) by the question's own attention queries against each
        segment's mean key. Top-k, then cut to the retrieved part's token budget (best first)."""
        c, res = self.res.cfg, self.res
        if not c.retrieval.top_k:
            return []
        first = res.store.tagged(self.stream_id, named or _TagMatcher(question))
        ranked = (first + [i for i in self._ranked(question, example) if i not in first])[:c.retrieval.top_k]
        picked: list[Segment] = []
        budget = c.retrieval.token_budget
        for index in ranked:
            segment = res.store.get(self.stream_id, index)
            if segment is None:  # a corrupt or missing file is skipped (and counted)
                continue
            size = sum(f.num_tokens for f in segment.frames)
            if size > budget:
                break
            budget -= size
            picked.append(segment)
        return [f for segment in sorted(picked, key=lambda g: g.index) for f in segment.frames]

    def _ranked(self, question: str, example: np.ndarray | None) -> list[int]:
        """Stored segment indices, best first, by the example image or the question's keys."""
        c, res = self.res.cfg, self.res
        if example is not None:
            indices, keys = res.store.keys(self.stream_id)
            return best_first(indices, cosine_scores(keys, example), c.retrieval.top_k)
        if res.queries is not None and isinstance(res.materializer, StreamingKVMaterializer):
            indices, qkeys = self.kv.question_keys()
            ranked = []
            if indices:
                query = res.queries(res.embedder.embed_text(f"<|im_start|>user\n{question}<|im_end|>\n"))
                ranked = best_first(indices, question_scores(qkeys, query), c.retrieval.top_k)
            return then_unscored(ranked, res.store.keys(self.stream_id)[0], c.retrieval.top_k)
        return []

    def held_frames(self) -> int:
        """Frames the stream's history holds: sink, stored chunks, the chunk filling, window."""
        ctx = self.context
        stored, _ = self.res.store.keys(self.stream_id)
        return (len(ctx.sink) + len(ctx.window) + len(ctx.evicted)
                + sum(self.chunks.get(i, (0, self.res.cfg.store.chunk_frames))[1] for i in stored))

    def stored_frames(self, newest_chunks: int | None = None) -> list[FrameSegment]:
        """Every frame the segment store still holds for the stream (of its `newest_chunks`
        newest chunks only, if given), in time order."""
        indices = sorted(self.res.store.keys(self.stream_id)[0])
        if newest_chunks is not None:
            indices = indices[max(0, len(indices) - newest_chunks):]
        frames: list[FrameSegment] = []
        for index in indices:
            segment = self.res.store.get(self.stream_id, index)
            if segment is not None:
                frames.extend(segment.frames)
        return frames

    def recall(self, question: str, retrieved: list[FrameSegment], named: _TagMatcher | None = None) -> str:
        """The note that opens the question's turn (`recall_note`): the `llm.context.recall_notes`
        frames in the context whose tags the question names (the likeliest, then the
        newest), grouped by the word of the question that names them, with their times;
        the things the question names (ImageNet classes and their kinds) that no frame of
        the stream was tagged with; the newest frame when it names nothing. Empty with
        `llm.context.recall_notes` 0."""
        limit = self.res.cfg.context.recall_notes
        frames = self.context.sink + retrieved + list(self.context.window)
        if not limit or not frames:
            return ""
        named = named or _TagMatcher(question)
        scored = [(score, f.seq, f) for f in frames if (score := f.tag_score(named)) is not None]
        quoted = sorted((f for _, _, f in sorted(scored, key=lambda x: (-x[0], -x[1]))[:limit]), key=lambda f: f.seq)
        asked = words_naming_classes(question)
        sightings = []
        told: set[int] = set()
        for word in [*asked, ""]:  # "": frames the question names by no single word of it
            wanted = named if not word else _TagMatcher(word)
            shown = [f for f in quoted if f.seq not in told and f.tag_score(wanted) is not None]
            if shown:
                told.update(f.seq for f in shown)
                best: dict[str, float] = {}
                for f in shown:
                    for t, p in f.scored_tags():
                        if wanted(t):
                            best[t] = max(p, best.get(t, 0.0))
                tags = tuple(sorted(best, key=lambda t: -best[t])[:MAX_NOTE_TAGS])
                sightings.append(Sighting(word, tuple(shown), tags))
        newest = frames[-1] if frames[-1].seq not in told else None
        if asked:
            ever = self.res.store.tags(self.stream_id) | {t for f in frames + self.context.evicted for t in f.tags}
            asked = tuple(w for w in asked if not any(question_names_tag(w, t) for t in ever))
        return recall_note(sightings, newest, asked)

    def compose(self, question: str, max_tokens: int, method: ContextMethod = ContextMethod.DEFAULT,
                example_request_id: str | None = None) -> Composed:
        """The context a question is answered from. The oldest window frames are left out
        until the prompt plus the answer fits the engine (all but `full`, which is refused)."""
        c, embedder = self.res.cfg, self.res.embedder
        materializer = self.res.materializer_for(method)
        example = self.examples.pop(example_request_id, None) if example_request_id else None
        named = _TagMatcher(question)  # the question's tag matches, shared by retrieval and the note
        if method is ContextMethod.FULL:  # stored chunks, then the chunk still filling
            retrieved = self.stored_frames() + list(self.context.evicted)
        elif method is ContextMethod.WINDOW:
            retrieved = []
        else:
            retrieved = self.retrieve(question, example, named)
        note = self.recall(question, retrieved, named)
        if method is ContextMethod.FULL:
            full = self.context.compose(c.context.system_prompt, question, retrieved=retrieved, note=note)
            tokens, most = embedder.count(full), c.engine.max_model_len
            if tokens + max_tokens > most:
                raise ContextError(f"the full context of stream {self.stream_id} is {tokens} tokens; with "
                                   f"{max_tokens} to answer it exceeds llm.engine.max_model_len ({most})")
        composed, tokens = self._fitted(question, max_tokens, retrieved=retrieved, note=note,
                                        retrieved_after_window=materializer.retrieved_after_window)
        first = self.res.embedder.yes_no_ids if c.context.yes_no_first and is_yes_no(question) else ()
        return Composed(composed, retrieved, materializer, tokens, "question", self.compute, first_token_ids=first)

    def newest_frame(self) -> FrameSegment | None:
        """What the stream shows now: the frames held back (folded, not in the context yet),
        else the context's newest."""
        if self.coalesced is not None:
            return self.coalesced.frame(pooled=None)
        frames = self.context.sink + list(self.context.window)
        return frames[-1] if frames else None

    def compose_check(self, question: str, max_tokens: int, purpose: Purpose = "check") -> Composed:
        """The context of a standing instruction's check or remark: the sink and the window
        frames already prefilled, on the service's own path (streaming KV: only this short
        tail is computed, never the prefill backlog), no past turns, and a note of what the
        newest frame showed (its tags, which came with it)."""
        newest = self.newest_frame()
        note = recall_note(newest=newest) if newest is not None and self.res.cfg.context.recall_notes else ""
        composed, tokens = self._fitted(question, max_tokens, note=note, dialogue=False,
                                        through_seq=self.res.materializer.ready_seq(self.context))
        return Composed(composed, [], self.res.materializer, tokens, purpose, self.compute)

    def _fitted(self, question: str, max_tokens: int, **parts: Any) -> tuple[ComposedContext, int]:
        """`context.compose(...)` with the oldest window frames left out until the prompt
        plus the answer fits the engine; and its length in tokens."""
        c, embedder = self.res.cfg, self.res.embedder
        composed = self.context.compose(c.context.system_prompt, question, **parts)
        tokens = embedder.count(composed)
        limit = len(self.context.window)
        while tokens + max_tokens > c.engine.max_model_len and limit > 0:
            limit -= 1
            composed = self.context.compose(c.context.system_prompt, question, window_limit=limit, **parts)
            tokens = embedder.count(composed)
        return composed, tokens
