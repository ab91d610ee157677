"""Running a stream's plan (`plan.py`) against the vision model in Triton, into tokens
records; and the question images, which have no stream.

Runs in the encoder's worker threads: a stream's state is touched by its own thread alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from livelens.config import EncoderConfig
from livelens.v1 import messages_pb2 as pb
from services.encoder.feature_cache import FrameDecision
from services.encoder.plan import Partial, Step, Whole
from services.encoder.records import tokens_record, unchanged_record
from services.encoder.streams import EncoderStream
from services.encoder.triton_client import VisionModelClient

Records = list[tuple[int, pb.TokensRecord]]  # by poll index


@dataclass
class Frame:
    """A frame of the poll being encoded: its place in the poll, record and pixels."""

    index: int
    record: pb.FrameRecord
    pixels: np.ndarray  # preprocessed [3, S, S]


def run_stream(cfg: EncoderConfig, stream: EncoderStream, frames: Sequence[Frame],
               decisions: Sequence[FrameDecision], steps: Sequence[Step],
               model: VisionModelClient) -> tuple[Records, int]:
    """Each step's requests, then the records of its frames in order (`frames[k]` decided
    `decisions[k]`); returns the records and the number of Triton requests."""
    out: Records = []
    calls = 0
    for step in steps:
        tokens: dict[int, np.ndarray] = {}
        probs: dict[int, np.ndarray] = {}
        if isinstance(step, Whole):
            for batch, with_cache in step.requests:
                enc = model.encode(np.stack([frames[k].pixels for k in batch]), with_cache)
                tokens.update(zip(batch, enc.tokens, strict=True))
                if enc.class_probs is not None:
                    probs.update(zip(batch, enc.class_probs, strict=True))
                if enc.states:
                    stream.cache.vit_state = enc.states[-1]
        elif isinstance(step, Partial):
            state = stream.cache.vit_state
            assert state is not None, "a partial recompute planned on a stream without a cache"
            rows, stream.cache.vit_state = model.encode_partial(
                [(frames[k].pixels, index) for k, index in step.recompute.items()], state)
            tokens.update(zip(step.recompute, rows, strict=True))
        calls += step.calls
        for k in step.frames:
            decision = decisions[k]
            if isinstance(step, Partial) and k in step.recompute:
                # accounted with every patch it recomputed, not only those its own decision named
                decision = replace(decision, recompute=step.recompute[k])
            out.append((frames[k].index, _record(cfg, stream, frames[k].record, decision, tokens.get(k),
                                                 probs.get(k))))
    return out, calls


def _record(cfg: EncoderConfig, stream: EncoderStream, frame: pb.FrameRecord, decision: FrameDecision,
            tokens: np.ndarray | None, class_probs: np.ndarray | None) -> pb.TokensRecord:
    """A stream frame's record; an encoded frame's tokens update the stream's novelty and
    feature cache (which learns the grid from them, where the model did not say)."""
    if not decision.encode:
        stream.cache.unchanged()
        return unchanged_record(cfg, frame, stream.grid, stream.cache.hidden, decision.changed_fraction)
    assert tokens is not None
    novelty = stream.novelty.update(tokens)
    kept = stream.cache.kept(decision, tokens)
    return tokens_record(cfg, frame, tokens, stream.grid, novelty, kept, class_probs)


def run_queries(cfg: EncoderConfig, frames: Sequence[Frame], model: VisionModelClient) -> tuple[Records, int]:
    """Example images of questions: encoded whole in one request, no cache, no novelty."""
    enc = model.encode(np.stack([f.pixels for f in frames]))
    probs = enc.class_probs if enc.class_probs is not None else [None] * len(frames)
    return [(f.index, tokens_record(cfg, f.record, t, model.grid_of(t), 0.0, None, p))
            for f, t, p in zip(frames, enc.tokens, probs, strict=True)], 1
