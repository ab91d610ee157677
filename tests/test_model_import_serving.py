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

from livelens.config import REPO_ROOT, LLMConfig, with_settings
from tests.tiny_checkpoints import llava_onevision_reference

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
    from services.common.ports import free_port
    from services.common.settings import load_service_config
    from devtools.infra.triton import TritonServer
    from livelens.records import decode_image
    from livelens.v1 import messages_pb2 as pb
    from services.encoder.service import EncoderService
    from services.encoder.triton_client import VisionModelClient
    from services.llm.core import LLMCore
    from services.llm.resources import build_resources
    from services.llm.stream import ContextMethod

    async def main():
        out, work, env = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
        cfg = load_service_config(env=env)  # the model spec applied, as a service loads it
        tcfg = replace(cfg.triton, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
        rng = np.random.default_rng(3)
        images = [rng.integers(0, 256, (72, 96, 3), dtype=np.uint8) for _ in range(3)]
        frames = [pb.FrameRecord(stream_id="cam", tenant="t", seq=i, pts_s=i * 0.5,
                                 data=cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes(),
                                 encoding=pb.FrameRecord.PNG) for i, im in enumerate(images)]
        encoder = EncoderService(cfg)
        with TritonServer(tcfg, cfg.encoder.model_name, work / "tritonserver.log"):
            model = VisionModelClient(tcfg.grpc_url, cfg.encoder.model_name)
            model.wait_ready()
            # the pixels the encoder computes, for the reference: the same decode and the
            # preprocessing the imported model's Triton config names
            prep = encoder.preprocessing(model)
            assert prep.resample == "bicubic" and prep.size == 56, prep
            np.save(work / "pixels.npy", np.stack([prep(decode_image(f.data, f.encoding)) for f in frames]))
            records = encoder.process(frames, model)
            engine, res = build_resources(cfg, work / "kv")
            service = LLMCore(cfg, res)
            for rec in records:
                service.on_tokens(rec)
            stream = service.stream("t/cam")
            while not stream.ready(2):
                await asyncio.sleep(0.05)
            results = {"kept": [int(len(r.kept_mask) == 0) for r in records], "dtype": records[0].dtype}
            for method in (ContextMethod.STREAMING_KV, ContextMethod.RECOMPUTE):
                composed = stream.compose(env["QUESTION"], 8, method)
                ids, top = [], None
                async for d in composed.generate(f"q-{method}", 8, logprobs=5):
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
    if not (Path(LLMConfig().engine.model_path) / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not built (make models): its tokenizer is the tiny checkpoint's")
    from devtools.models.importer import import_checkpoint
    from tests.tiny_checkpoints import build_llava_onevision

    tmp = tmp_path_factory.mktemp("imported-serving")
    ckpt = build_llava_onevision(tmp / "ckpt", tower="siglip")
    import_checkpoint(ckpt, "tiny-ov", tmp / "model_repo", tmp / "models", progress=lambda m: None)
    settings = {
        "LIVELENS_MODEL__SPEC": str(tmp / "models" / "tiny-ov"),
        "LIVELENS_TRITON__MODEL_REPOSITORY": str(tmp / "model_repo"),
        "LIVELENS_LLM__ENGINE__DTYPE": "float32", "LIVELENS_LLM__STORE__KV_DTYPE": "float32",
        "LIVELENS_LLM__ENGINE__FREQUENCY_PENALTY": "0", "LIVELENS_LLM__CONTEXT__SYSTEM_PROMPT": SYSTEM,
        "LIVELENS_LLM__ENGINE__MAX_MODEL_LEN": "2048", "LIVELENS_LLM__RETRIEVAL__LAYERS": "1",
        "LIVELENS_LLM__STORE__SEGMENTS_DISK_DIR": str(tmp / "segments"),
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


@pytest.mark.parametrize("method", ["streaming_kv", "recompute"])
def test_imported_model_answers_through_triton_and_vllm_as_transformers(served, method: str) -> None:
    results, ckpt, tmp = served
    assert results["kept"] == [1, 1, 1], "every token of every frame reached the LLM"
    ref = llava_onevision_reference(ckpt, np.load(tmp / "pixels.npy"), SYSTEM, QUESTION, ANSWER_TOKENS)
    want_tokens, want_top = ref.greedy, ref.top5
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


def test_imported_model_answers_through_the_whole_stack_as_transformers(tmp_path: Path) -> None:
    """`model.spec` set, the whole running stack (gateway -> Kafka -> encoder -> Triton ->
    Kafka -> LLM service -> vLLM): the answer text to a question about three frames is
    transformers' greedy answer, with both materializers."""
    import asyncio

    import cv2
    from transformers import AutoTokenizer

    from devtools.models.importer import import_checkpoint
    from devtools.models.tensorrt import read_config
    from devtools.stack import Stack
    from livelens.client import Ack, Client
    from livelens.records import decode_image
    from services.common.preprocess import FramePreprocessing
    from services.common.settings import apply_model_spec
    from tests.conftest import TOKENS, stack_config
    from tests.tiny_checkpoints import build_llava_onevision

    if not (Path(LLMConfig().engine.model_path) / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not built (make models): its tokenizer is the tiny checkpoint's")
    ckpt = build_llava_onevision(tmp_path / "ckpt", tower="clip")
    import_checkpoint(ckpt, "tiny-ov", tmp_path / "model_repo", tmp_path / "models", progress=lambda m: None)
    cfg = apply_model_spec(with_settings(stack_config(), {"model.spec": str(tmp_path / "models" / "tiny-ov")}))
    cfg = with_settings(cfg, {
        "triton.model_repository": str(tmp_path / "model_repo"),
        "llm.engine.dtype": "float32",
        "llm.engine.frequency_penalty": 0.0,
        "llm.context.system_prompt": SYSTEM,
        "llm.engine.max_model_len": 2048,
        "llm.retrieval.layers": [1],
        "llm.engine.max_answer_tokens": ANSWER_TOKENS,
        "llm.store.segments_disk_dir": str(tmp_path / "segments"),
        "llm.store.kv_dir": str(tmp_path / "kv"),
        "encoder.cache.skip_frames": False,
        "encoder.cache.drop_tokens": False})
    rng = np.random.default_rng(5)
    images = [cv2.imencode(".png", rng.integers(0, 256, (72, 96, 3), dtype=np.uint8))[1].tobytes()
              for _ in range(3)]
    token = next(iter(TOKENS))

    async def run() -> dict[str, str]:
        async with Client(stack.gateway_target, token) as client, client.watch("cam") as session:
            for i, image in enumerate(images):
                await session.send_frame(i, i * 0.5, image)
            acks = 0
            async for event in session.events():
                acks += isinstance(event, Ack)
                if acks == len(images):
                    break
            return {m: (await client.ask("cam", QUESTION, context_method=m, timeout_s=120)).text
                    for m in ("streaming_kv", "recompute")}

    stack = Stack(cfg, tmp_path / "run")
    stack.start(progress=lambda m: None)
    try:
        answers = asyncio.run(run())
    finally:
        stack.stop()
    prep = json.loads(read_config(tmp_path / "model_repo" / "tiny-ov" / "config.pbtxt")
                      .parameters["preprocessing"].string_value)
    preprocess = FramePreprocessing.of_model(prep, 0)
    pixels = np.stack([preprocess(decode_image(image)) for image in images])
    want = llava_onevision_reference(ckpt, pixels, SYSTEM, QUESTION, ANSWER_TOKENS).greedy
    text = str(AutoTokenizer.from_pretrained(ckpt).decode(want, skip_special_tokens=True))
    print("answers:", answers, "transformers:", repr(text))
    assert text.strip(), "the reference answer is empty: the test would compare nothing"
    assert answers["streaming_kv"].strip() == answers["recompute"].strip() == text.strip()
