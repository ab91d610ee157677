"""Build `services/common/data/imagenet_wordnet.json`: for each ImageNet-1k class, the other names
of its WordNet synset and the kinds it is (the lemmas of its hypernyms: "soccer ball" is a
ball, "cab" a car and a vehicle, "beagle" a hound and a dog).

ImageNet's class ids are WordNet 3.0 noun synset offsets ("n02123597" is synset 02123597 of
`data.noun`), so the hierarchy behind the classes is WordNet 3.0 itself. It comes from
Debian's `wordnet-base` package (WordNet 3.0 under the WordNet licence), fetched with
`apt-get download` and unpacked here; nothing is installed. The JSON is committed: the
service reads it, and this script is only run to rebuild it (`make wordnet-kinds`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from services.common.labels import KINDS_FILE, imagenet_names, imagenet_wnids

DEBIAN_PACKAGE = "wordnet-base"
# Hypernyms too abstract to be what a person asks about ("Did an object appear?" would
# name every class), and nouns that are also words of the questions people ask about video.
ABSTRACT = frozenset([
    "entity", "physical_entity", "abstraction", "abstract_entity", "object", "physical_object", "whole",
    "unit", "artifact", "artefact", "living_thing", "animate_thing", "organism", "being", "causal_agent",
    "cause", "causal_agency", "matter", "thing", "part", "portion", "component_part", "component",
    "constituent", "instrumentality", "instrumentation", "group", "grouping", "relation", "attribute",
    "measure", "quantity", "amount", "psychological_feature", "event", "act", "deed", "human_action",
    "human_activity", "communication", "location", "natural_object", "material", "stuff", "substance",
    "solid", "article", "ware", "commodity", "trade_good", "good", "consumer_goods", "way", "means", "system",
    "creation", "product", "production", "someone", "somebody", "individual", "mortal", "soul", "self",
    "person_of_color", "people", "covering", "natural_elevation", "elevation", "formation",
    "geological_formation", "point", "position", "region", "area", "site", "tract", "extent", "surface",
    "opening"
])
# A lemma names a synset only among its commonest senses ("machine" is not asked for a car,
# nor "hack" for a taxi): WordNet orders a lemma's senses by how often they were tagged.
COMMON_SENSES = 3
QUESTION_WORDS = frozenset([
    "video", "frame", "frames", "time", "scene", "view", "image", "picture", "camera", "kind", "type", "sort",
    "one", "end", "start", "change", "move", "motion", "sign", "show"
])


def fetch_wordnet(work: Path) -> Path:
    """The WordNet 3.0 dictionary directory of Debian's wordnet-base, unpacked under `work`."""
    subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=work, check=True)
    deb = next(work.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
    return work / "x" / "usr" / "share" / "wordnet"


def read_nouns(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """data.noun: synset offset -> (its lemmas, its hypernyms' offsets)."""
    synsets: dict[str, tuple[list[str], list[str]]] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):  # the licence header
            continue
        fields = line.split(" | ")[0].split()
        offset, count = fields[0], int(fields[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", w) for w in fields[4:4 + 2 * count:2]]
        rest = fields[4 + 2 * count:]
        pointers = int(rest[0])
        hypernyms = [rest[1 + 4 * i + 1] for i in range(pointers) if rest[1 + 4 * i] in ("@", "@i")]
        synsets[offset] = (lemmas, hypernyms)
    return synsets


def read_senses(path: Path) -> dict[str, list[str]]:
    """index.noun: lemma -> its synsets' offsets, commonest sense first."""
    senses = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        senses[fields[0]] = [f for f in fields[1:] if len(f) == 8 and f.isdigit()]
    return senses


def ancestors(synsets: dict[str, tuple[list[str], list[str]]], offset: str) -> list[str]:
    """Every hypernym of a synset, nearest first."""
    out: list[str] = []
    frontier = list(synsets[offset][1])
    while frontier:
        nxt: list[str] = []
        for o in frontier:
            if o not in out:
                out.append(o)
                nxt += synsets[o][1]
        frontier = nxt
    return out


def words(lemma: str) -> str:
    return lemma.replace("_", " ").lower()


def build(wordnet: Path) -> dict:
    synsets = read_nouns(wordnet / "data.noun")
    senses = read_senses(wordnet / "index.noun")

    def common(lemma: str, offset: str) -> bool:
        return offset in senses.get(lemma.lower(), [])[:COMMON_SENSES]

    classes: list[dict[str, Any]] = []
    for index, wnid in enumerate(imagenet_wnids()):
        lemmas, _ = synsets[wnid[1:]]
        names = [words(w) for i, w in enumerate(lemmas) if i == 0 or common(w, wnid[1:])]
        kinds: list[str] = []
        for o in ancestors(synsets, wnid[1:]):
            for w in synsets[o][0]:
                w_low = w.lower()
                if (w_low in ABSTRACT or w_low in QUESTION_WORDS or words(w) in names or words(w) in kinds
                        or not common(w, o)):
                    continue
                kinds.append(words(w))
        classes.append({"index": index, "wnid": wnid, "name": imagenet_names()[index], "names": names,
                        "kinds": kinds})
    vocabulary = {w for c in classes for w in [*c["names"], *c["kinds"]]}
    plurals = {}
    for line in (wordnet / "noun.exc").read_text(encoding="latin-1").splitlines():
        plural, singular = line.split()[:2]
        if words(singular) in vocabulary and words(plural) != words(singular):
            plurals[words(plural)] = words(singular)
    return {"source": "WordNet 3.0 (Princeton University), Debian package wordnet-base", "classes": classes,
            "irregular_plurals": dict(sorted(plurals.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wordnet", help="a WordNet 3.0 dict directory (default: fetch Debian's wordnet-base)")
    ap.add_argument("--out", default=str(KINDS_FILE))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="livelens-wordnet-") as tmp:
        wordnet = Path(args.wordnet) if args.wordnet else fetch_wordnet(Path(tmp))
        data = build(wordnet)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    kinds = {k for c in data["classes"] for k in c["kinds"]}
    print(f"{len(data['classes'])} classes, {len(kinds)} kind words, {len(data['irregular_plurals'])} irregular "
          f"plurals -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
