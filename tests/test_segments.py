import numpy as np

from services.llm.context import FrameSegment
from services.llm.segments import (
    Segment,
    TieredSegmentStore,
    best_first,
    retrieval_key,
    then_unscored,
    top_k_in_time_order,
)


def segment(i, hidden=16, stream="s", seed=None):
    rng = np.random.default_rng(i if seed is None else seed)
    tokens = rng.standard_normal((49, hidden)).astype(np.float16)
    return Segment(stream, i, (FrameSegment(i, i * 0.5, tokens, np.ones(49, bool)),))


def store(tmp_path, ram_segments=4, disk_segments=8, retention=1000):
    one = segment(0).nbytes
    return TieredSegmentStore(ram_budget_bytes=ram_segments * one, disk_dir=tmp_path,
                              disk_budget_bytes=disk_segments * (one + 2048), retention_segments=retention)


def test_spill_to_disk_and_back(tmp_path):
    s = store(tmp_path)
    for i in range(10):
        s.put(segment(i))
    assert s.stats.segments_ram == 4 and s.stats.segments_disk == 6 and s.stats.spilled == 6
    back = s.get("s", 0)  # the oldest: spilled first
    assert back is not None
    assert np.array_equal(back.frames[0].tokens, segment(0).frames[0].tokens)
    assert back.frames[0].seq == 0 and back.frames[0].pts_s == 0.0
    indices, keys = s.keys("s")
    assert indices == list(range(10)) and keys.shape == (10, 16)


def test_corrupt_and_missing_files_are_skipped_not_raised(tmp_path):
    s = store(tmp_path)
    for i in range(8):
        s.put(segment(i))
    files = sorted((tmp_path / "s").glob("*.seg"))
    assert len(files) == 4
    raw = bytearray(files[0].read_bytes())
    raw[-10] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    files[1].unlink()
    assert s.get("s", 0) is None and s.stats.corrupt == 1
    assert s.get("s", 1) is None and s.stats.missing == 1
    assert s.get("s", 2) is not None
    assert s.keys("s")[0] == [2, 3, 4, 5, 6, 7], "bad segments leave the index"


def test_budgets_and_retention_keep_memory_flat(tmp_path):
    s = store(tmp_path, ram_segments=4, disk_segments=8, retention=10)
    ram_peak = disk_peak = 0
    for i in range(3000):
        s.put(segment(i, stream="long", seed=i % 50))
        ram_peak = max(ram_peak, s.stats.ram_bytes)
        disk_peak = max(disk_peak, s.stats.disk_bytes)
    assert ram_peak <= s.ram_budget_bytes
    assert disk_peak <= s.disk_budget_bytes
    assert len(s) == 10 and s.keys("long")[0] == list(range(2990, 3000))
    assert len(list((tmp_path / "long").glob("*.seg"))) == s.stats.segments_disk


def test_replayed_segment_is_stored_once(tmp_path):
    s = store(tmp_path)
    s.put(segment(3))
    s.put(segment(3))
    assert len(s) == 1 and s.stats.ram_bytes == segment(3).nbytes


def test_top_k_returns_time_order():
    segs = [segment(i) for i in range(20)]
    keys = np.stack([retrieval_key(x.frames) for x in segs])
    query = segs[15].frames[0].tokens.astype(np.float32).mean(0)
    got = top_k_in_time_order(list(range(20)), keys, query, k=3)
    assert 15 in got and got == sorted(got) and len(got) == 3


def test_chunks_without_scores_follow_the_scored_ones_newest_first():
    assert best_first([3, 5, 8], np.array([0.1, 0.9, 0.5]), 2) == [5, 8]
    assert then_unscored([5, 8], [2, 3, 5, 8, 9], 4) == [5, 8, 9, 3]  # 3 and 9: keys not back yet
    assert then_unscored([], [2, 3, 9], 2) == [9, 3]
    assert then_unscored([5, 8], [5, 8, 9], 2) == [5, 8]
