""""Did X appear?" and "When did X appear?" about a cut-in, through the real gateway ->
Kafka -> encoder -> Triton -> LLM service (vLLM), as a client asks them: a cat image cut
into real footage, asked about long after it left the recent window.

The questions are asked one after another, each once the answer before it is done, as a
user in a conversation asks them: a question sees the past turns (`llm.context.dialogue_turns`),
so questions asked at once would each see whichever of the others happened to finish
first, and the small test LLM's wording follows them."""

from __future__ import annotations

import asyncio

import pytest

from devtools.bench.answers import first_word, times_said
from devtools.train.data import image_path
from livelens.client import Ack, Answer, Client, ItemError
from livelens.records import encode_jpeg
from livelens.video import CutIn, read_frames, sample_video

pytestmark = pytest.mark.integration

FPS = 2.0
CUT_AT_S, CUT_S = 8.0, 1.5  # three frames: 8.0, 8.5 and 9.0 s


def in_cut(t: float) -> bool:
    return CUT_AT_S - 1 / FPS <= t <= CUT_AT_S + CUT_S + 1 / FPS


async def conversation(target: str, questions: list[str]) -> list[Answer]:
    """Stream 24 s of vtest.avi with the cat cut in, then ask `questions` in turn; each
    one's final `Answer`, its text whole."""
    cut = CutIn(str(image_path("skimage:chelsea.png")), CUT_AT_S, CUT_S)
    frames = list(cut.apply(read_frames(sample_video("vtest.avi"), FPS, max_seconds=24.0)))
    async with Client(target, "test-token") as client, client.watch("did-it-appear") as session:
        events = session.events()
        for seq, frame in enumerate(frames):
            await session.send_frame(seq, frame.pts_s, encode_jpeg(frame.rgb))
        acked = 0
        async with asyncio.timeout(120):
            while acked < len(frames):
                event = await anext(events)
                assert not isinstance(event, ItemError), event
                acked += isinstance(event, Ack)
            answers = []
            for i, question in enumerate(questions):
                request_id = await session.ask(question, request_id=f"q{i}")
                text = ""
                while True:
                    event = await anext(events)
                    assert not (isinstance(event, ItemError) and event.request_id == request_id), event
                    if isinstance(event, Answer) and event.request_id == request_id:
                        text += event.text
                        if event.final:
                            answers.append(Answer(request_id, text, True, event.stream_time_s, event.ttft_s,
                                                  event.retrieved_pts_s))
                            break
        await session.close()
    return answers


def test_did_a_cat_appear_and_when(stack):
    questions = ["Did a cat appear in the video?", "When did a cat appear?",
                 "Did an elephant appear in the video?", "Which animal appeared in the video?"]
    answers = asyncio.run(conversation(stack.gateway_target, questions))
    said = "\n".join(f"{q!r} -> {a.text!r} (brought back {a.retrieved_pts_s})"
                     for q, a in zip(questions, answers, strict=True))
    did, when, elephant, which = answers
    # The window holds the newest 8 frames (4 s): the cat left it 14 s before the questions,
    # so only retrieval brings it back.
    assert any(in_cut(t) for t in did.retrieved_pts_s), said
    assert first_word(did.text) == "yes", said
    assert any(in_cut(t) for t in times_said(when.text)), said
    assert first_word(elephant.text) == "no", said
    assert "cat" in which.text.lower(), said
