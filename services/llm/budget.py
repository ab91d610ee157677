"""Whether the largest context the LLM service composes fits the engine (llm.engine.max_model_len).

The context is laid out by `services.llm.context`; this module lays out its largest case
with the same functions (the head, a frame's label, the question's note, the dialogue and
the question) and counts their text with the model's own tokenizer, so a change of the
layout changes the estimate with it:

    [head][sink + window frames][retrieved frames][dialogue][note + question][answer]

What cannot be known in advance is taken at a stated size: the frames' times (10 h in),
their tags (the classifier's longest names), the note's words, and a question of
`TYPICAL_QUESTION`'s length (the gateway allows longer ones: a question that does not fit
is refused when asked, not at start).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from livelens.config import ConfigError, LivelensConfig
from services.common.labels import imagenet_names
from services.common.model_spec import ModelSpec, served_chat
from services.llm.context import FrameSegment, Sighting, Turn, frame_block, head_block, recall_note, tail_block

log = logging.getLogger("livelens.llm.budget")

DEFAULT_FRAME_TOKENS = 49  # MobileNetV2's 7x7 grid, the default vision model
LATE_PTS_S = 36_000.0  # frame times ten hours into a stream: the longest labels the estimate takes
# A question of ~250 characters, the size the estimate takes for each one.
TYPICAL_QUESTION = ("What did the people near the entrance carry when they walked past the parked cars, "
                    "and did any of them stop to look at the shop window or talk to the person with the "
                    "umbrella before the bus arrived at the stop on the left side of the street?")
NOTE_WORD = "motor scooter"  # a question's word for a thing, as long as the classes' names run
CHARS_PER_TOKEN = 3  # without a tokenizer: English runs ~4.4 characters a token in SmolLM2's


def frame_tokens(cfg: LivelensConfig) -> tuple[int, str]:
    """Visual tokens of a whole frame (the encoder's first and refresh frames are whole),
    from the vision model's `model_info.json` in the Triton model repository (its "grid"),
    and where that number comes from. Without a readable one: 49, the default model's."""
    if cfg.model.spec:  # an imported model: its model config says (the LLM pod has no Triton repository)
        spec = ModelSpec.read(cfg.model.spec)
        return spec.tokens_per_frame, f"the {spec.grid[0]}x{spec.grid[1]} grid of model.spec {cfg.model.spec}"
    info = Path(cfg.triton.model_repository) / cfg.encoder.model_name / "1" / "model_info.json"
    try:
        grid_h, grid_w = json.loads(info.read_text())["grid"]
        tokens = int(grid_h) * int(grid_w)
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_FRAME_TOKENS, (f"assumed, the default vision model's 7x7 grid: no readable "
                                      f"grid in {info}")
    if tokens < 1:
        raise ConfigError(f"{info}: grid {grid_h}x{grid_w} holds no tokens")
    return tokens, f"the {grid_h}x{grid_w} grid of encoder.model_name {cfg.encoder.model_name!r} ({info})"


@lru_cache(maxsize=4)
def _tokenizer(model_path: str) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer at %s (%s): the context estimate counts %d characters a token",
                    model_path, exc, CHARS_PER_TOKEN)
        return None


@dataclass(frozen=True)
class ContextBudget:
    """The largest context, in tokens, by part."""

    per_frame: int  # visual tokens of a whole frame
    frame_source: str  # where per_frame comes from
    head: int
    label: int  # one frame's label around its visual tokens
    frames: int  # sink + window
    retrieved_frames: int
    retrieved: int  # their visual tokens (llm.retrieval.token_budget bounds them)
    note: int
    dialogue: int
    question: int
    answer: int

    @property
    def total(self) -> int:
        return (self.head + self.frames * (self.per_frame + self.label) + self.retrieved
                + self.retrieved_frames * self.label + self.note + self.dialogue + self.question + self.answer)


def largest_context(cfg: LivelensConfig) -> ContextBudget:
    c = cfg.llm
    tok = _tokenizer(c.engine.model_path)

    def count(text: str) -> int:
        if tok is None:
            return math.ceil(len(text) / CHARS_PER_TOKEN)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def text_of(parts: tuple[Any, ...]) -> int:
        return sum(count(p.text) for p in parts if hasattr(p, "text"))

    per_frame, source = frame_tokens(cfg)
    chat, _ = served_chat(cfg.model.spec)
    tags = _longest_tags(count, cfg.encoder.frame_tags)
    # (a folded frame's label is longer, but it stands for the frames folded into it)
    late = FrameSegment(seq=0, pts_s=LATE_PTS_S, tokens=np.zeros((0, 1), np.float16), kept=np.zeros(0, bool),
                        tags=tags)
    label = text_of(frame_block(late, chat).parts)
    frames = c.context.sink_frames + c.context.window_frames
    retrieved_frames = c.retrieval.top_k * c.store.chunk_frames
    retrieved = min(c.retrieval.token_budget, retrieved_frames * per_frame)
    note = ""
    if c.context.recall_notes > 0 and tags:
        seen = [Sighting(NOTE_WORD, (late,), tags) for _ in range(c.context.recall_notes + 1)]
        note = recall_note(seen, late, unseen=[NOTE_WORD, NOTE_WORD])
    dialogue = [Turn(TYPICAL_QUESTION, "")] * c.context.dialogue_turns
    with_dialogue = text_of(tail_block(dialogue, TYPICAL_QUESTION, note, chat).parts)
    alone = text_of(tail_block([], TYPICAL_QUESTION, note, chat).parts)
    question = text_of(tail_block([], TYPICAL_QUESTION, "", chat).parts)
    return ContextBudget(
        per_frame=per_frame, frame_source=source, head=text_of(head_block(c.context.system_prompt, chat).parts),
        label=label, frames=frames, retrieved_frames=retrieved_frames, retrieved=retrieved,
        note=alone - question, dialogue=with_dialogue - alone + c.context.dialogue_turns * c.engine.max_answer_tokens,
        question=question, answer=c.engine.max_answer_tokens)


def _longest_tags(count: Any, n: int) -> tuple[str, ...]:
    if n <= 0:
        return ()
    return tuple(sorted(imagenet_names(), key=lambda name: (-count(name), name))[:n])


def check_context_fits(cfg: LivelensConfig) -> ContextBudget:
    """The largest context the LLM service composes for a question, plus the answer, must
    fit llm.engine.max_model_len. Over it, vLLM refuses the warm-up and every full context
    (the service would die starting): refused here, with the settings that would fit."""
    b = largest_context(cfg)
    c = cfg.llm
    if b.total <= c.engine.max_model_len:
        return b
    per_window_frame = b.per_frame + b.label
    fit = (c.engine.max_model_len - (b.total - c.context.window_frames * per_window_frame)) // per_window_frame
    advice = (f"lower llm.context.window_frames (at most {fit} fit) or raise llm.engine.max_model_len" if fit >= 1
              else "raise llm.engine.max_model_len, or lower llm.context.sink_frames, llm.retrieval.token_budget, "
                   "llm.context.dialogue_turns or llm.engine.max_answer_tokens (not even one window frame fits)")
    retrieval = (f" + retrieved frames: min(llm.retrieval.token_budget ({c.retrieval.token_budget}), "
                 f"llm.retrieval.top_k ({c.retrieval.top_k}) x llm.store.chunk_frames ({c.store.chunk_frames}) "
                 f"x {b.per_frame}) = {b.retrieved} tokens" if b.retrieved_frames else "")
    raise ConfigError(
        f"the largest context does not fit the LLM: the system prompt and head ({b.head} tokens)"
        f" + llm.context.sink_frames ({c.context.sink_frames}) + llm.context.window_frames "
        f"({c.context.window_frames}) frames of {b.per_frame} tokens ({b.frames * b.per_frame}){retrieval}"
        f" + frame labels with encoder.frame_tags ({cfg.encoder.frame_tags}) tags"
        f" ({b.frames + b.retrieved_frames} x {b.label} = {(b.frames + b.retrieved_frames) * b.label})"
        f" + the question's note of llm.context.recall_notes ({c.context.recall_notes}) + 1 frames' tags ({b.note})"
        f" + llm.context.dialogue_turns ({c.context.dialogue_turns}) past turns ({b.dialogue})"
        f" + a question ({b.question}) + llm.engine.max_answer_tokens ({b.answer})"
        f" = {b.total} tokens > llm.engine.max_model_len ({c.engine.max_model_len}): {advice}"
        f" ({b.per_frame} tokens a frame: {b.frame_source})")
