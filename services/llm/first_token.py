"""`FirstTokenChoice`: a vLLM v1 logits processor that restricts a request's first
generated token to the ids in its `SamplingParams.extra_args["first_token_ids"]` (a yes/no
question's "Yes" and "No": `services.llm.yes_no`).

The engine loads it at start (`engine_args`); a request without the argument, and every
token after a request's first, is left alone. One request, nothing recomputed: the choice
is the model's own distribution over the composed context, cut to those tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

EXTRA_ARG = "first_token_ids"


class FirstTokenChoice(LogitsProcessor):
    """Restricts a request's first generated token to its `first_token_ids`."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        # batch index -> (allowed ids, the request's output token ids: live)
        self.requests: dict[int, tuple[tuple[int, ...], Sequence[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _state(params: Any, _prompt: list[int] | None,
               output: list[int]) -> tuple[tuple[int, ...], Sequence[int]] | None:
        ids = (params.extra_args or {}).get(EXTRA_ARG)
        return (tuple(int(i) for i in ids), output) if ids and not output else None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.requests, batch_update, self._state)
        for index in [i for i, (_, out) in self.requests.items() if out]:  # its first token is out
            del self.requests[index]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (ids, _) in self.requests.items():
            keep = torch.tensor(ids, device=logits.device)
            allowed = logits[index, keep].clone()
            logits[index] = float("-inf")
            logits[index, keep] = allowed
        return logits
