"""Standard gRPC health serving for the services that have no API of their own.
The encoder and the LLM service serve `grpc.health.v1.Health` on their health port, so
Kubernetes probes, `livelens up` and grpcurl (`livelens.health.check`) all ask them the
same way as the gateway.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.ports import ensure_free

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServer:
    def __init__(self, host: str, port: int, setting: str, service_name: str) -> None:
        ensure_free(host, port, setting)
        self.service_name = service_name
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(f"{host}:{port}")
        self.set(False)

    def start(self) -> HealthServer:
        self.server.start()
        return self

    def set(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        self.servicer.set("", status)
        self.servicer.set(self.service_name, status)

    def stop(self) -> None:
        self.server.stop(0)
