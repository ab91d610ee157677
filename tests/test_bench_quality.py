"""`livelens bench quality`: the parts that need no engine (the end-to-end run is the benchmark)."""

import json
from pathlib import Path

import pytest

from devtools.bench.answers import first_word, score, times_said
from devtools.bench.quality import (
    NEEDLES_FILE,
    goals,
    model_repository,
    needle_summary,
    questions_for,
    read_needles,
    summary,
)
from devtools.train.data import feature_grids, needle_frames, teacher_probs
from services.common.labels import imagenet_names, question_names_tag


def test_first_word_and_times() -> None:
    assert first_word("Yes, a cat appeared at 12 s.") == "yes" and first_word('"No."') == "no"
    assert first_word("I see a street. Yes.") is None and first_word("Nope") is None
    assert times_said("at 600.0s, 620.0 s and 10:40, then 5 seconds") == [600.0, 620.0, 5.0, 640.0]
    assert times_said("The video was taken at 600") == []


@pytest.mark.parametrize(("form", "present", "answer", "right", "alarm", "non"), [
    ("did", True, "Yes, a cat appeared at 600.0s.", True, False, False),
    ("did", True, "No, no cat appeared.", False, False, False),
    ("did", True, "The video has no information about a cat.", False, False, True),  # never a right No
    ("did", False, "No, no elephant appeared.", True, False, False),
    ("did", False, "Yes, an elephant.", False, True, False),
    ("did", False, "The video has been removed.", False, False, True),
    ("when", True, "A cat was first seen at 600.0s.", True, False, False),
    ("when", True, "The cat appeared at 661.0s.", False, False, False),  # more than one interval off
    ("when", True, "The video has been edited.", False, False, True),
    ("when", False, "No elephant was seen so far.", True, False, False),
    ("when", False, "The elephant appeared at 1240.0s.", False, True, False),
    ("which", True, "The animal was an Egyptian cat.", True, False, False),
    ("which", True, "The animal was a unicycle.", False, False, False),
    ("which", True, "The video was filmed at 600.0s.", False, False, True),
])
def test_score(form, present, answer, right, alarm, non) -> None:
    got = score(form, present, answer, ("cat", "Egyptian cat") if present else ("elephant",), (600.0, 640.0), 20.0)
    assert (got.right, got.false_alarm, got.non_answer) == (right, alarm, non)


def test_the_default_needles_are_named_by_the_classifier_and_asked_three_ways() -> None:
    needles = read_needles(NEEDLES_FILE)
    assert len(needles.needles) >= 8 and len({n.kind for n in needles.needles}) >= 7 and len(needles.absent) == 3
    names = imagenet_names()
    for n in needles.needles:
        probs = teacher_probs(feature_grids(needle_frames(n.path(), 3)))
        top = probs.argmax(-1)
        assert all(probs[i, t] >= 0.5 for i, t in enumerate(top.tolist())), (n.label, probs.max(-1))
        tag = names[int(top[0])]
        assert question_names_tag(f"Did {n.label} appear?", tag), (n.label, tag)
        assert question_names_tag(f"Which {n.kind} appeared?", tag), (n.kind, tag)
    forms = [(q.form, q.present) for q in questions_for(needles.needles[0], needles.absent)]
    assert forms == [("did", True), ("when", True), ("which", True)] + [("did", False), ("when", False)] * 3


def test_a_bad_needles_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "needles.json"
    bad.write_text(json.dumps({"needles": [{"image": "x.png", "label": "cat"}]}))
    with pytest.raises(ValueError, match="needles file .*kind"):
        read_needles(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="needles file"):
        read_needles(bad)


def test_summary_rates_per_form_and_kind_with_and_without_yes_no_first() -> None:
    def row(form, present, accuracy, non=0.0, alarm=None, constrained=True, method="streaming_kv", minutes=1):
        return {"method": method, "needle": "cat", "kind": "animal", "haystack_minutes": minutes, "depth": 0.5,
                "form": form, "present": present, "yes_no_first": constrained if form == "did" else None,
                "accuracy": accuracy, "false_alarm": alarm, "non_answer": non,
                "retrieved_needle": True if present and method != "full" else None}

    rows = [row("did", True, 1.0), row("did", True, 0.0, non=1.0, constrained=False), row("when", True, 1.0),
            row("which", True, 0.0), row("did", False, 1.0, alarm=0.0), row("when", False, 0.0, alarm=1.0),
            row("did", False, 0.0, non=1.0, alarm=0.0, constrained=False),
            row("did", True, 1.0, method="full"), row("when", True, 0.0, method="full")]
    rates = needle_summary(rows)
    on = next(r for r in rates if r["method"] == "streaming_kv" and r["by"] == "all" and r["yes_no_first"])
    assert (on["questions"], on["accuracy"], on["false_alarm"], on["non_answer"]) == (5, 0.6, 0.5, 0.0)
    off = next(r for r in rates if r["method"] == "streaming_kv" and r["by"] == "all" and not r["yes_no_first"])
    assert off["questions"] == 5 and off["accuracy"] == 0.2 and off["non_answer"] == 0.4
    kind = next(r for r in rates if r["by"] == "kind" and r["yes_no_first"] and r["method"] == "streaming_kv")
    assert kind["key"] == "animal" and kind["retrieved_needle"] == 1.0
    g = goals(rows, rates, "streaming_kv")
    assert g["accuracy"] == 0.6 and g["full_context_accuracy"] == 0.5 and g["accuracy_where_full_context_fits"] == 0.6
    text = summary({"needle_summary": rates, "goals": g})
    assert "| streaming_kv | on | all |  | 5 | 0.60 | 0.50 | 0.00 | 1.00 |" in text


def test_model_repository_serves_both_projectors(tmp_path: Path) -> None:
    seeded = tmp_path / "seeded.onnx"
    seeded.write_bytes(b"not really onnx")
    trained = tmp_path / "trained.onnx"
    trained.write_bytes(b"trained")
    repo = model_repository(tmp_path / "repo", {"vision_encoder_trained": trained, "vision_encoder_seeded": seeded})
    assert sorted(p.name for p in repo.iterdir()) == ["vision_encoder_seeded", "vision_encoder_trained"]
    config = (repo / "vision_encoder_seeded" / "config.pbtxt").read_text()
    assert 'name: "vision_encoder_seeded"' in config and 'name: "vision_encoder"' not in config
    assert (repo / "vision_encoder_seeded" / "1" / "model.onnx").read_bytes() == b"not really onnx"
    assert (repo / "vision_encoder_trained" / "1" / "model.onnx").read_bytes() == b"trained"
    assert (repo / "vision_encoder_trained" / "1" / "model.py").is_file()
