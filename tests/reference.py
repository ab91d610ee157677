"""The plain PyTorch/transformers reference of the LLM service's context.

Same composition (`ComposedContext` -> `ContextEmbedder.embed`), same positions
(0..n-1), no engine: the oracle that every materializer (vLLM `prompt_embeds`
recompute today, streaming KV next) is tested against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from livelens.config import REPO_ROOT, LLMConfig


def run_engine_script(script: str, tmp: Path) -> Any:
    """Run `script` in a fresh interpreter (vLLM's engine spawns processes: it needs a
    `__main__` of its own) as `script RESULT_PATH TMP`; returns the JSON it wrote there.
    Skipped where the LLM is not built."""
    if not (Path(LLMConfig().engine.model_path) / "config.json").is_file():
        pytest.skip("LLM not built (make models)")
    path, result_path = tmp / "check.py", tmp / "result.json"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path), str(result_path), str(tmp)], capture_output=True, text=True,
                         timeout=900, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(result_path.read_text())


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


class StreamingReference:
    """The streaming-KV path in plain transformers, with the same segments and positions as
    the engine: a block's KV is computed once, attending to the blocks it was prefilled
    with; a later request lays stored blocks end to end from position 0, keys re-rotated
    to their new positions, and computes only its new tokens.

    Segment ids are those of `StreamingKVMaterializer` (or any the caller chooses).
    """

    def __init__(self, ref: ReferenceLM, rope_theta: float) -> None:
        self.ref = ref
        self.rope_theta = rope_theta
        # id -> (position it was computed at, per layer (keys [n, kv_heads, head_dim], values))
        self.kv: dict[str, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    @torch.no_grad()
    def run(self, loaded: list[str], new: list[tuple[str | None, torch.Tensor]], max_tokens: int = 0
            ) -> tuple[torch.Tensor, list[int]]:
        """Load `loaded`, compute `new` (id or None, embeds [n, hidden]) after them, store the
        new blocks that have an id. Returns the next-token logits [vocab] and, when asked,
        the greedy continuation."""
        from transformers import DynamicCache

        from services.llm.kv.rope import rerotate_keys

        cache = DynamicCache()
        pos = 0
        if loaded:
            per_layer: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
            for seg_id in loaded:
                start, layers = self.kv[seg_id]
                if not per_layer:
                    per_layer = [([], []) for _ in layers]
                for (ks, vs), (k, v) in zip(per_layer, layers, strict=True):
                    ks.append(rerotate_keys(k, pos - start, self.rope_theta, k.shape[-1]))
                    vs.append(v)
                pos += layers[0][0].shape[0]
            for index, (ks, vs) in enumerate(per_layer):
                cache.update(torch.cat(ks)[None].transpose(1, 2), torch.cat(vs)[None].transpose(1, 2), index)
        embeds = torch.cat([e for _, e in new]).to(self.ref.dtype)
        out = self.ref.model(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        offset = pos
        for new_id, e in new:
            n = e.shape[0]
            if new_id is not None:
                self.kv[new_id] = (offset, [(layer.keys[0, :, offset:offset + n].transpose(0, 1).clone(),
                                             layer.values[0, :, offset:offset + n].transpose(0, 1).clone())
                                            for layer in cache.layers])
            offset += n
        logits = out.logits[0, -1].float()
        tokens: list[int] = []
        embed = self.ref.model.get_input_embeddings()
        step = out
        for _ in range(max_tokens):
            token = int(step.logits[0, -1].argmax())
            tokens.append(token)
            if token == self.ref.model.config.eos_token_id:
                break
            step = self.ref.model(inputs_embeds=embed(torch.tensor([[token]])), past_key_values=step.past_key_values,
                                  use_cache=True)
        # the request's own KV is not kept (the cache above is per request)
        return logits, tokens
