"""An imported model served as livelens serves it answers as transformers' whole model does.

A tiny seeded LLaVA-OneVision checkpoint (SigLIP tower, Qwen2 LM) is imported; then, with
`model.spec` pointing at its model config, three frames go through the encoder service's
frame path (decode, the family's preprocessing, the imported vision model in a real
tritonserver) into the LLM service's stream (the model config's chat layout, the newline
vector after the frames) and vLLM answers, with the streaming-KV materializer (frames
prefilled on arrival, their KV loaded for the question) and with recompute. The reference:
transformers' `LlavaOnevisionForConditionalGeneration` on the same pixels and question.

Float32 throughout, greedy, nothing evicted, the encoder's feature cache off (it would drop
tokens the reference sees). Measured tolerance: the first token's top-5 log-probabilities
within 1e-3 of transformers', the same greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livelens.config import REPO_ROOT, LLMConfig

pytestmark = pytest.mark.integration

SYSTEM = "You watch a video."
QUESTION = "What is in the video?"
ANSWER_TOKENS = 8
LOGPROB_TOLERANCE = 1e-3

SCRIPT = textwrap.dedent('''
    import asyncio, json, sys
    from dataclasses import replace
    from pathlib import Path
    import cv2, numpy as np
    from livelens.config import load_config
    from livelens.infra.ports import free_port
    from livelens.infra.triton import TritonServer
    from livelens.records import decode_image
    from livelens.v1 import messages_pb2 as pb
    from services.encoder.service import EncoderService
    from services.encoder.triton_client import VisionModelClient
    from services.llm.service import LLMService, build_resources
    from services.llm.stream import ContextMethod

    async def main():
        out, work, env = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
        cfg = load_config(env=env)
        tcfg = replace(cfg.triton, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        rng = np.random.default_rng(3)
        images = [rng.integers(0, 256, (72, 96, 3), dtype=np.uint8) for _ in range(3)]
        frames = [pb.FrameRecord(stream_id="cam", tenant="t", seq=i, pts_s=i * 0.5,
                                 data=cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes(),
                                 encoding=pb.FrameRecord.PNG) for i, im in enumerate(images)]
        encoder = EncoderService(cfg)
        with TritonServer(tcfg, work / "tritonserver.log"):
            model = VisionModelClient(tcfg.grpc_url, cfg.encoder.model_name)
            model.wait_ready()
            # the pixels the encoder computes, for the reference: the same decode and the
            # preprocessing the imported model's Triton config names
            prep = encoder.preprocessing(model)
            assert prep.resample == "bicubic" and prep.size == 56, prep
            np.save(work / "pixels.npy", np.stack([prep(decode_image(f.data, f.encoding)) for f in frames]))
            records = encoder.process(frames, model)
            engine, res = build_resources(cfg, work / "kv")
            service = LLMService(cfg, res)
            for rec in records:
                service.on_tokens(rec)
            stream = service.stream("cam")
            while not stream.ready(2):
                await asyncio.sleep(0.05)
            results = {"kept": [int(len(r.kept_mask) == 0) for r in records], "dtype": records[0].dtype}
            for method in (ContextMethod.STREAMING_KV, ContextMethod.RECOMPUTE):
                composed = stream.compose(env["QUESTION"], 8, method)
                ids, top = [], None
                async for d in composed.materializer.generate(composed.context, f"q-{method}", 8, logprobs=5):
                    ids += d.token_ids
                    if top is None and d.logprobs:
                        top = {str(k): float(v) for k, v in d.logprobs[0].items()}
                results[str(method)] = {"tokens": ids, "top": top, "n": composed.tokens,
                                        "frames": [f.seq for f in composed.context.frames]}
            results["stats"] = res.materializer.stats.__dict__
            model.client.close()
            encoder.pool.shutdown()
            stream.close()
            res.store.close()
            engine.shutdown()
        out.write_text(json.dumps(results))

    if __name__ == "__main__":
        asyncio.run(main())
''')


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    if not (Path(LLMConfig().model_path) / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not built (make models): its tokenizer is the tiny checkpoint's")
    from livelens.models.importer import import_checkpoint
    from tests.tiny_checkpoints import build_llava_onevision

    tmp = tmp_path_factory.mktemp("imported-serving")
    ckpt = build_llava_onevision(tmp / "ckpt", tower="siglip")
    import_checkpoint(ckpt, "tiny-ov", tmp / "model_repo", tmp / "models", progress=lambda m: None)
    settings = {
        "LIVELENS_MODEL__SPEC": str(tmp / "models" / "tiny-ov"),
        "LIVELENS_TRITON__MODEL_REPOSITORY": str(tmp / "model_repo"),
        "LIVELENS_LLM__DTYPE": "float32", "LIVELENS_LLM__KV_STORE_DTYPE": "float32",
        "LIVELENS_LLM__FREQUENCY_PENALTY": "0", "LIVELENS_LLM__SYSTEM_PROMPT": SYSTEM,
        "LIVELENS_LLM__MAX_MODEL_LEN": "2048", "LIVELENS_LLM__RETRIEVE_LAYERS": "1",
        "LIVELENS_LLM__STORE_DISK_DIR": str(tmp / "segments"),
        "LIVELENS_ENCODER__CACHE__SKIP_FRAMES": "false", "LIVELENS_ENCODER__CACHE__DROP_TOKENS": "false",
        "QUESTION": QUESTION,
    }
    script = tmp / "serve.py"
    script.write_text(SCRIPT)
    out_path = tmp / "out.json"
    out = subprocess.run([sys.executable, str(script), str(out_path), str(tmp), json.dumps(settings)],
                         capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out_path.read_text()), ckpt, tmp


def reference(ckpt: Path, pixels: np.ndarray) -> tuple[list[int], dict[str, float]]:
    """transformers' whole model: greedy tokens and the first token's top-5 log-probabilities."""
    import torch
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration
    from transformers.utils.chat_template_utils import render_jinja_template

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = render_jinja_template([messages], chat_template=(ckpt / "chat_template.jinja").read_text(),
                                   add_generation_prompt=True)[0][0]
    ids = tok(prompt, add_special_tokens=False).input_ids
    video = model.config.video_token_index
    at = ids.index(video)
    per_frame = 16
    ids = ids[:at] + [video] * (len(pixels) * per_frame + 1) + ids[at + 1:]
    inputs = dict(input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(pixels)[None])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits[0, -1].double(), -1)
        greedy = model.generate(**inputs, max_new_tokens=ANSWER_TOKENS, do_sample=False)[0, len(ids):]
    top = torch.topk(logprobs, 5)
    return greedy.tolist(), {str(int(i)): float(v) for v, i in zip(top.values, top.indices, strict=True)}


@pytest.mark.parametrize("method", ["streaming_kv", "recompute"])
def test_imported_model_answers_through_triton_and_vllm_as_transformers(served, method: str) -> None:
    results, ckpt, tmp = served
    assert results["kept"] == [1, 1, 1], "every token of every frame reached the LLM"
    want_tokens, want_top = reference(ckpt, np.load(tmp / "pixels.npy"))
    got = results[method]
    assert got["frames"] == [0, 1, 2]
    assert got["tokens"] == want_tokens
    assert set(got["top"]) == set(want_top)
    diff = max(abs(got["top"][token] - logprob) for token, logprob in want_top.items())
    print(f"{method}: first token's top-5 log-probabilities within {diff:.1e} of transformers'")
    assert diff < LOGPROB_TOLERANCE, (method, got["top"], want_top)
    if method == "streaming_kv":
        stats = results["stats"]
        assert stats["frames_ingested"] == 3 and stats["ingest_errors"] == 0 and stats["kv_misses"] == 0
        assert stats["questions_loaded_tokens"] > 3 * 16, "the frames' KV was loaded, not recomputed"
