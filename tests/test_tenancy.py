"""Tenants apart at the gateway, its limits, and the settings that keep Kafka private."""

from __future__ import annotations

import time

import grpc
import pytest

from livelens import kafka as lk
from livelens.config import ConfigError, GatewayConfig, KafkaConfig, LivelensConfig, with_settings
from livelens.identity import key_of, split_key, stream_key
from livelens.v1 import messages_pb2 as pb
from services.gateway.decider import ResponseTimingDecider
from services.gateway.server import LiveLensServicer
from services.gateway.sessions import RateLimit, Session, SessionRegistry
from services.gateway.validation import InvalidItem


def session(tenant: str, stream_id: str) -> Session:
    return Session(stream_id, tenant, ResponseTimingDecider(0.3, 1.0))


def test_two_tenants_may_watch_the_same_stream_id():
    reg = SessionRegistry(GatewayConfig(max_streams_per_tenant=1))
    a, b = session("acme", "cam-1"), session("beta", "cam-1")
    reg.open(a)
    reg.open(b)  # B learns nothing of A's stream
    assert reg.get("acme", "cam-1") is a and reg.get("beta", "cam-1") is b
    with pytest.raises(InvalidItem) as dup:
        reg.open(session("acme", "cam-1"))
    assert dup.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(InvalidItem) as limit:
        reg.open(session("acme", "cam-2"))
    assert limit.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "gateway.max_streams_per_tenant" in limit.value.message
    reg.close(session("acme", "cam-1"))  # another session object of the same name closes nothing
    assert reg.get("acme", "cam-1") is a
    reg.close(a)
    assert reg.get("acme", "cam-1") is None and reg.get("beta", "cam-1") is b


def test_stream_keys_are_tenant_and_stream_id():
    rec = pb.TokensRecord(tenant="acme", stream_id="cam-1")
    assert key_of(rec) == stream_key("acme", "cam-1") == "acme/cam-1"
    assert split_key("acme/cam-1") == ("acme", "cam-1")
    assert key_of(pb.TokensRecord(tenant="beta", stream_id="cam-1")) != key_of(rec)


def test_per_tenant_rates_are_limited_by_name():
    reg = SessionRegistry(GatewayConfig(tenant_max_fps=5, tenant_questions_per_minute=2))
    frames = 0
    with pytest.raises(InvalidItem) as fps:
        for _ in range(100):
            reg.admit_frame("acme")
            frames += 1
    assert frames == 5 and fps.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "gateway.tenant_max_fps" in fps.value.message
    reg.admit_frame("beta")  # another tenant's budget is its own
    reg.admit_question("acme")
    reg.admit_question("acme")
    with pytest.raises(InvalidItem) as qpm:
        reg.admit_question("acme")
    assert "gateway.tenant_questions_per_minute" in qpm.value.message


def test_rate_limit_refills():
    limit = RateLimit(rate=50.0, burst=1.0)
    assert limit.take() and not limit.take()
    time.sleep(0.05)
    assert limit.take()


def test_tokens_map_to_tenants():
    cfg = with_settings(LivelensConfig(), {"gateway.tokens": {"tok-a": "acme", "tok-b": "beta"}})
    servicer = LiveLensServicer(cfg, producer=None)
    assert servicer.token_tenant("tok-a") == "acme" and servicer.token_tenant("tok-b") == "beta"
    assert servicer.token_tenant("tok-") is None and servicer.token_tenant("") is None


@pytest.mark.parametrize("settings, setting", [
    ({"gateway.tokens": {"dev-token": "dev", "t": "a/b"}}, "gateway.tokens"),
    ({"gateway.cert_tenants": {"cn": ""}}, "gateway.cert_tenants"),
    ({"gateway.tls_client_ca": "ca.pem"}, "gateway.tls_client_ca"),
    ({"gateway.tenant_max_fps": 0}, "gateway.tenant_max_fps"),
    ({"kafka.security_protocol": "TLS"}, "kafka.security_protocol"),
    ({"kafka.security_protocol": "SASL_SSL"}, "kafka.sasl_mechanism"),
])
def test_tenancy_and_kafka_security_settings_are_checked(settings, setting):
    with pytest.raises(ConfigError, match=setting):
        with_settings(LivelensConfig(), settings)


def test_kafka_security_settings_reach_every_client():
    cfg = KafkaConfig(security_protocol="SASL_SSL", ssl_cafile="/ca.pem", sasl_mechanism="SCRAM-SHA-512",
                      sasl_username="livelens", sasl_password="secret")
    args = lk.security(cfg)
    assert args == {"security_protocol": "SASL_SSL", "ssl_cafile": "/ca.pem", "ssl_certfile": None,
                    "ssl_keyfile": None, "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "livelens",
                    "sasl_plain_password": "secret"}
    assert lk.consumer_limits(cfg)["security_protocol"] == "SASL_SSL"
    assert lk.security(KafkaConfig()) == {"security_protocol": "PLAINTEXT"}
