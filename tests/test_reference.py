"""Both materializers against the plain transformers reference, in one engine run (vLLM
with our KV connector, SmolLM2 in float32, stored KV in float32):

- recompute: the composed context as `prompt_embeds` vs transformers on the same embeddings;
- streaming KV, exact case: no frame has left the window yet, so every frame was prefilled
  with exactly the context the question has: it must match the full-prefill reference;
- streaming KV after evictions and with retrieved frames: against `StreamingReference`, the
  same segments computed once with the context they were prefilled with, laid end to end
  with keys re-rotated to their new positions.
Each: the same greedy tokens, first-token top-5 logprobs within 2e-2 (fp32 kernels differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from livelens.config import REPO_ROOT, LLMConfig

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import asyncio, json, sys
    from pathlib import Path
    import numpy as np, torch
    from livelens.config import LLMConfig
    from services.llm.context import ComposedContext, FrameSegment, StreamContext, frame_block, head_block
    from services.llm.embedder import ContextEmbedder
    from services.llm.engine import VllmEngine
    from services.llm.kv.rope import model_rope_theta
    from services.llm.materializer import RecomputeMaterializer, StreamingKVMaterializer
    from tests.reference import ReferenceLM, StreamingReference

    async def ask(materializer, composed, request_id):
        tokens, first, cached = [], None, 0
        async for d in materializer.generate(composed, request_id, 12, logprobs=5):
            tokens += d.token_ids
            cached = max(cached, d.cached_tokens)
            if first is None and d.logprobs:
                first = d.logprobs[0]
        return tokens, first, cached

    def check(name, tokens, top, ref_logits, ref_tokens, cached, n):
        ref_lp = torch.log_softmax(ref_logits, -1)
        return {"name": name, "tokens": tokens, "ref_tokens": ref_tokens, "cached": cached, "n": n,
                "top": {str(t): lp for t, lp in top.items()}, "ref_top": {str(t): float(ref_lp[t]) for t in top}}

    async def main():
        cfg = LLMConfig(dtype="float32", kv_store_dtype="float32", sink_frames=2, window_frames=3,
                        dialogue_turns=2)
        theta = model_rope_theta(cfg.model_path)
        emb = ContextEmbedder(cfg.model_path)
        rms = float(emb.table.float().pow(2).mean().sqrt())
        rng = np.random.default_rng(0)
        frames = [FrameSegment(i, i * 0.5, (rng.standard_normal((49, 576)) * rms).astype(np.float16),
                               np.ones(49, bool)) for i in range(12)]
        engine = VllmEngine(cfg, Path(sys.argv[2]) / "kv")
        streaming = StreamingKVMaterializer(engine, emb, cfg)
        recompute = RecomputeMaterializer(engine, emb)
        ref = ReferenceLM(cfg.model_path)
        sref = StreamingReference(ref, theta)
        ctx = StreamContext("s", cfg.sink_frames, cfg.window_frames, cfg.dialogue_turns,
                            on_evict=streaming.frames_evicted)
        head = emb.embed(ComposedContext([head_block(cfg.system_prompt)]))
        results = []
        for f in frames:
            ctx.add_frame(f)
            streaming.frame_added(ctx, f)
            block = (streaming.frame_id("s", f.seq), emb.embed(ComposedContext([frame_block(f)])))
            if f.seq == 0:
                sref.run([], [(streaming.head_id, head), block])
            else:
                sref.run([streaming.head_id] + [streaming.frame_id("s", p.seq) for p in ctx.preceding()], [block])
            while streaming.ready_seq(ctx) < f.seq:
                await asyncio.sleep(0.01)
            if f.seq == 4:  # sink 0-1 + window 2-4: nothing evicted, every frame's KV is exact
                composed = ctx.compose(cfg.system_prompt, "What is there?")
                embeds = emb.embed(composed).float()
                tokens, top, cached = await ask(streaming, composed, "exact")
                results.append(check("streaming_exact", tokens, top, ref.next_token_logits(embeds),
                                     ref.greedy(embeds, 12), cached, int(embeds.shape[0])))
        ctx.add_turn("What is there?", "A street with people.")
        composed = ctx.compose(cfg.system_prompt, "What changed?", retrieved=[frames[4], frames[6]])
        embeds = emb.embed(composed).float()
        tail = emb.embed(ComposedContext([composed.blocks[-1]]))
        loaded = [streaming.head_id] + [streaming.frame_id("s", f.seq) for f in composed.frames]
        ref_logits, ref_tokens = sref.run(loaded, [(None, tail)], 12)
        tokens, top, cached = await ask(streaming, composed, "streamed")
        results.append(check("streaming_retrieved", tokens, top, ref_logits, ref_tokens, cached,
                             int(embeds.shape[0])))
        results[-1]["tail"] = int(tail.shape[0])
        results[-1]["frames"] = [f.seq for f in composed.frames]
        await engine.llm.reset_prefix_cache()  # the recompute request must not reuse streamed blocks
        tokens, top, cached = await ask(recompute, composed, "recompute")
        results.append(check("recompute", tokens, top, ref.next_token_logits(embeds), ref.greedy(embeds, 12),
                             cached, int(embeds.shape[0])))
        results.append({"name": "stats", **streaming.stats.__dict__})
        Path(sys.argv[1]).write_text(json.dumps(results))
        engine.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
''')


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    if not (Path(LLMConfig().model_path) / "config.json").is_file():
        pytest.skip("LLM not built (make models)")
    tmp = tmp_path_factory.mktemp("reference")
    script = tmp / "check.py"
    script.write_text(SCRIPT)
    result_path = tmp / "result.json"
    out = subprocess.run([sys.executable, str(script), str(result_path), str(tmp)], capture_output=True, text=True,
                         timeout=900, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["name"]: r for r in json.loads(result_path.read_text())}


def assert_matches(r: dict[str, Any]) -> None:
    assert r["tokens"] == r["ref_tokens"]
    for token, logprob in r["top"].items():
        assert abs(logprob - r["ref_top"][token]) < 2e-2, (r["name"], token, logprob, r["ref_top"][token])


def test_recompute_matches_reference(results: dict[str, dict[str, Any]]) -> None:
    r = results["recompute"]
    assert r["n"] > 400
    assert_matches(r)


def test_streaming_kv_exact_context_matches_full_reference(results: dict[str, dict[str, Any]]) -> None:
    r = results["streaming_exact"]
    # everything but the question's tail came from stored KV (or vLLM's prefix cache of it)
    assert r["cached"] > r["n"] - 40
    assert_matches(r)


def test_streaming_kv_with_evictions_and_retrieval_matches_streaming_reference(
        results: dict[str, dict[str, Any]]) -> None:
    r = results["streaming_retrieved"]
    assert r["frames"] == [0, 1, 4, 6, 9, 10, 11]  # sink, retrieved (moved), window (moved)
    assert r["cached"] == r["n"] - r["tail"]  # only the dialogue + question were computed
    assert_matches(r)
    stats = results["stats"]
    assert stats["frames_ingested"] == 12 and stats["ingest_errors"] == 0 and stats["kv_misses"] == 0
