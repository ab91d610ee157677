"""The local S3 server the bundled broker keeps a durable log on (`broker.storage: s3`):
ministack, from its own venv (`make object-store`), persisting every object to disk.

Tansu's S3 storage needs conditional writes (`If-None-Match: *`, `If-Match`) so that two
writes of one offset cannot both succeed; ministack honours them, and survives a kill -9
(objects are written to a temp file and renamed; there is no fsync, so a power loss can
lose the newest). Other local S3 servers tried (rclone serve s3, s3rver, local-s3-server,
moto) lack the conditional writes or persistence.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from devtools.infra.process import ManagedProcess
from livelens.config import BrokerConfig, build_dir
from services.common.ports import ensure_free

MINISTACK = Path(build_dir()) / "object-store-venv" / "bin" / "ministack"
BUCKET = "tansu"
# ministack takes any keys; Tansu's S3 client wants some.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "livelens", "AWS_SECRET_ACCESS_KEY": "livelens-local",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


class ObjectStore(ManagedProcess):
    def __init__(self, cfg: BrokerConfig, data_dir: Path, log_path: Path) -> None:
        if not MINISTACK.is_file():
            raise FileNotFoundError(f"broker.storage s3 needs the local S3 server at {MINISTACK}: run "
                                    "`make object-store`")
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GATEWAY_PORT": str(cfg.s3_port), "BIND_HOST": cfg.host, "SERVICES": "s3",
               "S3_PERSIST": "1", "S3_DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING"}
        super().__init__("object store (ministack)", [str(MINISTACK)], log_path, env=env)
        self.cfg = cfg

    @property
    def endpoint(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.s3_port}"

    def start(self) -> None:
        ensure_free(self.cfg.host, self.cfg.s3_port, "broker.s3_port")
        super().start()

    def is_ready(self) -> bool:
        """Serving, with the broker's bucket (made here the first time; 409 after a restart)."""
        try:
            urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="PUT"),
                                   timeout=2).close()
        except urllib.error.HTTPError as exc:
            return exc.code == 409
        except OSError:
            return False
        return True

    def broker_env(self) -> dict[str, str]:
        """What Tansu needs in its environment to keep its log here."""
        return {"AWS_ENDPOINT": self.endpoint, **CREDENTIALS}
