import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from livelens.config import ConfigError
from services.common.settings import load_service_config
from services.llm.budget import check_context_fits, frame_tokens

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_load_without_file_or_env():
    cfg = load_service_config(env={})
    assert cfg.gateway.port == 50051
    assert cfg.kafka.partitions >= 1
    assert cfg.llm.engine.block_size % 32 == 0


def test_yaml_then_env_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gateway:\n  port: 6000\n  tokens: {abc: acme}\nllm:\n  window_frames: 4\n")
    cfg = load_service_config(f, env={"LIVELENS_GATEWAY__PORT": "7000", "LIVELENS_LLM__ENFORCE_EAGER": "false"})
    assert cfg.gateway.port == 7000
    assert cfg.gateway.tokens == {"abc": "acme"}
    assert cfg.llm.context.window_frames == 4
    assert cfg.llm.engine.enforce_eager is False


def test_env_tokens_pairs():
    cfg = load_service_config(env={"LIVELENS_GATEWAY__TOKENS": "t1=acme,t2=beta"})
    assert cfg.gateway.tokens == {"t1": "acme", "t2": "beta"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LIVELENS_GATEWAY__PORT": "abc"}, "gateway.port: expected int"),
        ({"LIVELENS_GATEWAY__NOPE": "1"}, "unknown setting gateway.nope"),
        ({"LIVELENS_LLM__ENGINE__BLOCK_SIZE": "16"}, "multiple of 32"),
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
        ({"LIVELENS_LLM__CONTEXT__SINK_FRAMES": "-1"}, "llm.context.sink_frames must be >= 0"),
        ({"LIVELENS_LLM__CONTEXT__WINDOW_FRAMES": "0"}, "llm.context.window_frames must be >= 1"),
        ({"LIVELENS_LLM__CONTEXT__DIALOGUE_TURNS": "-2"}, "llm.context.dialogue_turns must be >= 0"),
        ({"LIVELENS_LLM__ENGINE__MAX_ANSWER_TOKENS": "0"}, "llm.engine.max_answer_tokens must be > 0"),
        ({"LIVELENS_LLM__ENGINE__MAX_MODEL_LEN": "-4096"}, "llm.engine.max_model_len must be > 0"),
        ({"LIVELENS_LLM__ENGINE__TEMPERATURE": "-0.1"}, "llm.engine.temperature must be >= 0"),
        ({"LIVELENS_LLM__ENGINE__TEMPERATURE": "nan"}, "llm.engine.temperature must be >= 0"),
        ({"LIVELENS_LLM__BACKPRESSURE__FRAME_WAIT_S": "-1"}, "llm.backpressure.frame_wait_s must be >= 0"),
        ({"LIVELENS_LLM__RETRIEVAL__TOKEN_BUDGET": "-1"}, "llm.retrieval.token_budget must be >= 0"),
        ({"LIVELENS_LLM__STORE__KV_RAM_MB": "-1"}, "llm.store.kv_ram_mb must be >= 0"),
        ({"LIVELENS_LLM__ENGINE__KV_CACHE_GB": "0"}, "llm.engine.kv_cache_gb must be > 0"),
        ({"LIVELENS_LLM__ENGINE__BLOCK_SIZE": "0"}, "llm.engine.block_size must be a positive multiple of 32"),
        ({"LIVELENS_LLM__ENGINE__DTYPE": "fp8"}, "llm.engine.dtype must be one of 'auto'"),
        ({"LIVELENS_LLM__CONTEXT__MATERIALIZER": "paged"}, "llm.context.materializer must be one of 'recompute', "
                                                           "'streaming_kv', 'engine_cache', got 'paged'"),
        ({"LIVELENS_LLM__CONTEXT__WINDOW_SLIDE_FRAMES": "9"},
         r"llm.context.window_slide_frames must be within \[0, llm.context.window_frames"),
        # an earlier release's name: still read (with a warning), and checked under its new one
        ({"LIVELENS_LLM__MATERIALIZER": "paged"}, "llm.context.materializer must be one of"),
    ],
)
def test_nonsensical_llm_values_are_refused(env, message):
    with pytest.raises(ConfigError, match=message):
        load_service_config(env=env)


def load_checked(path=None, env=None):
    """The settings as the LLM service loads them: the context checked against the engine."""
    cfg = load_service_config(path, env=env)
    check_context_fits(cfg)
    return cfg


def test_default_context_fits_the_model_length():
    cfg = load_checked(env={})
    assert cfg.llm.context.window_frames == 8 and cfg.llm.engine.max_model_len == 4096


def test_a_window_that_cannot_fit_is_refused_from_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("llm:\n  context:\n    window_frames: 64\n")
    with pytest.raises(ConfigError) as err:
        load_checked(f, env={})
    message = str(err.value)
    assert "llm.context.window_frames (64)" in message and "llm.engine.max_model_len (4096)" in message
    assert "llm.context.sink_frames (2)" in message and "llm.retrieval.token_budget (512)" in message
    assert "lower llm.context.window_frames (at most " in message


def test_a_window_that_cannot_fit_is_refused_from_env():
    with pytest.raises(ConfigError, match=r"llm\.context\.window_frames \(64\).*> llm\.engine\.max_model_len \(4096\)"):
        load_checked(env={"LIVELENS_LLM__CONTEXT__WINDOW_FRAMES": "64"})
    # The same window fits a longer model length.
    cfg = load_checked(env={"LIVELENS_LLM__CONTEXT__WINDOW_FRAMES": "64",
                            "LIVELENS_LLM__ENGINE__MAX_MODEL_LEN": "8192"})
    assert cfg.llm.context.window_frames == 64


def test_the_largest_window_named_in_the_error_fits(tmp_path):
    env = {"LIVELENS_LLM__CONTEXT__WINDOW_FRAMES": "64", "LIVELENS_TRITON__MODEL_REPOSITORY": str(tmp_path)}
    with pytest.raises(ConfigError) as err:
        load_checked(env=env)
    found = re.search(r"at most (\d+) fit", str(err.value))
    assert found, err.value
    fit = int(found.group(1))
    assert load_checked(env={**env, "LIVELENS_LLM__CONTEXT__WINDOW_FRAMES": str(fit)}).llm.context.window_frames == fit
    with pytest.raises(ConfigError):
        load_checked(env={**env, "LIVELENS_LLM__CONTEXT__WINDOW_FRAMES": str(fit + 1)})


def test_tokens_per_frame_come_from_the_vision_models_grid(tmp_path):
    """A 14x14 ViT grid: 196 tokens a frame, read from the model repository; without a
    model_info.json the check assumes the default model's 49 and says so."""
    model = tmp_path / "vision_vit" / "1"
    model.mkdir(parents=True)
    (model / "model_info.json").write_text(json.dumps({"grid": [14, 14], "tokens_per_frame": 196}))
    env = {"LIVELENS_TRITON__MODEL_REPOSITORY": str(tmp_path), "LIVELENS_ENCODER__MODEL_NAME": "vision_vit"}
    assert frame_tokens(load_checked(env=env))[0] == 196
    load_checked(env=env)  # the default window fits 196-token frames too
    with pytest.raises(ConfigError, match=r"frames of 196 tokens.*14x14 grid"):
        load_checked(env={**env, "LIVELENS_LLM__CONTEXT__WINDOW_FRAMES": "16"})
    assert load_checked(env={**env, "LIVELENS_ENCODER__MODEL_NAME": "nope"}).encoder.model_name == "nope"
    with pytest.raises(ConfigError, match=r"frames of 49 tokens.*assumed"):
        load_checked(env={**env, "LIVELENS_ENCODER__MODEL_NAME": "nope", "LIVELENS_LLM__CONTEXT__WINDOW_FRAMES": "64"})


def test_livelens_up_refuses_a_context_that_cannot_fit():
    """The CLI maps the configuration error to exit status 2 before starting anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELENS_")}
    env["LIVELENS_LLM__CONTEXT__WINDOW_FRAMES"] = "64"
    proc = subprocess.run([sys.executable, "-m", "livelens.cli", "up", "--no-demo"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("livelens: error: configuration: ")
    assert "llm.context.window_frames (64)" in proc.stderr and "llm.engine.max_model_len (4096)" in proc.stderr


def test_frame_tags_count_in_the_context_budget():
    """Each tag lengthens every frame's label: enough of them no longer fit."""
    load_checked(env={"LIVELENS_ENCODER__FRAME_TAGS": "5"})
    with pytest.raises(ConfigError, match=r"encoder.frame_tags \(60\)"):
        load_checked(env={"LIVELENS_ENCODER__FRAME_TAGS": "60"})


def test_settings_of_earlier_releases_are_read_with_a_warning(tmp_path, caplog):
    """llm.window_frames is now llm.context.window_frames: the old name still works, in YAML
    and the environment, and the log says what to write instead; the new name wins."""
    f = tmp_path / "c.yaml"
    f.write_text("llm:\n  window_frames: 4\n  retrieve_top_k: 2\n  instruction_scorer: tags\n"
                 "encoder:\n  model_name: vision_vit\ntriton:\n  model_name: vision_encoder\n")
    with caplog.at_level("WARNING", logger="livelens.config"):
        cfg = load_service_config(f, env={"LIVELENS_LLM__KV_STORE_DTYPE": "float32",
                                          "LIVELENS_LLM__MAX_ANSWER_TOKENS": "20",
                                          "LIVELENS_LLM__ENGINE__MAX_ANSWER_TOKENS": "30"})
    assert cfg.llm.context.window_frames == 4 and cfg.llm.retrieval.top_k == 2
    assert cfg.llm.instructions.scorer == "tags" and cfg.llm.store.kv_dtype == "float32"
    assert cfg.llm.engine.max_answer_tokens == 30 and cfg.encoder.model_name == "vision_vit"
    said = caplog.text
    assert "llm.window_frames is deprecated: it is now llm.context.window_frames" in said
    assert "LIVELENS_LLM__KV_STORE_DTYPE (now LIVELENS_LLM__STORE__KV_DTYPE)" in said


def test_the_config_is_frozen_and_changed_by_copy():
    import dataclasses

    from livelens.config import with_settings

    cfg = load_service_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.llm.context.window_frames = 4  # type: ignore[misc]
    changed = with_settings(cfg, {"llm.context.window_frames": 4, "gateway.port": "7001"})
    assert changed.llm.context.window_frames == 4 and changed.gateway.port == 7001
    assert cfg.llm.context.window_frames == 8 and cfg.gateway.port == 50051
    with pytest.raises(ConfigError, match="llm.context.materializer must be one of"):
        with_settings(cfg, {"llm.context.materializer": "paged"})
    with pytest.raises(ConfigError, match="unknown setting llm.context.nope"):
        with_settings(cfg, {"llm.context.nope": 1})


def test_build_only_settings_are_not_in_the_runtime_config(tmp_path, caplog):
    """vision.* is read by `make models` alone: a service's config file may still hold it."""
    f = tmp_path / "c.yaml"
    f.write_text("vision:\n  projector: trained\n")
    with caplog.at_level("WARNING", logger="livelens.config"):
        cfg = load_service_config(f, env={})
    assert not hasattr(cfg, "vision") and "read by `make models` only" in caplog.text
