"""`livelens bench soak`'s accounting, on a made-up run (the soak itself runs 30 minutes
on the whole stack: `livelens bench soak`): every acknowledged frame is in the context,
folded or dropped, else unaccounted; questions asked during an outage are counted apart."""

from devtools.bench.soak import Soak, StreamTally, soak_result
from livelens.v1 import messages_pb2 as pb


def test_every_acknowledged_frame_is_accounted_for_and_outages_are_apart() -> None:
    soak = Soak(stack=None, token="t", minutes=1.0, fps=0.5, question_every_s=30.0,  # type: ignore[arg-type]
                kill_every_s=300.0)
    soak.kills = [{"service": "llm", "at_s": 100.0, "recovery_s": 40.0}]
    soak.rss = [{"t_s": 0.0, "llm": 1000.0, "encoder": 100.0, "gateway": 50.0, "broker": 20.0},
                {"t_s": 60.0, "llm": 1050.0, "encoder": 100.0, "gateway": 50.0, "broker": 20.0}]
    whole = StreamTally("soak-0", acked=set(range(30)), folds_told=9, encoded=set(range(30)))
    whole.asked = {"q0": 30.0, "q1": 110.0, "q2": 150.0}
    whole.outcome = {"q0": "answered", "q1": "DEADLINE_EXCEEDED", "q2": "answered"}
    short = StreamTally("soak-1", acked=set(range(30)), encoded=set(range(29)))  # seq 29 never encoded
    short.asked = {"q0": 30.0, "q1": 60.0}
    short.outcome = {"q0": "answered"}
    timings = {"soak-0": pb.AnswerTimings(frames_seen=30, frames_folded=9, frames_coalesced=2),
               "soak-1": pb.AnswerTimings(frames_seen=28)}
    result = soak_result(soak, [whole, short], timings, streams=2, replicas=1)
    rows = {r["stream"]: r for r in result["per_stream"]}
    assert (rows["soak-0"]["in_context"], rows["soak-0"]["folded"], rows["soak-0"]["unaccounted"]) == (19, 11, 0)
    assert rows["soak-1"]["unaccounted"] == 2 and result["frames_unaccounted"] == 2
    assert rows["soak-1"]["acked_not_encoded"] == [29]
    # q1 of soak-0 was asked during the LLM's outage (100-140 s): apart
    assert (rows["soak-0"]["questions_outside_outages"], rows["soak-0"]["answered_outside_outages"]) == (2, 2)
    assert rows["soak-1"]["answer_rate_outside_outages"] == 0.5
    assert rows["soak-0"]["missed"] == [{"request_id": "q1", "asked_at_s": 110.0, "outcome": "DEADLINE_EXCEEDED",
                                         "in_outage": True}]
    assert rows["soak-1"]["missed"] == [{"request_id": "q1", "asked_at_s": 60.0, "outcome": "no reply",
                                         "in_outage": False}]
    assert result["answer_rate_outside_outages_min"] == 0.5 and result["answered"] == 3
    assert result["llm_rss_change_last_20min"] == 0.05
    assert result["rss_mb_start"] == 1170.0  # the services and the broker


def test_the_memory_figures_leave_out_a_restarting_llm_as_they_say() -> None:
    """A restarted LLM service loads its model (not serving), then rebuilds its streams and
    fills its caches: the serving figure leaves out its samples before it serves again, the
    settled one those within SETTLE_S of that, the raw one only those when it is not running."""
    from devtools.bench.soak import SETTLE_S

    soak = Soak(stack=None, token="t", minutes=30.0, fps=0.5, question_every_s=30.0,  # type: ignore[arg-type]
                kill_every_s=300.0)
    soak.kills = [{"service": "llm", "at_s": 1200.0, "recovery_s": 60.0},
                  {"service": "encoder", "at_s": 1500.0, "recovery_s": 10.0}]
    llm = {600.0: 5000.0, 900.0: 5050.0, 1200.0: float("nan"), 1230.0: 2000.0, 1300.0: 4000.0, 1600.0: 5100.0,
           1800.0: 5150.0}
    soak.rss = [{"t_s": 0.0, "llm": 4000.0, "encoder": 100.0, "gateway": 50.0, "broker": 20.0}]
    soak.rss += [{"t_s": t, "llm": mb, "encoder": 100.0, "gateway": 50.0, "broker": 20.0} for t, mb in llm.items()]
    result = soak_result(soak, [], {}, streams=0, replicas=1)
    assert result["llm_rss_mb_last_20min"] == [2000.0, 5150.0]
    assert result["llm_rss_serving_mb_last_20min"] == [4000.0, 5150.0]  # 1230: before it served again
    assert 1200.0 + 60.0 + SETTLE_S <= 1600.0  # 1230 and 1300 are the warm-up's
    assert result["llm_rss_settled_mb_last_20min"] == [5000.0, 5150.0]
    assert result["llm_rss_settled_change_last_20min"] == 0.03
