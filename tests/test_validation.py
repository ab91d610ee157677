import grpc
import numpy as np
import pytest

from livelens.config import GatewayConfig
from livelens.records import encode_jpeg
from livelens.v1 import api_pb2
from services.gateway.validation import (
    InvalidItem,
    check_frame,
    check_max_tokens,
    check_question,
    check_stream_id,
    check_timeout,
)

JPEG = encode_jpeg(np.zeros((16, 16, 3), np.uint8))


def frame(seq=1, pts=1.0, image=JPEG):
    return api_pb2.Frame(seq=seq, pts_s=pts, image=image)


@pytest.mark.parametrize(
    "f, message",
    [
        (frame(image=b"not an image"), "not a JPEG or PNG"),
        (frame(image=JPEG[:30] + b"\x00" * 50), "corrupt"),
        (frame(seq=0), "not above the last accepted seq 0"),
        (frame(pts=-1.0), "before the previous"),
        (frame(pts=float("inf")), "finite"),
        (frame(pts=float("nan")), "finite"),
        (frame(image=b"\xff\xd8\xff" + b"0" * 2000), "over gateway.max_frame_bytes"),
    ],
)
def test_bad_frames(f, message):
    cfg = GatewayConfig(max_frame_bytes=1000)
    with pytest.raises(InvalidItem, match=message) as info:
        check_frame(f, cfg, last_seq=0, last_pts=0.0)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_good_frame_and_pixel_limit():
    encoding, rgb = check_frame(frame(), GatewayConfig(), last_seq=0, last_pts=0.0)
    assert rgb.shape == (16, 16, 3)
    with pytest.raises(InvalidItem, match="max_frame_pixels"):
        check_frame(frame(), GatewayConfig(max_frame_pixels=100), last_seq=0, last_pts=0.0)


def test_questions_and_stream_ids():
    cfg = GatewayConfig(max_question_chars=10)
    assert check_question("  hi ", cfg) == "hi"
    with pytest.raises(InvalidItem, match="empty"):
        check_question("   ", cfg)
    with pytest.raises(InvalidItem, match="max_question_chars"):
        check_question("x" * 11, cfg)
    check_stream_id("cam-1.a_b")
    with pytest.raises(InvalidItem, match="invalid"):
        check_stream_id("bad id/with spaces")


def test_answer_length_and_deadline_limits():
    assert check_max_tokens(0, 48) == 0 and check_max_tokens(48, 48) == 48
    for bad in (-1, 49, 10**9):
        with pytest.raises(InvalidItem, match=r"max_tokens .* 1\.\.48 \(llm.max_answer_tokens\)") as info:
            check_max_tokens(bad, 48)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    cfg = GatewayConfig(ask_timeout_s=60, max_ask_timeout_s=600)
    assert check_timeout(0, cfg) == 60 and check_timeout(0.5, cfg) == 0.5 and check_timeout(600, cfg) == 600
    for bad_timeout in (-1.0, float("nan"), float("inf"), 601.0):
        with pytest.raises(InvalidItem, match="gateway.max_ask_timeout_s"):
            check_timeout(bad_timeout, cfg)
