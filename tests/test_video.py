import pytest

from livelens.video import VideoError, read_frames, sample_video
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
