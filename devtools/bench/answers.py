"""How `livelens bench quality` scores an answer to "Did X appear?", "When did X appear?"
and "Which KIND appeared?", for a needle that is in the video or an object that is not.

- Yes/no questions are scored by their first word.
- "When" is right when the answer says a time within one frame interval of the needle
  (for an absent object: when it says it was not seen, and no time).
- "Which" is right when the answer names the needle (its label, one of its everyday
  words, or what the classifier called it).
- An answer that says neither Yes nor No (yes/no), no time and no "not" (when), or names
  nothing (which) is a **non-answer**: counted on its own, never as a right No.
- A **false alarm** says an absent object appeared: Yes, or a time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.labels import names_label, words_naming_classes

FORMS = ("did", "when", "which")
_NEGATION = re.compile(r"\b(no|not|never|none|nothing|neither|nor)\b|n't\b")
# "600.0s", "600 s", "600 seconds", "at 10:00" (minutes:seconds)
_SECONDS = re.compile(r"(\d+(?:\.\d+)?)\s*(?:s|sec|secs|second|seconds)\b")
_CLOCK = re.compile(r"\b(\d{1,3}):([0-5]\d)(?:\.\d+)?\b")


@dataclass(frozen=True)
class Score:
    right: bool
    false_alarm: bool
    non_answer: bool


def first_word(answer: str) -> str | None:
    """"yes" or "no" when the answer starts with it, else None."""
    m = re.match(r"\W*([A-Za-z]+)", answer)
    word = m.group(1).lower() if m else ""
    return word if word in ("yes", "no") else None


def times_said(answer: str) -> list[float]:
    """The stream times an answer names, in seconds."""
    text = answer.lower()
    out = [float(s) for s in _SECONDS.findall(text)]
    out += [int(m) * 60 + int(s) for m, s in _CLOCK.findall(text)]
    return out


def says_not(answer: str) -> bool:
    return bool(_NEGATION.search(answer.lower()))


def score(form: str, present: bool, answer: str, names: Sequence[str] = (),
          span_s: tuple[float, float] = (0.0, 0.0), interval_s: float = 0.0) -> Score:
    """`names`: what counts as naming the needle; `span_s`: its first and last frame's times."""
    if form == "did":
        word = first_word(answer)
        return Score(word == ("yes" if present else "no"), not present and word == "yes", word is None)
    if form == "when":
        times = times_said(answer)
        if present:
            lo, hi = span_s[0] - interval_s, span_s[1] + interval_s
            return Score(any(lo - 1e-6 <= t <= hi + 1e-6 for t in times), False, not times and not says_not(answer))
        denied = says_not(answer)
        return Score(denied and not times, bool(times) and not denied, not times and not denied)
    if form == "which":
        named = any(names_label(answer, n) for n in names)
        return Score(named, False, not named and not words_naming_classes(answer) and not says_not(answer))
    raise ValueError(f"unknown question form {form!r}; expected one of {', '.join(FORMS)}")
