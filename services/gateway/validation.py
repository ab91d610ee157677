"""Checks on everything a client sends. Each failure is an `InvalidItem` with the gRPC
status it answers with and a sentence that says what to change."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from livelens.config import GatewayConfig
from livelens.identity import NAME_RULE, is_name
from livelens.records import BadImage, decode_image, image_encoding, image_size
from livelens.v1 import api_pb2
from livelens.v1 import messages_pb2 as pb

MAX_SEQ = 2**53  # seqs stay exact in every client's numbers (a double holds integers up to 2^53)


class InvalidItem(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_stream_id(stream_id: str) -> None:
    if not is_name(stream_id):
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT, f"stream id {stream_id[:40]!r} is invalid: use {NAME_RULE}")


def check_session_id(session_id: str) -> None:
    if not is_name(session_id):
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"resume_session_id {session_id[:40]!r} is invalid: pass the session_id of `Opened`")


@dataclass(frozen=True)
class CheckedImage:
    """An image whose header passed the checks; `decodes` is still to be run (off the
    event loop: it is the one costly check)."""

    encoding: pb.FrameRecord.Encoding
    data: bytes
    width: int
    height: int
    what: str

    def decodes(self) -> None:
        """Raises InvalidItem unless the pixels decode. A JPEG is decoded at 1/8 scale (its
        entropy-coded data is read whole all the same), so the check costs 1/64 of the
        memory; a PNG at most gateway.max_frame_pixels x 3 bytes."""
        try:
            decode_image(self.data, self.encoding, self.width, self.height, min_side=1)
        except BadImage:
            raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{self.what} is a corrupt image (it does not decode)") from None


def check_frame(frame: api_pb2.Frame, cfg: GatewayConfig, last_seq: int, last_pts: float) -> CheckedImage:
    """The frame's image, if the frame may be published once it decodes. `last_seq` and
    `last_pts` are the stream's last accepted frame's (-1 and 0 before any)."""
    check_size(frame.image, cfg, f"frame {frame.seq}")  # first: the cheapest check
    if frame.seq <= last_seq:
        raise InvalidItem(grpc.StatusCode.ALREADY_EXISTS,
                          f"frame seq {frame.seq} is not above the last accepted seq {last_seq}: "
                          "it was acknowledged already, or it is out of order")
    if frame.seq >= MAX_SEQ:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"frame seq {frame.seq} is too large: seqs must stay below 2^53")
    if last_seq >= 0 and frame.seq - last_seq > cfg.max_seq_step:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"frame seq {frame.seq} jumps {frame.seq - last_seq} past the last accepted seq "
                          f"{last_seq}, over gateway.max_seq_step ({cfg.max_seq_step})")
    if not math.isfinite(frame.pts_s) or frame.pts_s < 0:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"frame {frame.seq} has pts {frame.pts_s}: pts_s must be a finite, non-negative "
                          "number of seconds")
    if frame.pts_s < last_pts:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"frame {frame.seq} has pts {frame.pts_s}, before the previous frame's "
                          f"{last_pts}")
    if frame.pts_s - (last_pts if last_seq >= 0 else 0.0) > cfg.max_pts_step_s:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"frame {frame.seq} has pts {frame.pts_s:g}, {frame.pts_s - last_pts:g}s after the "
                          f"previous frame's, over gateway.max_pts_step_s ({cfg.max_pts_step_s:g})")
    return check_image(frame.image, cfg, f"frame {frame.seq}")


def check_size(data: bytes, cfg: GatewayConfig, what: str) -> None:
    if len(data) > cfg.max_frame_bytes:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{what} is {len(data)} bytes, over gateway.max_frame_bytes ({cfg.max_frame_bytes})")


def check_image(data: bytes, cfg: GatewayConfig, what: str) -> CheckedImage:
    """A JPEG/PNG within the byte and pixel limits, read from its header alone: a small
    file that says it is 20000x20000 costs nothing."""
    check_size(data, cfg, what)
    encoding = image_encoding(data)
    if not encoding:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is not a JPEG or PNG image")
    try:
        width, height = image_size(data)
    except BadImage as exc:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is a corrupt image ({exc})") from None
    if width <= 0 or height <= 0:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT, f"{what} says it is {width}x{height}: an empty image")
    if width * height > cfg.max_frame_pixels:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{what} is {width}x{height}, over gateway.max_frame_pixels ({cfg.max_frame_pixels})")
    return CheckedImage(encoding, data, width, height, what)


CONTEXT_METHODS = ("", "recompute", "streaming_kv", "engine_cache", "window", "full")


def check_context_method(method: str) -> str:
    if method not in CONTEXT_METHODS:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"context method {method[:40]!r} is unknown: use one of "
                          f"{', '.join(repr(m) for m in CONTEXT_METHODS)}")
    return method


def check_max_tokens(max_tokens: int, limit: int) -> int:
    """A question's answer length: 0 is the service's default (`llm.engine.max_answer_tokens`), else 1..that."""
    if not 0 <= max_tokens <= limit:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"max_tokens {max_tokens} is out of range: use 1..{limit} (llm.engine.max_answer_tokens), "
                          "or 0 for that default")
    return max_tokens


def check_timeout(timeout_s: float, cfg: GatewayConfig) -> float:
    """An Ask's own deadline in seconds: 0 is gateway.ask_timeout_s, else within
    (0, gateway.max_ask_timeout_s]."""
    if timeout_s == 0:
        return cfg.ask_timeout_s
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= cfg.max_ask_timeout_s):
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"timeout_s {timeout_s} is out of range: use a number of seconds in "
                          f"(0, {cfg.max_ask_timeout_s:g}] (gateway.max_ask_timeout_s), or 0 for "
                          f"gateway.ask_timeout_s ({cfg.ask_timeout_s:g})")
    return timeout_s


def check_question(text: str, cfg: GatewayConfig) -> str:
    text = text.strip()
    if not text:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT, "the question is empty")
    if len(text) > cfg.max_question_chars:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the question is {len(text)} characters, over "
                          f"gateway.max_question_chars ({cfg.max_question_chars})")
    # A character outside ASCII costs the model several tokens: bytes bound the prompt too.
    size = len(text.encode())
    if size > cfg.max_question_bytes:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the question is {size} bytes in UTF-8, over gateway.max_question_bytes "
                          f"({cfg.max_question_bytes})")
    return text


def check_instruction(text: str, instruction_id: str, cfg: GatewayConfig) -> str:
    """The instruction's text, stripped."""
    text = " ".join(text.split())
    if not text:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          "the instruction is empty: say what to watch for, e.g. \"a car appears\"")
    if len(text) > cfg.max_instruction_chars:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the instruction is {len(text)} characters, over "
                          f"gateway.max_instruction_chars ({cfg.max_instruction_chars})")
    check_instruction_id(instruction_id)
    return text


def check_instruction_id(instruction_id: str) -> None:
    if not is_name(instruction_id):
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"instruction id {instruction_id[:40]!r} is invalid: use {NAME_RULE}")
