"""The tokens records the encoder publishes, one per frame: its tokens (those kept), its
grid, novelty and tags; or, for a frame not worth encoding, an unchanged record (no
tokens: what the LLM holds for the stream stands)."""

from __future__ import annotations

import time

import numpy as np

from livelens.config import EncoderConfig
from livelens.labels import imagenet_names
from livelens.records import set_tokens
from livelens.v1 import messages_pb2 as pb
from services.encoder.grid import Grid


def tokens_record(cfg: EncoderConfig, frame: pb.FrameRecord, tokens: np.ndarray, grid: Grid, novelty: float,
                  kept: np.ndarray | None = None, class_probs: np.ndarray | None = None) -> pb.TokensRecord:
    """An encoded frame's record: `tokens` [T, H] on `grid`, those `kept` (None: all)."""
    rec = pb.TokensRecord(
        stream_id=frame.stream_id, tenant=frame.tenant, session_id=frame.session_id, seq=frame.seq,
        pts_s=frame.pts_s, grid_h=grid.h, grid_w=grid.w, novelty=novelty, encoder_model=cfg.model_id,
        gateway_time_unix=frame.gateway_time_unix, encoded_time_unix=time.time(),
        query_request_id=frame.query_request_id,
    )
    set_tokens(rec, tokens, kept)
    if class_probs is not None:
        for name, p in frame_tags(class_probs, cfg.frame_tags, cfg.tag_min_prob):
            rec.tags.append(name)
            rec.tag_scores.append(p)
    return rec


def unchanged_record(cfg: EncoderConfig, frame: pb.FrameRecord, grid: Grid, hidden: int,
                     novelty: float) -> pb.TokensRecord:
    """A skipped frame's record: no token kept on its `grid` (tokens `hidden` wide)."""
    rec = pb.TokensRecord(
        stream_id=frame.stream_id, tenant=frame.tenant, session_id=frame.session_id, seq=frame.seq,
        pts_s=frame.pts_s, grid_h=grid.h, grid_w=grid.w, novelty=novelty,
        encoder_model=cfg.model_id, gateway_time_unix=frame.gateway_time_unix,
        encoded_time_unix=time.time(), unchanged=True)
    set_tokens(rec, np.zeros((grid.size, hidden), np.float16), np.zeros(grid.size, bool))
    return rec


def dropped_record(cfg: EncoderConfig, frame: pb.FrameRecord, grid: Grid) -> pb.TokensRecord:
    """A frame dropped unencoded because the encoder was behind: no tokens; it counts as seen."""
    return pb.TokensRecord(
        stream_id=frame.stream_id, tenant=frame.tenant, session_id=frame.session_id, seq=frame.seq,
        pts_s=frame.pts_s, grid_h=grid.h, grid_w=grid.w, encoder_model=cfg.model_id,
        gateway_time_unix=frame.gateway_time_unix, encoded_time_unix=time.time(), dropped=True)


def frame_tags(class_probs: np.ndarray, most: int, min_prob: float) -> list[tuple[str, float]]:
    """The names of the `most` likeliest ImageNet classes at least `min_prob` likely."""
    if most <= 0:
        return []
    names = imagenet_names()
    p = class_probs.astype(np.float32)
    top = np.argsort(-p)[:most]
    return [(names[int(c)], round(float(p[c]), 4)) for c in top if p[c] >= min_prob]
