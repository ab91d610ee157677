"""Turns a composed context into the `prompt_embeds` tensor vLLM takes.

Text is tokenized with the model's own tokenizer and looked up in the model's own input
embedding table (read from its safetensors), so a text-only composition gives exactly
the embeddings vLLM would compute from the same token ids.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from services.llm.context import Block, ComposedContext, EmbeddingPart, TextPart, VisualPart
from services.llm.yes_no import answer_token_ids

EMBED_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight")
CACHE_BYTES = 16 << 20  # text embeddings kept for reuse


def load_embedding_table(model_dir: Path) -> torch.Tensor:
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in EMBED_KEYS:
                if key in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                    return f.get_tensor(key)
    raise FileNotFoundError(f"no input embedding table ({' or '.join(EMBED_KEYS)}) in {model_dir}")


class ContextEmbedder:
    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} has no config.json; run `make models`")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.table = load_embedding_table(self.model_dir)
        self.hidden_size = int(json.loads((self.model_dir / "config.json").read_text())["hidden_size"])
        # Texts embedded again and again (the head, the labels of the frames in the window):
        # least recently used out past CACHE_BYTES. Every frame label and question tail is
        # new text, so a cap by count let it grow by megabytes a minute.
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_bytes = 0
        self.yes_no_ids = answer_token_ids(self.tokenizer)  # a yes/no answer's first token

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def embed_text(self, text: str) -> torch.Tensor:
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        cached = self.table[torch.tensor(self.text_ids(text), dtype=torch.long)]
        self._cache[text] = cached
        self._cache_bytes += cached.nbytes
        while self._cache_bytes > CACHE_BYTES:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return cached

    def embed(self, context: ComposedContext) -> torch.Tensor:
        pieces = []
        for part in context.parts:
            if isinstance(part, TextPart):
                pieces.append(self.embed_text(part.text))
            elif isinstance(part, VisualPart):
                tokens = part.segment.tokens
                if tokens.shape[1] != self.hidden_size:
                    raise ValueError(f"visual tokens of size {tokens.shape[1]}, model hidden size "
                                     f"{self.hidden_size}: the encoder serves another model")
                pieces.append(torch.from_numpy(np.asarray(tokens)).to(self.table.dtype))
            elif isinstance(part, EmbeddingPart):
                pieces.append(torch.from_numpy(np.asarray(part.vectors, np.float32)).to(self.table.dtype))
        return torch.cat(pieces, 0)

    def count(self, context: ComposedContext) -> int:
        return sum(self.block_tokens(b) for b in context.blocks)

    def block_tokens(self, block: Block) -> int:
        # Through embed_text's cache: the text parts are tokenized once for count and embed.
        return sum(int(self.embed_text(p.text).shape[0]) if isinstance(p, TextPart)
                   else p.segment.num_tokens if isinstance(p, VisualPart) else p.num_tokens for p in block.parts)
