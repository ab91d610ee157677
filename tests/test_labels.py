"""The words a question may use for what a frame's tag names: WordNet's other names and
kinds of each ImageNet class (services/common/data/imagenet_wordnet.json), plurals, and the
question's words that name anything at all."""

from __future__ import annotations

import json

import pytest

from services.common.labels import (
    KINDS_FILE,
    class_words,
    imagenet_names,
    imagenet_wnids,
    names_label,
    question_names_tag,
    words_naming_classes,
)
from services.llm.yes_no import is_yes_no


@pytest.mark.parametrize(("question", "tag"), [
    ("Did a ball appear?", "soccer ball"),  # a kind, also the last word of a multi-word name
    ("Did a football appear?", "soccer ball"),  # an everyday word
    ("Which fruit appeared?", "orange"),  # WordNet: orange -> citrus -> edible fruit -> fruit
    ("Did any vehicle pass?", "moped"),
    ("When did the taxi come?", "taxicab"),  # the other names in ImageNet's class list
    ("Did you see a cab?", "taxicab"),
    ("Were there dogs?", "beagle"),  # plural, kind
    ("Did you see mice?", "mouse"),  # irregular plural
    ("Any butterflies?", "monarch butterfly"),  # y -> ies
    ("Did a drink appear?", "espresso"),
    ("Did coffee appear?", "espresso"),
    ("Which building appeared?", "monastery"),
    ("Did people appear?", "scuba diver"),
    ("Which animal appeared?", "Egyptian cat"),
])
def test_a_question_names_a_tag_by_any_word_for_its_class(question: str, tag: str) -> None:
    assert question_names_tag(question, tag)


@pytest.mark.parametrize(("question", "tag"), [
    ("Did a guitar appear?", "soccer ball"),
    ("Did a machine appear?", "taxicab"),  # not among "machine"'s commonest senses
    ("Did a cat appear?", "catamaran"),  # whole words only
    ("Did a dog appear?", "Egyptian cat"),
    ("Did an object appear?", "orange"),  # too abstract to ask about
])
def test_a_question_does_not_name_other_classes(question: str, tag: str) -> None:
    assert not question_names_tag(question, tag)


def test_the_wordnet_data_covers_every_class_in_imagenets_order() -> None:
    data = json.loads(KINDS_FILE.read_text())
    assert [c["wnid"] for c in data["classes"]] == list(imagenet_wnids())
    assert [c["name"] for c in data["classes"]] == list(imagenet_names())
    assert "ball" in class_words(805) and "vehicle" in class_words(665) and "fruit" in class_words(950)
    assert all("video" not in class_words(i) and "object" not in class_words(i) for i in range(1000))


def test_the_words_of_a_question_that_name_things() -> None:
    assert words_naming_classes("Did an elephant appear in the video?") == ("elephant",)
    assert words_naming_classes("Did any vehicles appear?") == ("vehicle",)
    assert words_naming_classes("Did a guitar or an airplane appear?") == ("airplane", "guitar")
    assert words_naming_classes("Did a soccer ball appear?") == ("soccer ball",), "the longest"
    assert words_naming_classes("What is happening now?") == ()


def test_names_label_allows_plurals() -> None:
    assert names_label("two wolves", "wolf") and names_label("some butterflies", "butterfly")
    assert names_label("three dogs", "dog") and names_label("boxes", "box") and names_label("geese", "goose")
    assert not names_label("a dogma", "dog")


@pytest.mark.parametrize(("question", "yes_no"), [
    ("Did a cat appear?", True), ("Is there a dog?", True), ("has the car left", True), ("Were there people?", True),
    ("Didn't a cat appear?", True), ("When did a cat appear?", False), ("Which animal appeared?", False),
    ("Is it a cat or a dog?", False), ("What do you see?", False), ("Discuss the video.", False),
])
def test_yes_no_questions(question: str, yes_no: bool) -> None:
    assert is_yes_no(question) is yes_no
