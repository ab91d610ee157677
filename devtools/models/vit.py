"""A ViT of ours with partial recompute (STC-Cacher's idea), exportable to ONNX.

Parameter names follow SigLIP's vision tower (`transformers` `SiglipVisionModel`, keys
under `vision_model.`), so real SigLIP / SigLIP2-style weights (no class token, learned
absolute position embeddings, pre-LayerNorm blocks, tanh-GELU MLP, post-LayerNorm) load
without change through `load_siglip_state_dict`; livelens adds a linear projector into
the LLM's hidden size (`projector.weight`, `projector.bias`).

Partial recompute: for a frame close to the stream's cached one, only K patches (the
most changed) are recomputed. In every layer their queries attend to all N keys: their
own new keys/values and the cached keys/values of the unchanged patches; the unchanged
patches' tokens are the cached ones. The cache (per layer K and V) is an input of the
exported model and its recomputed rows an output, so the same ONNX runs under Triton
with the state kept by the encoder, per stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 32  # 7 x 7 = 49 tokens, the grid livelens' LLM side expects
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    mlp_size: int = 768
    out_size: int = 576  # the LLM's hidden size
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, 3 * P * P], rows in the conv weight's (c, y, x) order."""
        p = self.cfg.patch_size
        b = pixels.shape[0]
        x = pixels.reshape(b, 3, self.cfg.grid, p, self.cfg.grid, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, self.cfg.num_patches, 3 * p * p)

    def forward(self, pixels: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of all patches, or of the patches `index` [B, K]: [B, N or K, D]."""
        w = self.patch_embedding.weight.reshape(self.cfg.hidden_size, -1)
        patches = self.patches(pixels)
        positions = self.position_embedding.weight[None]
        if index is not None:
            patches = torch.gather(patches, 1, index[..., None].expand(-1, -1, patches.shape[-1]))
            positions = self.position_embedding.weight[index]
        bias = self.patch_embedding.bias
        assert bias is not None
        return patches @ w.T + bias + positions


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, M, D] over k, v [B, N, D] (no mask: every patch sees every patch)."""
        w = (self.split(q) @ self.split(k).transpose(-1, -2)) / math.sqrt(self.head_dim)
        out = w.softmax(-1) @ self.split(v)
        return self.out_proj(out.transpose(1, 2).reshape(q.shape))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_size)
        self.fc2 = nn.Linear(cfg.mlp_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def kv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer_norm1(h)
        return self.self_attn.q_proj(x), self.self_attn.k_proj(x), self.self_attn.v_proj(x)

    def finish(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn.attend(q, k, v)
        return h + self.mlp(self.layer_norm2(h))


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def blocks(self) -> list[EncoderLayer]:
        return [cast(EncoderLayer, layer) for layer in self.layers]


class VisionModel(nn.Module):
    """SigLIP-style layout: `embeddings`, `encoder.layers.N`, `post_layernorm`."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CachedViT(nn.Module):
    """tokens = projector(post_layernorm(ViT(pixels))), with a per-layer cache."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionModel(cfg)
        self.projector = nn.Linear(cfg.hidden_size, cfg.out_size)

    def encoder_blocks(self) -> list[EncoderLayer]:
        return cast(Encoder, self.vision_model.encoder).blocks()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision_model.post_layernorm(h))

    def full(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every patch: (tokens [B, N, out], keys and values [B, L, N, D], last hidden [B, N, D])."""
        h = self.vision_model.embeddings(pixels)
        keys, values = [], []
        for layer in self.encoder_blocks():
            q, k, v = layer.kv(h)
            keys.append(k)
            values.append(v)
            h = layer.finish(h, q, k, v)
        return self.head(h), torch.stack(keys, 1), torch.stack(values, 1), h

    def partial_rows(self, pixels: torch.Tensor, index: torch.Tensor, keys_others: torch.Tensor,
                     values_others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Recompute only the patches `index` [B, K] (distinct per row); the other M = N - K
        patches are seen through their cached keys and values (`keys_others`,
        `values_others` [B, L, M, D], any order: attention without a mask does not care).
        Returns the recomputed rows only: tokens [B, K, out], keys and values [B, K, L, D],
        last hidden [B, K, D]; the other patches' tokens are unchanged by construction.
        K = N with M = 0 is the full model, with nothing to send. Batch first everywhere,
        so Triton can batch the requests of many streams."""
        h = self.vision_model.embeddings(pixels, index)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.encoder_blocks()):
            q, k, v = layer.kv(h)
            new_keys.append(k)
            new_values.append(v)
            h = layer.finish(h, q, torch.cat([keys_others[:, i], k], 1), torch.cat([values_others[:, i], v], 1))
        return self.head(h), torch.stack(new_keys, 2), torch.stack(new_values, 2), h

    def partial(self, pixels: torch.Tensor, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference of `partial_rows`, on the whole cache (`keys`, `values` [B, L, N, D],
        `hidden` [B, N, D]): the recomputed rows scattered into it, the same outputs as `full`."""
        h = self.vision_model.embeddings(pixels, index)
        rows = index[..., None].expand(-1, -1, h.shape[-1])
        keys_all, values_all = [], []
        for i, layer in enumerate(self.encoder_blocks()):
            q, k, v = layer.kv(h)
            keys_all.append(keys[:, i].scatter(1, rows, k))
            values_all.append(values[:, i].scatter(1, rows, v))
            h = layer.finish(h, q, keys_all[-1], values_all[-1])
        h_all = hidden.scatter(1, rows, h)
        return self.head(h_all), torch.stack(keys_all, 1), torch.stack(values_all, 1), h_all


class PartialExport(nn.Module):
    """The ONNX entry point, `partial_rows`: with K == N (index = every patch) it is the full
    model. Only the recomputed rows come back, so a small change costs small outputs.
    With `half_io`, the cache and the tokens cross the graph boundary in float16 (half the
    bytes per request; the math inside stays float32)."""

    def __init__(self, model: CachedViT, half_io: bool = False) -> None:
        super().__init__()
        self.model = model
        self.half_io = half_io

    def forward(self, pixels: torch.Tensor, index: torch.Tensor, keys_others: torch.Tensor,
                values_others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, k_rows, v_rows, _ = self.model.partial_rows(pixels, index, keys_others.float(),
                                                            values_others.float())
        if self.half_io:
            return tokens.half(), k_rows.half(), v_rows.half()
        return tokens, k_rows, v_rows


def build_tiny_vit(seed: int = 0, cfg: ViTConfig | None = None) -> CachedViT:
    """The seeded tiny ViT the tests and the benchmark use (no weights to download)."""
    torch.manual_seed(seed)
    model = CachedViT(cfg or ViTConfig())
    return model.eval()


# The ViT livelens serves through Triton (`model_repo/vision_vit`) and benchmarks: ViT-S/16
# widths at half depth, 14 x 14 = 196 tokens, seeded random weights. Real weights of the same
# layout replace them with `load_siglip_state_dict`.
SERVED_VIT = ViTConfig(patch_size=16, hidden_size=384, num_layers=6, num_heads=6, mlp_size=1536)


def build_served_vit(seed: int, out_size: int, target_rms: float) -> CachedViT:
    """The seeded ViT of `model_repo/vision_vit`: projector into the LLM's hidden size, its
    tokens scaled to the LLM's embedding RMS. Position embeddings are drawn small, as in
    trained ViTs, so a token says more about its patch than about where the patch is."""
    model = build_tiny_vit(seed, replace(SERVED_VIT, out_size=out_size))
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.mul_(0.1)
        probe = torch.randn(4, 3, model.cfg.image_size, model.cfg.image_size,
                            generator=torch.Generator().manual_seed(seed))
        rms = float(model.full(probe)[0].pow(2).mean().sqrt())
        model.projector.weight.mul_(target_rms / rms)
        model.projector.bias.mul_(target_rms / rms)
    return model


def load_siglip_state_dict(model: CachedViT, state: dict[str, torch.Tensor]) -> None:
    """Load SigLIP vision-tower weights: a `SiglipModel` / `SiglipVisionModel` checkpoint
    (`vision_model.*` keys; the text tower and the attention-pooling `head.*` are not used)
    or transformers' in-memory `SiglipVisionModel.state_dict()` (the same keys without the
    `vision_model.` prefix). The projector is livelens' own and keeps its weights unless
    `projector.*` keys are given."""
    tower = ("embeddings.", "encoder.", "post_layernorm.")
    ours = {}
    for key, value in state.items():
        if key.startswith(tower):
            key = "vision_model." + key
        if key.startswith(("vision_model.", "projector.")) and not key.startswith("vision_model.head."):
            ours[key] = value
    try:
        missing, unexpected = model.load_state_dict(ours, strict=False)
    except RuntimeError as exc:  # shapes of another ViTConfig
        raise ValueError(f"not a SigLIP-style vision tower for this ViTConfig: {exc}") from None
    missing = [k for k in missing if not k.startswith("projector.")]
    if missing or unexpected:
        raise ValueError(f"not a SigLIP-style vision tower for this ViTConfig: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


class FullExport(nn.Module):
    """The plain model, pixels -> tokens (float16): how the ViT is served without a cache."""

    def __init__(self, model: CachedViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.full(pixels)[0].half()


def export_full_onnx(model: CachedViT, path: str | Path, opset: int = 17) -> Path:
    """ONNX with input pixels [B,3,S,S] and output tokens [B,N,out] float16; B dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(FullExport(model).eval(), (torch.zeros(2, 3, model.cfg.image_size, model.cfg.image_size),),
                          str(path), opset_version=opset, dynamo=False, input_names=["pixels"],
                          output_names=["tokens"], dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}})
    return path


OUTPUT_NAMES = ("tokens_new", "keys_new", "values_new")


def export_partial_onnx(model: CachedViT, path: str | Path, opset: int = 17, half_io: bool = False) -> Path:
    """ONNX with inputs pixels [B,3,S,S], index [B,K] int64, keys_others/values_others
    [B,L,M,D] (the cache of the patches not in index) and outputs the recomputed rows:
    tokens_new [B,K,out], keys_new and values_new [B,K,L,D]; B, K and M dynamic.
    `half_io`: cache and tokens in float16 at the boundary (what Triton serves)."""
    cfg = model.cfg
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    b, n, d, layers = 2, cfg.num_patches, cfg.hidden_size, cfg.num_layers
    state = torch.float16 if half_io else torch.float32
    args = (torch.zeros(b, 3, cfg.image_size, cfg.image_size), torch.arange(3).repeat(b, 1),
            torch.zeros(b, layers, n - 3, d, dtype=state), torch.zeros(b, layers, n - 3, d, dtype=state))
    others = {0: "batch", 2: "others"}
    batch = {0: "batch"}
    rows = {0: "batch", 1: "recompute"}
    with torch.no_grad():
        torch.onnx.export(
            PartialExport(model, half_io).eval(), args, str(path), opset_version=opset, dynamo=False,
            input_names=["pixels", "index", "keys_others", "values_others"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={"pixels": batch, "index": rows, "keys_others": others, "values_others": others,
                          **{name: rows for name in OUTPUT_NAMES}},
        )
    return path
