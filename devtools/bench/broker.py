"""`livelens bench broker`: the bundled broker's log in memory vs on disk (`broker.storage`).

Each storage gets a broker of its own on free ports. One partition fills with batches of
20 KB (a frame record's size), one batch per send as a live stream makes them; at every
`step` batches, the median time from a send to its consumer getting it (`samples` sends),
and the send rate. Tansu's S3 storage lists a partition's every batch on a fetch, so the
on-disk figures grow with the log: what keeps `memory` the default.

Written to bench/results/broker.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from devtools.bench.common import machine
from devtools.infra.broker import TansuBroker
from devtools.infra.object_store import ObjectStore
from livelens.config import BrokerConfig
from services.common.ports import free_port

TOPIC = "bench-broker"
RECORD = b"x" * 20_000


def measure(bootstrap: str, steps: int, step: int, samples: int) -> list[dict[str, float]]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(TOPIC, 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50)
    tp = TopicPartition(TOPIC, 0)
    consumer.assign([tp])
    consumer.seek_to_end(tp)
    consumer.position(tp)  # resolved now: the first send below is after it
    rows = []
    batches = 0
    try:
        for _ in range(steps + 1):
            latencies = []
            for _ in range(samples):
                t0 = time.perf_counter()
                producer.send(TOPIC, RECORD).get(30)
                while not any(consumer.poll(1000).values()):
                    pass
                latencies.append(time.perf_counter() - t0)
            batches += samples
            t0 = time.perf_counter()
            for _ in range(step):  # one batch each: sent one by one, as a stream's frames are
                producer.send(TOPIC, RECORD).get(30)
            rate = step / (time.perf_counter() - t0)
            rows.append({"batches": batches, "send_to_consume_ms_p50": round(statistics.median(latencies) * 1000, 1),
                         "sends_per_s": round(rate, 1)})
            print(f"  {rows[-1]}", flush=True)
            batches += step
            consumer.seek_to_end(tp)
            consumer.position(tp)
    finally:
        producer.close()
        consumer.close()
    return rows


def run_broker_bench(out: Path, steps: int = 3, step: int = 1000, samples: int = 11) -> int:
    result: dict[str, Any] = {"record_bytes": len(RECORD), "step": step, "samples": samples, "machine": machine()}
    for storage in ("memory", "s3"):
        cfg = BrokerConfig(host="127.0.0.1", port=free_port(), storage=storage, s3_port=free_port())
        run_dir = Path(tempfile.mkdtemp(prefix=f"livelens-bench-broker-{storage}-"))
        store = ObjectStore(cfg, run_dir / "data", run_dir / "object-store.log") if storage == "s3" else None
        broker = TansuBroker(cfg, run_dir / "broker.log", store)
        print(f"==> broker log in {storage}", flush=True)
        try:
            if store is not None:
                store.start()
                store.wait_ready(60)
            broker.start()
            broker.wait_ready(30)
            result[storage] = measure(f"{cfg.host}:{cfg.port}", steps, step, samples)
        finally:
            broker.stop()
            if store is not None:
                store.stop()
    first, last = result["s3"][0], result["s3"][-1]
    result["s3_ms_per_1000_batches"] = round((last["send_to_consume_ms_p50"] - first["send_to_consume_ms_p50"])
                                             / ((last["batches"] - first["batches"]) / 1000), 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nlivelens bench broker ({result['machine']}): send -> consume p50, ms, by batches in the partition")
    for storage in ("memory", "s3"):
        print(f"  {storage:7s} " + "  ".join(f"{r['batches']}: {r['send_to_consume_ms_p50']}" for r in result[storage]))
    print(f"  on disk it grows {result['s3_ms_per_1000_batches']} ms per 1,000 batches; written to {out}")
    return 0
