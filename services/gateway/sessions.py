"""Stream sessions the gateway holds: one per open `Watch`, with its outbox, and the
per-tenant limits (streams, frames per second, questions per minute).

A stream is (tenant, stream id): two tenants may watch the same stream id at once, and
nothing a tenant is told depends on another tenant's streams.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc

from livelens.config import GatewayConfig
from livelens.identity import stream_key
from livelens.v1 import api_pb2
from services.gateway.decider import ResponseTimingDecider
from services.gateway.validation import InvalidItem


@dataclass
class Session:
    stream_id: str
    tenant: str
    decider: ResponseTimingDecider
    session_id: str = ""  # names this Watch's stream session (resume with it)
    outbox: asyncio.Queue[api_pb2.WatchResponse] = field(default_factory=asyncio.Queue)
    last_seq: int = -1
    last_pts: float = 0.0
    newest_pts: float = 0.0
    pending: set[str] = field(default_factory=set)  # request ids still being answered
    tags: tuple[str, ...] = ()  # what the classifier saw in the newest frame with tokens (scene-change alerts)

    @property
    def key(self) -> str:
        return stream_key(self.tenant, self.stream_id)

    def send(self, response: api_pb2.WatchResponse) -> None:
        self.outbox.put_nowait(response)


@dataclass(frozen=True)
class Detached:
    """A session whose Watch broke here: how far it got, for its resume."""

    key: tuple[str, str]  # (tenant, stream id)
    last_seq: int
    last_pts: float


MAX_DETACHED = 10_000  # sessions remembered for their resume, oldest forgotten first


@dataclass
class RateLimit:
    """A token bucket: `rate` a second, bursts up to `burst`."""

    rate: float
    burst: float
    tokens: float = -1.0
    at: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        now = time.monotonic()
        if self.tokens < 0:
            self.tokens = self.burst
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class TenantLimits:
    frames: RateLimit
    questions: RateLimit


class SessionRegistry:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.sessions: dict[tuple[str, str], Session] = {}
        self.limits: dict[str, TenantLimits] = {}
        # (tenant, stream id) -> its standing instructions, as the owner's last reply said
        self.instructions: dict[tuple[str, str], int] = {}
        self.detached: OrderedDict[str, Detached] = OrderedDict()  # by session id

    def open(self, session: Session) -> None:
        if (session.tenant, session.stream_id) in self.sessions:
            raise InvalidItem(grpc.StatusCode.ALREADY_EXISTS,
                              f"stream {session.stream_id!r} is already being watched")
        count = sum(1 for tenant, _ in self.sessions if tenant == session.tenant)
        if count >= self.cfg.max_streams_per_tenant:
            raise InvalidItem(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"tenant {session.tenant!r} already has {count} open streams "
                              f"(limit gateway.max_streams_per_tenant)")
        self.sessions[(session.tenant, session.stream_id)] = session

    def refuse(self, session: Session) -> None:
        """A session that was never served (its resume was refused)."""
        if self.sessions.get((session.tenant, session.stream_id)) is session:
            del self.sessions[(session.tenant, session.stream_id)]

    def close(self, session: Session, ended: bool = False) -> None:
        """The session's Watch is over; `ended`: so is the stream (its instructions too)."""
        self.refuse(session)
        if ended:
            self.instructions.pop((session.tenant, session.stream_id), None)
        elif session.session_id:
            self.detached[session.session_id] = Detached((session.tenant, session.stream_id), session.last_seq,
                                                         session.last_pts)
            while len(self.detached) > MAX_DETACHED:
                self.detached.popitem(last=False)

    def get(self, tenant: str, stream_id: str) -> Session | None:
        return self.sessions.get((tenant, stream_id))

    def _limits(self, tenant: str) -> TenantLimits:
        limits = self.limits.get(tenant)
        if limits is None:
            c = self.cfg
            limits = self.limits[tenant] = TenantLimits(
                RateLimit(c.tenant_max_fps, max(1.0, c.tenant_max_fps)),
                RateLimit(c.tenant_questions_per_minute / 60.0, float(c.tenant_questions_per_minute)))
        return limits

    def admit_frame(self, tenant: str) -> None:
        if not self._limits(tenant).frames.take():
            raise InvalidItem(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"tenant {tenant!r} sends more than {self.cfg.tenant_max_fps:g} frames a second "
                              "(limit gateway.tenant_max_fps)")

    def admit_question(self, tenant: str) -> None:
        if not self._limits(tenant).questions.take():
            raise InvalidItem(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"tenant {tenant!r} asks more than {self.cfg.tenant_questions_per_minute} "
                              "questions a minute (limit gateway.tenant_questions_per_minute)")

    def admit_instruction(self, tenant: str) -> None:
        held = sum(n for (t, _), n in self.instructions.items() if t == tenant)
        if held >= self.cfg.max_instructions_per_tenant:
            raise InvalidItem(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"tenant {tenant!r} holds {held} standing instructions "
                              "(limit gateway.max_instructions_per_tenant): cancel one first")
