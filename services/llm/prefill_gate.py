"""How frame prefill shares one engine with answers, for the materializers that prefill
frames as they arrive (streaming KV, engine cache).

- Up to `llm.backpressure.prefill_concurrency` prefill requests of all streams are in the engine at once:
  vLLM schedules the requests it holds into one engine step, so several streams' frames are
  prefilled together. Waiters are served in turn (asyncio's semaphore is FIFO): no stream
  starves.
- A prefill waits (at most `llm.backpressure.prefill_yield_s`) while a question, check or remark
  generates: vLLM puts a prefill in the same step as the answers' decodes, so each of their
  tokens would take as long as the prefill. The frames that arrive meanwhile go together in
  the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from livelens.config import LLMConfig


class Arrived(Protocol):
    arrived: float  # when the frame reached the service (unix time)


def waited_s(in_flight: Sequence[Arrived], waiting: Sequence[Arrived]) -> float:
    """How long a stream's oldest frame not prefilled yet has waited: the first of those in
    the engine now, else the first waiting (0: none)."""
    oldest = in_flight[0] if in_flight else (waiting[0] if waiting else None)
    return 0.0 if oldest is None else max(0.0, time.time() - oldest.arrived)


@dataclass
class PrefillStats:
    frames_ingested: int = 0
    ingest_requests: int = 0
    ingest_errors: int = 0
    ingest_s: float = 0.0
    prefill_waits: int = 0  # ingest requests held back while answers generated
    prefill_wait_s: float = 0.0
    # Over ingest requests: how many were in flight (itself included) when each started.
    # Divided by ingest_requests: how many vLLM could batch into one step on average.
    ingest_in_flight_sum: int = 0


class PrefillGate:
    def __init__(self, cfg: LLMConfig, stats: PrefillStats) -> None:
        self.cfg = cfg
        self.stats = stats
        concurrency = cfg.backpressure.prefill_concurrency
        self.slots = asyncio.Semaphore(concurrency) if concurrency > 0 else None
        self.answering = 0  # questions, checks and remarks generating now
        self.no_answers = asyncio.Event()  # set while `answering` is 0
        self.no_answers.set()
        self.in_flight = 0  # prefill requests in the engine

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A prefill slot, taken once no answer generates (or `llm.backpressure.prefill_yield_s` passed)."""
        async with self.slots or contextlib.nullcontext():
            await self._yield_to_answers()
            yield

    async def _yield_to_answers(self) -> None:
        if self.no_answers.is_set() or not self.cfg.backpressure.prefill_yield_s:
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.no_answers.wait(), self.cfg.backpressure.prefill_yield_s)
        self.stats.prefill_waits += 1
        self.stats.prefill_wait_s += loop.time() - t0

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """A prefill request in the engine."""
        self.in_flight += 1
        self.stats.ingest_in_flight_sum += self.in_flight
        try:
            yield
        finally:
            self.in_flight -= 1

    @contextlib.contextmanager
    def answer(self) -> Iterator[None]:
        """A question, check or remark generating: new prefill yields to it."""
        self.answering += 1
        self.no_answers.clear()
        try:
            yield
        finally:
            self.answering -= 1
            if not self.answering:
                self.no_answers.set()
