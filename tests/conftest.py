"""Session fixtures: the real stack (Tansu broker, tritonserver, vLLM in the LLM service,
encoder, gateway) started once, on free loopback ports, and stopped at the end."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import use_free_ports
from livelens.config import LivelensConfig, load_config, with_settings

TOKENS = {"test-token": "acme", "beta-token": "beta"}


def stack_config() -> LivelensConfig:
    return with_settings(use_free_ports(load_config(env={})), {
        "gateway.tokens": dict(TOKENS),
        "gateway.max_streams_per_tenant": 3,
        "gateway.max_frame_bytes": 512 * 1024,
        "gateway.max_question_chars": 200,
        "gateway.max_question_bytes": 400,
        "gateway.alert_cooldown_s": 2.0,
        "llm.engine.max_answer_tokens": 16,
        "llm.instructions.max_per_stream": 3,  # low limits, for the tests of refusals
        "gateway.max_instructions_per_tenant": 5,
        "llm.store.kv_dtype": "float32",  # stored KV bit-exact: streaming KV answers as recompute does
        # Tests send frames in bursts and check each one's tokens: the encoder drops only frames
        # far behind (its drop policy: tests/test_encoder_plan.py; measured by bench streams).
        "encoder.max_frame_age_s": 30.0,
        "llm.backpressure.max_context_lag_s": 30.0,  # likewise for the LLM's (tests/test_backpressure.py)
    })


def started_stack(cfg: LivelensConfig) -> Iterator:
    from devtools.stack import Stack, check_prerequisites

    try:
        check_prerequisites(cfg)
    except FileNotFoundError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    run_dir = Path(tempfile.mkdtemp(prefix="livelens-test-stack-"))
    s = Stack(cfg, run_dir)
    s.start(progress=lambda m: print(f"[stack] {m}", flush=True))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def stack() -> Iterator:
    yield from started_stack(stack_config())


@pytest.fixture(scope="session")
def engine_cache_stack(stack) -> Iterator:
    """A stack whose LLM service runs llm.context.materializer engine_cache: the session's own where
    that is the default, else a second one (its own broker, Triton and engine)."""
    if stack.cfg.llm.context.materializer == "engine_cache":
        yield stack
        return
    yield from started_stack(with_settings(stack_config(), {"llm.context.materializer": "engine_cache"}))
