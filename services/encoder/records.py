"""The tokens records the encoder publishes, one per frame: its tokens (those kept), its
grid, novelty and tags; or, for a frame not worth encoding, an unchanged record (no
tokens: what the LLM holds for the stream stands)."""

from __future__ import annotations

import time

import numpy as np

from livelens.config import EncoderConfig
from livelens.records import get_tokens, set_tokens
from livelens.v1 import messages_pb2 as pb
from services.common.labels import imagenet_names
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


def fold_records(cfg: EncoderConfig, stale: list[pb.FrameRecord], encoded: list[pb.TokensRecord]) -> pb.TokensRecord:
    """One record for the `stale` frames of a stream (in order), from the records of those
    of them that were `encoded` (in order): the last stale frame's seq and pts, at each
    grid position the newest token, each tag at its likeliest, the largest novelty."""
    first, last = stale[0], stale[-1]
    folded = pb.FoldNotice(from_seq=first.seq, to_seq=last.seq, from_pts_s=first.pts_s, to_pts_s=last.pts_s,
                           frames=len(stale), encoded=len(encoded), reason="encoder_behind")
    if not encoded:  # none of them decoded: the fold says so, with no tokens
        return pb.TokensRecord(stream_id=last.stream_id, tenant=last.tenant, session_id=last.session_id, seq=last.seq,
                               pts_s=last.pts_s, encoder_model=cfg.model_id, gateway_time_unix=last.gateway_time_unix,
                               encoded_time_unix=time.time(), unchanged=True, folded=folded)
    base = encoded[-1]
    grid: np.ndarray | None = None
    have = np.zeros(base.grid_h * base.grid_w, bool)
    tags: dict[str, float] = {}
    for rec in encoded:
        tokens, kept = get_tokens(rec)
        if grid is None:
            grid = np.zeros((kept.size, rec.hidden_size), tokens.dtype)
        grid[kept] = tokens
        have |= kept
        for name, p in zip(rec.tags, rec.tag_scores, strict=True):
            tags[name] = max(p, tags.get(name, 0.0))
    out = pb.TokensRecord(
        stream_id=last.stream_id, tenant=last.tenant, session_id=last.session_id, seq=last.seq, pts_s=last.pts_s,
        grid_h=base.grid_h, grid_w=base.grid_w, novelty=max(r.novelty for r in encoded), encoder_model=cfg.model_id,
        gateway_time_unix=last.gateway_time_unix, encoded_time_unix=time.time(), unchanged=not have.any(),
        folded=folded)
    assert grid is not None
    set_tokens(out, grid, have)
    for name, p in sorted(tags.items(), key=lambda t: -t[1])[:max(cfg.frame_tags, 0)]:
        out.tags.append(name)
        out.tag_scores.append(p)
    return out


def frame_tags(class_probs: np.ndarray, most: int, min_prob: float) -> list[tuple[str, float]]:
    """The names of the `most` likeliest ImageNet classes at least `min_prob` likely."""
    if most <= 0:
        return []
    names = imagenet_names()
    p = class_probs.astype(np.float32)
    top = np.argsort(-p)[:most]
    return [(names[int(c)], round(float(p[c]), 4)) for c in top if p[c] >= min_prob]
