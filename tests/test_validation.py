from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from livelens.config import GatewayConfig
from livelens.identity import is_name, key_path
from livelens.records import BadImage, encode_jpeg, image_size
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


def sized_jpeg(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header says width x height."""
    data = bytearray(JPEG)
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def sized_png(width: int, height: int) -> bytes:
    data = bytearray(cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize(
    "f, message",
    [
        (frame(image=b"not an image"), "not a JPEG or PNG"),
        (frame(image=JPEG[:30] + b"\x00" * 50), "corrupt"),
        (frame(pts=0.5), "before the previous"),
        (frame(pts=-1.0), "finite, non-negative"),
        (frame(pts=float("inf")), "finite"),
        (frame(pts=float("nan")), "finite"),
        (frame(pts=1e308), "over gateway.max_pts_step_s"),
        (frame(seq=2**63 - 1), "below 2\\^53"),
        (frame(seq=2_000_000), "over gateway.max_seq_step"),
        (frame(image=b"\xff\xd8\xff" + b"0" * 2000), "over gateway.max_frame_bytes"),
        (frame(image=sized_jpeg(20000, 20000)), "20000x20000, over gateway.max_frame_pixels"),
        (frame(image=sized_png(20000, 20000)), "20000x20000, over gateway.max_frame_pixels"),
        (frame(image=sized_png(0, 16)), "0x16: an empty image"),
    ],
)
def test_bad_frames(f, message):
    cfg = GatewayConfig(max_frame_bytes=1000)
    with pytest.raises(InvalidItem, match=message) as info:
        check_frame(f, cfg, last_seq=0, last_pts=1.0).decodes()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_frame_at_or_below_the_last_seq_already_exists():
    for seq in (0, 5):
        with pytest.raises(InvalidItem, match="acknowledged already") as info:
            check_frame(frame(seq=seq), GatewayConfig(), last_seq=5, last_pts=0.0)
        assert info.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_good_frame_and_pixel_limit():
    image = check_frame(frame(), GatewayConfig(), last_seq=0, last_pts=0.0)
    image.decodes()
    assert (image.width, image.height) == (16, 16)
    # a first frame may start anywhere below the step bound; a far seq, anywhere below 2^53
    check_frame(frame(seq=2**53 - 1, pts=3600.0), GatewayConfig(), last_seq=-1, last_pts=0.0)
    with pytest.raises(InvalidItem, match="max_frame_pixels"):
        check_frame(frame(), GatewayConfig(max_frame_pixels=100), last_seq=0, last_pts=0.0)


def test_image_size_comes_from_the_header_alone():
    """What a pixel bomb says it is, read without decoding: baseline and progressive JPEG
    (any markers before the frame header), and PNG."""
    rgb = np.zeros((37, 53, 3), np.uint8)
    progressive = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    png = cv2.imencode(".png", rgb)[1].tobytes()
    for data in (encode_jpeg(rgb), progressive, png):
        assert image_size(data) == (53, 37)
    assert image_size(sized_jpeg(20000, 30000)) == (20000, 30000)
    truncated = (b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10" + b"\x00" * 4, b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)
    for bad in (*truncated, b"GIF89a"):
        with pytest.raises(BadImage):
            image_size(bad)


def test_ids_are_matched_whole():
    for good in ("cam-1.a_b", "a", "x" * 128, ".hidden", "a..b"):
        check_stream_id(good)
        assert is_name(good)
    for bad in ("nl-test\n", "..", ".", "...", "", "x" * 129, "a/b", "a b", "caf\u00e9"):
        with pytest.raises(InvalidItem, match="invalid"):
            check_stream_id(bad)


def test_stream_keys_never_leave_their_folder():
    root = Path("/data")
    for key in ("dev/..", "../x", "dev/.", "a/b/../../c", "dev/cam-1"):
        path = root / key_path(key)
        assert path.parent.parent == root and ".." not in path.parts and "." not in path.parts
    assert key_path("dev/cam-1") == Path("dev/cam-1".replace(".", "%2E"))


def test_questions_and_stream_ids():
    cfg = GatewayConfig(max_question_chars=10)
    assert check_question("  hi ", cfg) == "hi"
    with pytest.raises(InvalidItem, match="empty"):
        check_question("   ", cfg)
    with pytest.raises(InvalidItem, match="max_question_chars"):
        check_question("x" * 11, cfg)
    emoji = "\U0001f600" * 10  # 10 characters, 40 bytes
    with pytest.raises(InvalidItem, match="40 bytes in UTF-8, over gateway.max_question_bytes"):
        check_question(emoji, GatewayConfig(max_question_chars=10, max_question_bytes=20))
    check_stream_id("cam-1.a_b")
    with pytest.raises(InvalidItem, match="invalid"):
        check_stream_id("bad id/with spaces")


def test_answer_length_and_deadline_limits():
    assert check_max_tokens(0, 48) == 0 and check_max_tokens(48, 48) == 48
    for bad in (-1, 49, 10**9):
        with pytest.raises(InvalidItem, match=r"max_tokens .* 1\.\.48 \(llm.engine.max_answer_tokens\)") as info:
            check_max_tokens(bad, 48)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    cfg = GatewayConfig(ask_timeout_s=60, max_ask_timeout_s=600)
    assert check_timeout(0, cfg) == 60 and check_timeout(0.5, cfg) == 0.5 and check_timeout(600, cfg) == 600
    for bad_timeout in (-1.0, float("nan"), float("inf"), 601.0):
        with pytest.raises(InvalidItem, match="gateway.max_ask_timeout_s"):
            check_timeout(bad_timeout, cfg)
