"""`livelens bench e2e` keeps every answer it received (no stack needed for this part)."""

import json

from devtools.bench.e2e import answer_records
from livelens.client import ItemError
from livelens.watcher import AnswerRecord, WatchReport


def test_answer_records_keep_every_question_in_the_order_asked():
    report = WatchReport()
    report.answers["q-0-1"] = AnswerRecord("What is happening?", 5.0, 1000.0, text=" People walk by.",
                                           stream_time_s=4.5, ttft_s=1.25, server_ttft_s=0.9, done=True)
    report.answers["q-1-2"] = AnswerRecord("And now?", 10.0, 1005.0)  # nothing came back
    report.answers["q-2-3"] = AnswerRecord("Still?", 15.0, 1010.0, done=True)
    report.errors.append(ItemError("INTERNAL", "the model could not answer", 0, "q-2-3"))
    report.errors.append(ItemError("INVALID_ARGUMENT", "corrupt frame", 7, ""))

    records = answer_records(report)

    assert [r["question"] for r in records] == ["What is happening?", "And now?", "Still?"]
    assert records[0] == {"question": "What is happening?", "asked_at_s": 5.0, "stream_time_s": 4.5,
                          "text": " People walk by.", "ttft_s": 1.25, "done": True, "error": None}
    assert records[1]["ttft_s"] is None and records[1]["done"] is False and records[1]["text"] == ""
    assert records[2]["error"] == "the model could not answer"
    json.dumps(records)  # goes into the JSON as is
