"""Both materializers against the plain transformers reference, in one engine run (vLLM
with our KV connector, SmolLM2 in float32, stored KV in float32), through one `Stream`
built from the service's own resources (`build_resources`), each question composed and
answered as the service does (`Stream.compose` with a `ContextMethod`, an example image
as the retrieval query):

- recompute: the composed context as `prompt_embeds` vs transformers on the same embeddings;
- streaming KV, exact case: no frame has left the window yet, so every frame was prefilled
  with exactly the context the question has: it must match the full-prefill reference;
- streaming KV after evictions and with retrieved frames: against `StreamingReference`, the
  same segments computed once with the context they were prefilled with, laid end to end
  with keys re-rotated to their new positions.
Each: the same greedy tokens, first-token top-5 logprobs within 2e-2 (fp32 kernels differ).
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from tests.reference import run_engine_script

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import asyncio, json, sys
    from pathlib import Path
    import numpy as np, torch
    from livelens.config import LivelensConfig, LLMConfig, with_settings
    from services.llm.context import ComposedContext, FrameSegment, frame_block, head_block
    from services.llm.kv.rope import model_rope_theta
    from services.llm.resources import build_resources
    from services.llm.stream import ContextMethod, Stream
    from tests.reference import ReferenceLM, StreamingReference

    async def ask(stream, method, question, request_id, example=None):
        """As the service answers: compose (the example image: the retrieval query), generate."""
        if example is not None:
            stream.add_example(request_id, example)
        composed = stream.compose(question, 12, method, request_id if example is not None else None)
        tokens, first, cached = [], None, 0
        async for d in composed.generate(request_id, 12, logprobs=5):
            tokens += d.token_ids
            cached = max(cached, d.cached_tokens)
            if first is None and d.logprobs:
                first = d.logprobs[0]
        return composed, tokens, first, cached

    def check(name, tokens, top, ref_logits, ref_tokens, cached, n):
        ref_lp = torch.log_softmax(ref_logits, -1)
        return {"name": name, "tokens": tokens, "ref_tokens": ref_tokens, "cached": cached, "n": n,
                "top": {str(t): lp for t, lp in top.items()}, "ref_top": {str(t): float(ref_lp[t]) for t in top}}

    async def main():
        tmp = Path(sys.argv[2])
        # frequency_penalty 0: the reference is transformers' plain greedy decoding.
        cfg = with_settings(LivelensConfig(), {
            "llm.engine.dtype": "float32",
            "llm.store.kv_dtype": "float32",
            "llm.context.sink_frames": 2,
            "llm.context.window_frames": 3,
            "llm.context.dialogue_turns": 2,
            "llm.retrieval.top_k": 2,
            "llm.engine.frequency_penalty": 0.0,
            "llm.store.segments_disk_dir": str(tmp / "segments"),
        })
        c = cfg.llm
        theta = model_rope_theta(c.engine.model_path)
        engine, res = build_resources(cfg, tmp / "kv")  # as the service builds them
        emb, streaming = res.embedder, res.materializer
        rms = float(emb.table.float().pow(2).mean().sqrt())
        rng = np.random.default_rng(0)
        frames = [FrameSegment(i, i * 0.5, (rng.standard_normal((49, 576)) * rms).astype(np.float16),
                               np.ones(49, bool)) for i in range(12)]
        ref = ReferenceLM(c.engine.model_path)
        sref = StreamingReference(ref, theta)
        stream = Stream("s", res)
        head = emb.embed(ComposedContext([head_block(c.context.system_prompt)]))
        results = []
        for f in frames:
            stream.add(f.seq, f.pts_s, f.tokens, f.kept)
            block = (streaming.frame_id("s", f.seq), emb.embed(ComposedContext([frame_block(f)])))
            if f.seq == 0:
                sref.run([], [(streaming.head_id, head), block])
            else:
                sref.run([streaming.head_id] + [streaming.frame_id("s", p.seq) for p in stream.context.preceding()],
                         [block])
            while not stream.ready(f.seq):
                await asyncio.sleep(0.01)
            if f.seq == 4:  # sink 0-1 + window 2-4: nothing evicted, every frame's KV is exact
                composed, tokens, top, cached = await ask(stream, ContextMethod.STREAMING_KV, "What is there?",
                                                          "exact")
                embeds = emb.embed(composed.context).float()
                results.append(check("streaming_exact", tokens, top, ref.next_token_logits(embeds),
                                     ref.greedy(embeds, 12), cached, int(embeds.shape[0])))
                results[-1]["frames"] = [x.seq for x in composed.context.frames]
        stream.add_turn("What is there?", "A street with people.")
        # An example image like frames 4 and 6 (out of the window): the service retrieves them.
        example = np.concatenate([frames[4].tokens, frames[6].tokens])
        composed, tokens, top, cached = await ask(stream, ContextMethod.STREAMING_KV, "What changed?", "streamed",
                                                  example)
        embeds = emb.embed(composed.context).float()
        tail = emb.embed(ComposedContext([composed.context.blocks[-1]]))
        loaded = [streaming.head_id] + [streaming.frame_id("s", f.seq) for f in composed.context.frames]
        ref_logits, ref_tokens = sref.run(loaded, [(None, tail)], 12)
        results.append(check("streaming_retrieved", tokens, top, ref_logits, ref_tokens, cached,
                             int(embeds.shape[0])))
        results[-1]["tail"] = int(tail.shape[0])
        results[-1]["frames"] = [f.seq for f in composed.context.frames]
        # No prefix-cache reset: the recompute requests are salted, so they never reuse the
        # blocks the streamed question loaded.
        composed, tokens, top, cached = await ask(stream, ContextMethod.RECOMPUTE, "What changed?", "recompute",
                                                  example)
        embeds = emb.embed(composed.context).float()
        results.append(check("recompute", tokens, top, ref.next_token_logits(embeds), ref.greedy(embeds, 12),
                             cached, int(embeds.shape[0])))
        results[-1]["frames"] = [f.seq for f in composed.context.frames]
        results.append({"name": "stats", **streaming.stats.__dict__})
        Path(sys.argv[1]).write_text(json.dumps(results))
        stream.close()
        res.store.close()
        engine.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
''')


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in run_engine_script(SCRIPT, tmp_path_factory.mktemp("reference"))}


def assert_matches(r: dict[str, Any]) -> None:
    assert r["tokens"] == r["ref_tokens"]
    for token, logprob in r["top"].items():
        assert abs(logprob - r["ref_top"][token]) < 2e-2, (r["name"], token, logprob, r["ref_top"][token])


def test_recompute_matches_reference(results: dict[str, dict[str, Any]]) -> None:
    r = results["recompute"]
    assert r["n"] > 400
    assert r["frames"] == results["streaming_retrieved"]["frames"]  # the same context, recomputed
    assert r["cached"] == 0  # salted: nothing from the streamed question's blocks
    assert_matches(r)


def test_streaming_kv_exact_context_matches_full_reference(results: dict[str, dict[str, Any]]) -> None:
    r = results["streaming_exact"]
    assert r["frames"] == [0, 1, 2, 3, 4]
    # everything but the question's tail came from stored KV (or vLLM's prefix cache of it)
    assert r["cached"] > r["n"] - 40
    assert_matches(r)


def test_streaming_kv_with_evictions_and_retrieval_matches_streaming_reference(
        results: dict[str, dict[str, Any]]) -> None:
    r = results["streaming_retrieved"]
    # sink, retrieved by the example image (moved), window (moved)
    assert r["frames"] == [0, 1, 4, 6, 9, 10, 11]
    assert r["cached"] == r["n"] - r["tail"]  # only the dialogue + question were computed
    assert_matches(r)
    stats = results["stats"]
    assert stats["frames_ingested"] == 12 and stats["ingest_errors"] == 0 and stats["kv_misses"] == 0
