"""Asks a livelens service whether it is serving: standard gRPC health checking
(`grpc.health.v1.Health`), which every service answers (the gateway on its API port, the
encoder and the LLM service on their health ports), as Kubernetes probes and grpcurl do.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(target: str, service: str = "", timeout_s: float = 1.0) -> bool:
    """True when the server at `target` reports SERVING."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return bool(reply.status == SERVING)
