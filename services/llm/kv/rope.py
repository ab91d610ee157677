"""RoPE re-rotation of cached keys.

Llama applies rotary embeddings with the "rotate_half" (GPT-NeoX) convention: for a
head of size D, dimension i < D/2 is paired with i + D/2 and both are rotated by the
angle p * theta^(-2i/D). Rotations of one pair compose additively, R(a) R(b) = R(a+b),
so a key cached at position p_old (k_old = R(p_old) k) is moved to p_new by

    k_new = R(p_new - p_old) k_old

without knowing the pre-RoPE key. Values carry no position and are copied as is.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch


def inv_freq(rope_theta: float, head_dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """theta^(-2i/D) for i in [0, D/2): the default ("rope_type": "default") Llama frequencies."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    exps = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / (rope_theta**exps)).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, rope_theta: float, head_dim: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [n, head_dim] for integer (or real) positions of shape [n]."""
    freqs = positions.to(torch.float64)[:, None] * inv_freq(rope_theta, head_dim)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope_theta: float) -> torch.Tensor:
    """Rotate x of shape [n, heads, head_dim] (or [n, head_dim]) by the RoPE of `positions` [n].

    Computed in float64 and cast back to x's dtype.
    """
    head_dim = x.shape[-1]
    cos, sin = rope_cos_sin(positions, rope_theta, head_dim)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (head_dim,)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x64 = x.to(torch.float64)
    return (x64 * cos + rotate_half(x64) * sin).to(x.dtype)


@functools.lru_cache(maxsize=4096)
def _rotation(delta: int, rope_theta: float, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [head_dim] of one position delta (float64)."""
    cos, sin = rope_cos_sin(torch.tensor([delta]), rope_theta, head_dim)
    return cos[0], sin[0]


def rerotate_keys(
    keys: torch.Tensor, delta_positions: torch.Tensor | int, rope_theta: float, head_dim: int
) -> torch.Tensor:
    """Move post-RoPE keys by `delta_positions` (p_new - p_old): k_new = R(delta) k_old.

    keys: [..., n, num_kv_heads, head_dim] (or [n, head_dim]); delta_positions: an int (one
    delta for all rows, the usual case for a segment moved as a whole: one cos/sin vector,
    cached per delta, float32 arithmetic; this runs for every layer of every loaded segment
    on a question's critical path) or a tensor [n] (float64 arithmetic).
    Returns a new tensor of keys' dtype; a zero delta returns an unchanged copy.
    """
    if keys.shape[-1] != head_dim:
        raise ValueError(f"keys' last dimension is {keys.shape[-1]}, expected head_dim {head_dim}")
    if isinstance(delta_positions, int):
        if delta_positions == 0:
            return keys.clone()
        cos, sin = _rotation(delta_positions, float(rope_theta), head_dim)
        dtype = torch.promote_types(keys.dtype, torch.float32)  # float32 math (float64 for float64 keys)
        k = keys.to(dtype)
        return (k * cos.to(dtype) + rotate_half(k) * sin.to(dtype)).to(keys.dtype)
    n = keys.shape[0]
    delta = delta_positions.reshape(-1)
    if delta.shape[0] != n:
        raise ValueError(f"{delta.shape[0]} deltas for {n} keys")
    return apply_rope(keys, delta, rope_theta)


def model_rope_theta(model_dir: str | Path) -> float:
    """rope_theta of a Hugging Face model directory (transformers 5 nests it in
    "rope_parameters"; older configs have it at the top level)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
