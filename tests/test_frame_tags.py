"""The encoder's frame tags: which classes become tags, and when a question names one."""

import numpy as np
import pytest

from services.common.labels import imagenet_names, question_names_tag
from services.encoder.records import frame_tags


def test_tags_are_the_likeliest_classes_above_the_floor():
    names = imagenet_names()
    probs = np.zeros(1000, np.float16)
    probs[[281, 285, 7, 500]] = [0.5, 0.3, 0.15, 0.05]
    assert frame_tags(probs, 3, 0.1) == [(names[281], 0.5), (names[285], 0.3), (names[7], 0.15)]
    assert [n for n, _ in frame_tags(probs, 2, 0.1)] == [names[281], names[285]]
    assert [n for n, _ in frame_tags(probs, 5, 0.2)] == [names[281], names[285]]
    assert frame_tags(probs, 0, 0.1) == []
    assert frame_tags(np.full(1000, 1e-3, np.float16), 3, 0.1) == [], "a flat distribution names nothing"


@pytest.mark.parametrize("question, tag, named", [
    ("Did a cat appear?", "tabby cat", True),
    ("Did a tabby cat appear?", "tabby cat", True),
    ("Was there a dog?", "beagle", True),  # ImageNet's dog classes
    ("Did cats appear?", "tiger cat", True),
    ("Did a car appear?", "tabby cat", False),
    ("What happened at the concatenation?", "tabby cat", False),  # whole words only
    ("Did an ox appear?", "ox", False),  # words under three letters never match
    ("Which animal appeared?", "tabby cat", True),  # any of ImageNet's animal classes
    ("Which animals appeared?", "beagle", True),
    ("Which animal appeared?", "street sign", False),
    ("Did an airplane appear?", "airliner", True),  # QUESTION_WORDS
])
def test_question_names_tag(question, tag, named):
    assert question_names_tag(question, tag) is named
