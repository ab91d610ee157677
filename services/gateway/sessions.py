"""Stream sessions the gateway holds: one per open `Watch`, with its outbox and limits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from livelens.v1 import api_pb2
from services.gateway.decider import ResponseTimingDecider
from services.gateway.validation import InvalidItem


@dataclass
class Session:
    stream_id: str
    tenant: str
    decider: ResponseTimingDecider
    outbox: asyncio.Queue[api_pb2.WatchResponse] = field(default_factory=asyncio.Queue)
    last_seq: int = -1
    last_pts: float = 0.0
    newest_pts: float = 0.0
    pending: set[str] = field(default_factory=set)  # request ids still being answered

    def send(self, response: api_pb2.WatchResponse) -> None:
        self.outbox.put_nowait(response)


class SessionRegistry:
    def __init__(self, max_streams_per_tenant: int) -> None:
        self.max_streams_per_tenant = max_streams_per_tenant
        self.sessions: dict[str, Session] = {}

    def open(self, session: Session) -> None:
        if session.stream_id in self.sessions:
            raise InvalidItem(grpc.StatusCode.ALREADY_EXISTS,
                              f"stream {session.stream_id!r} is already being watched")
        count = sum(1 for s in self.sessions.values() if s.tenant == session.tenant)
        if count >= self.max_streams_per_tenant:
            raise InvalidItem(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"tenant {session.tenant!r} already has {count} open streams "
                              f"(gateway.max_streams_per_tenant)")
        self.sessions[session.stream_id] = session

    def close(self, stream_id: str) -> None:
        self.sessions.pop(stream_id, None)

    def get(self, stream_id: str) -> Session | None:
        return self.sessions.get(stream_id)

    def for_tenant(self, stream_id: str, tenant: str) -> Session:
        session = self.sessions.get(stream_id)
        if session is None or session.tenant != tenant:
            raise InvalidItem(grpc.StatusCode.NOT_FOUND, f"no open stream {stream_id!r}")
        return session
