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

from devtools.infra.process import ManagedProcess
from livelens import health
from livelens.client import Client
from livelens.config import REPO_ROOT, to_dict
from services.common.ports import free_port

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
    cfg["gateway"].update(port=port, metrics_port=0, tls_cert=str(cert), tls_key=str(key))
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


def issue(tmp: Path, name: str, ca: tuple | None = None) -> tuple[Path, Path, tuple]:
    """A certificate for common name `name`, signed by `ca` (key, cert) or self-signed as a CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer = (key, subject) if ca is None else (ca[0], ca[1].subject)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True))
    if name == "localhost":
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, (key, cert)


def test_mtls_maps_client_certificates_to_tenants(stack, tmp_path):
    ca_cert, _, ca = issue(tmp_path, "livelens-test-ca")
    server_cert, server_key, _ = issue(tmp_path, "localhost", ca)
    camera_cert, camera_key, _ = issue(tmp_path, "camera-7", ca)
    stranger_cert, stranger_key, _ = issue(tmp_path, "stranger", ca)
    outsider_cert, outsider_key, _ = issue(tmp_path, "camera-7-forged")  # the right name, not the CA's
    cfg = to_dict(stack.cfg)
    port = free_port()
    cfg["gateway"].update(port=port, metrics_port=0, tls_cert=str(server_cert), tls_key=str(server_key),
                          tls_client_ca=str(ca_cert), cert_tenants={"camera-7": "beta"})
    (tmp_path / "livelens.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELENS_")}
    env.update(LIVELENS_CONFIG=str(tmp_path / "livelens.yaml"), PYTHONPATH=str(REPO_ROOT))
    gateway = ManagedProcess("mtls-gateway", [sys.executable, "-m", "services.gateway"],
                             tmp_path / "gateway.log", env=env, cwd=REPO_ROOT,
                             ready_check=lambda: "gateway serving" in (tmp_path / "gateway.log").read_text())
    target = f"localhost:{port}"

    async def opened(cert: Path, key: Path, token: str = "") -> str:
        async with Client(target, token, root_cert=ca_cert.read_bytes(),
                          client_cert=(key.read_bytes(), cert.read_bytes())) as client, \
                client.watch("mtls-stream") as session:
            return await session.opened()

    async def asked(cert: Path, key: Path) -> None:
        async with Client(target, "", root_cert=ca_cert.read_bytes(),
                          client_cert=(key.read_bytes(), cert.read_bytes())) as client:
            await client.ask("mtls-stream", "hi?", timeout_s=2)

    async def without_certificate() -> None:
        async with Client(target, "test-token", root_cert=ca_cert.read_bytes()) as client:
            await asyncio.wait_for(client.ask("mtls-stream", "hi?", timeout_s=2), 10)

    gateway.start()
    try:
        gateway.wait_ready(60)
        assert asyncio.run(opened(camera_cert, camera_key)) == "beta"  # no token needed
        # a certificate the CA signed but no tenant names: the bearer token decides
        assert asyncio.run(opened(stranger_cert, stranger_key, "test-token")) == "acme"
        with pytest.raises(grpc.aio.AioRpcError) as unmapped:
            asyncio.run(asked(stranger_cert, stranger_key))
        assert unmapped.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for bad in (without_certificate(), opened(outsider_cert, outsider_key, "test-token")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                asyncio.run(bad)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.stop()
