"""A stream's identity: (tenant, stream id).

Two tenants may use the same stream id at once, so nothing inside livelens names a
stream by its id alone. Every Kafka record carries both; its key, and the key of the
stream's state in every service (contexts, feature caches, segment and KV stores, the
paths of their files), is `stream_key(tenant, stream_id)`: "tenant/stream_id". Neither
part may contain "/" (tenant names are checked when the config loads, stream ids at the
gateway), so the key splits back unambiguously and makes a two-level path.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Protocol
from urllib.parse import quote

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
NAME_RULE = "1-128 of A-Z a-z 0-9 . _ -, not only dots"


def is_name(text: str) -> bool:
    """A tenant name, stream id, session id or instruction id: matched whole (a trailing
    newline is not allowed) and never "." or ".." (or other dots alone)."""
    return _NAME.fullmatch(text) is not None and text.strip(".") != ""


class Keyed(Protocol):
    tenant: str
    stream_id: str


def stream_key(tenant: str, stream_id: str) -> str:
    return f"{tenant}/{stream_id}"


def key_of(record: Keyed) -> str:
    """The stream key of any livelens Kafka record."""
    return stream_key(record.tenant, record.stream_id)


def split_key(key: str) -> tuple[str, str]:
    tenant, _, stream_id = key.partition("/")
    return tenant, stream_id


def key_path(key: str) -> PurePath:
    """A stream key as a relative path, a level per part ("tenant/stream_id": two): each
    part percent-encoded, dots too, so no key (checked or not) names a path outside the
    folder it is joined to."""
    return PurePath(*(quote(part, safe="").replace(".", "%2E") or "%00" for part in key.split("/", 1)))
