"""Checks on everything a client sends. Each failure is an `InvalidItem` with the gRPC
status it answers with and a sentence that says what to change."""

from __future__ import annotations

import math

import grpc
import numpy as np

from livelens.config import GatewayConfig
from livelens.identity import NAME, NAME_RULE
from livelens.records import BadImage, decode_image, image_encoding
from livelens.v1 import api_pb2
from livelens.v1 import messages_pb2 as pb


class InvalidItem(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_stream_id(stream_id: str) -> None:
    if not NAME.match(stream_id):
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT, f"stream id {stream_id[:40]!r} is invalid: use {NAME_RULE}")


def check_session_id(session_id: str) -> None:
    if not NAME.match(session_id):
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"resume_session_id {session_id[:40]!r} is invalid: pass the session_id of `Opened`")


def check_frame(frame: api_pb2.Frame, cfg: GatewayConfig, last_seq: int,
                last_pts: float) -> tuple[pb.FrameRecord.Encoding, np.ndarray]:
    """Returns (encoding, decoded RGB) of a frame that may be published."""
    check_size(frame.image, cfg, f"frame {frame.seq}")  # first: the cheapest check
    if frame.seq <= last_seq:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"frame seq {frame.seq} is not above the last accepted seq {last_seq}")
    if not math.isfinite(frame.pts_s):
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"frame {frame.seq} has pts {frame.pts_s}: pts_s must be a finite number of seconds")
    if frame.pts_s < last_pts:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"frame {frame.seq} has pts {frame.pts_s}, before the previous frame's "
                          f"{last_pts}")
    return check_image(frame.image, cfg, f"frame {frame.seq}")


def check_size(data: bytes, cfg: GatewayConfig, what: str) -> None:
    if len(data) > cfg.max_frame_bytes:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{what} is {len(data)} bytes, over gateway.max_frame_bytes ({cfg.max_frame_bytes})")


def check_image(data: bytes, cfg: GatewayConfig, what: str) -> tuple[pb.FrameRecord.Encoding, np.ndarray]:
    """A JPEG/PNG within the byte and pixel limits -> (encoding, decoded RGB)."""
    check_size(data, cfg, what)
    encoding = image_encoding(data)
    if not encoding:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is not a JPEG or PNG image")
    try:
        rgb = decode_image(data, encoding)
    except BadImage:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{what} is a corrupt image (it does not decode)") from None
    if rgb.shape[0] * rgb.shape[1] > cfg.max_frame_pixels:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{what} is {rgb.shape[1]}x{rgb.shape[0]}, over "
                          f"gateway.max_frame_pixels ({cfg.max_frame_pixels})")
    return encoding, rgb


CONTEXT_METHODS = ("", "recompute", "streaming_kv", "engine_cache", "window", "full")


def check_context_method(method: str) -> str:
    if method not in CONTEXT_METHODS:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"context method {method[:40]!r} is unknown: use one of "
                          f"{', '.join(repr(m) for m in CONTEXT_METHODS)}")
    return method


def check_max_tokens(max_tokens: int, limit: int) -> int:
    """A question's answer length: 0 is the service's default (`llm.max_answer_tokens`), else 1..that."""
    if not 0 <= max_tokens <= limit:
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"max_tokens {max_tokens} is out of range: use 1..{limit} (llm.max_answer_tokens), "
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
    if not NAME.match(instruction_id):
        raise InvalidItem(grpc.StatusCode.INVALID_ARGUMENT,
                          f"instruction id {instruction_id[:40]!r} is invalid: use {NAME_RULE}")
