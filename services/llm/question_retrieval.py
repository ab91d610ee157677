"""Retrieval by the question itself, inside the model (ReKV): the question's attention
queries at chosen layers, averaged, scored by cosine against each stored segment's mean
key at the same layers (the connector writes those means when it saves a frame's KV).

Both sides are *pre-RoPE* (the connector rotates stored keys back to position 0), so a
score does not depend on where a segment sat in the stream. The queries are computed in
plain PyTorch with the first layers of the served model's own weights: the question
alone, a few dozen tokens, a few milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class QuestionQueries:
    def __init__(self, model_dir: str | Path, layers: list[int]) -> None:
        from transformers import AutoModelForCausalLM

        self.layers = list(layers)
        depth = max(self.layers) + 1
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     num_hidden_layers=depth)
        if len(model.model.layers) < depth:
            raise ValueError(f"llm.retrieval.layers {self.layers}: the model has {len(model.model.layers)} layers")
        self.model = model.model.eval()
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)

    @torch.no_grad()
    def __call__(self, embeds: torch.Tensor) -> np.ndarray:
        """Mean pre-RoPE query per layer and KV head (query heads of a group averaged, as they
        share that head's keys): [layers, kv_heads * head_dim]."""
        out = self.model(inputs_embeds=embeds.float()[None], output_hidden_states=True)
        rows = []
        for index in self.layers:
            layer = self.model.layers[index]
            hidden = out.hidden_states[index]  # the input of layer `index`
            q = layer.self_attn.q_proj(layer.input_layernorm(hidden))[0]  # [n, heads * head_dim]
            q = q.view(-1, self.kv_heads, self.heads // self.kv_heads, self.head_dim).mean(dim=(0, 2))
            rows.append(q.reshape(-1))
        return torch.stack(rows).numpy()


def question_scores(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine of `query` [layers, D] with each segment's keys [n, layers, D], averaged over layers."""
    if keys.size == 0:
        return np.zeros(0, np.float32)
    k = keys / (np.linalg.norm(keys, axis=-1, keepdims=True) + 1e-6)
    q = query / (np.linalg.norm(query, axis=-1, keepdims=True) + 1e-6)
    return np.einsum("nld,ld->nl", k, q).mean(-1)
