from services.gateway.decider import ResponseTimingDecider


def test_first_frame_never_alerts():
    d = ResponseTimingDecider(threshold=0.3, cooldown_s=5)
    assert d.observe(0.0, 1.0) is None


def test_scene_change_fires_once_then_cools_down():
    d = ResponseTimingDecider(threshold=0.3, cooldown_s=5)
    d.observe(0.0, 1.0)
    assert d.observe(0.5, 0.05) is None
    fired = d.observe(1.0, 0.6)
    assert fired is not None and fired.reason == "scene_change" and fired.pts_s == 1.0
    # still changing (no hysteresis reset) and inside the cooldown: silent
    assert d.observe(1.5, 0.7) is None
    assert d.observe(2.0, 0.05) is None
    assert d.observe(3.0, 0.9) is None  # armed again but inside the 5 s cooldown
    assert d.observe(6.5, 0.9) is not None


def test_busy_stream_needs_calm_before_next_alert():
    d = ResponseTimingDecider(threshold=0.3, cooldown_s=1)
    d.observe(0.0, 1.0)
    d.observe(0.5, 0.0)
    assert d.observe(1.0, 0.5) is not None
    # novelty never falls under threshold/2: no chatter however long
    assert all(d.observe(1.0 + i, 0.4) is None for i in range(1, 20))
