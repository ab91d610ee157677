""""Did X appear?" and "When did X appear?" about a cut-in, through the real gateway ->
Kafka -> encoder -> Triton -> LLM service (vLLM), as a client asks them: a cat image cut
into real footage, asked about long after it left the recent window."""

from __future__ import annotations

import asyncio

import pytest

from livelens.client import Client
from livelens.dev.bench.answers import first_word, times_said
from livelens.dev.train.data import image_path
from livelens.video import CutIn, sample_video
from livelens.watcher import ScheduledQuestion, watch_video

pytestmark = pytest.mark.integration

FPS = 2.0
CUT_AT_S, CUT_S = 8.0, 1.5  # three frames: 8.0, 8.5 and 9.0 s


def test_did_a_cat_appear_and_when(stack):
    cut = CutIn(str(image_path("skimage:chelsea.png")), CUT_AT_S, CUT_S)
    questions = [ScheduledQuestion(22.0, "Did a cat appear in the video?"),
                 ScheduledQuestion(22.0, "When did a cat appear?"),
                 ScheduledQuestion(22.0, "Did an elephant appear in the video?"),
                 ScheduledQuestion(22.0, "Which animal appeared in the video?")]

    async def run():
        async with Client(stack.gateway_target, "test-token") as client:
            return await watch_video(client, sample_video("vtest.avi"), "did-it-appear", FPS, questions,
                                     realtime=False, max_seconds=24.0, cut_in=cut)

    report = asyncio.run(run())
    assert report.frames_acked == report.frames_sent and not report.errors
    answers = {a.question: a.text for a in report.answers.values()}
    assert all(a.done for a in report.answers.values()), answers
    # The window holds the newest 8 frames (4 s): the cat left it 9 s before the questions.
    assert first_word(answers["Did a cat appear in the video?"]) == "yes", answers
    when = times_said(answers["When did a cat appear?"])
    assert any(CUT_AT_S - 1 / FPS <= t <= CUT_AT_S + CUT_S + 1 / FPS for t in when), answers
    assert first_word(answers["Did an elephant appear in the video?"]) == "no", answers
    assert "cat" in answers["Which animal appeared in the video?"].lower(), answers
