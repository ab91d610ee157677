"""What the engine computed for each prompt, against what it took from its cache.

vLLM reports, for every request, how many of its prompt tokens it did not compute
(`RequestOutput.num_cached_tokens`: its prefix cache, plus what a KV connector loaded).
Prompt minus that is the work the request cost, a figure that holds on any hardware: a
frame's prefill, a question, an instruction check and a remark are each counted by what
they computed, per stream (`PromptCompute`, owned by its `Stream`, in `AnswerTimings`) and
over all streams (Prometheus counters by purpose and tenant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import Counter

Purpose = Literal["frame", "question", "check", "remark"]
PURPOSES: tuple[Purpose, ...] = ("frame", "question", "check", "remark")

TOKENS_COMPUTED = Counter(
    "livelens_llm_prompt_tokens_computed", "Prompt tokens the engine computed (not taken from its cache), "
    "by purpose (frame prefill, question, instruction check, remark) and tenant", ["purpose", "tenant"])
TOKENS_CACHED = Counter(
    "livelens_llm_prompt_tokens_cached", "Prompt tokens the engine took from its cache (vLLM's prefix cache, "
    "or a KV connector), by purpose and tenant", ["purpose", "tenant"])
ITEMS = Counter(
    "livelens_llm_prompt_items", "What the prompt tokens were spent on: frames prefilled (purpose frame), "
    "else requests; tokens computed per frame = computed / items", ["purpose", "tenant"])
PREFIX_MISSES = Counter(
    "livelens_llm_prefix_misses", "Frame prefill requests that found less of their stream's prefix in the "
    "engine's cache than the request before left there (evicted by other streams' pages)", ["tenant"])


@dataclass
class Spent:
    """One purpose's account: items (frames, or requests), prompt tokens, computed tokens."""

    items: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0

    @property
    def computed_per_item(self) -> float:
        return self.computed_tokens / self.items if self.items else 0.0


@dataclass
class PromptCompute:
    """One stream's account (`tenant`: its Prometheus label)."""

    tenant: str = ""
    spent: dict[str, Spent] = field(default_factory=lambda: {p: Spent() for p in PURPOSES})
    prefix_misses: int = 0

    def record(self, purpose: Purpose, prompt_tokens: int, cached_tokens: int, items: int = 1) -> int:
        """A request of `prompt_tokens` of which the engine took `cached_tokens` from its
        cache, spent on `items` (frames, for a frame prefill); returns the tokens computed."""
        computed = max(0, prompt_tokens - cached_tokens)
        s = self.spent[purpose]
        s.items += items
        s.requests += 1
        s.prompt_tokens += prompt_tokens
        s.computed_tokens += computed
        TOKENS_COMPUTED.labels(purpose, self.tenant).inc(computed)
        TOKENS_CACHED.labels(purpose, self.tenant).inc(prompt_tokens - computed)
        ITEMS.labels(purpose, self.tenant).inc(items)
        return computed

    def missed_prefix(self) -> None:
        self.prefix_misses += 1
        PREFIX_MISSES.labels(self.tenant).inc()

    def per(self, purpose: Purpose) -> float:
        """Tokens computed per frame (`frame`) or per request (the others), so far."""
        return self.spent[purpose].computed_per_item
