import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from livelens.config import ConfigError
from services.common.settings import frame_tokens, load_service_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_load_without_file_or_env():
    cfg = load_service_config(env={})
    assert cfg.gateway.port == 50051
    assert cfg.kafka.partitions >= 1
    assert cfg.llm.block_size % 32 == 0


def test_yaml_then_env_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gateway:\n  port: 6000\n  tokens: {abc: acme}\nllm:\n  window_frames: 4\n")
    cfg = load_service_config(f, env={"LIVELENS_GATEWAY__PORT": "7000", "LIVELENS_LLM__ENFORCE_EAGER": "false"})
    assert cfg.gateway.port == 7000
    assert cfg.gateway.tokens == {"abc": "acme"}
    assert cfg.llm.window_frames == 4
    assert cfg.llm.enforce_eager is False


def test_env_tokens_pairs():
    cfg = load_service_config(env={"LIVELENS_GATEWAY__TOKENS": "t1=acme,t2=beta"})
    assert cfg.gateway.tokens == {"t1": "acme", "t2": "beta"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LIVELENS_GATEWAY__PORT": "abc"}, "gateway.port: expected int"),
        ({"LIVELENS_GATEWAY__NOPE": "1"}, "unknown setting gateway.nope"),
        ({"LIVELENS_LLM__BLOCK_SIZE": "16"}, "multiple of 32"),
        ({"LIVELENS_GATEWAY__TLS_CERT": "/x.pem"}, "set together"),
        ({"LIVELENS_ENCODER__FRAME_TAGS": "-1"}, "encoder.frame_tags must be >= 0"),
        ({"LIVELENS_ENCODER__TAG_MIN_PROB": "1.5"}, r"encoder.tag_min_prob within \[0, 1\], got 3 and 1.5"),
    ],
)
def test_bad_settings_name_the_setting(env, message):
    with pytest.raises(ConfigError, match=message):
        load_service_config(env=env)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_service_config(tmp_path / "nope.yaml", env={})


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LIVELENS_LLM__SINK_FRAMES": "-1"}, "llm.sink_frames must be >= 0"),
        ({"LIVELENS_LLM__WINDOW_FRAMES": "0"}, "llm.window_frames >= 1"),
        ({"LIVELENS_LLM__DIALOGUE_TURNS": "-2"}, "llm.dialogue_turns must be >= 0"),
        ({"LIVELENS_LLM__MAX_ANSWER_TOKENS": "0"}, "llm.max_answer_tokens must be > 0"),
        ({"LIVELENS_LLM__MAX_MODEL_LEN": "-4096"}, "llm.max_model_len must be > 0"),
        ({"LIVELENS_LLM__TEMPERATURE": "-0.1"}, "llm.temperature must be >= 0"),
        ({"LIVELENS_LLM__TEMPERATURE": "nan"}, "llm.temperature must be >= 0"),
        ({"LIVELENS_LLM__FRAME_WAIT_S": "-1"}, "llm.frame_wait_s must be >= 0"),
        ({"LIVELENS_LLM__RETRIEVE_TOKEN_BUDGET": "-1"}, "llm.retrieve_token_budget must be >= 0"),
        ({"LIVELENS_LLM__KV_RAM_MB": "-1"}, "llm.kv_ram_mb must be >= 0"),
        ({"LIVELENS_LLM__KV_CACHE_GB": "0"}, "llm.kv_cache_gb must be > 0"),
        ({"LIVELENS_LLM__BLOCK_SIZE": "0"}, "llm.block_size must be a positive multiple of 32"),
        ({"LIVELENS_LLM__DTYPE": "fp8"}, "llm.dtype must be auto"),
        ({"LIVELENS_LLM__MATERIALIZER": "paged"}, "llm.materializer must be one of recompute, streaming_kv, "
                                                  "engine_cache"),
        ({"LIVELENS_LLM__WINDOW_SLIDE_FRAMES": "9"}, r"llm.window_slide_frames must be within \[0, llm.window_frames"),
    ],
)
def test_nonsensical_llm_values_are_refused(env, message):
    with pytest.raises(ConfigError, match=message):
        load_service_config(env=env)


def test_default_context_fits_the_model_length():
    cfg = load_service_config(env={})
    assert cfg.llm.window_frames == 8 and cfg.llm.max_model_len == 4096


def test_a_window_that_cannot_fit_is_refused_from_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("llm:\n  window_frames: 64\n")
    with pytest.raises(ConfigError) as err:
        load_service_config(f, env={})
    message = str(err.value)
    assert "llm.window_frames (64)" in message and "llm.max_model_len (4096)" in message
    assert "llm.sink_frames (2)" in message and "llm.retrieve_token_budget (512)" in message
    assert "lower llm.window_frames (at most " in message


def test_a_window_that_cannot_fit_is_refused_from_env():
    with pytest.raises(ConfigError, match=r"llm\.window_frames \(64\).*> llm\.max_model_len \(4096\)"):
        load_service_config(env={"LIVELENS_LLM__WINDOW_FRAMES": "64"})
    # The same window fits a longer model length.
    cfg = load_service_config(env={"LIVELENS_LLM__WINDOW_FRAMES": "64", "LIVELENS_LLM__MAX_MODEL_LEN": "8192"})
    assert cfg.llm.window_frames == 64


def test_the_largest_window_named_in_the_error_fits(tmp_path):
    env = {"LIVELENS_LLM__WINDOW_FRAMES": "64", "LIVELENS_TRITON__MODEL_REPOSITORY": str(tmp_path)}
    with pytest.raises(ConfigError) as err:
        load_service_config(env=env)
    found = re.search(r"at most (\d+) fit", str(err.value))
    assert found, err.value
    fit = int(found.group(1))
    assert load_service_config(env={**env, "LIVELENS_LLM__WINDOW_FRAMES": str(fit)}).llm.window_frames == fit
    with pytest.raises(ConfigError):
        load_service_config(env={**env, "LIVELENS_LLM__WINDOW_FRAMES": str(fit + 1)})


def test_tokens_per_frame_come_from_the_vision_models_grid(tmp_path):
    """A 14x14 ViT grid: 196 tokens a frame, read from the model repository; without a
    model_info.json the check assumes the default model's 49 and says so."""
    model = tmp_path / "vision_vit" / "1"
    model.mkdir(parents=True)
    (model / "model_info.json").write_text(json.dumps({"grid": [14, 14], "tokens_per_frame": 196}))
    env = {"LIVELENS_TRITON__MODEL_REPOSITORY": str(tmp_path), "LIVELENS_ENCODER__MODEL_NAME": "vision_vit"}
    assert frame_tokens(load_service_config(env=env))[0] == 196
    load_service_config(env=env)  # the default window fits 196-token frames too
    with pytest.raises(ConfigError, match=r"frames of 196 tokens.*14x14 grid"):
        load_service_config(env={**env, "LIVELENS_LLM__WINDOW_FRAMES": "16"})
    assert load_service_config(env={**env, "LIVELENS_ENCODER__MODEL_NAME": "nope"}).encoder.model_name == "nope"
    with pytest.raises(ConfigError, match=r"frames of 49 tokens.*assumed"):
        load_service_config(env={**env, "LIVELENS_ENCODER__MODEL_NAME": "nope", "LIVELENS_LLM__WINDOW_FRAMES": "64"})


def test_livelens_up_refuses_a_context_that_cannot_fit():
    """The CLI maps the configuration error to exit status 2 before starting anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELENS_")}
    env["LIVELENS_LLM__WINDOW_FRAMES"] = "64"
    proc = subprocess.run([sys.executable, "-m", "livelens.cli", "up", "--no-demo"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("livelens: error: configuration: ")
    assert "llm.window_frames (64)" in proc.stderr and "llm.max_model_len (4096)" in proc.stderr


def test_frame_tags_count_in_the_context_budget():
    """Each tag lengthens every frame's label: enough of them no longer fit."""
    load_service_config(env={"LIVELENS_ENCODER__FRAME_TAGS": "5"})
    with pytest.raises(ConfigError, match=r"encoder.frame_tags \(60\)"):
        load_service_config(env={"LIVELENS_ENCODER__FRAME_TAGS": "60"})
