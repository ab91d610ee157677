import pytest

from livelens.config import ConfigError, load_config


def test_defaults_load_without_file_or_env():
    cfg = load_config(env={})
    assert cfg.gateway.port == 50051
    assert cfg.kafka.partitions >= 1
    assert cfg.llm.block_size % 32 == 0


def test_yaml_then_env_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gateway:\n  port: 6000\n  tokens: {abc: acme}\nllm:\n  window_frames: 4\n")
    cfg = load_config(f, env={"LIVELENS_GATEWAY__PORT": "7000", "LIVELENS_LLM__ENFORCE_EAGER": "false"})
    assert cfg.gateway.port == 7000
    assert cfg.gateway.tokens == {"abc": "acme"}
    assert cfg.llm.window_frames == 4
    assert cfg.llm.enforce_eager is False


def test_env_tokens_pairs():
    cfg = load_config(env={"LIVELENS_GATEWAY__TOKENS": "t1=acme,t2=beta"})
    assert cfg.gateway.tokens == {"t1": "acme", "t2": "beta"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LIVELENS_GATEWAY__PORT": "abc"}, "gateway.port: expected int"),
        ({"LIVELENS_GATEWAY__NOPE": "1"}, "unknown setting gateway.nope"),
        ({"LIVELENS_LLM__BLOCK_SIZE": "16"}, "multiple of 32"),
        ({"LIVELENS_GATEWAY__TLS_CERT": "/x.pem"}, "set together"),
    ],
)
def test_bad_settings_name_the_setting(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", env={})
