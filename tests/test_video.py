from pathlib import Path

import pytest

from devtools.train.data import image_path
from livelens.video import CutIn, VideoError, read_frames, sample_video, video_source
from livelens.watcher import ScheduledQuestion


def test_frames_sampled_by_stream_time():
    frames = list(read_frames(sample_video("bigbuckbunny.mp4"), fps=2))
    pts = [f.pts_s for f in frames]
    assert len(frames) == 11  # 5.28 s at 2 fps: 0.0, 0.5, ... 5.0
    assert all(abs(b - a - 0.5) < 0.05 for a, b in zip(pts, pts[1:], strict=False))
    assert max(frames[0].rgb.shape[:2]) == 640


def test_missing_video_is_a_clear_error(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        list(read_frames(tmp_path / "nope.mp4", fps=2))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage")
    with pytest.raises(VideoError, match="cannot open"):
        list(read_frames(bad, fps=2))


def test_scheduled_question_parse():
    q = ScheduledQuestion.parse("12.5:What is the man holding?")
    assert q.at_s == 12.5 and q.text == "What is the man holding?"
    for bad in ["no-colon", "x:question", "5:", "-1:q"]:
        with pytest.raises(ValueError, match="SECONDS:QUESTION"):
            ScheduledQuestion.parse(bad)


def test_cut_in_replaces_the_frames_of_its_span_with_the_image():
    cat = str(image_path("skimage:chelsea.png"))
    cut = CutIn.parse(f"{cat}@2+1")
    assert (cut.at_s, cut.seconds) == (2.0, 1.0) and CutIn.parse(f"{cat}@3").seconds == 1.5
    plain = list(read_frames(sample_video("vtest.avi"), 2.0, max_seconds=4.0))
    frames = list(cut.apply(iter(plain)))
    assert [f.pts_s for f in frames] == [f.pts_s for f in plain]
    changed = [f.pts_s for f, p in zip(frames, plain, strict=True) if f.rgb is not p.rgb]
    assert changed == [2.0, 2.5]
    assert frames[4].rgb.shape == plain[4].rgb.shape


@pytest.mark.parametrize("spec", ["cat.png", "@3", "x@-1", "x@a", "x@1+0"])
def test_a_bad_cut_in_is_a_clear_error(spec, tmp_path):
    with pytest.raises(VideoError, match="--cut-in expects|does not exist"):
        CutIn.parse(spec)
    with pytest.raises(VideoError, match="does not exist"):
        CutIn.parse(f"{tmp_path / 'none.png'}@3")


def test_a_video_is_a_file_a_camera_a_url_or_a_sample_video(tmp_path: Path) -> None:
    mine = tmp_path / "mine.mp4"
    mine.write_bytes(b"")
    assert video_source(str(mine)) == str(mine)
    assert Path(video_source("vtest.avi")).name == "vtest.avi"
    assert video_source("rtsp://camera/1") == "rtsp://camera/1" and video_source("0") == "0"
    with pytest.raises(VideoError, match="sample video"):
        video_source("no-such-video.mp4")
