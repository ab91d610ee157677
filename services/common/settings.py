"""The services' configuration: `livelens.config` (the settings every reader shares, the
client commands included) and what only a server checks when it loads them: the imported
model's config (`model.spec`) applied, and the largest context the LLM service composes
fitting the engine.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from livelens.config import ConfigError, LivelensConfig, load_config
from services.common.model_spec import ModelSpec, SpecError


def load_service_config(path: str | os.PathLike[str] | None = None,
                        env: dict[str, str] | None = None) -> LivelensConfig:
    """`load_config`, then the model config applied and the context checked."""
    cfg = load_config(path, env)
    apply_model_spec(cfg)
    check_context_fits(cfg)
    return cfg


def apply_model_spec(cfg: LivelensConfig) -> None:
    """The settings `model.spec` decides (see ModelConfig)."""
    if not cfg.model.spec:
        return
    try:
        spec = ModelSpec.read(cfg.model.spec)
    except SpecError as exc:
        raise ConfigError(f"model.spec: {exc}") from exc
    root = Path(cfg.model.spec) if Path(cfg.model.spec).is_dir() else Path(cfg.model.spec).parent
    cfg.llm.model_path = str(root / spec.llm_dir)
    cfg.encoder.model_name = cfg.triton.model_name = spec.vision_model
    cfg.encoder.frame_tags = 0
    cfg.llm.recall_notes = 0  # its notes are made of tags
    rope_type = spec.rope.get("rope_type", "default")
    if cfg.llm.materializer == "streaming_kv" and rope_type != "default":
        raise ConfigError(f"model.spec {cfg.model.spec}: the model's RoPE is {rope_type!r}; the streaming-KV "
                          "connector re-rotates plain RoPE only: set llm.materializer: engine_cache")


# What the context check (below) counts besides visual tokens: the text the LLM service
# composes around them (services/llm/context.py), in SmolLM2's tokenizer. Estimates where
# the text is not known in advance; measured where it is.
HEAD_MARKUP_TOKENS = 14  # ChatML around the system prompt and "The video so far:" (measured)
CHARS_PER_TOKEN = 3  # the system prompt's length in tokens, over-estimated (English is ~4.4)
FRAME_LABEL_TOKENS = 16  # "<frame t=...s>" + "</frame>\n": 13 tokens at t=0, 16 at t=1 h (measured)
TAG_MARKUP_TOKENS = 4  # ' seen=""' in a frame's label
# " Seen at 3600.0s: a soccer ball (). A soccer ball appeared: it was first seen at
# 3600.0s." in a question's note: 36 tokens (measured); 45 with a longer word and tag
NOTE_FRAME_TOKENS = 45
UNSEEN_NOTE_TOKENS = 16  # " Not seen so far: ..." (the question names the things; QUESTION_TOKENS bounds them)
TAG_TOKENS = 7  # one tag and its ", ": ImageNet's longest short names are 6 tokens
QUESTION_TOKENS = 64  # a question of ~250 characters (gateway.max_question_chars allows more)
TURN_MARKUP_TOKENS = 11  # ChatML around a question and its answer (measured)
DEFAULT_FRAME_TOKENS = 49  # MobileNetV2's 7x7 grid, the default vision model


def frame_tokens(cfg: LivelensConfig) -> tuple[int, str]:
    """Visual tokens of a whole frame (the encoder's first and refresh frames are whole),
    from the vision model's `model_info.json` in the Triton model repository (its "grid"),
    and where that number comes from. Without a readable one: 49, the default model's."""
    if cfg.model.spec:  # an imported model: its model config says (the LLM pod has no Triton repository)
        spec = ModelSpec.read(cfg.model.spec)
        return spec.tokens_per_frame, f"the {spec.grid[0]}x{spec.grid[1]} grid of model.spec {cfg.model.spec}"
    info = Path(cfg.triton.model_repository) / cfg.encoder.model_name / "1" / "model_info.json"
    try:
        grid_h, grid_w = json.loads(info.read_text())["grid"]
        tokens = int(grid_h) * int(grid_w)
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_FRAME_TOKENS, (f"assumed, the default vision model's 7x7 grid: no readable "
                                      f"grid in {info}")
    if tokens < 1:
        raise ConfigError(f"{info}: grid {grid_h}x{grid_w} holds no tokens")
    return tokens, f"the {grid_h}x{grid_w} grid of encoder.model_name {cfg.encoder.model_name!r} ({info})"


def check_context_fits(cfg: LivelensConfig) -> None:
    """The largest context the LLM service composes for a question, plus the answer, must
    fit llm.max_model_len: [system][sink][retrieved][window][dialogue][question]. Over it,
    vLLM refuses the warm-up and every full context (the service would die starting)."""
    c = cfg.llm
    per_frame, source = frame_tokens(cfg)
    head = HEAD_MARKUP_TOKENS + math.ceil(len(c.system_prompt) / CHARS_PER_TOKEN)
    frames = c.sink_frames + c.window_frames
    if c.retrieve_top_k > 0:
        retrieved_frames = c.retrieve_top_k * c.chunk_frames
        retrieved = min(c.retrieve_token_budget, retrieved_frames * per_frame)
    else:
        retrieved_frames = retrieved = 0
    per_label = 0 if cfg.model.spec else FRAME_LABEL_TOKENS + (  # an imported family's frames are unlabelled
        TAG_MARKUP_TOKENS + TAG_TOKENS * cfg.encoder.frame_tags if cfg.encoder.frame_tags > 0 else 0)
    labels = (frames + retrieved_frames) * per_label
    notes = (c.recall_notes + 1) * (NOTE_FRAME_TOKENS + TAG_TOKENS * cfg.encoder.frame_tags) \
        + UNSEEN_NOTE_TOKENS if c.recall_notes > 0 and cfg.encoder.frame_tags > 0 else 0
    dialogue = c.dialogue_turns * (QUESTION_TOKENS + c.max_answer_tokens + TURN_MARKUP_TOKENS)
    question = QUESTION_TOKENS + TURN_MARKUP_TOKENS
    total = head + frames * per_frame + retrieved + labels + notes + dialogue + question + c.max_answer_tokens
    if total <= c.max_model_len:
        return
    # The most window frames that fit with everything else as it is.
    per_window_frame = per_frame + per_label
    fit = (c.max_model_len - (total - c.window_frames * per_window_frame)) // per_window_frame
    advice = (f"lower llm.window_frames (at most {fit} fit) or raise llm.max_model_len" if fit >= 1 else
              "raise llm.max_model_len, or lower llm.sink_frames, llm.retrieve_token_budget, "
              "llm.dialogue_turns or llm.max_answer_tokens (not even one window frame fits)")
    retrieval = (f" + retrieved frames: min(llm.retrieve_token_budget ({c.retrieve_token_budget}), "
                 f"llm.retrieve_top_k ({c.retrieve_top_k}) x llm.chunk_frames ({c.chunk_frames}) "
                 f"x {per_frame}) = {retrieved} tokens" if c.retrieve_top_k > 0 else "")
    raise ConfigError(
        f"the largest context does not fit the LLM: the system prompt and head (~{head} tokens)"
        f" + llm.sink_frames ({c.sink_frames}) + llm.window_frames ({c.window_frames}) frames"
        f" of {per_frame} tokens ({frames * per_frame}){retrieval}"
        f" + frame labels with encoder.frame_tags ({cfg.encoder.frame_tags}) tags"
        f" ({frames + retrieved_frames} x ~{per_label} = {labels})"
        f" + the question's note of llm.recall_notes ({c.recall_notes}) + 1 frames' tags (~{notes})"
        f" + llm.dialogue_turns ({c.dialogue_turns}) past turns (~{dialogue})"
        f" + a question (~{question}) + llm.max_answer_tokens ({c.max_answer_tokens})"
        f" = {total} tokens > llm.max_model_len ({c.max_model_len}): {advice}"
        f" ({per_frame} tokens a frame: {source})")
