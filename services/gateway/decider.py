"""The response-timing decider: when should the model speak without being asked?

First version: a scene-change alert when the encoder's novelty score crosses a
threshold, then silence for a cooldown of stream time, so it neither stays silent
through a cut nor chatters through a busy shot (hysteresis: after firing, novelty must
fall back under half the threshold before it can fire again).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Decision:
    pts_s: float
    score: float
    reason: str


class ResponseTimingDecider:
    def __init__(self, threshold: float, cooldown_s: float) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.last_alert_pts: float | None = None
        self.armed = False  # the first frame is all novelty by definition: never an alert
        self.frames = 0

    def observe(self, pts_s: float, novelty: float) -> Decision | None:
        self.frames += 1
        if self.frames == 1:
            return None
        if not self.armed:
            self.armed = novelty < self.threshold / 2
            if not self.armed:
                return None
        cooling = self.last_alert_pts is not None and pts_s - self.last_alert_pts < self.cooldown_s
        if novelty >= self.threshold and not cooling:
            self.last_alert_pts = pts_s
            self.armed = False
            return Decision(pts_s, novelty, "scene_change")
        return None
