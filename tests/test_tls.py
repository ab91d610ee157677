"""The gateway over TLS: a second gateway with a certificate, on the session's Kafka."""

from __future__ import annotations

import asyncio
import datetime
import os
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from livelens import health
from livelens.client import Client
from livelens.config import REPO_ROOT, to_dict
from livelens.infra.ports import free_port
from livelens.infra.process import ManagedProcess

pytestmark = pytest.mark.integration


def self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_gateway_serves_tls(stack, tmp_path):
    cert, key = self_signed(tmp_path)
    cfg = to_dict(stack.cfg)
    port = free_port()
    cfg["gateway"].update(port=port, tls_cert=str(cert), tls_key=str(key))
    (tmp_path / "livelens.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELENS_")}
    env.update(LIVELENS_CONFIG=str(tmp_path / "livelens.yaml"), PYTHONPATH=str(REPO_ROOT))
    gateway = ManagedProcess("tls-gateway", [sys.executable, "-m", "services.gateway"], tmp_path / "gateway.log",
                             env=env, cwd=REPO_ROOT,
                             ready_check=lambda: "gateway serving" in (tmp_path / "gateway.log").read_text())
    gateway.start()
    try:
        gateway.wait_ready(60)
        assert not health.check(f"127.0.0.1:{port}"), "plaintext must not reach a TLS gateway"

        async def run() -> str:
            target = f"localhost:{port}"
            async with Client(target, "test-token", root_cert=cert.read_bytes()) as client, \
                    client.watch("tls-stream") as session:
                return await session.opened()

        assert asyncio.run(run()) == "acme"

        async def untrusted() -> None:
            async with Client(f"localhost:{port}", "test-token", root_cert=None) as client:
                await asyncio.wait_for(client.ask("tls-stream", "hi?", timeout_s=2), 10)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            asyncio.run(untrusted())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.stop()
