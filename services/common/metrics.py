"""Prometheus metrics: what every service serves on its `/metrics` port.

Each service defines its histograms next to its code (`services/*/metrics.py`, named in
vLLM's style: `livelens_llm_time_to_first_token_seconds`) and exports the counters it
already keeps in its stats dataclasses through `StatsCollector`, read at scrape time, so
a number is counted once and shown everywhere. Consumer lag per partition is one gauge
shared by every consumer (`record_lag`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.ports import ensure_free

# Seconds: from a frame's or a question's few milliseconds to a CPU answer's tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)

CONSUMER_LAG = Gauge("livelens_kafka_consumer_lag", "Records in a partition not yet read by the consumer",
                     ["consumer", "topic", "partition"])


class StatsCollector(Collector):
    """A service's stats dataclasses as metrics, read when scraped: an int field `frames` of
    source `llm` is the counter `livelens_llm_frames_total`; fields named in `gauges` (and
    float fields) are gauges `livelens_llm_<field>`. A source may be several dataclasses
    (the service's own stats and its consume loop's)."""

    def __init__(self, sources: Callable[[], dict[str, Any]], gauges: frozenset[str] = frozenset()) -> None:
        self.sources = sources
        self.gauges = gauges

    def collect(self) -> Iterator[Any]:
        for source, value_of in self.sources().items():
            for stats in value_of if isinstance(value_of, tuple) else (value_of,):
                if stats is not None:
                    yield from self._fields(source, stats)

    def _fields(self, source: str, stats: Any) -> Iterator[Any]:
        for f in dataclasses.fields(stats):
            value = getattr(stats, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name = f"livelens_{source}_{f.name}"
            if f.name in self.gauges or isinstance(value, float):
                yield GaugeMetricFamily(name, f"{source} {f.name.replace('_', ' ')}", value=value)
            else:
                yield CounterMetricFamily(name, f"{source} {f.name.replace('_', ' ')}", value=value)


def serve_metrics(host: str, port: int, setting: str, stats: Callable[[], dict[str, Any]],
                  gauges: frozenset[str] = frozenset()) -> None:
    """`/metrics` on host:port, in a daemon thread, with the service's `stats` exported
    (port 0: no endpoint, nothing registered; a process serves one service's metrics)."""
    if not port:
        return
    ensure_free(host, port, setting)
    REGISTRY.register(StatsCollector(stats, gauges))
    start_http_server(port, addr=host)


def record_lag(consumer: Any, name: str) -> None:
    """Each assigned partition's lag, from what the consumer's last fetches said."""
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None:
            continue
        try:
            position = consumer.position(tp, timeout_ms=100)
        except Exception:  # noqa: BLE001 - no position yet (being reassigned)
            continue
        if position is not None:
            CONSUMER_LAG.labels(name, tp.topic, str(tp.partition)).set(max(0, high - position))
