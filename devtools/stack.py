"""The whole livelens stack on one machine: broker, Triton, LLM service, encoder, gateway.

Used by `livelens up`, the e2e benchmark and the integration test fixtures, so they all
start the same processes the same way. Every port is checked before anything starts, and
a taken port is reported with the setting that moves it. A process that fails to start
stops the start at once, with how it ended and its log; once all are up, a `Supervisor`
restarts any that exits. More replicas of a service (`add_replica`) join it as they would
in a cluster: the same Kafka consumer group, ports of their own.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from devtools.infra.broker import TansuBroker
from devtools.infra.object_store import ObjectStore
from devtools.infra.process import ManagedProcess, wait_all_ready
from devtools.infra.supervisor import Supervisor
from devtools.infra.triton import TritonServer
from livelens import health
from livelens.config import REPO_ROOT, LivelensConfig, to_dict, with_settings
from services.common import kafka as lk
from services.common.ports import ensure_free, free_port

Progress = Callable[[str], None]

SERVICES = {"gateway": "services.gateway", "encoder": "services.encoder", "llm": "services.llm"}
READY_TIMEOUT_S = {"gateway": 60.0, "encoder": 120.0, "llm": 300.0}


def health_target(cfg: LivelensConfig, service: str) -> str:
    """Where the service answers grpc.health.v1 (the gateway: on its API port)."""
    if service == "gateway":
        return f"{cfg.gateway.host}:{cfg.gateway.port}"
    section = cfg.encoder if service == "encoder" else cfg.llm
    return f"{section.health_host}:{section.health_port}"


def replica_config(cfg: LivelensConfig, service: str) -> LivelensConfig:
    """`cfg` with free ports for one more replica of `service` (its other settings shared)."""
    if service == "gateway":
        return with_settings(cfg, {"gateway.port": free_port(),
                                   "gateway.metrics_port": free_port() if cfg.gateway.metrics_port else 0})
    section = cfg.encoder if service == "encoder" else cfg.llm
    return with_settings(cfg, {f"{service}.health_port": free_port(),
                               f"{service}.metrics_port": free_port() if section.metrics_port else 0})


def port_settings(cfg: LivelensConfig) -> list[tuple[str, int, str]]:
    """(host, port, setting) of every port the local stack listens on."""
    ports = [
        (cfg.gateway.host, cfg.gateway.port, "gateway.port"),
        (cfg.encoder.health_host, cfg.encoder.health_port, "encoder.health_port"),
        (cfg.llm.health_host, cfg.llm.health_port, "llm.health_port"),
    ]
    ports += [(host, port, setting) for host, port, setting in (
        (cfg.gateway.host, cfg.gateway.metrics_port, "gateway.metrics_port"),
        (cfg.encoder.health_host, cfg.encoder.metrics_port, "encoder.metrics_port"),
        (cfg.llm.health_host, cfg.llm.metrics_port, "llm.metrics_port")) if port]
    if cfg.broker.enabled:
        ports.append((cfg.broker.host, cfg.broker.port, "broker.port"))
        if cfg.broker.storage == "s3":
            ports.append((cfg.broker.host, cfg.broker.s3_port, "broker.s3_port"))
    if cfg.triton.enabled:
        t = cfg.triton
        ports += [(t.host, t.grpc_port, "triton.grpc_port"), (t.host, t.http_port, "triton.http_port"),
                  (t.host, t.metrics_port, "triton.metrics_port")]
    return ports


# Every port the local stack listens on, as settings.
PORT_SETTINGS = ("broker.port", "broker.s3_port", "triton.grpc_port", "triton.http_port", "triton.metrics_port",
                 "gateway.port", "encoder.health_port", "llm.health_port", "gateway.metrics_port",
                 "encoder.metrics_port", "llm.metrics_port")


def use_free_ports(cfg: LivelensConfig) -> LivelensConfig:
    """`cfg` with every port of the local stack moved to a free one (benchmarks and tests
    run beside a `livelens up`)."""
    settings: dict[str, Any] = {name: free_port() for name in PORT_SETTINGS}
    settings["kafka.bootstrap"] = f"{cfg.broker.host}:{settings['broker.port']}"
    return with_settings(cfg, settings)


def check_prerequisites(cfg: LivelensConfig) -> None:
    missing = []
    if not (Path(cfg.llm.engine.model_path) / "config.json").is_file():
        missing.append(f"LLM weights at {cfg.llm.engine.model_path}")
    # Triton loads every model of the repository (each runs its version 1's ONNX): all of
    # them must be built, the one the encoder asks for first.
    repo = Path(cfg.triton.model_repository)
    models = sorted({cfg.encoder.model_name} | {p.parent.name for p in repo.glob("*/config.pbtxt")})
    for onnx in (repo / name / "1" / "model.onnx" for name in models):
        if cfg.triton.enabled and not onnx.is_file():
            missing.append(f"vision model at {onnx}")
    if missing:
        raise FileNotFoundError("missing " + " and ".join(missing) + ": run `make models`")


class Stack:
    def __init__(self, cfg: LivelensConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.processes: list[ManagedProcess] = []
        self.supervisor: Supervisor | None = None  # restarts what crashes, once all are up
        self.shared_kv: Path | None = None  # the LLM replicas' KV directory, when the stack made it

    def _service(self, name: str, module: str, health_target: str,
                 config_file: str = "livelens.yaml") -> ManagedProcess:
        env = {**os.environ, "LIVELENS_CONFIG": str(self.run_dir / config_file),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        # Settings come from the file written below; stray overrides must not differ from it.
        for key in [k for k in env if k.startswith("LIVELENS_") and "__" in k]:
            del env[key]
        return ManagedProcess(name, [sys.executable, "-m", module], self.run_dir / f"{name}.log",
                              env=env, cwd=REPO_ROOT, ready_check=lambda: health.check(health_target))

    def start(self, progress: Progress = print) -> None:
        cfg = self.cfg
        check_prerequisites(cfg)
        for host, port, setting in port_settings(cfg):
            ensure_free(host, port, setting)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {}
        if cfg.broker.enabled:  # the services talk to the broker started here, wherever its port was moved
            settings["kafka.bootstrap"] = f"{cfg.broker.host}:{cfg.broker.port}"
        if cfg.llm.context.materializer == "streaming_kv" and not cfg.llm.store.kv_shared_dir:
            # Every replica here shares this machine's disk: one that takes a stream over
            # (after a crash, or a second one) loads its stored KV. It lives as long as
            # the broker's log (in memory), so with the stack.
            self.shared_kv = self.run_dir / "kv-shared"
            settings["llm.store.kv_shared_dir"] = str(self.shared_kv)
        self.cfg = cfg = with_settings(cfg, settings)
        (self.run_dir / "livelens.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        try:
            self._start(progress)
        except BaseException:
            self.stop()
            raise

    def _start(self, progress: Progress) -> None:
        cfg = self.cfg
        t0 = time.monotonic()
        if cfg.broker.enabled:
            store = None
            if cfg.broker.storage == "s3":
                data = Path(cfg.broker.data_dir) if cfg.broker.data_dir else self.run_dir / "broker-data"
                progress(f"starting the broker's object store on {cfg.broker.host}:{cfg.broker.s3_port} ({data})")
                store = ObjectStore(cfg.broker, data, self.run_dir / "object-store.log")
                self.processes.append(store)
                store.start()
                store.wait_ready(60)
            progress(f"starting Kafka broker (tansu) on {cfg.broker.host}:{cfg.broker.port}, "
                     f"its log {'on disk' if store else 'in memory'}")
            broker = TansuBroker(cfg.broker, self.run_dir / "broker.log", store)
            self.processes.append(broker)
            broker.start()
            broker.wait_ready(30)
        lk.ensure_topics(cfg.kafka)
        if cfg.triton.enabled:
            progress(f"starting Triton on {cfg.triton.grpc_url}")
            triton = TritonServer(cfg.triton, cfg.encoder.model_name, self.run_dir / "triton.log")
            self.processes.append(triton)
            triton.start()
        progress("starting LLM service (loads vLLM, ~30-60 s on CPU)")
        llm = self._service("llm", SERVICES["llm"], health_target(cfg, "llm"))
        self.processes.append(llm)
        llm.start()
        if cfg.triton.enabled:
            triton.wait_ready()
        progress("starting encoder and gateway")
        encoder = self._service("encoder", SERVICES["encoder"], health_target(cfg, "encoder"))
        gateway = self._service("gateway", SERVICES["gateway"], health_target(cfg, "gateway"))
        self.processes += [encoder, gateway]
        encoder.start()
        gateway.start()
        # Any of them failing ends the wait at once, with its reason and log.
        wait_all_ready([(p, READY_TIMEOUT_S[p.name]) for p in (gateway, encoder, llm)])
        progress(f"stack ready in {time.monotonic() - t0:.0f}s; logs in {self.run_dir}")
        self.supervisor = Supervisor(self.processes, self.status_path, report=progress).start()

    @property
    def gateway_target(self) -> str:
        return f"{self.cfg.gateway.host}:{self.cfg.gateway.port}"

    @property
    def status_path(self) -> Path:
        return self.run_dir / "status.json"

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.processes if p.name == name)

    def add_replica(self, service: str) -> tuple[ManagedProcess, LivelensConfig]:
        """Start one more replica of `service` ("gateway", "encoder" or "llm") on free ports,
        wait until it serves, and have the supervisor restart it like the others. Returns the
        process (named `<service>-<n>`) and its settings (its ports)."""
        if service not in SERVICES:
            raise ValueError(f"no service {service!r}: one of {', '.join(SERVICES)}")
        if self.supervisor is None:
            raise RuntimeError("the stack is not running: start it first")
        n = 2
        while any(p.name == f"{service}-{n}" for p in self.processes):
            n += 1
        name = f"{service}-{n}"
        cfg = replica_config(self.cfg, service)
        (self.run_dir / f"{name}.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        p = self._service(name, SERVICES[service], health_target(cfg, service), f"{name}.yaml")
        p.start()
        try:
            wait_all_ready([(p, READY_TIMEOUT_S[service])])
        except BaseException:
            p.stop()
            raise
        self.processes.append(p)
        self.supervisor.add(p, health_target(cfg, service))
        return p, cfg

    def remove_replica(self, name: str) -> None:
        """Stop a replica `add_replica` started (SIGTERM: it leaves its consumer group)."""
        p = self.process(name)
        if self.supervisor is not None:
            self.supervisor.remove(name)
        p.stop()
        self.processes.remove(p)

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()
        if self.shared_kv is not None:
            shutil.rmtree(self.shared_kv, ignore_errors=True)
