import numpy as np
import pytest

from livelens.records import (
    BadImage,
    decode_image,
    encode_jpeg,
    get_tokens,
    image_encoding,
    set_tokens,
)
from livelens.v1 import messages_pb2 as pb


def test_tokens_round_trip_with_kept_mask():
    tokens = np.random.default_rng(0).standard_normal((49, 16)).astype(np.float16)
    kept = np.ones(49, bool)
    kept[[3, 10, 48]] = False
    rec = pb.TokensRecord(grid_h=7, grid_w=7)
    set_tokens(rec, tokens, kept)
    back = pb.TokensRecord()
    back.ParseFromString(rec.SerializeToString())
    got, got_kept = get_tokens(back)
    assert got.shape == (46, 16)
    assert np.array_equal(got_kept, kept)
    assert np.array_equal(got, tokens[kept])


def test_tokens_mismatch_is_an_error():
    rec = pb.TokensRecord(grid_h=7, grid_w=7)
    set_tokens(rec, np.zeros((48, 4), np.float16))
    with pytest.raises(ValueError, match="48 tokens for 49"):
        get_tokens(rec)


def test_images():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10, 0] = 255
    data = encode_jpeg(rgb)
    assert image_encoding(data) == pb.FrameRecord.JPEG
    back = decode_image(data)
    assert back.shape == (20, 30, 3) and back[5, 2, 0] > 200 and back[5, 25, 0] < 50
    with pytest.raises(BadImage):
        decode_image(data[:40] + b"\x00" * 100)
    with pytest.raises(BadImage):
        decode_image(b"", pb.FrameRecord.RAW_RGB, 2, 2)
