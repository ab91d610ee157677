"""The livelens model config: everything that depends on the model family, in one file.

`livelens models import` writes it (`livelens_model.json` in the imported model's
directory); the encoder (preprocessing, the Triton model's name and grid), the LLM service
(the language model's directory, where frames go in the chat template, what follows the
last frame, RoPE for the KV connector) and the Helm chart read it, so switching models is
one setting.

The chat layout is cut from the family's own chat template, rendered once with
placeholders: what comes before the frames (with the system prompt), what follows the
last frame (text, and for LLaVA-OneVision the `image_newline` vector), a past turn, and
the question's turn up to the assistant's answer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPEC_NAME = "livelens_model.json"
SYSTEM, QUESTION, ANSWER = "\x00SYSTEM\x00", "\x00QUESTION\x00", "\x00ANSWER\x00"


class SpecError(ValueError):
    """A model config that cannot be read or rendered; the message names the file."""


@dataclass(frozen=True)
class ChatLayout:
    head: str  # before the frames; "{system}" where the system prompt goes
    after_frames: str  # text after the last frame (after `after_frames_embedding`)
    turn: str  # a past turn: "{question}", "{answer}"
    question: str  # the question's turn up to the answer: "{question}"
    after_frames_embedding: str | None = None  # file (beside the spec) of a vector after the last frame
    frame_open: str = ""  # text before each frame's tokens: "{t}" its stream time, "{seen}" its tags
    frame_close: str = ""  # text after each frame's tokens


# The built-in model's layout (SmolLM2's ChatML): frames in the first user turn, each
# labelled with its stream time and tags; questions in turns of their own.
DEFAULT_CHAT = ChatLayout(
    head="<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nThe video so far:\n",
    after_frames="<|im_end|>\n<|im_start|>user\n",
    turn="{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n<|im_start|>user\n",
    question="{question}<|im_end|>\n<|im_start|>assistant\n",
    frame_open="<frame t={t:.1f}s{seen}>",
    frame_close="</frame>\n",
)


@dataclass
class Preprocessing:
    size: int
    mean: list[float]
    std: list[float]
    resample: str = "bicubic"
    rescale: float = 1 / 255


@dataclass
class ModelSpec:
    name: str
    family: str
    source: str  # the checkpoint's directory name and its config's hash
    vision_model: str  # the Triton model's name in the model repository
    grid: list[int]  # [h, w] of a frame's tokens
    hidden_size: int
    tokens_dtype: str
    llm_dir: str  # relative to the spec's directory
    dtype: str
    rope: dict[str, Any]  # the LM's rope_parameters (rope_theta, rope_type, scaling)
    chat: ChatLayout
    preprocessing: Preprocessing
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    def write(self, directory: Path) -> Path:
        path = directory / SPEC_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> ModelSpec:
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_NAME
        try:
            data = json.loads(path.read_text())
            data["chat"] = ChatLayout(**data["chat"])
            data["preprocessing"] = Preprocessing(**data["preprocessing"])
            return cls(**data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpecError(f"{path}: not a livelens model config ({exc})") from exc


def served_chat(spec_path: str) -> tuple[ChatLayout, Any]:
    """The chat layout the LLM service composes with, and the vector after the frames
    ([n, hidden] float32, or None): the model config's, or the built-in model's."""
    if not spec_path:
        return DEFAULT_CHAT, None
    import numpy as np

    spec = ModelSpec.read(spec_path)
    root = Path(spec_path) if Path(spec_path).is_dir() else Path(spec_path).parent
    name = spec.chat.after_frames_embedding
    after = np.load(root / name).astype(np.float32).reshape(-1, spec.hidden_size) if name else None
    return spec.chat, after


def chat_layout(template: str, video_token: str) -> ChatLayout:
    """Cut a chat template into the pieces livelens composes around frames: rendered with
    a system prompt, one video then the question in the user's turn, and (for the past
    turn) a second conversation with an answer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list[dict[str, Any]], prompt: bool) -> str:
        result: Any = render_jinja_template([messages], chat_template=template, add_generation_prompt=prompt)
        return str(result[0][0])  # ([rendered], [generation indices])

    system = {"role": "system", "content": [{"type": "text", "text": SYSTEM}]}
    asked = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}
    one = render([system, asked], True)
    if one.count(video_token) != 1 or SYSTEM not in one or QUESTION not in one:
        raise SpecError(f"the chat template does not render a system prompt, one {video_token} and the question "
                        f"in order: {one!r}")
    head, _, rest = one.partition(video_token)
    after_frames, _, question_end = rest.partition(QUESTION)
    # A past turn, as it follows the frames: its question closes the video's user turn (or
    # the previous answer's next one), its answer is followed by the next user turn's opening.
    two = render([system, asked, {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
                  {"role": "user", "content": [{"type": "text", "text": QUESTION}]}], True)
    start = two.index(ANSWER) + len(ANSWER)
    next_open = two[start:two.index(QUESTION, start)]  # e.g. "<|im_end|>\n<|im_start|>user\n"
    return ChatLayout(head=head.replace(SYSTEM, "{system}"), after_frames=after_frames,
                      turn="{question}" + question_end + "{answer}" + next_open,
                      question="{question}" + question_end)
