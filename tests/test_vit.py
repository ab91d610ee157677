"""The ViT with partial recompute: exact where it must be, close where it approximates,
SigLIP weights load as they are, and the ONNX export (dynamic batch and recompute count)
gives what PyTorch gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.models.vit import ViTConfig, build_tiny_vit, export_partial_onnx, load_siglip_state_dict

CFG = ViTConfig()


def frames(seed: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(seed))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


@torch.no_grad()
def test_partial_with_every_patch_is_the_full_model() -> None:
    model = build_tiny_vit()
    x = frames(0)
    full = model.full(x)
    index = torch.arange(CFG.num_patches).repeat(2, 1)
    zeros = torch.zeros_like
    part = model.partial(x, index, zeros(full[1]), zeros(full[2]), zeros(full[3]))
    for a, b in zip(full, part, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unchanged_frame_partial_recompute_is_exact() -> None:
    model = build_tiny_vit()
    x = frames(1)
    tokens, keys, values, hidden = model.full(x)
    index = torch.tensor([[0, 5, 9, 30], [1, 2, 3, 48]])
    out = model.partial(x, index, keys, values, hidden)
    torch.testing.assert_close(out[0], tokens, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_changed_patches_recomputed_close_to_full() -> None:
    """Five patches change; recomputing the 12 most changed ones (25% of 49, as STC-Cacher)
    stays close to a full encode; reusing the stale tokens does not."""
    model = build_tiny_vit()
    x0 = frames(2, 1)
    _, keys, values, hidden = model.full(x0)
    stale = model.full(x0)[0]
    x1 = x0.clone()
    p = CFG.patch_size
    for gy, gx in [(0, 0), (1, 4), (3, 3), (5, 1), (6, 6)]:
        x1[:, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p] = torch.randn(1, 3, p, p)
    diff = (x1 - x0).abs().reshape(1, 3, CFG.grid, p, CFG.grid, p).mean(dim=(1, 3, 5)).reshape(1, -1)
    index = diff.argsort(dim=1, descending=True)[:, :12]
    truth = model.full(x1)[0]
    partial = model.partial(x1, index, keys, values, hidden)[0]
    assert cos(partial, truth) >= 0.98
    changed = [gy * CFG.grid + gx for gy, gx in [(0, 0), (1, 4), (3, 3), (5, 1), (6, 6)]]
    assert cos(partial[:, changed], truth[:, changed]) >= 0.98
    assert cos(stale[:, changed], truth[:, changed]) < 0.9


@torch.no_grad()
def test_siglip_weights_load_without_change() -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf_cfg = SiglipVisionConfig(hidden_size=CFG.hidden_size, intermediate_size=CFG.mlp_size,
                                num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads,
                                image_size=CFG.image_size, patch_size=CFG.patch_size,
                                vision_use_head=False)  # type: ignore[call-arg]
    torch.manual_seed(3)
    siglip = SiglipVisionModel(hf_cfg).eval()
    model = build_tiny_vit(seed=9)
    load_siglip_state_dict(model, siglip.state_dict())
    x = frames(4)
    ours = model.vision_model.post_layernorm(model.full(x)[3])
    theirs = siglip(pixel_values=x).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="SigLIP-style"):
        load_siglip_state_dict(model, {"vision_model.embeddings.patch_embedding.weight": torch.zeros(1)})


def others(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The cache rows [B, L, N, D] of the patches not in `index` [B, K]: [B, L, N - K, D]."""
    keep = torch.ones(cache.shape[0], cache.shape[2], dtype=torch.bool)
    keep[torch.arange(cache.shape[0])[:, None], index] = False
    return torch.stack([c[:, m] for c, m in zip(cache, keep, strict=True)])


def test_onnx_export_dynamic_batch_and_recompute_count(tmp_path: Path) -> None:
    """The served graph (`partial_rows`: attention over the other patches' cached keys and
    the new ones, concatenated) against the reference (`partial`: new rows scattered into
    the whole cache), through ONNX Runtime, for several batch sizes and recompute counts,
    K = N (no cache sent) included."""
    import onnxruntime as ort

    model = build_tiny_vit()
    path = export_partial_onnx(model, tmp_path / "vit.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, k in ((1, 12), (3, 49), (2, 5)):
        x = frames(10 + b, b)
        with torch.no_grad():
            _, keys, values, hidden = model.full(frames(20 + b, b))
            index = torch.stack([torch.randperm(CFG.num_patches)[:k] for _ in range(b)])
            ref_tokens, ref_keys, ref_values, _ = model.partial(x, index, keys, values, hidden)
        got = session.run(None, {"pixels": x.numpy(), "index": index.numpy(),
                                 "keys_others": others(keys, index).numpy(),
                                 "values_others": others(values, index).numpy()})
        rows_shape = (b, k, CFG.num_layers, CFG.hidden_size)
        assert [g.shape for g in got] == [(b, k, CFG.out_size), rows_shape, rows_shape]
        rows = index[..., None]
        np.testing.assert_allclose(got[0], ref_tokens.gather(1, rows.expand(-1, -1, CFG.out_size)).numpy(),
                                   rtol=1e-4, atol=1e-4)
        per_layer = index[:, None, :, None].expand(-1, CFG.num_layers, -1, CFG.hidden_size)
        np.testing.assert_allclose(got[1], ref_keys.gather(2, per_layer).transpose(1, 2).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[2], ref_values.gather(2, per_layer).transpose(1, 2).numpy(),
                                   rtol=1e-4, atol=1e-4)
