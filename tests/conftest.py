"""Session fixtures: the real stack (Tansu broker, tritonserver, vLLM in the LLM service,
encoder, gateway) started once, on free loopback ports, and stopped at the end."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack import use_free_ports
from livelens.config import LivelensConfig, load_config

TOKENS = {"test-token": "acme", "beta-token": "beta"}


def stack_config() -> LivelensConfig:
    cfg = load_config(env={})
    use_free_ports(cfg)
    cfg.gateway.tokens = dict(TOKENS)
    cfg.gateway.max_streams_per_tenant = 3
    cfg.gateway.max_frame_bytes = 512 * 1024
    cfg.gateway.max_question_chars = 200
    cfg.gateway.max_question_bytes = 400
    cfg.gateway.alert_cooldown_s = 2.0
    cfg.llm.max_answer_tokens = 16
    cfg.llm.max_instructions = 3  # low limits, for the tests of refusals
    cfg.gateway.max_instructions_per_tenant = 5
    cfg.llm.kv_store_dtype = "float32"  # stored KV bit-exact: streaming KV answers as recompute does
    # Tests send frames in bursts and check each one's tokens: the encoder drops only frames
    # far behind (its drop policy: tests/test_encoder_plan.py; measured by bench streams).
    cfg.encoder.max_frame_age_s = 30.0
    cfg.llm.max_context_lag_s = 30.0  # likewise for the LLM's (tests/test_backpressure.py)
    return cfg


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
    """A stack whose LLM service runs llm.materializer engine_cache: the session's own where
    that is the default, else a second one (its own broker, Triton and engine)."""
    if stack.cfg.llm.materializer == "engine_cache":
        yield stack
        return
    cfg = stack_config()
    cfg.llm.materializer = "engine_cache"
    yield from started_stack(cfg)
