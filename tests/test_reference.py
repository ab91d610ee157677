"""The vLLM recompute materializer against the plain transformers reference: same composed
context, same next-token distribution and greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from livelens.config import REPO_ROOT, LLMConfig

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import asyncio, json, sys
    import numpy as np, torch
    from livelens.config import LLMConfig
    from services.llm.context import FrameSegment, StreamContext
    from services.llm.embedder import ContextEmbedder
    from services.llm.engine import VllmEngine
    from services.llm.reference import ReferenceLM

    async def main():
        cfg = LLMConfig(dtype="float32")
        emb = ContextEmbedder(cfg.model_path)
        rms = float(emb.table.float().pow(2).mean().sqrt())
        rng = np.random.default_rng(0)
        ctx = StreamContext("s", sink_frames=2, window_frames=3, dialogue_turns=2)
        frames = [FrameSegment(i, i * 0.5, (rng.standard_normal((49, 576)) * rms).astype(np.float16),
                               np.ones(49, bool)) for i in range(8)]
        for f in frames:
            ctx.add_frame(f)
        ctx.add_turn("What is there?", "A street with people.")
        composed = ctx.compose(cfg.system_prompt, "What changed?", retrieved=frames[3:5])
        embeds = emb.embed(composed).float()
        ref = ReferenceLM(cfg.model_path)
        ref_logprobs = torch.log_softmax(ref.next_token_logits(embeds), -1)
        ref_tokens = ref.greedy(embeds, 12)
        engine = VllmEngine(cfg)
        from vllm import SamplingParams
        from vllm.inputs import EmbedsPrompt
        params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5)
        final = None
        async for out in engine.llm.generate(EmbedsPrompt(prompt_embeds=embeds), params, "ref-check"):
            final = out
        completion = final.outputs[0]
        first = completion.logprobs[0]
        top = {int(t): float(lp.logprob) for t, lp in first.items()}
        open(sys.argv[1], "w").write(json.dumps({"n": int(embeds.shape[0]), "ref_tokens": ref_tokens,
                          "vllm_tokens": list(completion.token_ids),
                          "top": top, "ref_top": {t: float(ref_logprobs[t]) for t in top}}))
        engine.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
''')


def test_recompute_matches_reference(tmp_path):
    if not (Path(LLMConfig().model_path) / "config.json").is_file():
        pytest.skip("LLM not built (make models)")
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    result_path = tmp_path / "result.json"
    out = subprocess.run([sys.executable, str(script), str(result_path)], capture_output=True, text=True, timeout=600,
                         cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                             "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["n"] > 400
    assert result["vllm_tokens"] == result["ref_tokens"]
    for token, logprob in result["top"].items():
        assert abs(logprob - result["ref_top"][token]) < 2e-2, (token, logprob, result["ref_top"][token])
