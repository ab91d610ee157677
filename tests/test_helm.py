"""The Helm chart (helm/livelens), checked with the real `helm` binary.

`helm lint --strict` and `helm template` run against the chart, and every rendered
manifest is validated against the Kubernetes OpenAPI schemas shipped in the
`kubernetes-validate` package. `tools/install_helm.sh` (run by the Makefile) puts the
binary in build/bin/helm.
"""

from __future__ import annotations

import base64
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

pytestmark = pytest.mark.skipif(
    not HELM.exists(),
    reason=f"helm binary not found at {HELM.relative_to(ROOT)}; run tools/install_helm.sh",
)

# A values file that switches on every optional branch of the templates.
FULL_VALUES: dict[str, Any] = {
    "kafka": {
        "bootstrap": "kafka-0.kafka:9092,kafka-1.kafka:9092",
        "ports": [9092, 9093],
        "egressTo": [{"namespaceSelector": {"matchLabels": {"name": "kafka"}}}],
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "gateway": {
        "tokens": {"tok-alpha": "acme", "tok-beta": "globex"},
        "tls": {"secretName": "gateway-tls"},
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
    "llm": {
        "replicas": 2,
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
}


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
        ("HorizontalPodAutoscaler", component("gateway")),
        ("PodDisruptionBudget", component("gateway")),
        ("Deployment", component("encoder")),
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
    errors = []
    for doc in docs:
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
    assert llm_env["LIVELENS_LLM__MODEL_PATH"] == "/models/llm"
    # both stores live on the disk-tier volume, not in the image
    assert llm_env["LIVELENS_LLM__STORE_DISK_DIR"] == "/var/lib/livelens/store/segments"
    assert llm_env["LIVELENS_LLM__KV_STORE_DIR"] == "/var/lib/livelens/store/kv"
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
                value = secret_values[value["secretKeyRef"]["key"]]
            if isinstance(value, str):
                env[key] = value
        cfg = lconfig.load_config(config_file, env=env)
        assert cfg.kafka.bootstrap == FULL_VALUES["kafka"]["bootstrap"]
        assert cfg.kafka.partitions == 16
        assert cfg.broker.enabled is False and cfg.triton.enabled is False
        assert cfg.triton_url == f"{component('triton')}:8001"
        if name == "gateway":
            assert cfg.gateway.tokens == {"tok-alpha": "acme", "tok-beta": "globex"}
            assert cfg.gateway.tls_cert == "/etc/livelens/tls/tls.crt"


def _rendered_llm_config(docs: list[dict[str, Any]], tmp_path: Path) -> Any:
    """The LLM service's configuration as it loads in its pod: the ConfigMap's livelens.yaml
    and the StatefulSet's plain LIVELENS_* variables, through livelens.config."""
    from livelens import config as lconfig

    config_file = tmp_path / "livelens.yaml"
    config_file.write_text(find(docs, "ConfigMap", component("config"))["data"]["livelens.yaml"])
    env = {k: v for k, v in env_of(pod_spec(find(docs, "StatefulSet", component("llm")))["containers"][0]).items()
           if isinstance(v, str)}
    return lconfig.load_config(config_file, env=env)


def test_llm_materializer_is_recompute_by_default(default_docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """GPU nodes: the streaming-KV connector only handles vLLM's CPU attention backend, so
    the chart's default is recompute, written into the rendered config (the embedded
    default, streaming_kv, is for `make up` on a CPU)."""
    configmap = find(default_docs, "ConfigMap", component("config"))
    assert yaml.safe_load(configmap["data"]["livelens.yaml"])["llm"]["materializer"] == "recompute"
    assert _rendered_llm_config(default_docs, tmp_path).llm.materializer == "recompute"


def test_llm_materializer_streaming_kv_when_set(tmp_path: Path) -> None:
    docs = render("--set", "config.llm.materializer=streaming_kv")
    configmap = find(docs, "ConfigMap", component("config"))
    rendered = yaml.safe_load(configmap["data"]["livelens.yaml"])
    assert rendered["llm"]["materializer"] == "streaming_kv"
    assert rendered["llm"]["enforce_eager"] is False  # the rest of the section is kept
    assert _rendered_llm_config(docs, tmp_path).llm.materializer == "streaming_kv"


def test_schema_rejects_an_unknown_materializer() -> None:
    proc = run_helm("template", RELEASE, str(CHART), "--set", "config.llm.materializer=paged", check=False)
    assert proc.returncode != 0
    assert "/config/llm/materializer" in proc.stderr
    assert "recompute" in proc.stderr and "streaming_kv" in proc.stderr


def test_encoder_and_llm_serve_grpc_health_probes(default_docs: list[dict[str, Any]]) -> None:
    for name, kind, port in (("encoder", "Deployment", 50052), ("llm", "StatefulSet", 50053)):
        container = pod_spec(find(default_docs, kind, component(name)))["containers"][0]
        assert container["ports"] == [{"name": "health", "containerPort": port, "protocol": "TCP"}]
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
    assert container["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]
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
    assert not [d for d in full_docs if d["kind"] == "PersistentVolumeClaim"]
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
    """The init container runs exactly the trtexec command of `python -m livelens.models.tensorrt`
    (profile from configs/gpu.pbtxt) for each model Triton loads, and Triton loads only those,
    in that configuration."""
    from livelens.models.tensorrt import profile_for, read_config, trtexec_command

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

    assert not [
        d for d in render("--set", "networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"
    ]


# --------------------------------------------------------------------------- installer


def test_install_script_is_idempotent() -> None:
    script = ROOT / "tools" / "install_helm.sh"
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
    assert env["LIVELENS_MODEL__SPEC"] == "/models/llava-ov" and "LIVELENS_LLM__MODEL_PATH" not in env
    encoder = pod_spec(find(docs, "Deployment", component("encoder")))["containers"][0]
    assert env_of(encoder)["LIVELENS_ENCODER__MODEL_NAME"] == "llava-ov"
    default = pod_spec(find(render(), "StatefulSet", component("llm")))
    assert "LIVELENS_MODEL__SPEC" not in env_of(default["containers"][0]) and not default.get("initContainers")
    bad = run_helm("template", RELEASE, str(CHART), "--set", "model.name=a b", check=False)
    assert bad.returncode != 0 and "model" in bad.stderr
