"""Packing and unpacking the Kafka records whose payloads are arrays or images."""

from __future__ import annotations

import cv2
import numpy as np

from livelens.v1 import messages_pb2 as pb

_DTYPES = {pb.TokensRecord.FLOAT16: np.float16, pb.TokensRecord.FLOAT32: np.float32}


class BadImage(ValueError):
    """Image bytes that do not decode to a frame."""


def decode_image(data: bytes, encoding: int = pb.FrameRecord.ENCODING_UNSPECIFIED,
                 width: int = 0, height: int = 0, min_side: int = 0) -> np.ndarray:
    """JPEG/PNG (or raw RGB with its size) -> RGB uint8 [H, W, 3]. With `min_side` and the
    size of a JPEG known, it is decoded at 1/2, 1/4 or 1/8 scale (libjpeg scales in its
    inverse DCT, for less work) as long as both sides stay >= min_side."""
    if encoding == pb.FrameRecord.RAW_RGB:
        if width <= 0 or height <= 0 or len(data) != width * height * 3:
            raise BadImage(f"raw RGB frame of {len(data)} bytes does not match {width}x{height}")
        return np.frombuffer(data, np.uint8).reshape(height, width, 3)
    if not data:
        raise BadImage("empty image")
    flag = cv2.IMREAD_COLOR
    if min_side > 0 and width > 0 and height > 0 and image_encoding(data) == pb.FrameRecord.JPEG:
        for scale, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                               (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if min(width, height) // scale >= min_side:
                flag = reduced
                break
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if bgr is None:
        raise BadImage("image bytes are not a decodable JPEG or PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def image_encoding(data: bytes) -> pb.FrameRecord.Encoding:
    if data[:3] == b"\xff\xd8\xff":
        return pb.FrameRecord.JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return pb.FrameRecord.PNG
    return pb.FrameRecord.ENCODING_UNSPECIFIED


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's or PNG's header, without decoding a pixel: how big
    the decoded frame would be is known before any memory is spent on it."""
    encoding = image_encoding(data)
    if encoding == pb.FrameRecord.PNG:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise BadImage("PNG without an IHDR header")
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if encoding == pb.FrameRecord.JPEG:
        at = 2
        while at + 4 <= len(data):
            if data[at] != 0xFF:
                raise BadImage("JPEG with a broken marker before its frame header")
            marker = data[at + 1]
            if marker == 0xFF:  # a fill byte
                at += 1
                continue
            if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
                at += 2
                continue
            length = int.from_bytes(data[at + 2:at + 4], "big")
            if marker in _JPEG_SOF:
                if at + 9 > len(data):
                    break
                return int.from_bytes(data[at + 7:at + 9], "big"), int.from_bytes(data[at + 5:at + 7], "big")
            if marker == 0xDA or length < 2:  # scan data before any frame header
                break
            at += 2 + length
        raise BadImage("JPEG without a frame header (SOF)")
    raise BadImage("not a JPEG or PNG image")


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadImage("could not encode JPEG")
    return buf.tobytes()


def set_tokens(rec: pb.TokensRecord, tokens: np.ndarray, kept: np.ndarray | None = None) -> None:
    """Store the kept tokens ([grid_h*grid_w, H] with an optional bool mask) in `rec`:
    float32 as they are (an imported model that sends them so), anything else as float16."""
    n, hidden = tokens.shape
    wire = np.float32 if tokens.dtype == np.float32 else np.float16
    rec.dtype = pb.TokensRecord.FLOAT32 if wire is np.float32 else pb.TokensRecord.FLOAT16
    rec.hidden_size = hidden
    if kept is not None and not kept.all():
        rec.kept_mask = kept.astype(np.uint8).tobytes()
        tokens = tokens[kept]
    rec.embeddings = np.ascontiguousarray(tokens, dtype=wire).tobytes()


def get_tokens(rec: pb.TokensRecord) -> tuple[np.ndarray, np.ndarray]:
    """(kept tokens [n_kept, H], kept mask bool [grid_h*grid_w]) of a record."""
    dtype = _DTYPES.get(rec.dtype)
    if dtype is None:
        raise ValueError(f"unsupported token dtype {rec.dtype}")
    grid = rec.grid_h * rec.grid_w
    kept = (np.frombuffer(rec.kept_mask, np.uint8).astype(bool) if rec.kept_mask
            else np.ones(grid, bool))
    if kept.size != grid:
        raise ValueError(f"kept mask has {kept.size} entries for a {rec.grid_h}x{rec.grid_w} grid")
    tokens = np.frombuffer(rec.embeddings, dtype).reshape(-1, rec.hidden_size)
    if tokens.shape[0] != int(kept.sum()):
        raise ValueError(f"{tokens.shape[0]} tokens for {int(kept.sum())} kept positions")
    return tokens, kept
