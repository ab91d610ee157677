"""A stream's context: what the LLM sees when it answers about the stream.

    [system][sink: first frames][retrieved segments][window: recent frames][dialogue][question]

or, where the engine's own prefix cache holds the context (the engine-cache path), with the
retrieved segments after the window, so that nothing in front of the window changes:

    [system][sink][window][retrieved segments][dialogue][question]

The sink is kept for good (attention sinks keep a windowed model stable, StreamingLLM);
the window holds the most recent frames; frames leaving the window are handed to
`on_evict` in chunks (the LLM service stores them as segments in the tiered store, from
where a question can bring them back); the dialogue keeps the last few turns. The
composition is a list of blocks (head, one per frame, tail) of parts, text or visual
tokens, that a materializer turns into what the engine takes (`services.llm.materializer`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.labels import with_article
from services.common.model_spec import DEFAULT_CHAT, ChatLayout


@dataclass(frozen=True)
class FrameSegment:
    """The visual tokens of one frame, in grid order (kept positions only)."""

    seq: int
    pts_s: float
    tokens: np.ndarray  # [n_kept, hidden] float16
    kept: np.ndarray  # bool [grid_h * grid_w]
    # The mean over the whole grid of what the stream shows at this frame (kept tokens and,
    # where the encoder dropped a token, the last one received there): the retrieval key's
    # input, comparable with an example image's full-grid mean. None: the kept tokens' mean.
    pooled: np.ndarray | None = field(default=None, compare=False)
    # What the vision model's classifier sees in the frame (most likely first): written into
    # the frame's label, so even a small LLM can name it.
    tags: tuple[str, ...] = ()
    tag_scores: tuple[float, ...] = ()  # each tag's probability (1.0 where not given)
    offset: int = field(default=-1, compare=False)  # its tokens record's offset (checkpoints)
    sent_unix: float = field(default=0.0, compare=False)  # when the gateway took it (0: not known)
    # Set when it stands for several frames folded into one (its stream fell behind): the
    # first one's time. Its label says so ("folded 15.0-26.5s").
    folded_from_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def scored_tags(self) -> list[tuple[str, float]]:
        """(tag, its probability: 1.0 where not given), most likely first."""
        return [(t, self.tag_scores[i] if i < len(self.tag_scores) else 1.0) for i, t in enumerate(self.tags)]

    def tag_score(self, wanted: Callable[[str], bool]) -> float | None:
        """The highest probability among the tags `wanted` accepts; None if it accepts none."""
        return max((score for t, score in self.scored_tags() if wanted(t)), default=None)


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class VisualPart:
    segment: FrameSegment


@dataclass(frozen=True)
class EmbeddingPart:
    """Vectors in the LLM's input space that are not a frame (LLaVA-OneVision's
    `image_newline` after the last frame): [n, hidden]."""

    vectors: np.ndarray = field(compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.vectors.shape[0])


Part = TextPart | VisualPart | EmbeddingPart


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass(frozen=True)
class Block:
    """A run of parts that the streaming-KV path stores and loads as one KV segment: the
    head (system prompt), one frame, or the tail (dialogue and question, always computed)."""

    parts: tuple[Part, ...]
    frame: FrameSegment | None = None


@dataclass
class ComposedContext:
    blocks: list[Block]
    stream_id: str = ""

    @property
    def parts(self) -> list[Part]:
        return [part for block in self.blocks for part in block.parts]

    @property
    def frames(self) -> list[FrameSegment]:
        return [b.frame for b in self.blocks if b.frame is not None]

    @property
    def newest_pts_s(self) -> float:
        return max((f.pts_s for f in self.frames), default=0.0)


@dataclass
class StreamContext:
    stream_id: str
    sink_frames: int
    window_frames: int
    dialogue_turns: int
    sink: list[FrameSegment] = field(default_factory=list)
    window: deque[FrameSegment] = field(default_factory=deque)
    dialogue: deque[Turn] = field(default_factory=deque)
    last_seq: int = -1
    frames_seen: int = 0
    chunk_frames: int = 1
    # Frames that leave the window together once it holds more than `window_frames`: with
    # more than 1, the window's front stays put between slides (the engine-cache path keeps
    # its KV in the engine's prefix cache, which a one-frame slide would break every frame).
    window_slide: int = 1
    on_evict: Callable[[str, int, list[FrameSegment]], None] | None = None
    evicted: list[FrameSegment] = field(default_factory=list)
    chunks_evicted: int = 0
    chat: ChatLayout = DEFAULT_CHAT  # the model family's chat layout (`services.common.model_spec`)
    after_frames: np.ndarray | None = None  # a vector after the last frame ([n, hidden]), if the family has one

    def add_frame(self, segment: FrameSegment) -> bool:
        """Add a frame; False (and nothing changes) for a redelivered or stale one."""
        if segment.seq <= self.last_seq:
            return False
        self.last_seq = segment.seq
        self.frames_seen += 1
        if len(self.sink) < self.sink_frames:
            self.sink.append(segment)
            return True
        self.window.append(segment)
        if len(self.window) > self.window_frames:
            for _ in range(min(self.window_slide, len(self.window) - 1)):
                self._evict_oldest()
        return True

    def _evict_oldest(self) -> None:
        self.evicted.append(self.window.popleft())
        if len(self.evicted) >= self.chunk_frames:
            if self.on_evict is not None:
                self.on_evict(self.stream_id, self.chunks_evicted, self.evicted)
            self.chunks_evicted += 1
            self.evicted = []

    def note_unchanged(self, seq: int) -> bool:
        """A frame the encoder found unchanged (no tokens): seen, nothing enters the context."""
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        self.frames_seen += 1
        return True

    def add_turn(self, question: str, answer: str) -> None:
        self.dialogue.append(Turn(question, answer))
        while len(self.dialogue) > self.dialogue_turns:
            self.dialogue.popleft()

    def compose(self, system_prompt: str, question: str, window_limit: int | None = None,
                retrieved: Sequence[FrameSegment] = (), note: str = "", dialogue: bool = True,
                through_seq: int | None = None, retrieved_after_window: bool = False) -> ComposedContext:
        """The model's chat layout (`self.chat`) around the frames. `retrieved` frames (in
        time order) go between the sink and the window, or after it (`retrieved_after_window`:
        what is in front of the window never changes); `window_limit` trims the oldest
        window frames when the whole context would not fit the engine's length; `note` (see
        `recall_note`) opens the question's turn; `dialogue`: the past turns before it;
        `through_seq`: window frames after it are left out."""
        window = [f for f in self.window if through_seq is None or f.seq <= through_seq]
        if window_limit is not None:
            window = window[len(window) - window_limit:] if window_limit > 0 else []
        before, after = ([], list(retrieved)) if retrieved_after_window else (list(retrieved), [])
        frames = self.sink + before + window + after
        return ComposedContext([head_block(system_prompt, self.chat),
                                *(frame_block(f, self.chat) for f in frames),
                                tail_block(self.dialogue if dialogue else (), question, note, self.chat,
                                           self.after_frames)],
                               self.stream_id)

    def preceding(self) -> list[FrameSegment]:
        """What the newest frame attends to when it is prefilled on arrival (streaming KV):
        the sink and the window before it."""
        frames = self.sink + list(self.window)
        return frames[:-1]


def head_block(system_prompt: str, chat: ChatLayout = DEFAULT_CHAT) -> Block:
    return Block((TextPart(chat.head.format(system=system_prompt)),))


def frame_block(frame: FrameSegment, chat: ChatLayout = DEFAULT_CHAT) -> Block:
    # The built-in layout labels each frame with its time (frames left out in between need
    # no marker) and tags; a research family's frames follow each other unlabelled.
    seen = ", ".join(t.replace('"', "'") for t in frame.tags)
    attrs = f' seen="{seen}"' if seen else ""
    if frame.folded_from_s is not None:
        attrs += f' folded="{frame.folded_from_s:.1f}-{frame.pts_s:.1f}s"'
    label = chat.frame_open.format(t=frame.pts_s, seen=attrs)
    parts = (TextPart(label), VisualPart(frame), TextPart(chat.frame_close))
    return Block(tuple(p for p in parts if not isinstance(p, TextPart) or p.text), frame)


@dataclass(frozen=True)
class Sighting:
    """What a question asks about (`word`: "cat", "vehicle"; "" when no word of it names the
    tags) and the frames whose tags it names, in time order, with those tags."""

    word: str
    frames: tuple[FrameSegment, ...]
    tags: tuple[str, ...]


def recall_note(sightings: Sequence[Sighting] = (), newest: FrameSegment | None = None,
                unseen: Sequence[str] = ()) -> str:
    """What the frames a question names showed and when, and what no frame showed, as one
    line of text: `Seen at 600.0s, 620.0s and 640.0s: a cat (Egyptian cat, tiger cat). An
    Egyptian cat appeared: it was first seen at 600.0s. No elephant was seen so far: it has
    not appeared.` A question
    that names nothing gets what the newest frame shows instead (`Seen at 1240.0s:
    unicycle, mountain.`). A question's turn opens with it, next to the question, where
    even a small LLM reads it (it loses a few frames' labels among many). The newest frame
    is left out when the question names something: measured, SmolLM2-135M then answered
    "When did a cat appear?" with the newest frame's time (docs/quality.md)."""
    parts = []
    for s in sightings:
        times = [f"{f.pts_s:.1f}s" for f in s.frames]
        when = times[0] if len(times) == 1 else ", ".join(times[:-1]) + " and " + times[-1]
        if s.word:
            likeliest = with_article(s.tags[0] if s.tags else s.word)
            parts.append(f"Seen at {when}: {with_article(s.word)} ({', '.join(s.tags)}). "
                         f"{likeliest[0].upper()}{likeliest[1:]} appeared: it was first seen at {times[0]}.")
        else:
            parts.append(f"Seen at {when}: {', '.join(s.tags)}.")
    if unseen:
        parts.append(f"No {' or '.join(unseen)} was seen so far: it has not appeared.")
    if not sightings and not unseen and newest is not None and newest.tags:
        parts.append(f"Seen at {newest.pts_s:.1f}s: {', '.join(newest.tags)}.")
    return " ".join(parts)


def tail_block(dialogue: Iterable[Turn], question: str, note: str = "", chat: ChatLayout = DEFAULT_CHAT,
               after_frames: np.ndarray | None = None) -> Block:
    """What follows the frames: the family's vector after them (if any), then one text of
    the layout's closing, the past turns and the question's turn (one text: tokenized as
    the family's template renders it)."""
    asked = f"{note}\n{question}" if note else question
    text = chat.after_frames + "".join(chat.turn.format(question=t.question, answer=t.answer) for t in dialogue)
    parts: list[Part] = [EmbeddingPart(after_frames)] if after_frames is not None else []
    parts.append(TextPart(text + chat.question.format(question=asked)))
    return Block(tuple(parts))
