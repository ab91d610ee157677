"""The Helm chart (helm/livelens), checked with the real `helm` binary.

`helm lint --strict` and `helm template` run against the chart, and every rendered
manifest is validated against the Kubernetes OpenAPI schemas shipped in the
`kubernetes-validate` package. `devtools/install_helm.sh` (run by the Makefile) puts the
binary in build/bin/helm.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "livelens"
HELM = ROOT / "build" / "bin" / "helm"
RELEASE = "demo"
FULLNAME = f"{RELEASE}-livelens"
APP_COMPONENTS = ("gateway", "encoder", "llm")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# Custom resources of operators the chart can target (Prometheus Operator, KEDA): the
# kubernetes-validate schemas do not know them; their tests below check them field by field.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}
METRICS_PORTS = {"gateway": 50061, "encoder": 50062, "llm": 50063}
DASHBOARD = CHART / "dashboards" / "livelens.json"

pytestmark = pytest.mark.skipif(
    not HELM.exists(),
    reason=f"helm binary not found at {HELM.relative_to(ROOT)}; run devtools/install_helm.sh",
)

# A values file that switches on every optional branch of the templates.
FULL_VALUES: dict[str, Any] = {
    "kafka": {
        "bootstrap": "kafka-0.kafka:9092,kafka-1.kafka:9092",
        "ports": [9092, 9093],
        "egressTo": [{"namespaceSelector": {"matchLabels": {"name": "kafka"}}}],
        "retentionMs": 14400000,
        "security": {
            "protocol": "SASL_SSL",
            "tls": {"secretName": "kafka-tls", "clientAuth": True},
            "sasl": {
                "mechanism": "SCRAM-SHA-512",
                "username": "livelens",
                "passwordSecret": {"name": "kafka-credentials", "key": "sasl-password"},
            },
        },
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "gateway": {
        "tokens": {"tok-alpha": "acme", "tok-beta": "globex"},
        "tls": {"secretName": "gateway-tls", "clientCASecret": "gateway-client-ca"},
        "certTenants": {"camera-01.acme.example": "acme", "Globex Camera 7": "globex"},
        "autoscaling": {"enabled": False},
        "replicas": 3,
        "service": {"type": "LoadBalancer"},
        "extraEnv": [{"name": "LIVELENS_GATEWAY__MAX_STREAMS_PER_TENANT", "value": "16"}],
    },
    "triton": {
        "modelRepository": {"source": "initContainer"},
        "runtimeClassName": "nvidia",
        "gpu": {"count": 2},
    },
    "encoder": {"autoscaling": {"keda": {"enabled": True, "maxReplicas": 16, "lagThreshold": 40}}},
    "llm": {
        "replicas": 2,
        "sharedKV": {"enabled": True, "storageClassName": "efs"},
        "autoscaling": {"keda": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
        "initContainers": [
            {
                "name": "fetch-weights",
                "image": "busybox:1.36",
                "command": ["sh", "-c", "true"],
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 10001,
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "1"}},
                "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "models", "mountPath": "/models"},
                ],
            }
        ],
    },
    "networkPolicy": {
        "gatewayIngressFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
        "metricsIngressFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    },
    "metrics": {
        "podAnnotations": True,
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}},
        "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "livelens"}},
    },
}
# Secrets the full values reference but the chart does not create: (name, key) -> value.
EXTERNAL_SECRETS = {("kafka-credentials", "sasl-password"): "s3cr3t"}


# --------------------------------------------------------------------------- helpers


def run_helm(
    *args: str,
    values: dict[str, Any] | None = None,
    tmp_path: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    cmd = [str(HELM), *args]
    if values is not None:
        assert tmp_path is not None, "a values dict needs tmp_path for its file"
        values_file = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(values_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
    return proc


def render(
    *set_args: str, values: dict[str, Any] | None = None, tmp_path: Path | None = None
) -> list[dict[str, Any]]:
    proc = run_helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        "video",
        *set_args,
        values=values,
        tmp_path=tmp_path,
    )
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    names = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    raise AssertionError(f"{kind}/{name} not rendered; got {names}")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def all_containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value (plain values) or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def component(name: str) -> str:
    return f"{FULLNAME}-{name}"


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def full_docs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(values=FULL_VALUES, tmp_path=tmp_path_factory.mktemp("values"))


# --------------------------------------------------------------------------- lint, render


def test_lint_strict_default_values() -> None:
    proc = run_helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in proc.stdout


def test_lint_strict_full_values(tmp_path: Path) -> None:
    proc = run_helm("lint", "--strict", str(CHART), values=FULL_VALUES, tmp_path=tmp_path)
    assert "0 chart(s) failed" in proc.stdout


def test_template_renders_every_resource(default_docs: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in default_docs}
    expected = {
        ("ServiceAccount", FULLNAME),
        ("ConfigMap", component("config")),
        ("Secret", component("gateway-tokens")),
        ("Deployment", component("gateway")),
        ("Service", component("gateway")),
        ("Service", component("gateway-metrics")),
        ("HorizontalPodAutoscaler", component("gateway")),
        ("PodDisruptionBudget", component("gateway")),
        ("Deployment", component("encoder")),
        ("Service", component("encoder")),
        ("Deployment", component("triton")),
        ("Service", component("triton")),
        ("PersistentVolumeClaim", component("triton-models")),
        ("StatefulSet", component("llm")),
        ("Service", component("llm")),
        ("PodDisruptionBudget", component("llm")),
        *(("NetworkPolicy", component(c)) for c in ("gateway", "encoder", "triton", "llm")),
    }
    assert expected <= kinds, f"missing: {sorted(expected - kinds)}"
    for doc in default_docs:
        assert doc["metadata"]["namespace"] == "video", doc["metadata"]["name"]
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_notes_render() -> None:
    proc = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", "video")
    assert "port-forward svc/demo-livelens-gateway 50051:50051" in proc.stdout
    assert "random token" in proc.stdout


# --------------------------------------------------------------------------- schemas

# Oldest Kubernetes the chart supports, and the newest the installed package knows.
K8S_VERSIONS = ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("which", ["default", "full"])
def test_manifests_validate_against_kubernetes_schemas(
    which: str, k8s_version: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(f"{which}_docs")
    custom = {(d["apiVersion"], d["kind"]) for d in docs} & CRD_KINDS
    assert custom == (CRD_KINDS if which == "full" else set())
    errors = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} {e.json_path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert not errors, "\n".join(errors)


def test_schema_rejects_empty_kafka_bootstrap(tmp_path: Path) -> None:
    proc = run_helm(
        "template",
        RELEASE,
        str(CHART),
        values={"kafka": {"bootstrap": ""}},
        tmp_path=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert "/kafka/bootstrap" in proc.stderr
    assert "minLength" in proc.stderr


def test_schema_rejects_wrongly_typed_values(tmp_path: Path) -> None:
    proc = run_helm(
        "template",
        RELEASE,
        str(CHART),
        values={"kafka": {"bootstrap": 9092}},
        tmp_path=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "/kafka/bootstrap" in proc.stderr
    assert "want string" in proc.stderr

    proc = run_helm("template", RELEASE, str(CHART), "--set", "gateway.replicas=many", check=False)
    assert proc.returncode != 0
    assert "/gateway/replicas" in proc.stderr
    assert "want integer" in proc.stderr


def test_schema_rejects_unknown_sections_and_bad_tokens(tmp_path: Path) -> None:
    proc = run_helm("template", RELEASE, str(CHART), "--set", "kafak.bootstrap=x", check=False)
    assert proc.returncode != 0
    assert "additional properties 'kafak' not allowed" in proc.stderr

    bad = {"gateway": {"tokens": {"tok=en": "acme"}}}
    proc = run_helm("template", RELEASE, str(CHART), values=bad, tmp_path=tmp_path, check=False)
    assert proc.returncode != 0
    assert "invalid propertyName 'tok=en'" in proc.stderr

    bad = {"gateway": {"tokens": {"token": "acme,globex"}}}
    proc = run_helm("template", RELEASE, str(CHART), values=bad, tmp_path=tmp_path, check=False)
    assert proc.returncode != 0
    assert "/gateway/tokens/token" in proc.stderr

    proc = run_helm(
        "template", RELEASE, str(CHART), "--set", "triton.modelRepository.source=s3", check=False
    )
    assert proc.returncode != 0
    assert "/triton/modelRepository/source" in proc.stderr


# --------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("which", ["default", "full"])
def test_gpu_workloads_are_scheduled_on_gpu_nodes(
    which: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(f"{which}_docs")
    gpus = 2 if which == "full" else 1
    triton = find(docs, "Deployment", component("triton"))
    llm = find(docs, "StatefulSet", component("llm"))
    for workload, expected_gpus in ((triton, gpus), (llm, 1)):
        spec = pod_spec(workload)
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            spec["tolerations"]
        )
        main = spec["containers"][0]
        assert int(main["resources"]["limits"]["nvidia.com/gpu"]) == expected_gpus
    # CPU workloads stay off the GPU.
    for name in ("gateway", "encoder"):
        spec = pod_spec(find(docs, "Deployment", component(name)))
        for container in all_containers(spec):
            assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


@pytest.mark.parametrize("which", ["default", "full"])
def test_every_container_is_non_root_and_read_only(
    which: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(f"{which}_docs")
    found = workloads(docs)
    assert len(found) == 4
    for workload in found:
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == FULLNAME
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in all_containers(spec):
            where = f"{workload['metadata']['name']}/{container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["runAsUser"] == 10001, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert container["resources"].get("requests"), where
            assert container["resources"].get("limits"), where
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{where}: no emptyDir at /tmp"


def test_app_commands_image_and_config_mount(default_docs: list[dict[str, Any]]) -> None:
    for name, kind in (
        ("gateway", "Deployment"),
        ("encoder", "Deployment"),
        ("llm", "StatefulSet"),
    ):
        spec = pod_spec(find(default_docs, kind, component(name)))
        container = spec["containers"][0]
        assert container["command"] == ["python", "-m", f"services.{name}"]
        assert container["image"] == "livelens:0.1.0"
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert env_of(container)["LIVELENS_CONFIG"] == "/etc/livelens/livelens.yaml"
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert mount["mountPath"] == "/etc/livelens/livelens.yaml"
        volume = next(v for v in spec["volumes"] if v["name"] == "config")
        assert volume["configMap"]["name"] == component("config")
    rendered = render(
        "--set", "image.repository=registry.example/livelens", "--set", "image.tag=1.2.3"
    )
    container = pod_spec(find(rendered, "Deployment", component("gateway")))["containers"][0]
    assert container["image"] == "registry.example/livelens:1.2.3"


def test_services_env_follows_the_config_convention(full_docs: list[dict[str, Any]]) -> None:
    bootstrap = FULL_VALUES["kafka"]["bootstrap"]
    for name, kind in (
        ("gateway", "Deployment"),
        ("encoder", "Deployment"),
        ("llm", "StatefulSet"),
    ):
        env = env_of(pod_spec(find(full_docs, kind, component(name)))["containers"][0])
        assert env["LIVELENS_KAFKA__BOOTSTRAP"] == bootstrap
        assert env["LIVELENS_BROKER__ENABLED"] == "false"
        assert env["LIVELENS_TRITON__ENABLED"] == "false"
        assert env["LIVELENS_TRITON__HOST"] == component("triton")
        assert env["LIVELENS_TRITON__GRPC_PORT"] == "8001"
        assert env["LIVELENS_ENCODER__TRITON_URL"] == f"{component('triton')}:8001"
    llm_env = env_of(pod_spec(find(full_docs, "StatefulSet", component("llm")))["containers"][0])
    assert llm_env["LIVELENS_LLM__ENGINE__MODEL_PATH"] == "/models/llm"
    # both stores live on the disk-tier volume, not in the image
    assert llm_env["LIVELENS_LLM__STORE__SEGMENTS_DISK_DIR"] == "/var/lib/livelens/store/segments"
    assert llm_env["LIVELENS_LLM__STORE__KV_DIR"] == "/var/lib/livelens/store/kv"
    gw_env = env_of(pod_spec(find(full_docs, "Deployment", component("gateway")))["containers"][0])
    assert gw_env["LIVELENS_GATEWAY__HOST"] == "0.0.0.0"
    assert gw_env["LIVELENS_GATEWAY__PORT"] == "50051"
    assert gw_env["LIVELENS_GATEWAY__MAX_STREAMS_PER_TENANT"] == "16"


def test_rendered_config_and_env_load_with_livelens_config(
    full_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The ConfigMap's livelens.yaml and every LIVELENS_* variable the chart sets are
    settings that livelens.config knows (it rejects unknown ones)."""
    from livelens import config as lconfig

    configmap = find(full_docs, "ConfigMap", component("config"))
    config_file = tmp_path / "livelens.yaml"
    config_file.write_text(configmap["data"]["livelens.yaml"])
    secret = find(full_docs, "Secret", component("gateway-tokens"))
    secret_values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    for name, kind in (
        ("gateway", "Deployment"),
        ("encoder", "Deployment"),
        ("llm", "StatefulSet"),
    ):
        env = {}
        for key, value in env_of(
            pod_spec(find(full_docs, kind, component(name)))["containers"][0]
        ).items():
            if isinstance(value, dict) and "secretKeyRef" in value:
                ref = value["secretKeyRef"]
                if ref["name"] == secret["metadata"]["name"]:
                    value = secret_values[ref["key"]]
                else:
                    value = EXTERNAL_SECRETS[ref["name"], ref["key"]]
            if isinstance(value, str):
                env[key] = value
        cfg = lconfig.load_config(config_file, env=env)
        assert cfg.kafka.bootstrap == FULL_VALUES["kafka"]["bootstrap"]
        assert cfg.kafka.partitions == 16
        assert cfg.broker.enabled is False and cfg.triton.enabled is False
        assert cfg.triton_url == f"{component('triton')}:8001"
        assert cfg.kafka.retention_ms == 14400000
        assert cfg.kafka.security_protocol == "SASL_SSL"
        assert cfg.kafka.ssl_cafile == "/etc/livelens/kafka-tls/ca.crt"
        assert cfg.kafka.ssl_certfile == "/etc/livelens/kafka-tls/tls.crt"
        assert cfg.kafka.ssl_keyfile == "/etc/livelens/kafka-tls/tls.key"
        assert (cfg.kafka.sasl_mechanism, cfg.kafka.sasl_username) == ("SCRAM-SHA-512", "livelens")
        assert cfg.kafka.sasl_password == "s3cr3t"
        section = getattr(cfg, name)
        assert section.metrics_port == METRICS_PORTS[name]
        assert (cfg.gateway.host if name == "gateway" else section.health_host) == "0.0.0.0"
        if name == "gateway":
            assert cfg.gateway.tokens == {"tok-alpha": "acme", "tok-beta": "globex"}
            assert cfg.gateway.tls_cert == "/etc/livelens/tls/tls.crt"
            assert cfg.gateway.tls_client_ca == "/etc/livelens/client-ca/ca.crt"
            assert cfg.gateway.cert_tenants == FULL_VALUES["gateway"]["certTenants"]


def _rendered_llm_config(docs: list[dict[str, Any]], tmp_path: Path) -> Any:
    """The LLM service's configuration as it loads in its pod: the ConfigMap's livelens.yaml
    and the StatefulSet's plain LIVELENS_* variables, through livelens.config."""
    from livelens import config as lconfig

    config_file = tmp_path / "livelens.yaml"
    config_file.write_text(find(docs, "ConfigMap", component("config"))["data"]["livelens.yaml"])
    env = {k: v for k, v in env_of(pod_spec(find(docs, "StatefulSet", component("llm")))["containers"][0]).items()
           if isinstance(v, str)}
    return lconfig.load_config(config_file, env=env)


def test_llm_materializer_is_engine_cache_by_default(default_docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """GPU nodes: the streaming-KV connector only handles vLLM's CPU attention backend, so
    the chart's default is engine_cache (frames kept in vLLM's own prefix cache, any vLLM),
    written into the rendered config (the embedded default, streaming_kv, is for `make up`
    on a CPU)."""
    configmap = find(default_docs, "ConfigMap", component("config"))
    assert yaml.safe_load(configmap["data"]["livelens.yaml"])["llm"]["context"]["materializer"] == "engine_cache"
    assert _rendered_llm_config(default_docs, tmp_path).llm.context.materializer == "engine_cache"


def test_llm_materializer_streaming_kv_when_set(tmp_path: Path) -> None:
    docs = render("--set", "config.llm.context.materializer=streaming_kv")
    configmap = find(docs, "ConfigMap", component("config"))
    rendered = yaml.safe_load(configmap["data"]["livelens.yaml"])
    assert rendered["llm"]["context"]["materializer"] == "streaming_kv"
    assert rendered["llm"]["engine"]["enforce_eager"] is False  # the rest of the section is kept
    assert _rendered_llm_config(docs, tmp_path).llm.context.materializer == "streaming_kv"


def test_schema_rejects_an_unknown_materializer() -> None:
    proc = run_helm("template", RELEASE, str(CHART), "--set", "config.llm.context.materializer=paged",
                    check=False)
    assert proc.returncode != 0
    assert "/config/llm/context/materializer" in proc.stderr
    assert "recompute" in proc.stderr and "streaming_kv" in proc.stderr and "engine_cache" in proc.stderr


def test_encoder_and_llm_serve_grpc_health_probes(default_docs: list[dict[str, Any]]) -> None:
    for name, kind, port in (("encoder", "Deployment", 50052), ("llm", "StatefulSet", 50053)):
        container = pod_spec(find(default_docs, kind, component(name)))["containers"][0]
        assert container["ports"] == [
            {"name": "health", "containerPort": port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORTS[name], "protocol": "TCP"},
        ]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": port}, f"{name} {probe}"
        env = env_of(container)
        assert env[f"LIVELENS_{name.upper()}__HEALTH_HOST"] == "0.0.0.0"
        assert env[f"LIVELENS_{name.upper()}__HEALTH_PORT"] == str(port)
    docs = render("--set", "encoder.probes.enabled=false")
    container = pod_spec(find(docs, "Deployment", component("encoder")))["containers"][0]
    assert "livenessProbe" not in container


# --------------------------------------------------------------------------- gateway


def test_tokens_secret_feeds_the_gateway(full_docs: list[dict[str, Any]]) -> None:
    secret = find(full_docs, "Secret", component("gateway-tokens"))
    assert secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["tokens"]).decode() == ("tok-alpha=acme,tok-beta=globex")
    gateway = find(full_docs, "Deployment", component("gateway"))
    env = env_of(pod_spec(gateway)["containers"][0])
    assert env["LIVELENS_GATEWAY__TOKENS"] == {
        "secretKeyRef": {"name": component("gateway-tokens"), "key": "tokens"}
    }
    # Other services never see the tokens.
    for name in ("encoder",):
        other = env_of(pod_spec(find(full_docs, "Deployment", component(name)))["containers"][0])
        assert "LIVELENS_GATEWAY__TOKENS" not in other


def test_a_token_is_generated_when_none_is_configured(default_docs: list[dict[str, Any]]) -> None:
    secret = find(default_docs, "Secret", component("gateway-tokens"))
    token, _, tenant = base64.b64decode(secret["data"]["tokens"]).decode().partition("=")
    assert tenant == "default"
    assert len(token) == 40 and token.isalnum()


def test_existing_tokens_secret(tmp_path: Path) -> None:
    docs = render(
        "--set", "gateway.existingSecret=my-tokens", "--set", "gateway.existingSecretKey=list"
    )
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = env_of(pod_spec(find(docs, "Deployment", component("gateway")))["containers"][0])
    assert env["LIVELENS_GATEWAY__TOKENS"] == {"secretKeyRef": {"name": "my-tokens", "key": "list"}}


def test_gateway_service_probes_and_autoscaling(default_docs: list[dict[str, Any]]) -> None:
    gateway = find(default_docs, "Deployment", component("gateway"))
    assert "replicas" not in gateway["spec"], "the HPA owns the replica count"
    container = pod_spec(gateway)["containers"][0]
    assert container["ports"] == [
        {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 50061, "protocol": "TCP"},
    ]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe
    service = find(default_docs, "Service", component("gateway"))
    assert service["spec"]["ports"][0]["port"] == 50051
    assert service["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    hpa = find(default_docs, "HorizontalPodAutoscaler", component("gateway"))
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": component("gateway"),
    }
    assert hpa["spec"]["minReplicas"] == 2


def test_tls_secret_is_mounted_into_the_gateway() -> None:
    docs = render("--set", "gateway.tls.secretName=x")
    spec = pod_spec(find(docs, "Deployment", component("gateway")))
    volume = next(v for v in spec["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "x"
    container = spec["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert mount == {"name": "tls", "mountPath": "/etc/livelens/tls", "readOnly": True}
    env = env_of(container)
    assert env["LIVELENS_GATEWAY__TLS_CERT"] == "/etc/livelens/tls/tls.crt"
    assert env["LIVELENS_GATEWAY__TLS_KEY"] == "/etc/livelens/tls/tls.key"
    # kubelet's gRPC probes cannot speak TLS: the probes fall back to TCP.
    assert container["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    # Without TLS nothing is mounted.
    plain = pod_spec(find(render(), "Deployment", component("gateway")))
    assert not [v for v in plain["volumes"] if v["name"] == "tls"]
    assert "LIVELENS_GATEWAY__TLS_CERT" not in env_of(plain["containers"][0])


def test_gateway_mtls_client_ca_and_cert_tenants(full_docs: list[dict[str, Any]]) -> None:
    spec = pod_spec(find(full_docs, "Deployment", component("gateway")))
    volume = next(v for v in spec["volumes"] if v["name"] == "client-ca")
    assert volume["secret"]["secretName"] == "gateway-client-ca"
    container = spec["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "client-ca")
    assert mount == {"name": "client-ca", "mountPath": "/etc/livelens/client-ca", "readOnly": True}
    env = env_of(container)
    assert env["LIVELENS_GATEWAY__TLS_CLIENT_CA"] == "/etc/livelens/client-ca/ca.crt"
    # The CN -> tenant map goes through the config file: a CN may hold spaces or commas.
    configmap = find(full_docs, "ConfigMap", component("config"))
    rendered = yaml.safe_load(configmap["data"]["livelens.yaml"])
    assert rendered["gateway"]["cert_tenants"] == FULL_VALUES["gateway"]["certTenants"]
    assert rendered["kafka"]["partitions"] == 16  # the rest of `config` is kept
    # Without a client CA: no mTLS mount, no variable, no cert_tenants.
    plain = render("--set", "gateway.tls.secretName=x")
    plain_spec = pod_spec(find(plain, "Deployment", component("gateway")))
    assert "client-ca" not in {v["name"] for v in plain_spec["volumes"]}
    assert "LIVELENS_GATEWAY__TLS_CLIENT_CA" not in env_of(plain_spec["containers"][0])
    plain_config = yaml.safe_load(find(plain, "ConfigMap", component("config"))["data"]["livelens.yaml"])
    assert "gateway" not in plain_config


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "gateway.tls.clientCASecret=ca"), "gateway.tls.clientCASecret (mTLS) needs gateway.tls.secretName"),
        (("--set", "gateway.certTenants.cam=acme"), "gateway.certTenants maps client certificates to tenants"),
    ],
)
def test_gateway_mtls_fails_without_its_pieces(args: tuple[str, ...], message: str) -> None:
    proc = run_helm("template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_schema_rejects_a_bad_cert_tenant() -> None:
    proc = run_helm("template", RELEASE, str(CHART), "--set", "gateway.tls.secretName=x",
                    "--set", "gateway.tls.clientCASecret=ca", "--set", "gateway.certTenants.cam=a b", check=False)
    assert proc.returncode != 0
    assert "/gateway/certTenants/cam" in proc.stderr


# --------------------------------------------------------------------------- kafka


def _app_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(component, pod spec, main container) of the gateway, the encoder and the LLM service."""
    for name, kind in (("gateway", "Deployment"), ("encoder", "Deployment"), ("llm", "StatefulSet")):
        spec = pod_spec(find(docs, kind, component(name)))
        yield name, spec, spec["containers"][0]


def test_kafka_retention_reaches_every_service(default_docs: list[dict[str, Any]]) -> None:
    for name, _, container in _app_containers(default_docs):
        assert env_of(container)["LIVELENS_KAFKA__RETENTION_MS"] == "7200000", name
    # A day: written as an integer, not in float notation (8.64e+07).
    for name, _, container in _app_containers(render("--set", "kafka.retentionMs=86400000")):
        assert env_of(container)["LIVELENS_KAFKA__RETENTION_MS"] == "86400000", name
    # Triton is no Kafka client.
    triton = pod_spec(find(default_docs, "Deployment", component("triton")))["containers"][0]
    assert not [k for k in env_of(triton) if k.startswith("LIVELENS_KAFKA__")]


def test_kafka_sasl_ssl_reaches_every_service(full_docs: list[dict[str, Any]]) -> None:
    for name, spec, container in _app_containers(full_docs):
        env = env_of(container)
        assert env["LIVELENS_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL", name
        assert env["LIVELENS_KAFKA__SSL_CAFILE"] == "/etc/livelens/kafka-tls/ca.crt", name
        assert env["LIVELENS_KAFKA__SSL_CERTFILE"] == "/etc/livelens/kafka-tls/tls.crt", name
        assert env["LIVELENS_KAFKA__SSL_KEYFILE"] == "/etc/livelens/kafka-tls/tls.key", name
        assert env["LIVELENS_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512", name
        assert env["LIVELENS_KAFKA__SASL_USERNAME"] == "livelens", name
        # The password only ever comes from its Secret.
        assert env["LIVELENS_KAFKA__SASL_PASSWORD"] == {
            "secretKeyRef": {"name": "kafka-credentials", "key": "sasl-password"}
        }, name
        volume = next(v for v in spec["volumes"] if v["name"] == "kafka-tls")
        assert volume["secret"]["secretName"] == "kafka-tls", name
        mount = next(m for m in container["volumeMounts"] if m["name"] == "kafka-tls")
        assert mount == {"name": "kafka-tls", "mountPath": "/etc/livelens/kafka-tls", "readOnly": True}, name


def test_kafka_plaintext_by_default_and_tls_without_client_auth(default_docs: list[dict[str, Any]]) -> None:
    for name, spec, container in _app_containers(default_docs):
        env = env_of(container)
        assert env["LIVELENS_KAFKA__SECURITY_PROTOCOL"] == "PLAINTEXT", name
        assert not [k for k in env if k.startswith(("LIVELENS_KAFKA__SSL_", "LIVELENS_KAFKA__SASL_"))], name
        assert "kafka-tls" not in {v["name"] for v in spec["volumes"]}, name
    docs = render("--set", "kafka.security.protocol=SSL", "--set", "kafka.security.tls.secretName=ca-only")
    for name, spec, container in _app_containers(docs):
        env = env_of(container)
        assert env["LIVELENS_KAFKA__SSL_CAFILE"] == "/etc/livelens/kafka-tls/ca.crt", name
        # No client certificate unless clientAuth, and no SASL over plain SSL.
        assert "LIVELENS_KAFKA__SSL_CERTFILE" not in env and "LIVELENS_KAFKA__SASL_USERNAME" not in env, name
        assert next(v for v in spec["volumes"] if v["name"] == "kafka-tls")["secret"]["secretName"] == "ca-only"


SASL = ("--set", "kafka.security.protocol=SASL_PLAINTEXT")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "kafka.security.protocol=SSL"),
         "kafka.security.protocol SSL needs kafka.security.tls.secretName"),
        (("--set", "kafka.security.protocol=SASL_SSL", "--set", "kafka.security.sasl.mechanism=PLAIN",
          "--set", "kafka.security.sasl.username=u", "--set", "kafka.security.sasl.passwordSecret.name=p"),
         "kafka.security.protocol SASL_SSL needs kafka.security.tls.secretName"),
        ((*SASL, "--set", "kafka.security.sasl.username=u", "--set", "kafka.security.sasl.passwordSecret.name=p"),
         "kafka.security.protocol SASL_PLAINTEXT needs kafka.security.sasl.mechanism"),
        ((*SASL, "--set", "kafka.security.sasl.mechanism=PLAIN", "--set", "kafka.security.sasl.passwordSecret.name=p"),
         "kafka.security.protocol SASL_PLAINTEXT needs kafka.security.sasl.username"),
        ((*SASL, "--set", "kafka.security.sasl.mechanism=PLAIN", "--set", "kafka.security.sasl.username=u"),
         "kafka.security.protocol SASL_PLAINTEXT needs kafka.security.sasl.passwordSecret.name"),
    ],
)
def test_kafka_security_fails_without_its_pieces(args: tuple[str, ...], message: str) -> None:
    proc = run_helm("template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    # The same settings complete render.
    complete = ("--set", "kafka.security.tls.secretName=ca", "--set", "kafka.security.sasl.mechanism=PLAIN",
                "--set", "kafka.security.sasl.username=u", "--set", "kafka.security.sasl.passwordSecret.name=p")
    assert run_helm("template", RELEASE, str(CHART), *args, *complete, check=False).returncode == 0


@pytest.mark.parametrize(
    ("setting", "path"),
    [
        ("kafka.security.protocol=TLS", "/kafka/security/protocol"),
        ("kafka.security.protocol=sasl_ssl", "/kafka/security/protocol"),
        ("kafka.security.sasl.mechanism=GSSAPI", "/kafka/security/sasl/mechanism"),
        ("kafka.retentionMs=1000", "/kafka/retentionMs"),
    ],
)
def test_schema_rejects_bad_kafka_security_and_retention(setting: str, path: str) -> None:
    proc = run_helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert path in proc.stderr


# --------------------------------------------------------------------------- metrics


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions with In) applied to labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_every_service_serves_metrics_on_a_named_port(default_docs: list[dict[str, Any]]) -> None:
    services = {d["metadata"]["name"]: d for d in default_docs if d["kind"] == "Service"}
    for name, _, container in _app_containers(default_docs):
        port = METRICS_PORTS[name]
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"], name
        env = env_of(container)
        assert env[f"LIVELENS_{name.upper()}__METRICS_PORT"] == str(port)
        # /metrics listens on the pod IP (the gateway's host, the encoder's/LLM's health host).
        assert env["LIVELENS_GATEWAY__HOST" if name == "gateway" else f"LIVELENS_{name.upper()}__HEALTH_HOST"] == (
            "0.0.0.0")
        # No prometheus.io annotations unless metrics.podAnnotations.
        workload = find(default_docs, "StatefulSet" if name == "llm" else "Deployment", component(name))
        assert not [a for a in workload["spec"]["template"]["metadata"]["annotations"]
                    if a.startswith("prometheus.io/")], name
        # A Service in the cluster exposes the metrics port, to this component's pods.
        service = services[component("gateway-metrics" if name == "gateway" else name)]
        assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
        assert {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP",
                "appProtocol": "http"} in service["spec"]["ports"], name
        assert service["spec"]["clusterIP"] == "None"  # headless: Prometheus scrapes each pod
    # The gateway's client-facing Service (maybe a LoadBalancer) does not carry /metrics.
    assert [p["name"] for p in services[component("gateway")]["spec"]["ports"]] == ["grpc"]


def test_metrics_pod_annotations_when_asked(full_docs: list[dict[str, Any]]) -> None:
    for name, kind in (("gateway", "Deployment"), ("encoder", "Deployment"), ("llm", "StatefulSet")):
        annotations = find(full_docs, kind, component(name))["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORTS[name])
        assert annotations["prometheus.io/path"] == "/metrics"
        assert annotations["checksum/config"]  # the chart's own annotations stay


def test_service_monitor_scrapes_the_metrics_ports(
    default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]]
) -> None:
    assert not [d for d in default_docs if d["kind"] == "ServiceMonitor"]
    monitor = find(full_docs, "ServiceMonitor", FULLNAME)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["video"]}
    assert spec["endpoints"] == [{"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s"}]
    # The Services it selects that have a "metrics" port: every component's, Triton's too.
    scraped = {
        d["metadata"]["name"]: next(p["port"] for p in d["spec"]["ports"] if p["name"] == "metrics")
        for d in full_docs
        if d["kind"] == "Service" and _selects(spec["selector"], d["metadata"]["labels"])
        and any(p["name"] == "metrics" for p in d["spec"]["ports"])
    }
    assert scraped == {
        component("gateway-metrics"): 50061,
        component("encoder"): 50062,
        component("llm"): 50063,
        component("triton"): 8002,
    }
    # ...and each of those Services' "metrics" port targets the container port named so.
    for name, _, container in _app_containers(full_docs):
        assert "metrics" in {p["name"] for p in container["ports"]}, name


def _dashboard(docs: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = find(docs, "ConfigMap", component("dashboard"))
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(configmap["data"]["livelens.json"])


def test_grafana_dashboard_configmap(default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]]) -> None:
    assert not [d for d in default_docs if d["metadata"]["name"] == component("dashboard")]
    configmap = find(full_docs, "ConfigMap", component("dashboard"))
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "livelens"}
    dashboard = _dashboard(full_docs)
    assert dashboard == json.loads(DASHBOARD.read_text())  # the file, whole
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["uid"] == "livelens"
    (variable,) = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = []
    for panel in panels:
        assert panel["type"] == "timeseries", panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert re.search(r"\blivelens_[a-z0-9_]+", target["expr"]), f"{panel['title']}: {target['expr']}"
            exprs.append(target["expr"])
    # No two panels overlap on the grid.
    cells = [(x, y) for g in (p["gridPos"] for p in dashboard["panels"])
             for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
    assert len(cells) == len(set(cells))
    # Every metric the dashboard promises is charted.
    charted = set(re.findall(r"livelens_[a-z0-9_]+", " ".join(exprs)))
    assert charted >= {
        "livelens_gateway_frames_total", "livelens_gateway_open_streams", "livelens_gateway_refused_total",
        "livelens_gateway_time_to_first_token_seconds_bucket", "livelens_gateway_e2e_request_latency_seconds_bucket",
        "livelens_llm_time_to_first_token_seconds_bucket", "livelens_llm_frame_to_context_seconds_bucket",
        "livelens_encoder_frame_to_tokens_seconds_bucket", "livelens_kafka_consumer_lag",
        "livelens_llm_dead_letters_total", "livelens_encoder_dead_letters_total", "livelens_llm_rebuilds_total",
        "livelens_llm_context_rebuild_seconds_bucket", "livelens_encoder_cache_patches_computed_total",
        "livelens_encoder_cache_tokens_total", "livelens_llm_kv_questions_loaded_tokens_total",
        "livelens_llm_kv_questions_computed_tokens_total", "livelens_llm_answer_errors_total",
    }
    assert "sum by (tenant) (rate(livelens_gateway_frames_total[1m]))" in exprs
    assert "sum by (consumer, topic) (livelens_kafka_consumer_lag)" in exprs


def test_grafana_dashboard_metrics_are_the_services() -> None:
    """The dashboard's histograms, labelled counters and gauges are the ones the services
    define (services/*/metrics.py, services/common/metrics.py); its other counters are the
    services' stats, exported at scrape time."""
    from prometheus_client import REGISTRY

    import services.common.metrics  # noqa: F401
    import services.encoder.metrics  # noqa: F401
    import services.gateway.metrics  # noqa: F401
    import services.llm.metrics  # noqa: F401

    defined = {family.name: family.type for family in REGISTRY.collect()}
    charted = set(re.findall(r"livelens_[a-z0-9_]+", DASHBOARD.read_text()))
    histograms = {name.removesuffix("_bucket") for name in charted if name.endswith("_bucket")}
    assert len(histograms) == 6
    assert {name: defined.get(name) for name in histograms} == dict.fromkeys(histograms, "histogram")
    assert {name: defined.get(name) for name in (
        "livelens_gateway_frames", "livelens_gateway_refused", "livelens_llm_answer_errors",
        "livelens_gateway_open_streams", "livelens_kafka_consumer_lag")} == {
        "livelens_gateway_frames": "counter", "livelens_gateway_refused": "counter",
        "livelens_llm_answer_errors": "counter", "livelens_gateway_open_streams": "gauge",
        "livelens_kafka_consumer_lag": "gauge"}


# --------------------------------------------------------------------------- autoscaling (KEDA)


def test_keda_scaled_objects(default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]]) -> None:
    assert not [d for d in default_docs if d["apiVersion"].startswith("keda.sh/")]
    assert find(default_docs, "Deployment", component("encoder"))["spec"]["replicas"] == 2
    assert find(default_docs, "StatefulSet", component("llm"))["spec"]["replicas"] == 1
    bootstrap = FULL_VALUES["kafka"]["bootstrap"]
    for name, kind, group, topic, low, high, lag in (
        ("encoder", "Deployment", "livelens-encoder", "livelens.frames", 2, 16, "40"),
        ("llm", "StatefulSet", "livelens-llm", "livelens.tokens", 2, 6, "50"),
    ):
        scaled = find(full_docs, "ScaledObject", component(name))
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": kind, "name": component(name)}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (low, high), name
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"] == {
            "bootstrapServers": bootstrap,
            "consumerGroup": group,
            "topic": topic,
            "lagThreshold": lag,
            "offsetResetPolicy": "earliest",
            "tls": "enable",
            "sasl": "scram_sha512",
        }, name
        assert trigger["authenticationRef"] == {"name": component("kafka")}
        # KEDA's HPA owns the replica count; the chart renders no HPA of its own for it.
        assert "replicas" not in find(full_docs, kind, component(name))["spec"], name
        assert not [d for d in full_docs if d["kind"] == "HorizontalPodAutoscaler"
                    and d["spec"]["scaleTargetRef"]["name"] == component(name)]
    auth = find(full_docs, "TriggerAuthentication", component("kafka"))
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "password": ("kafka-credentials", "sasl-password"),
        "ca": ("kafka-tls", "ca.crt"),
        "cert": ("kafka-tls", "tls.crt"),
        "key": ("kafka-tls", "tls.key"),
    }
    # The user name: the scaled container's own LIVELENS_KAFKA__SASL_USERNAME.
    assert auth["spec"]["env"] == [{"parameter": "username", "name": "LIVELENS_KAFKA__SASL_USERNAME"}]


def test_keda_follows_the_configured_groups_and_topics_and_plaintext(tmp_path: Path) -> None:
    values = {
        "config": {"kafka": {"partitions": 8, "frames_topic": "cam.frames", "tokens_topic": "cam.tokens"},
                   "encoder": {"group_id": "enc-a"}, "llm": {"group_id": "llm-a"}},
        "encoder": {"autoscaling": {"keda": {"enabled": True, "maxReplicas": 8}}},
        "llm": {"autoscaling": {"keda": {"enabled": True, "maxReplicas": 8}}},
    }
    docs = render(values=values, tmp_path=tmp_path)
    for name, group, topic in (("encoder", "enc-a", "cam.frames"), ("llm", "llm-a", "cam.tokens")):
        (trigger,) = find(docs, "ScaledObject", component(name))["spec"]["triggers"]
        assert (trigger["metadata"]["consumerGroup"], trigger["metadata"]["topic"]) == (group, topic)
        # PLAINTEXT: no TLS/SASL for the scaler, no TriggerAuthentication.
        assert "tls" not in trigger["metadata"] and "sasl" not in trigger["metadata"]
        assert "authenticationRef" not in trigger
    assert not [d for d in docs if d["kind"] == "TriggerAuthentication"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "encoder.autoscaling.keda.enabled=true", "--set", "encoder.autoscaling.keda.maxReplicas=17"),
         "encoder.autoscaling.keda.maxReplicas (17) exceeds config.kafka.partitions (16"),
        (("--set", "llm.autoscaling.keda.enabled=true", "--set", "llm.autoscaling.keda.maxReplicas=24",
          "--set", "config.kafka.partitions=20"),
         "llm.autoscaling.keda.maxReplicas (24) exceeds config.kafka.partitions (20"),
        # Without config.kafka.partitions the services create 4 (sdk/livelens/config.py).
        (("--set", "llm.autoscaling.keda.enabled=true", "--set", "llm.autoscaling.keda.maxReplicas=5",
          "--set", "config.kafka.partitions=null"),
         "llm.autoscaling.keda.maxReplicas (5) exceeds config.kafka.partitions (4"),
        (("--set", "llm.autoscaling.keda.enabled=true", "--set", "llm.autoscaling.keda.minReplicas=5",
          "--set", "llm.autoscaling.keda.maxReplicas=3"),
         "llm.autoscaling.keda.minReplicas (5) exceeds its maxReplicas (3)"),
    ],
)
def test_keda_max_replicas_check(args: tuple[str, ...], message: str) -> None:
    proc = run_helm("template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_keda_max_replicas_up_to_the_partitions_renders() -> None:
    docs = render("--set", "encoder.autoscaling.keda.enabled=true", "--set", "encoder.autoscaling.keda.maxReplicas=16")
    assert find(docs, "ScaledObject", component("encoder"))["spec"]["maxReplicaCount"] == 16
    # A disabled component is not checked (its maxReplicas is unused).
    docs = render("--set", "llm.autoscaling.keda.maxReplicas=64")
    assert not [d for d in docs if d["kind"] == "ScaledObject"]


def test_schema_rejects_bad_keda_values() -> None:
    for setting, path in (("encoder.autoscaling.keda.lagThreshold=0", "/encoder/autoscaling/keda/lagThreshold"),
                          ("llm.autoscaling.keda.minReplicas=0", "/llm/autoscaling/keda/minReplicas"),
                          ("llm.autoscaling.keda.enabled=yes", "/llm/autoscaling/keda/enabled")):
        proc = run_helm("template", RELEASE, str(CHART), "--set", setting, check=False)
        assert proc.returncode != 0, setting
        assert path in proc.stderr, setting


# --------------------------------------------------------------------------- triton, llm


def test_triton_deployment_and_service(default_docs: list[dict[str, Any]]) -> None:
    triton = find(default_docs, "Deployment", component("triton"))
    spec = pod_spec(triton)
    container = spec["containers"][0]
    assert container["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert container["command"] == ["tritonserver"]
    assert "--model-repository=/models" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"]["claimName"] == component("triton-models")
    service = find(default_docs, "Service", component("triton"))
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc": 8001, "http": 8000, "metrics": 8002}


def test_triton_model_repository_from_an_init_container(full_docs: list[dict[str, Any]]) -> None:
    assert not [d for d in full_docs if d["kind"] == "PersistentVolumeClaim" and "triton" in d["metadata"]["name"]]
    spec = pod_spec(find(full_docs, "Deployment", component("triton")))
    init, trt = spec["initContainers"]  # the repository is copied before the engine is built
    assert trt["name"] == "tensorrt-engine"
    assert init["image"] == "livelens:0.1.0"
    assert init["command"] == ["sh", "-c", "cp -R /app/model_repo/. /models/"]
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert "emptyDir" in models
    assert spec["runtimeClassName"] == "nvidia"


def _engine_builds(spec: dict[str, Any]) -> dict[str, list[str]]:
    """The tensorrt-engine init container's command: model -> the trtexec argv it runs."""
    (init,) = [c for c in spec["initContainers"] if c["name"] == "tensorrt-engine"]
    lines = init["command"][2].split("\n")
    assert init["command"][:2] == ["sh", "-c"] and lines[0] == "set -e"  # a failed build stops the pod
    builds = {}
    for line in lines[1:]:
        guard, build = line.split(" || ")
        model = guard.split("/")[2]
        assert guard == f"test -s /models/{model}/1/model.plan"
        builds[model] = build.split()
    return builds


def test_triton_builds_its_tensorrt_engine_on_the_node(default_docs: list[dict[str, Any]]) -> None:
    """The init container runs exactly the trtexec command of `python -m devtools.models.tensorrt`
    (profile from configs/gpu.pbtxt) for each model Triton loads, and Triton loads only those,
    in that configuration."""
    from devtools.models.tensorrt import profile_for, read_config, trtexec_command

    def expected(model: str) -> list[str]:
        models = Path(f"/models/{model}/1")
        config = read_config(ROOT / "model_repo" / model / "configs" / "gpu.pbtxt")
        return trtexec_command("/usr/src/tensorrt/bin/trtexec", models / "model.onnx", models / "model.plan",
                               profile_for(config))

    spec = pod_spec(find(default_docs, "Deployment", component("triton")))
    (init,) = [c for c in spec["initContainers"] if c["name"] == "tensorrt-engine"]
    assert init["image"] == spec["containers"][0]["image"]  # trtexec of the same TensorRT as Triton's
    assert _engine_builds(spec) == {"vision_encoder": expected("vision_encoder")}
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = spec["containers"][0]["args"]
    assert "--model-config-name=gpu" in args and "--model-control-mode=explicit" in args
    assert [a for a in args if a.startswith("--load-model=")] == ["--load-model=vision_encoder"]

    # The cached ViT and its plain twin: the chart's profiles are the script's, input by input.
    vit = pod_spec(find(render("--set", "triton.models={vision_vit,vision_vit_full}"), "Deployment",
                        component("triton")))
    assert _engine_builds(vit) == {m: expected(m) for m in ("vision_vit", "vision_vit_full")}
    assert [a for a in vit["containers"][0]["args"] if a.startswith("--load-model=")] == [
        "--load-model=vision_vit", "--load-model=vision_vit_full"]

    # A loaded model without a profile is refused at render time, with the command to run.
    run = subprocess.run([str(HELM), "template", "t", str(CHART), "--set", "triton.models={my_model}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "triton.tensorrt.profiles.my_model" in run.stderr

    off = pod_spec(find(render("--set", "triton.tensorrt.enabled=false"), "Deployment", component("triton")))
    assert "initContainers" not in off
    assert not [a for a in off["containers"][0]["args"] if a.startswith("--model-config-name")]


def test_triton_existing_claim() -> None:
    docs = render("--set", "triton.modelRepository.pvc.existingClaim=models-rox")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    spec = pod_spec(find(docs, "Deployment", component("triton")))
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"]["claimName"] == "models-rox"


def test_llm_statefulset_volumes_and_headless_service(default_docs: list[dict[str, Any]]) -> None:
    llm = find(default_docs, "StatefulSet", component("llm"))
    assert llm["spec"]["serviceName"] == component("llm")
    claims = {t["metadata"]["name"]: t for t in llm["spec"]["volumeClaimTemplates"]}
    assert set(claims) == {"models", "disk-tier"}
    assert claims["models"]["spec"]["resources"]["requests"]["storage"] == "50Gi"
    mounts = {m["name"]: m["mountPath"] for m in pod_spec(llm)["containers"][0]["volumeMounts"]}
    assert mounts["models"] == "/models"
    assert mounts["disk-tier"] == "/var/lib/livelens/store"
    service = find(default_docs, "Service", component("llm"))
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == llm["spec"]["selector"]["matchLabels"]


def test_pod_disruption_budgets(default_docs: list[dict[str, Any]]) -> None:
    for name, kind in (("gateway", "Deployment"), ("llm", "StatefulSet")):
        pdb = find(default_docs, "PodDisruptionBudget", component(name))
        workload = find(default_docs, kind, component(name))
        assert pdb["spec"]["selector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]
        assert pdb["spec"]["maxUnavailable"] == 1


# --------------------------------------------------------------------------- network


def _rule_ports(rules: list[dict[str, Any]]) -> set[int]:
    return {p["port"] for rule in rules for p in rule.get("ports", [])}


def test_network_policies(
    default_docs: list[dict[str, Any]], full_docs: list[dict[str, Any]]
) -> None:
    policies = {
        d["metadata"]["name"]: d["spec"] for d in default_docs if d["kind"] == "NetworkPolicy"
    }
    for spec in policies.values():
        assert spec["policyTypes"] == ["Ingress", "Egress"]
    gateway = policies[component("gateway")]
    assert _rule_ports(gateway["ingress"]) == {50051}
    assert _rule_ports(gateway["egress"]) == {53, 9092}
    encoder = policies[component("encoder")]
    assert encoder["ingress"] == []
    assert _rule_ports(encoder["egress"]) == {53, 9092, 8001, 8000}
    triton_rule = next(
        r for r in encoder["egress"] if r.get("to") and _rule_ports([r]) == {8000, 8001}
    )
    assert (
        triton_rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "triton"
    )
    triton = policies[component("triton")]
    assert (
        triton["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "encoder"
    )
    assert _rule_ports(triton["egress"]) == {53}
    llm = policies[component("llm")]
    assert llm["ingress"] == []
    assert _rule_ports(llm["egress"]) == {53, 9092}

    full = {d["metadata"]["name"]: d["spec"] for d in full_docs if d["kind"] == "NetworkPolicy"}
    assert full[component("gateway")]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    kafka_rule = next(r for r in full[component("llm")]["egress"] if 9092 in _rule_ports([r]))
    assert _rule_ports([kafka_rule]) == {9092, 9093}
    assert kafka_rule["to"] == FULL_VALUES["kafka"]["egressTo"]
    assert _rule_ports(full[component("triton")]["ingress"]) == {8000, 8001, 8002}
    # Prometheus (metricsIngressFrom) reaches each service's metrics port, and only that.
    monitoring = FULL_VALUES["networkPolicy"]["metricsIngressFrom"]
    for name, port in METRICS_PORTS.items():
        rules = [r for r in full[component(name)]["ingress"] if r.get("from") == monitoring]
        assert _rule_ports(rules) == {port}, name
    assert _rule_ports(full[component("gateway")]["ingress"]) == {50051, 50061}

    assert not [
        d for d in render("--set", "networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"
    ]


# --------------------------------------------------------------------------- installer


def test_install_script_is_idempotent() -> None:
    script = ROOT / "devtools" / "install_helm.sh"
    proc = subprocess.run(
        ["bash", str(script), str(HELM.parent)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "already installed" in proc.stdout


def test_an_imported_model_reaches_the_llm_pods_and_the_encoder() -> None:
    docs = render("--set", "model.name=llava-ov", "--set", "model.source=initContainer")
    llm = pod_spec(find(docs, "StatefulSet", component("llm")))
    (copy,) = [c for c in llm["initContainers"] if c["name"] == "imported-model"]
    assert copy["command"] == ["sh", "-c", "test -s /models/llava-ov/livelens_model.json || "
                               "cp -R /app/build/models/llava-ov /models/"]
    env = env_of(llm["containers"][0])
    assert env["LIVELENS_MODEL__SPEC"] == "/models/llava-ov" and "LIVELENS_LLM__ENGINE__MODEL_PATH" not in env
    encoder = pod_spec(find(docs, "Deployment", component("encoder")))["containers"][0]
    assert env_of(encoder)["LIVELENS_ENCODER__MODEL_NAME"] == "llava-ov"
    default = pod_spec(find(render(), "StatefulSet", component("llm")))
    assert "LIVELENS_MODEL__SPEC" not in env_of(default["containers"][0]) and not default.get("initContainers")
    bad = run_helm("template", RELEASE, str(CHART), "--set", "model.name=a b", check=False)
    assert bad.returncode != 0 and "model" in bad.stderr


def test_llm_replicas_share_a_kv_volume_when_asked(default_docs: list[dict[str, Any]],
                                                   full_docs: list[dict[str, Any]]) -> None:
    """Off by default (each replica's KV on its own disk tier); on, one ReadWriteMany claim
    mounted by every replica, named to the LLM service by LIVELENS_LLM__STORE__KV_SHARED_DIR."""
    default = pod_spec(find(default_docs, "StatefulSet", component("llm")))
    assert "LIVELENS_LLM__STORE__KV_SHARED_DIR" not in env_of(default["containers"][0])
    assert not [d for d in default_docs if d["metadata"]["name"] == component("llm-shared-kv")]
    spec = pod_spec(find(full_docs, "StatefulSet", component("llm")))
    llm = spec["containers"][0]
    assert env_of(llm)["LIVELENS_LLM__STORE__KV_SHARED_DIR"] == "/var/lib/livelens/shared-kv"
    assert {"name": "shared-kv", "mountPath": "/var/lib/livelens/shared-kv"} in llm["volumeMounts"]
    volume = next(v for v in spec["volumes"] if v["name"] == "shared-kv")
    assert volume["persistentVolumeClaim"]["claimName"] == component("llm-shared-kv")
    claim = find(full_docs, "PersistentVolumeClaim", component("llm-shared-kv"))
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "efs"
    existing = render("--set", "llm.sharedKV.enabled=true", "--set", "llm.sharedKV.existingClaim=team-kv")
    spec = pod_spec(find(existing, "StatefulSet", component("llm")))
    assert next(v for v in spec["volumes"] if v["name"] == "shared-kv")["persistentVolumeClaim"] == \
        {"claimName": "team-kv"}
    assert not [d for d in existing if d["metadata"]["name"] == component("llm-shared-kv")]
