"""`livelens status`: consumer groups, partitions and lag from Kafka; the release's pods
from Kubernetes; exit codes.

The Kafka part runs against the real stack (the session `stack` fixture: Tansu, Triton,
vLLM, the services). The Kubernetes API is mocked, because no real cluster can be had
here: kmock serves the API over HTTP on loopback (pods kept in memory, listed with the
label selector applied, as the API server does) to the official `kubernetes` client,
which reaches it through an ordinary kubeconfig file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from livelens import kafka as lk
from livelens import status
from livelens.config import REPO_ROOT
from services.common import kafka as sk
from services.common.ports import free_port

RELEASE = "livelens"
NAMESPACE = "video"
SELECTOR = "app.kubernetes.io/instance=livelens,app.kubernetes.io/part-of=livelens"


# --- a mock Kubernetes API server ------------------------------------------------------

def pod(name: str, component: str, *, release: str = RELEASE, namespace: str = NAMESPACE, node: str = "cpu-1",
        ip: str = "", ready: bool = True, restarts: int = 0, gpu_limit: str | None = None,
        gpu_request: str | None = None, waiting: str | None = None,
        last_terminated: tuple[str, int] | None = None) -> dict[str, Any]:
    """A pod as the chart's Deployments and StatefulSet make them (labels of
    helm/livelens/templates/_helpers.tpl), in the API's JSON."""
    resources: dict[str, Any] = {}
    if gpu_limit is not None:
        resources["limits"] = {"nvidia.com/gpu": gpu_limit, "memory": "8Gi"}
    if gpu_request is not None:
        resources["requests"] = {"nvidia.com/gpu": gpu_request, "cpu": "2"}
    container_status: dict[str, Any] = {
        "name": component, "image": f"livelens:{component}", "imageID": "", "ready": ready,
        "restartCount": restarts,
        "state": {"waiting": {"reason": waiting, "message": "back-off 5m0s"}} if waiting else {"running": {}},
    }
    if last_terminated:
        reason, code = last_terminated
        container_status["lastState"] = {"terminated": {"reason": reason, "exitCode": code}}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {
            "app.kubernetes.io/name": "livelens", "app.kubernetes.io/instance": release,
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "livelens",
            "app.kubernetes.io/managed-by": "Helm"}},
        "spec": {"nodeName": node, "containers": [{"name": component, "image": f"livelens:{component}",
                                                   "resources": resources}]},
        "status": {"phase": "Running", "podIP": ip or f"10.1.0.{zlib.crc32(name.encode()) % 250 + 1}",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                   "containerStatuses": [container_status]},
    }


def _matches(labels: dict[str, str], selector: str) -> bool:
    return all(labels.get(k) == v for k, _, v in (term.partition("=") for term in selector.split(",") if term))


@contextlib.contextmanager
def kubernetes_api(pods: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """kmock's Kubernetes emulator holding `pods`, on a loopback port in a thread of its own
    (the `kubernetes` client is synchronous), with a kubeconfig (current namespace
    NAMESPACE) in $KUBECONFIG. Yields the emulator: iterating it gives the requests it served."""
    import kmock

    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            for p in pods:
                k8s.objects["v1/pods", p["metadata"]["namespace"], p["metadata"]["name"]] = p

            def list_pods(request: Any) -> dict[str, Any]:
                # The emulator lists every pod of the namespace; the API server applies the
                # label selector (equality terms: what `livelens status` sends).
                selector = request.params.get("labelSelector", "")
                items = [obj.raw for (res, ns, _), obj in k8s.objects.items()
                         if res.plural == "pods" and ns == request.namespace and not obj.deleted
                         and _matches(obj.raw["metadata"].get("labels", {}), selector)]
                return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}

            k8s[kmock.action.LIST][kmock.resource("v1/pods")] << list_pods
            box.update(k8s=k8s, url=str(server.url).rstrip("/"), loop=asyncio.get_running_loop(), stop=stop)
            started.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="kmock", daemon=True)
    thread.start()
    assert started.wait(30), "the mock Kubernetes API server did not start"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "mock",
        "clusters": [{"name": "mock", "cluster": {"server": box["url"]}}],
        "users": [{"name": "operator", "user": {"token": "operator-token"}}],
        "contexts": [{"name": "mock", "context": {"cluster": "mock", "user": "operator", "namespace": NAMESPACE}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # never the in-cluster configuration
    try:
        yield box["k8s"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


def release_pods() -> list[dict[str, Any]]:
    return [
        pod("livelens-gateway-7d9f-abcde", "gateway"),
        pod("livelens-encoder-5c4b-fghij", "encoder", restarts=1, last_terminated=("Error", 1)),
        pod("livelens-llm-0", "llm", node="gpu-a100-1", gpu_limit="1", restarts=2,
            last_terminated=("OOMKilled", 137)),
        pod("livelens-llm-1", "llm", node="gpu-a100-2", gpu_limit="2", gpu_request="2"),
        pod("livelens-triton-6f8d-klmno", "triton", node="gpu-a100-1", gpu_limit="1", gpu_request="1"),
    ]


def others() -> list[dict[str, Any]]:
    """Pods status must not list: another release in the namespace, the same release name
    in another namespace."""
    return [pod("canary-llm-0", "llm", release="canary", gpu_limit="1"),
            pod("livelens-llm-0", "llm", namespace="staging", gpu_limit="4")]


# --- the Kubernetes part (mock API server) -----------------------------------------------

def test_lists_the_release_pods_with_restarts_nodes_and_gpus(tmp_path, monkeypatch):
    with kubernetes_api(release_pods() + others(), tmp_path, monkeypatch) as k8s:
        cluster = status.cluster_status(RELEASE)  # the namespace: the kubeconfig context's
        requests = list(k8s)

    assert cluster.namespace == NAMESPACE and cluster.selector == SELECTOR
    pods = {p.name: p for p in cluster.pods}
    assert sorted(pods) == sorted(p["metadata"]["name"] for p in release_pods())
    llm0, llm1, triton = pods["livelens-llm-0"], pods["livelens-llm-1"], pods["livelens-triton-6f8d-klmno"]
    assert (llm0.component, llm0.phase, llm0.ready, llm0.restarts, llm0.node) == ("llm", "Running", True, 2,
                                                                                  "gpu-a100-1")
    assert llm0.gpus == 1, "nvidia.com/gpu in limits only: the request defaults to the limit"
    assert llm0.last_exit == "OOMKilled, exit 137"
    assert llm1.gpus == 2 and triton.gpus == 1
    assert pods["livelens-gateway-7d9f-abcde"].gpus == 0
    assert pods["livelens-encoder-5c4b-fghij"].restarts == 1
    assert all(p.healthy for p in cluster.pods) and cluster.problems == []
    (listing,) = [r for r in requests if r.resource is not None and r.resource.plural == "pods"]
    assert listing.url.path == f"/api/v1/namespaces/{NAMESPACE}/pods"
    assert listing.params["labelSelector"] == SELECTOR


def test_the_selector_follows_the_release_and_namespace(tmp_path, monkeypatch):
    with kubernetes_api(release_pods() + others(), tmp_path, monkeypatch) as k8s:
        canary = status.cluster_status("canary")
        staging = status.cluster_status(RELEASE, namespace="staging")
        selectors = [(r.url.path, r.params.get("labelSelector")) for r in k8s]

    assert [p.name for p in canary.pods] == ["canary-llm-0"]
    assert [(p.name, p.gpus) for p in staging.pods] == [("livelens-llm-0", 4)]
    assert ("/api/v1/namespaces/video/pods", "app.kubernetes.io/instance=canary,app.kubernetes.io/part-of=livelens") \
        in selectors
    assert ("/api/v1/namespaces/staging/pods", SELECTOR) in selectors
    # a release with only an LLM pod misses its gateway and encoder
    assert any("no gateway pod of release canary" in p for p in canary.problems)
    assert any("no encoder pod of release canary" in p for p in canary.problems)


def test_a_crash_looping_pod_makes_the_cluster_unhealthy(tmp_path, monkeypatch):
    looping = pod("livelens-llm-2", "llm", node="gpu-a100-3", gpu_limit="1", ready=False, restarts=7,
                  waiting="CrashLoopBackOff", last_terminated=("Error", 1))
    with kubernetes_api([*release_pods(), looping], tmp_path, monkeypatch):
        cluster = status.cluster_status(RELEASE)

    p = next(p for p in cluster.pods if p.name == "livelens-llm-2")
    assert (p.healthy, p.ready, p.reason, p.restarts, p.gpus) == (False, False, "CrashLoopBackOff", 7, 1)
    assert cluster.problems == ["pod livelens-llm-2 (llm): Running, not ready, CrashLoopBackOff, 7 restarts; "
                                "last exit: Error, exit 1"]
    report = status.StatusReport("kafka:9092", [], [], [], cluster, cluster.problems)
    assert not report.healthy and report.to_dict()["healthy"] is False
    table = status.render(report)
    assert "UNHEALTHY" in table and "CrashLoopBackOff" in table and "livelens-llm-2" in table


def test_unreachable_kubernetes_api_is_a_sentence(tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(status.StatusError, match="Kubernetes API at http://127.0.0.1:.* is unreachable"):
        status.cluster_status(RELEASE, timeout_s=2)


# --- Kafka without a stack ---------------------------------------------------------------

def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livelens.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO_ROOT)


def test_kafka_unreachable_exits_2_with_a_sentence():
    port = free_port()
    out = run_cli("status", "--timeout", "3", env={"LIVELENS_KAFKA__BOOTSTRAP": f"127.0.0.1:{port}"})
    assert out.returncode == 2
    assert f"livelens: error: Kafka is unreachable at 127.0.0.1:{port} (kafka.bootstrap)" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_assignment_a_broker_reports_is_taken_as_is():
    """A real Kafka broker reports each member's client id, host and assignment in
    DescribeGroups (Tansu does not: see the stack tests); kafka-python decodes them."""
    from kafka import TopicPartition
    from kafka.protocol.admin import DescribeGroupsResponse
    from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment, ConsumerProtocolSubscription
    from kafka.structs import OffsetAndMetadata, OffsetAndTimestamp

    group = DescribeGroupsResponse.DescribedGroup
    members = [group.DescribedGroupMember(
        member_id=f"livelens-llm-{c}-0b8e9f8a-2f1c-4d3e-9a7b-1c2d3e4f5a6b", group_instance_id=None,
        client_id=f"livelens-llm-{c}", client_host=f"/10.1.0.{i + 5}",
        member_metadata=ConsumerProtocolSubscription(version=0, topics=["t"], user_data=b"").encode(),
        # not what the range assignor would give: the broker's word counts
        member_assignment=ConsumerProtocolAssignment(version=0, assigned_partitions=[("t", parts)],
                                                     user_data=b"").encode())
        for i, (c, parts) in enumerate([("aaaaaa", [1, 3]), ("bbbbbb", [0, 2])])]
    response = DescribeGroupsResponse(throttle_time_ms=0, groups=[group(
        error_code=0, group_id="livelens-llm", group_state="Stable", protocol_type="consumer",
        protocol_data="range", members=members, authorized_operations=None)], version=5)
    admin = object.__new__(status.StatusAdmin)  # only its response processing, no connection
    described = admin._describe_groups_process_response(
        DescribeGroupsResponse.decode(response.encode(version=5), version=5))["livelens-llm"]
    tps = [TopicPartition("t", p) for p in range(4)]
    g = status.group_status("llm", "livelens-llm", {"t": [0, 1, 2, 3]}, described,
                            {tps[1]: OffsetAndMetadata(7, "", -1)},
                            {tp: OffsetAndTimestamp(10, -1, 0) for tp in tps},
                            {tp: OffsetAndTimestamp(2, -1, 0) for tp in tps})
    assert g.assignment == "broker" and g.problems == []
    assert [(m.client_id, m.host, m.partitions) for m in g.members] == [
        ("livelens-llm-aaaaaa", "10.1.0.5", {"t": [1, 3]}), ("livelens-llm-bbbbbb", "10.1.0.6", {"t": [0, 2]})]
    client = {m.member_id: m.client_id for m in g.members}
    # lag: end - committed; never committed: end - the earliest offset (10 - 2)
    assert [(r.partition, client[r.member or ""], r.committed, r.lag) for r in g.partitions] == [
        (0, "livelens-llm-bbbbbb", None, 8), (1, "livelens-llm-aaaaaa", 7, 3),
        (2, "livelens-llm-bbbbbb", None, 8), (3, "livelens-llm-aaaaaa", None, 8)]


# --- Kafka on the real stack -------------------------------------------------------------

def partition_of(cfg: Any, topic: str, key: str, timeout_s: float = 60) -> int:
    """The partition the stream's records went to, read off the topic."""
    consumer = lk.make_tail_consumer(cfg.kafka, [topic], from_beginning=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    if r.key == key.encode():
                        return int(r.partition)
    finally:
        consumer.close()
    raise AssertionError(f"no record of {key} in {topic}")


def wait_stable(cfg: Any, timeout_s: float = 90) -> None:
    """Until every group is stable with its partitions held (a rebalance left by an earlier
    test of the session settles)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        groups = status.kafka_status(cfg)
        if not any(g.problems for g in groups):
            return
        time.sleep(2)
    raise AssertionError(f"groups not stable: {[p for g in groups for p in g.problems]}")


@pytest.mark.integration
def test_status_json_names_the_llm_replica_holding_a_stream(stack, tmp_path):
    from livelens.client import Ack, Client
    from livelens.records import encode_jpeg
    from livelens.video import read_frames, sample_video

    cfg = stack.cfg
    stream_id, key = "status-probe", "acme/status-probe"
    frames = [encode_jpeg(f.rgb) for f in read_frames(sample_video("vtest.avi"), 2.0, max_seconds=1.5)]
    wait_stable(cfg)
    # `livelens status` reads the supervisor of a running `livelens up` from <build dir>/up.json:
    # point it at the test stack's supervisor
    (tmp_path / "up.json").write_text(json.dumps({"pid": os.getpid(), "status": str(stack.status_path)}))
    env = {"LIVELENS_BUILD_DIR": str(tmp_path)}

    async def run() -> subprocess.CompletedProcess:
        async with Client(stack.gateway_target, "test-token") as client, client.watch(stream_id) as s:
            for i, image in enumerate(frames):
                await s.send_frame(i, i * 0.5, image)
            acked: set[int] = set()
            async for event in s.events(replay=True):
                if isinstance(event, Ack):
                    acked.add(event.seq)
                if len(acked) == len(frames):
                    break
            # the stream is open: ask the command line, as an operator does
            return await asyncio.to_thread(run_cli, "--config", str(stack.run_dir / "livelens.yaml"), "status",
                                           "--json", "--stream", key, env=env)

    out = asyncio.run(asyncio.wait_for(run(), 180))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    partition = partition_of(cfg, cfg.kafka.commands_topic, key)  # where the gateway's open command went

    assert report["healthy"] is True and report["problems"] == []
    llm = next(g for g in report["groups"] if g["service"] == "llm")
    assert llm["group_id"] == cfg.llm.group_id and llm["state"] == "Stable"
    assert llm["topics"] == [cfg.kafka.tokens_topic, cfg.kafka.commands_topic]
    holder = next(m for m in llm["members"] if partition in m["partitions"].get(cfg.kafka.commands_topic, []))
    assert partition in holder["partitions"][cfg.kafka.tokens_topic], "one replica holds a stream's tokens and commands"
    assert holder["client_id"].startswith(f"{cfg.llm.group_id}-"), "the client id make_group_consumer gives"
    rows = {(r["topic"], r["partition"]): r for r in llm["partitions"]}
    assert sorted(rows) == sorted((t, p) for t in llm["topics"] for p in range(cfg.kafka.partitions))
    assert rows[(cfg.kafka.commands_topic, partition)]["member"] == holder["member_id"]
    assert rows[(cfg.kafka.commands_topic, partition)]["end"] >= 1, "the stream's open command is in it"
    for g in report["groups"]:
        for r in g["partitions"]:
            assert isinstance(r["lag"], int) and r["lag"] >= 0, r
            assert isinstance(r["end"], int) and r["end"] >= 0, r
            if r["committed"] is not None:
                assert r["lag"] == r["end"] - r["committed"], r
    encoder = next(g for g in report["groups"] if g["service"] == "encoder")
    frames_row = next(r for r in encoder["partitions"] if r["partition"] == partition)
    assert frames_row["end"] >= len(frames) and frames_row["member"] is not None
    # the stream's partition, computed from its key, is the one its records went to
    assert report["streams"] == [{"key": key, "partition": partition, "member": holder["member_id"],
                                  "client_id": holder["client_id"]}]
    services = {s["name"]: s for s in report["services"]}
    assert all(services[n]["serving"] is True for n in ("gateway", "encoder", "llm"))
    assert services["llm"]["restarts"] is not None, "the supervisor's count"
    assert report["cluster"] is None

    table = run_cli("--config", str(stack.run_dir / "livelens.yaml"), "status", "--stream", key, env=env)
    print(f"\n$ livelens status --stream {key}\n{table.stdout}")  # pytest -s shows it
    assert table.returncode == 0 and "livelens status: HEALTHY" in table.stdout
    assert f"GROUP {cfg.llm.group_id} (llm): Stable" in table.stdout and key in table.stdout


@pytest.mark.integration
def test_derived_assignment_is_what_the_members_hold(stack):
    """Tansu's DescribeGroups leaves the members' assignment empty: the status derives it
    with the range assignor. Two real members of a group say what they hold."""
    cfg = stack.cfg
    group, topic = "livelens-status-probe", cfg.kafka.commands_topic
    consumers = [sk.make_group_consumer(cfg.kafka, [topic], group, auto_commit=False) for _ in range(2)]
    stop = threading.Event()

    def poll(c: Any) -> None:
        while not stop.is_set():
            c.poll(timeout_ms=200)

    threads = [threading.Thread(target=poll, args=(c,), daemon=True) for c in consumers]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 90
        derived: dict[str, Any] = {}
        held: dict[str, Any] = {}
        while time.monotonic() < deadline:
            held = {c.config["client_id"]: sorted(tp.partition for tp in c.assignment()) for c in consumers}
            (g,) = status.kafka_status(cfg, groups={"probe": (group, [topic])})
            derived = {m.client_id: m.partitions.get(topic, []) for m in g.members}
            if g.state == "Stable" and len(g.members) == 2 and all(held.values()) and derived == held:
                break
            time.sleep(1)
        assert derived == held, (derived, held)
        assert sorted(p for ps in held.values() for p in ps) == list(range(cfg.kafka.partitions))
        assert g.assignment == status.RANGE and g.problems == []
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for c in consumers:
            c.close()


def test_range_assignment_splits_like_kafka_python():
    """Against kafka-python's own range assignor, for 1-5 members and 4 or 7 partitions."""
    from kafka.coordinator.assignors.range import RangePartitionAssignor

    class Cluster:
        def __init__(self, parts: dict[str, list[int]]) -> None:
            self.parts = parts

        def partitions_for_topic(self, topic: str) -> set[int]:
            return set(self.parts[topic])

    class Member:
        def __init__(self, member_id: str, topics: list[str]) -> None:
            self.member_id, self.group_instance_id = member_id, None
            self.metadata = RangePartitionAssignor.metadata(topics)

    for n in range(1, 6):
        for parts in ({"a": list(range(4)), "b": list(range(4))}, {"a": list(range(7))}):
            ids = [f"c-{i}-{(i * 7919) % 1000:04d}" for i in range(n)]
            theirs = RangePartitionAssignor.assign(Cluster(parts), [Member(i, list(parts)) for i in ids])
            expected = {m: {topic: list(ps) for topic, ps in a.assigned_partitions if ps}
                        for m, a in theirs.items()}
            assert status.range_assignment(ids, parts) == expected, (n, parts)


@pytest.mark.integration
def test_status_in_a_cluster_with_a_crash_looping_pod_exits_1(stack, tmp_path, monkeypatch):
    """`livelens status --kube`: Kafka from the real stack, the pods from the mock API server;
    one LLM pod crash-loops, so the status is unhealthy (exit 1) and says which and why."""
    wait_stable(stack.cfg)
    looping = pod("livelens-llm-2", "llm", node="gpu-a100-3", gpu_limit="1", ready=False, restarts=7,
                  waiting="CrashLoopBackOff", last_terminated=("OOMKilled", 137))
    with kubernetes_api([*release_pods(), *others(), looping], tmp_path, monkeypatch):
        out = run_cli("--config", str(stack.run_dir / "livelens.yaml"), "status", "--kube", "--json")
        table = run_cli("--config", str(stack.run_dir / "livelens.yaml"), "status", "--namespace", NAMESPACE)

    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["healthy"] is False
    assert report["problems"] == ["pod livelens-llm-2 (llm): Running, not ready, CrashLoopBackOff, 7 restarts; "
                                  "last exit: OOMKilled, exit 137"], "Kafka and every other pod are fine"
    cluster = report["cluster"]
    assert (cluster["namespace"], cluster["release"], cluster["selector"]) == (NAMESPACE, RELEASE, SELECTOR)
    assert {p["name"]: (p["restarts"], p["gpus"]) for p in cluster["pods"]} == {
        "livelens-gateway-7d9f-abcde": (0, 0), "livelens-encoder-5c4b-fghij": (1, 0), "livelens-llm-0": (2, 1),
        "livelens-llm-1": (0, 2), "livelens-llm-2": (7, 1), "livelens-triton-6f8d-klmno": (0, 1)}
    assert report["services"] == [], "in a cluster the pods' readiness stands for the services' health"
    assert any(g["service"] == "llm" and g["members"] for g in report["groups"])
    print(f"\n$ livelens status --namespace {NAMESPACE}\n{table.stdout}")  # pytest -s shows it
    assert table.returncode == 1 and "livelens status: UNHEALTHY" in table.stdout
    assert "PODS (release livelens, namespace video)" in table.stdout and "CrashLoopBackOff" in table.stdout
