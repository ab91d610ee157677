"""The scoring of `livelens bench timing`: hits within the window after an onset that
name the label, precision/recall/F1, delays by arrival and by decided frame, PAUC, and
the events file formats."""

import json

import pytest

from devtools.bench.timing import Event, Said, load_events, named, score, scores

EVENTS = [Event(10.0, 16.0, "cat"), Event(40.0, 44.0, "orange")]


def test_a_timely_alert_naming_the_label_hits_and_a_late_one_is_false() -> None:
    said = [Said(11.0, ("cat",), "a cat", 10.5),  # decided 0.5 s after the onset, got 1 s after it
            Said(11.8, ("cat",), "a cat again", 11.5),  # the same event again: a hit, not its first
            Said(43.0, ("orange",), "an orange", 41.5)]  # decided 1.5 s after the onset, got 3 s after it
    s = scores(EVENTS, said, minutes=1.0)
    assert s["hits"] == 3 and s["alerts"] == 3 and s["recall"] == 1.0 and s["f1"] == 1.0
    assert s["delay_median_s"] == pytest.approx(1.0)  # 0.5 and 1.5
    assert s["false_alerts_per_10min"] == 0.0
    # PAUC: the cat's span after its first correct alert (5.5 of 6 s), the orange's (2.5 of 4)
    assert s["pauc"] == pytest.approx((5.5 / 6 + 2.5 / 4) / 2)

    a = s["arrival"]  # by arrival the orange's alert came too late: a miss, and a false alert
    assert a["hits"] == 2 and a["alerts"] == 3
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(0.5)
    assert a["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert a["delay_median_s"] == pytest.approx(1.0)
    assert a["false_alerts_per_10min"] == pytest.approx(10.0)
    assert a["pauc"] == pytest.approx((5 / 6 + 1 / 4) / 2)


def test_an_alert_naming_another_label_is_no_hit() -> None:
    s = score(EVENTS, [Said(10.5, ("orange",), "an orange", 10.0)], minutes=1.0)
    assert s["hits"] == 0 and s["recall"] == 0.0 and s["f1"] == 0.0 and s["delay_median_s"] is None


def test_labels_are_read_from_remarks_by_their_words() -> None:
    assert named("There is a small kitten on the left.", ["cat", "orange"]) == ("cat",)
    assert named("A street with people walking.", ["cat", "orange"]) == ()


def test_events_files_in_json_and_csv(tmp_path) -> None:
    j = tmp_path / "events.json"
    j.write_text(json.dumps([{"onset": 5, "end": 9, "label": "truck"}, {"onset": 1, "end": 3, "label": "car"}]))
    assert load_events(j) == [Event(1.0, 3.0, "car"), Event(5.0, 9.0, "truck")]
    c = tmp_path / "events.csv"
    c.write_text("onset,end,label\n# a comment\n5,9,truck\n1,3,car\n")
    assert load_events(c) == [Event(1.0, 3.0, "car"), Event(5.0, 9.0, "truck")]
