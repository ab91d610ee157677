"""The engine-cache path through the whole running stack (gateway -> Kafka -> encoder ->
Triton -> LLM service with llm.context.materializer engine_cache), counted by vLLM's own figures
as the service reports them (`AnswerTimings` on the responses topic, Prometheus)."""

from __future__ import annotations

import time
import urllib.request

import pytest

from livelens.subscriber import TopicSubscriber
from livelens.v1 import messages_pb2 as pb
from tests.test_integration import agreement, answers_before_and_after_evictions

pytestmark = pytest.mark.integration

# A frame here: 49 visual tokens and its label (time and the classifier's tags), ~70-90.
FRAME_TOKENS_MAX = 100


def test_engine_cache_answers_as_recompute_and_computes_each_frame_about_once(engine_cache_stack):
    from transformers import AutoTokenizer

    stack = engine_cache_stack
    cfg = stack.cfg.llm
    questions = ["What is the capital of France?", "What do you see in the video?"]
    with TopicSubscriber(stack.cfg.kafka, [stack.cfg.kafka.responses_topic], from_beginning=False) as sub:
        exact, evicted = answers_before_and_after_evictions(stack, "ec-stream", questions, ["", "recompute", "full"])
        wanted = {request_id: key[:2] for key, request_id in evicted.items() if len(key) == 3}
        timings: dict[tuple[str, ...], pb.AnswerTimings] = {}
        deadline = time.monotonic() + 60
        while len(timings) < len(wanted) and time.monotonic() < deadline:
            for rec in sub.records(timeout_s=1):
                if isinstance(rec, pb.ResponseRecord) and rec.final and rec.request_id in wanted:
                    timings[wanted[rec.request_id]] = rec.timings
    assert len(timings) == len(wanted), (timings, wanted)
    # Nothing evicted yet: the same context three ways, the same greedy text.
    for q in questions:
        assert exact[(q, "")] == exact[(q, "recompute")] == exact[(q, "full")], (q, exact)
        assert len(exact[(q, "")].split()) >= 3, exact
    tokenizer = AutoTokenizer.from_pretrained(cfg.engine.model_path)
    scores = [agreement(tokenizer, evicted[(q, "")], evicted[(q, "full")]) for q in questions]
    assert sum(scores) / len(scores) >= 0.5, (scores, evicted)
    own: pb.AnswerTimings = timings[(questions[-1], "")]
    assert own.context_method == "engine_cache"
    # Each frame computed about once (window slides included), by vLLM's counts.
    assert 0 < own.stream_tokens_computed_per_frame <= 1.5 * FRAME_TOKENS_MAX, own
    assert own.stream_prefix_misses == 0
    # The question computed its tail (the note, the past turns, the question) and at most
    # the window's partial last block: every frame of its context (each at least its label,
    # ~20 tokens, and its kept visual tokens) came from the engine's cache.
    assert own.context_frames >= cfg.context.sink_frames + 1
    assert own.prompt_tokens_computed <= own.context_tokens - 20 * own.context_frames, own
    with urllib.request.urlopen(f"http://{cfg.health_host}:{cfg.metrics_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    frame_lines = [line for line in metrics.splitlines()
                   if line.startswith('livelens_llm_prompt_tokens_computed_total{purpose="frame"')]
    assert frame_lines and float(frame_lines[0].split()[-1]) > 0, frame_lines
