"""What the benchmark suites share: percentiles, the machine they ran on, and a thread
that reads livelens topics while a benchmark runs."""

from __future__ import annotations

import os
import platform
import threading
from typing import Any

from livelens.config import LivelensConfig
from livelens.subscriber import TopicSubscriber


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}"


class TopicWatcher:
    """Reads topics in a thread while a benchmark runs, handing each record to `seen`."""

    def __init__(self, cfg: LivelensConfig, topics: list[str], tenant: str | None = None) -> None:
        self.sub = TopicSubscriber(cfg.kafka, topics, tenant=tenant)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def seen(self, rec: Any) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self.stop.is_set():
            for rec in self.sub.records(timeout_s=0.2):
                self.seen(rec)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sub.close()
