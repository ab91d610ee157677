"""Tiny seeded checkpoints of the model families livelens imports, built with
transformers' own classes and saved as real checkpoint directories (no hub: the tokenizer
is SmolLM2's, from the project's own model build, with the family's image and video
tokens added).

Sizes are the smallest vLLM's CPU attention takes (head size 64)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livelens.config import LLMConfig

# LLaVA-OneVision's chat template (as its processor ships it): images, then videos, then
# the text of each message; the assistant's text marked for training masks.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGE_SIZE, PATCH = 56, 8  # a 7x7 patch grid: pooled to 4x4 (ceil), 16 tokens a frame


def build_llava_onevision(out: Path, tower: str = "siglip", seed: int = 0) -> Path:
    """A LlavaOnevisionForConditionalGeneration with random seeded weights, saved to `out`."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = AutoTokenizer.from_pretrained(LLMConfig().engine.model_path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.chat_template = LLAVA_ONEVISION_TEMPLATE
    image_id, video_id = (int(tok.convert_tokens_to_ids(t)) for t in ("<image>", "<video>"))  # type: ignore[arg-type]
    text = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                       rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
                       tie_word_embeddings=False)
    vision: Any
    strategy: Any
    common: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    if tower == "siglip":
        vision = SiglipVisionConfig(**common)
        vision.vision_use_head = False  # LLaVA-OneVision reads hidden states: no pooling head
        strategy, layer = "full", -1
    else:  # CLIP: a CLS token first, dropped by the "default" strategy; LongVA-style second-last layer
        vision = CLIPVisionConfig(**common)
        strategy, layer = "default", -2
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                               video_token_index=video_id, vision_feature_layer=layer,
                               vision_feature_select_strategy=strategy,
                               image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]])
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a trained model's newline is not zero; the seeded init may be
        model.model.image_newline.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(LLAVA_ONEVISION_TEMPLATE)
    return out


@dataclass
class Reference:
    prompt_tokens: int
    logits: torch.Tensor  # the last prompt position's
    greedy: list[int]
    top5: dict[str, float]  # the first token's top-5 log-probabilities, by token id


def llava_onevision_reference(ckpt: Path, pixels: Any, system: str, question: str, max_tokens: int) -> Reference:
    """transformers' whole model on preprocessed frames [F, 3, S, S] and a question. The
    prompt is the checkpoint's chat template with one <video> expanded to F x tokens + 1,
    as its processor does (the processor itself needs torchvision, not installed here)."""
    import math

    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration
    from transformers.utils.chat_template_utils import render_jinja_template

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = render_jinja_template([messages], chat_template=(ckpt / "chat_template.jinja").read_text(),
                                   add_generation_prompt=True)[0][0]
    ids = tok(prompt, add_special_tokens=False).input_ids
    video = model.config.video_token_index
    at = ids.index(video)
    vc = model.config.vision_config
    per_frame = math.ceil(vc.image_size // vc.patch_size / 2) ** 2
    ids = ids[:at] + [video] * (len(pixels) * per_frame + 1) + ids[at + 1:]
    inputs = dict(input_ids=torch.tensor([ids]), pixel_values_videos=torch.as_tensor(pixels)[None])
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        greedy = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)[0, len(ids):]
    top = torch.topk(torch.log_softmax(logits.double(), -1), 5)
    return Reference(len(ids), logits, greedy.tolist(),
                     {str(int(i)): float(v) for v, i in zip(top.values, top.indices, strict=True)})
