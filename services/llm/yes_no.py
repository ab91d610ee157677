"""Yes/no questions answered with Yes or No first, decided by the model's own probabilities.

A small LLM asked "Did a cat appear?" over a context that shows one often starts with
something else ("The video has no information about..."), which neither a person nor a
program can read as an answer. So the first token of a yes/no question's answer is
chosen among the tokens of "Yes" and "No" only: the likelier of the two by the model's
own distribution over the composed context (greedy: its argmax; sampled: renormalised
over the two). The rest of the answer is generated as usual, after that word (it then
says when, or what was seen instead).

The choice is made in the engine by `services.llm.first_token.FirstTokenChoice`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# A question that starts with an auxiliary verb asks yes or no ("Did a cat appear?"),
# unless it offers a choice ("Is it a cat or a dog?").
_AUXILIARIES = ("did", "does", "do", "is", "are", "was", "were", "has", "have", "had", "can", "could", "will",
                "would", "should", "shall", "may", "might", "must")
_YES_NO = re.compile(rf"^\s*(?:{'|'.join(_AUXILIARIES)})(?:n't)?\b", re.IGNORECASE)


def is_yes_no(question: str) -> bool:
    """Whether a question is answered yes or no."""
    return bool(_YES_NO.match(question)) and not re.search(r"\bor\b", question, re.IGNORECASE)


def answer_token_ids(tokenizer: Any, words: Sequence[str] = ("Yes", "No")) -> tuple[int, ...]:
    """The token of each word as an answer's first token; () when a word is more than one
    token for this tokenizer (the first word is then left to the model)."""
    ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
    return tuple(i[0] for i in ids) if all(len(i) == 1 for i in ids) else ()
