"""Query-by-example retrieval on real footage, through the real vision model and store."""


import pytest

from devtools.bench.needle import FPS, VisionModel, run_one
from devtools.models.settings import VisionBuild
from livelens.config import load_config, with_settings
from livelens.video import read_frames, sample_video


@pytest.fixture(scope="module")
def encoded():
    cfg = load_config(env={})
    if not VisionBuild.of(cfg).onnx_path.is_file():
        pytest.skip("vision model not built (make models)")
    model = VisionModel(VisionBuild.of(cfg).onnx_path)
    hay = model.encode([f.rgb for f in read_frames(sample_video("vtest.avi"), FPS, max_seconds=30)])
    clip = [f.rgb for f in read_frames(sample_video("Megamind.avi"), 2 * FPS, max_seconds=5.0) if f.pts_s >= 2.0]
    return cfg, hay, model.encode(clip[0::2]), model.encode([clip[7]])[0]


@pytest.mark.parametrize("depth", [0.2, 0.6])
def test_needle_found_by_example_image(encoded, depth, tmp_path):
    cfg, hay, needle, query = encoded
    cfg = with_settings(cfg, {"llm.store.segments_ram_mb": 1.0})  # forces most segments to the disk tier
    (row,) = run_one(cfg, hay, needle, query, minutes=3, depth=depth, ks=[len(needle)], disk_dir=tmp_path)
    assert row["recall"] == 1.0
    assert row["disk_mb"] > 0 and row["ram_mb"] <= 1.0


def test_haystack_frame_does_not_find_the_needle(encoded, tmp_path):
    cfg, hay, needle, _ = encoded
    (row,) = run_one(cfg, hay, needle, hay[5], minutes=3, depth=0.5, ks=[len(needle)], disk_dir=tmp_path)
    assert row["recall"] < 0.5
