"""A stream's context: what the LLM sees when it answers about the stream.

    [system][sink: first frames][retrieved segments][window: recent frames][dialogue][question]

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

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def tag_score(self, wanted: Callable[[str], bool]) -> float | None:
        """The highest probability among the tags `wanted` accepts; None if it accepts none."""
        scores = [self.tag_scores[i] if i < len(self.tag_scores) else 1.0
                  for i, t in enumerate(self.tags) if wanted(t)]
        return max(scores) if scores else None


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class VisualPart:
    segment: FrameSegment


Part = TextPart | VisualPart


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


def frame_label(pts_s: float, tags: tuple[str, ...] = ()) -> str:
    seen = ", ".join(t.replace('"', "'") for t in tags)
    return f'<frame t={pts_s:.1f}s seen="{seen}">' if tags else f"<frame t={pts_s:.1f}s>"


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
    on_evict: Callable[[str, int, list[FrameSegment]], None] | None = None
    evicted: list[FrameSegment] = field(default_factory=list)
    chunks_evicted: int = 0

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
        while len(self.window) > self.window_frames:
            self.evicted.append(self.window.popleft())
            if len(self.evicted) >= self.chunk_frames:
                if self.on_evict is not None:
                    self.on_evict(self.stream_id, self.chunks_evicted, self.evicted)
                self.chunks_evicted += 1
                self.evicted = []
        return True

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
                retrieved: Sequence[FrameSegment] = (), note: str = "") -> ComposedContext:
        """ChatML composition (SmolLM2's template). `retrieved` frames (in time order) go
        between the sink and the window; `window_limit` trims the oldest window frames when
        the whole context would not fit the engine's length; `note` (see `recall_note`)
        opens the question's turn."""
        window = list(self.window)
        if window_limit is not None:
            window = window[len(window) - window_limit:] if window_limit > 0 else []
        frames = self.sink + list(retrieved) + window
        return ComposedContext([head_block(system_prompt), *map(frame_block, frames),
                                tail_block(self.dialogue, question, note)], self.stream_id)

    def preceding(self) -> list[FrameSegment]:
        """What the newest frame attends to when it is prefilled on arrival (streaming KV):
        the sink and the window before it."""
        frames = self.sink + list(self.window)
        return frames[:-1]


def head_block(system_prompt: str) -> Block:
    return Block((TextPart(f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
                           "<|im_start|>user\nThe video so far:\n"),))


def frame_block(frame: FrameSegment) -> Block:
    # The label carries the time, so frames left out in between need no marker.
    return Block((TextPart(frame_label(frame.pts_s, frame.tags)), VisualPart(frame), TextPart("</frame>\n")), frame)


def recall_note(frames: Sequence[FrameSegment], unseen: Sequence[str] = ()) -> str:
    """What the tagged frames showed, and what no frame did, as one line of text:
    `Seen at 312.0s: tabby cat. Seen at 600.0s: street sign, prison. Not seen so far:
    elephant.` A question's turn opens with it, next to the question, where even a small
    LLM reads it (it loses a few frames' labels among many)."""
    seen = [f"Seen at {f.pts_s:.1f}s: {', '.join(f.tags)}." for f in frames if f.tags]
    return " ".join(seen + ([f"Not seen so far: {', '.join(unseen)}."] if unseen else []))


def tail_block(dialogue: Iterable[Turn], question: str, note: str = "") -> Block:
    parts: list[Part] = [TextPart("<|im_end|>\n")]
    for turn in dialogue:
        parts.append(TextPart(f"<|im_start|>user\n{turn.question}<|im_end|>\n"
                              f"<|im_start|>assistant\n{turn.answer}<|im_end|>\n"))
    asked = f"{note}\n{question}" if note else question
    parts.append(TextPart(f"<|im_start|>user\n{asked}<|im_end|>\n<|im_start|>assistant\n"))
    return Block(tuple(parts))
