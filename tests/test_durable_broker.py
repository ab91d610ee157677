"""The bundled broker's log on disk (`broker.storage: s3`: Tansu on a local S3 server,
ministack): a kill -9 of the broker mid-stream loses nothing acknowledged, and the stream
and its questions go on. Its own stack (the session's keeps its log in memory, the
default), stopped when this module ends."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from livelens.client import Ack, Answer, Client, ItemError
from livelens.config import with_settings
from livelens.subscriber import TopicSubscriber
from tests.conftest import stack_config, started_stack
from tests.test_integration import TOKEN, collect, final_response, frames_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def durable_stack() -> Iterator:
    yield from started_stack(with_settings(stack_config(), {"broker.storage": "s3"}))


def test_a_kill_9_of_the_broker_loses_nothing_acknowledged(durable_stack):
    stack = durable_stack
    frames = frames_of("vtest.avi", 20.0)
    broker = stack.process("kafka broker (tansu)")

    async def run() -> tuple[list, set[int], float]:
        async with Client(stack.gateway_target, TOKEN) as client, client.watch("through-a-broker-crash") as s:
            t0 = time.monotonic()
            for seq, image in enumerate(frames):
                await asyncio.sleep(max(0.0, t0 + seq * 0.25 - time.monotonic()))
                await s.send_frame(seq, seq * 0.5, image)
                if seq in (8, 24, 36):
                    await s.ask("What do you see?", request_id=f"q{seq}", max_tokens=8, timeout_s=240)
                if seq == 16:
                    killed = broker.proc.pid
                    os.kill(killed, signal.SIGKILL)
            await collect(s, lambda ev: {e.seq for e in ev if isinstance(e, Ack)} >= set(range(len(frames))), 240)
            await asyncio.sleep(3)
            await s.ask("What happened?", request_id="final", max_tokens=4, timeout_s=240)
            asked = {"q8", "q24", "q36", "final"}
            events = await collect(s, lambda ev: asked <= {e.request_id for e in ev if isinstance(e, ItemError)
                                                           or (isinstance(e, Answer) and e.final)}, 300)
            return events, {e.seq for e in events if isinstance(e, Ack)}, killed

    with TopicSubscriber(stack.cfg.kafka, ["responses"], tenant="acme") as sub:
        events, acked, killed = asyncio.run(run())
        final = final_response(sub, "final", timeout_s=30)
    assert broker.proc is not None and broker.proc.pid != killed  # the supervisor restarted it
    assert not [e for e in events if isinstance(e, ItemError)], [e for e in events if isinstance(e, ItemError)]
    answers = {e.request_id: "".join(a.text for a in events if isinstance(a, Answer) and a.request_id == e.request_id)
               for e in events if isinstance(e, Answer) and e.final}
    assert {"q8", "q24", "q36", "final"} <= set(answers) and all(t.strip() for t in answers.values()), answers
    assert acked == set(range(len(frames)))
    assert final is not None and final.timings.frames_seen == len(frames)  # every acknowledged frame, once
    assert any((stack.run_dir / "broker-data").rglob("*"))  # the log is on disk
