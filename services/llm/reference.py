"""The plain PyTorch/transformers reference of the LLM service's context.

Same composition (`ComposedContext` -> `ContextEmbedder.embed`), same positions
(0..n-1), no engine: the oracle that every materializer (vLLM `prompt_embeds`
recompute today, streaming KV next) is tested against.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ReferenceLM:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model.eval()
        self.dtype = dtype

    @torch.no_grad()
    def next_token_logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] of the token after `embeds` [n, hidden]."""
        out = self.model(inputs_embeds=embeds.to(self.dtype)[None])
        return out.logits[0, -1].float()

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_tokens: int) -> list[int]:
        """Greedy token ids after `embeds`, with a KV cache (positions continue from n)."""
        embed = self.model.get_input_embeddings()
        out = self.model(inputs_embeds=embeds.to(self.dtype)[None], use_cache=True)
        tokens: list[int] = []
        for _ in range(max_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token == self.model.config.eos_token_id:
                break
            out = self.model(inputs_embeds=embed(torch.tensor([[token]])), past_key_values=out.past_key_values,
                             use_cache=True)
        return tokens
