"""`livelens status`: what runs, who holds which partitions, how far behind, what is healthy.

Three sources, one report (`StatusReport`):

- **Kafka** (always): for the consumer group of each service that has one (the encoder's
  `encoder.group_id` on `kafka.frames_topic`, the LLM service's `llm.group_id` on
  `kafka.tokens_topic` and `kafka.commands_topic`; the gateway tails every partition
  without a group), the group's state, its members (replicas), the partitions each holds,
  and per partition the lag: the end offset minus the committed offset (a partition the
  group never committed counts from its earliest offset, where its consumers start). A
  stream is hashed to a partition by its key: `--stream tenant/id` says which partition
  and which LLM replica hold it (kafka-python's default partitioner, murmur2, the one every
  livelens producer uses: exact).
- **The services' health** (local stack): `grpc.health.v1` of each service, as `livelens
  health` asks it, and what the supervisor of a running `livelens up` says (restarts).
- **Kubernetes** (`--kube`, `--namespace`, `--release`, or when running in a pod that has
  a service account token): the release's pods, selected by the chart's labels
  (`app.kubernetes.io/instance=<release>`, `app.kubernetes.io/part-of=livelens`), with
  phase, readiness (the kubelet's gRPC health probe), restarts, node and GPU requests. In
  a cluster the pods' readiness stands for the services' health. The official
  `kubernetes` client is imported only for this part.

Healthy means: every service serves, every group is stable with at least one member and
every partition held, no supervised process is restarting, and every pod runs, ready and
not crash-looping. Lag is reported, not judged.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import OffsetSpec
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2
from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment

from livelens.config import KafkaConfig, LivelensConfig

GPU_RESOURCE = "nvidia.com/gpu"
CHART_PART_OF = "livelens"  # app.kubernetes.io/part-of of every pod of the chart
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Waiting reasons of a container that will not come up by itself.
BAD_WAITING = frozenset({"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError",
                         "CreateContainerError", "InvalidImageName", "RunContainerError"})
RANGE = "range"  # how a group's assignment is known: "broker" (DescribeGroups) or derived ("range")


class StatusError(Exception):
    """The status could not be asked for: Kafka or Kubernetes unreachable, no Kubernetes
    configuration, a bad argument. The message says which."""


# --- the report ------------------------------------------------------------------------

@dataclass
class PartitionLag:
    topic: str
    partition: int
    member: str | None  # member_id of the member holding it, None when none does
    committed: int | None  # the group's committed offset, None when it never committed
    end: int  # the partition's end offset (the next record's)
    lag: int  # end - committed (end - earliest offset when never committed)


@dataclass
class GroupMember:
    member_id: str
    client_id: str
    host: str  # where it connects from ("" when the broker does not say)
    partitions: dict[str, list[int]]  # topic -> partitions it holds
    pod: str = ""  # the pod with that IP (in a cluster)


@dataclass
class GroupStatus:
    service: str
    group_id: str
    topics: list[str]
    state: str  # Stable, PreparingRebalance, CompletingRebalance, Empty, Dead, ...
    members: list[GroupMember]
    partitions: list[PartitionLag]
    # "broker": the assignment the broker reports; "range": derived from the members with
    # the range assignor every livelens consumer uses (the broker reports none: Tansu).
    assignment: str
    problems: list[str] = field(default_factory=list)


@dataclass
class StreamPartition:
    key: str  # tenant/stream_id
    partition: int  # of the frames, tokens, commands and checkpoints topics alike
    member: str | None  # member_id of the LLM replica holding it
    client_id: str | None


@dataclass
class ServiceHealth:
    name: str  # gateway, encoder, llm, llm-2, ... or a supervised process without health (broker, triton)
    target: str  # host:port of its grpc.health.v1, "" when it has none
    serving: bool | None  # None: no health endpoint
    state: str = ""  # the supervisor's: running / restarting ("" when no `livelens up` supervises it)
    restarts: int | None = None
    last_exit: str = ""
    last_exit_unix: float = 0.0


@dataclass
class PodStatus:
    name: str
    component: str
    phase: str
    ready: bool
    restarts: int
    node: str
    gpus: int  # nvidia.com/gpu requested by its containers
    ip: str
    reason: str = ""  # why a container is waiting or terminated (CrashLoopBackOff, OOMKilled, ...)
    last_exit: str = ""  # how a container ended last time (OOMKilled, exit 137), after a restart
    healthy: bool = True


@dataclass
class ClusterStatus:
    namespace: str
    release: str
    selector: str
    pods: list[PodStatus]
    problems: list[str] = field(default_factory=list)


@dataclass
class StatusReport:
    kafka_bootstrap: str
    groups: list[GroupStatus]
    streams: list[StreamPartition]
    services: list[ServiceHealth]
    cluster: ClusterStatus | None
    problems: list[str]
    time_unix: float = field(default_factory=time.time)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, **dataclasses.asdict(self)}


# --- Kafka ------------------------------------------------------------------------------

def service_groups(cfg: LivelensConfig) -> dict[str, tuple[str, list[str]]]:
    """service -> (its consumer group, the topics it consumes)."""
    k = cfg.kafka
    return {"encoder": (cfg.encoder.group_id, [k.frames_topic]),
            "llm": (cfg.llm.group_id, [k.tokens_topic, k.commands_topic])}


class StatusAdmin(KafkaAdminClient):  # type: ignore[misc]
    """kafka-python's admin client, tolerant of Tansu's DescribeGroups answer."""

    # Tansu (0.6) answers DescribeGroups with every bit of authorized_operations set,
    # asked or not, and kafka-python (3.0.12) fails on the bits it has no name for
    # ("15 is not a valid ACLOperation"). The status needs no ACL operations.
    def _process_acl_operations(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj.pop("authorized_operations", None)
        return obj


def _admin(cfg: KafkaConfig, timeout_s: float) -> StatusAdmin:
    from livelens.kafka import security

    try:
        return StatusAdmin(bootstrap_servers=cfg.bootstrap, client_id="livelens-status",
                           bootstrap_timeout_ms=int(timeout_s * 1000), request_timeout_ms=int(timeout_s * 1000),
                           **security(cfg))
    except KafkaError as exc:
        raise StatusError(f"Kafka is unreachable at {cfg.bootstrap} (kafka.bootstrap): {exc}") from None


CLIENT_ID = re.compile(r"^(?P<client>.*)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _client_id(member: Mapping[str, Any]) -> str:
    """The member's client id; where the broker leaves it empty (Tansu), from the member id
    the coordinator made of it (`<client id>-<uuid>`)."""
    if member.get("client_id"):
        return str(member["client_id"])
    m = CLIENT_ID.match(str(member.get("member_id", "")))
    return m.group("client") if m else str(member.get("member_id", ""))


def _assigned(member: Mapping[str, Any]) -> dict[str, list[int]] | None:
    """What DescribeGroups says the member holds (None when the broker says nothing)."""
    raw = member.get("member_assignment")
    if not raw:
        return None
    if isinstance(raw, bytes | bytearray):
        raw = ConsumerProtocolAssignment.decode(bytes(raw)).to_dict()
    if not isinstance(raw, Mapping):
        return None
    held: dict[str, list[int]] = {}
    for tp in raw.get("assigned_partitions") or []:
        held.setdefault(str(tp["topic"]), []).extend(int(p) for p in tp["partitions"])
    return {t: sorted(ps) for t, ps in held.items()}


def range_assignment(member_ids: Iterable[str],
                     topic_partitions: Mapping[str, list[int]]) -> dict[str, dict[str, list[int]]]:
    """What kafka-python's range assignor (the default, which every livelens consumer uses)
    gives members that all subscribe to the same topics: per topic, the partitions in order,
    split into contiguous ranges over the members sorted by id, the first ones one more."""
    members = sorted(member_ids)
    held: dict[str, dict[str, list[int]]] = {m: {} for m in members}
    if not members:
        return held
    for topic, parts in topic_partitions.items():
        parts = sorted(parts)
        per, extra = divmod(len(parts), len(members))
        for i, m in enumerate(members):
            start = per * i + min(i, extra)
            count = per + (1 if i < extra else 0)
            if count:
                held[m][topic] = parts[start:start + count]
    return held


def group_status(service: str, group_id: str, topic_partitions: Mapping[str, list[int]],
                 description: Mapping[str, Any], committed: Mapping[Any, Any],
                 ends: Mapping[Any, Any], starts: Mapping[Any, Any]) -> GroupStatus:
    """One group's status from what the broker answered (DescribeGroups, OffsetFetch and
    ListOffsets, as kafka-python returns them)."""
    state = str(description.get("group_state") or "Unknown")
    problems = []
    if description.get("error"):
        problems.append(f"{service} group {group_id}: {description['error']}")
    raw_members = list(description.get("members") or [])
    held = {str(m["member_id"]): _assigned(m) for m in raw_members}
    assignment = "broker"
    if raw_members and all(h is None for h in held.values()):
        # The broker reports no assignment (Tansu leaves member_assignment empty): the
        # members' consumers all run the range assignor on the same topics, so it is
        # theirs, once the group is stable (during a rebalance nobody holds anything yet).
        assignment = RANGE
        held = dict(range_assignment(held, topic_partitions)) if state == "Stable" else {m: {} for m in held}
    members = [GroupMember(member_id=str(m["member_id"]), client_id=_client_id(m),
                           host=str(m.get("client_host") or "").lstrip("/"),
                           partitions=held.get(str(m["member_id"])) or {})
               for m in raw_members]
    holder = {(t, p): m.member_id for m in members for t, ps in m.partitions.items() for p in ps}
    rows = []
    for topic, parts in topic_partitions.items():
        for p in sorted(parts):
            tp = TopicPartition(topic, p)
            end = int(ends[tp].offset) if tp in ends else 0
            c = committed.get(tp)
            offset = int(c.offset) if c is not None and c.offset is not None and c.offset >= 0 else None
            base = offset if offset is not None else (int(starts[tp].offset) if tp in starts else 0)
            rows.append(PartitionLag(topic, p, holder.get((topic, p)), offset, end, max(0, end - base)))
    if not members:
        problems.append(f"{service} group {group_id} has no member: no {service} replica consumes "
                        f"{', '.join(topic_partitions)}")
    elif state != "Stable":
        problems.append(f"{service} group {group_id} is {state} (a rebalance is under way)")
    else:
        free = [f"{r.topic}[{r.partition}]" for r in rows if r.member is None]
        if free:
            problems.append(f"{service} group {group_id}: no member holds {', '.join(free)}")
    return GroupStatus(service, group_id, list(topic_partitions), state, members, rows, assignment, problems)


def kafka_status(cfg: LivelensConfig, timeout_s: float = 10.0,
                 groups: Mapping[str, tuple[str, list[str]]] | None = None) -> list[GroupStatus]:
    """The consumer group of each service (`groups`: service -> (group id, topics); default
    the services'), from the broker. Raises StatusError when Kafka cannot be asked.

    Tried on Tansu 0.6: ListOffsets, OffsetFetch (committed offsets) and DescribeGroups
    (members, state) answer; DescribeGroups leaves each member's client id, host and
    assignment empty, so the client id comes from the member id and the assignment is
    derived (`range_assignment`)."""
    groups = service_groups(cfg) if groups is None else groups
    admin = _admin(cfg.kafka, timeout_s)
    try:
        existing = set(admin.list_topics())
        wanted = sorted({t for _, topics in groups.values() for t in topics})
        partitions: dict[str, list[int]] = {t: [] for t in wanted}
        for t in admin.describe_topics([t for t in wanted if t in existing]):
            partitions[t["name"]] = sorted(p["partition_index"] for p in t["partitions"])
        tps = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
        # Committed offsets first, end offsets after: both only grow, so each end is then at
        # least its committed offset (read the other way round, a commit landing in between
        # gave end < committed).
        committed = {gid: admin.list_group_offsets({gid: None}).get(gid, {}) for gid, _ in groups.values()}
        ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps}) if tps else {}
        starts = admin.list_partition_offsets({tp: OffsetSpec.EARLIEST for tp in tps}) if tps else {}
        descriptions = admin.describe_groups([gid for gid, _ in groups.values()])
        out = []
        for service, (gid, topics) in groups.items():
            status = group_status(service, gid, {t: partitions[t] for t in topics},
                                  descriptions.get(gid, {}), committed[gid], ends, starts)
            status.problems[:0] = [f"topic {t} does not exist (the {service} service creates it when it starts)"
                                   for t in topics if t not in existing]
            out.append(status)
        return out
    except (KafkaError, OSError) as exc:
        raise StatusError(f"Kafka at {cfg.kafka.bootstrap} did not answer: {type(exc).__name__}: {exc}") from None
    finally:
        admin.close()


def stream_partition(key: str, partitions: int) -> int:
    """The partition of a stream's records: kafka-python's default partitioner (murmur2 of
    the key, as the Java client), which every livelens producer uses."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def streams_status(keys: Iterable[str], groups: list[GroupStatus], cfg: LivelensConfig) -> list[StreamPartition]:
    from livelens.identity import is_name

    llm = next((g for g in groups if g.service == "llm"), None)
    tokens = [r for r in (llm.partitions if llm else []) if r.topic == cfg.kafka.tokens_topic]
    out = []
    for key in keys:
        tenant, _, stream_id = key.partition("/")
        if not (is_name(tenant) and is_name(stream_id)):
            raise StatusError(f"--stream {key!r}: a stream is TENANT/STREAM_ID (e.g. acme/cam-1)")
        if not tokens:
            raise StatusError(f"--stream {key}: topic {cfg.kafka.tokens_topic} has no partitions")
        p = stream_partition(key, len(tokens))
        member = next((r.member for r in tokens if r.partition == p), None)
        client = next((m.client_id for m in llm.members if m.member_id == member), None) if llm else None
        out.append(StreamPartition(key, p, member, client))
    return out


# --- the services' health (local stack) ---------------------------------------------------

def services_health(cfg: LivelensConfig, supervised: Mapping[str, Any], timeout_s: float = 2.0) -> list[ServiceHealth]:
    """grpc.health.v1 of every service (its replicas included) and what the supervisor of a
    running `livelens up` says of each process (`supervised`: read_status's states)."""
    from livelens.health import check

    targets = {
        "gateway": f"{cfg.gateway.host}:{cfg.gateway.port}",
        "encoder": f"{cfg.encoder.health_host}:{cfg.encoder.health_port}",
        "llm": f"{cfg.llm.health_host}:{cfg.llm.health_port}",
    }
    targets.update({name: st.health for name, st in supervised.items() if st.health})
    with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
        serving = dict(zip(targets, pool.map(lambda t: check(t, timeout_s=timeout_s), targets.values()),
                           strict=True))
    out = []
    for name in [*targets, *(n for n in supervised if n not in targets)]:
        st = supervised.get(name)
        h = ServiceHealth(name, targets.get(name, ""), serving.get(name))
        if st is not None:
            h.state, h.restarts, h.last_exit, h.last_exit_unix = st.state, st.restarts, st.last_exit, st.last_exit_unix
        out.append(h)
    return out


def services_problems(services: list[ServiceHealth]) -> list[str]:
    problems = []
    for s in services:
        if s.serving is False:
            problems.append(f"{s.name} at {s.target} is NOT SERVING")
        if s.state == "restarting":
            problems.append(f"{s.name} is restarting ({s.last_exit})")
    return problems


# --- Kubernetes -------------------------------------------------------------------------

def in_cluster() -> bool:
    """Running in a pod that can ask the API server (a service account token is mounted)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT_DIR / "token").is_file()


def release_selector(release: str) -> str:
    """The chart's labels on every pod of a release (helm/livelens/templates/_helpers.tpl)."""
    return f"app.kubernetes.io/instance={release},app.kubernetes.io/part-of={CHART_PART_OF}"


def _kube_client(context: str | None) -> tuple[Any, str]:
    """An API client (in-cluster, else the kubeconfig: $KUBECONFIG or ~/.kube/config) and
    the namespace that configuration names."""
    from kubernetes import client, config

    conf = client.Configuration()
    try:
        if in_cluster():
            config.load_incluster_config(client_configuration=conf)
            namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
        else:
            # $KUBECONFIG as it is now (the client reads it once, when it is imported)
            files = os.environ.get("KUBECONFIG") or "~/.kube/config"
            config.load_kube_config(config_file=files, context=context, client_configuration=conf)
            contexts, active = config.list_kube_config_contexts(config_file=files)
            chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
            namespace = ((chosen or {}).get("context") or {}).get("namespace", "")
    except (config.ConfigException, OSError, TypeError) as exc:
        raise StatusError(f"Kubernetes: no usable configuration (in-cluster service account or "
                          f"KUBECONFIG / ~/.kube/config): {exc}") from None
    return client.ApiClient(conf), namespace or "default"


def _gpus(container: Any) -> int:
    res = container.resources
    amount = None
    if res is not None:  # extended resources: requests default to limits
        amount = (res.requests or {}).get(GPU_RESOURCE) or (res.limits or {}).get(GPU_RESOURCE)
    try:
        return int(float(amount)) if amount is not None else 0
    except ValueError:
        return 0


def pod_status(pod: Any) -> PodStatus:
    meta, spec, st = pod.metadata, pod.spec, pod.status
    statuses = list((st.container_statuses if st else None) or [])
    conditions = list((st.conditions if st else None) or [])
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    reason, last_exit = "", ""
    for cs in statuses:
        state, last = cs.state, cs.last_state
        if state is not None and state.waiting is not None and state.waiting.reason and not reason:
            reason = state.waiting.reason
        elif state is not None and state.terminated is not None and not reason:
            reason = state.terminated.reason or f"exit {state.terminated.exit_code}"
        if last is not None and last.terminated is not None and not last_exit:
            t = last.terminated
            last_exit = ", ".join(filter(None, [t.reason, f"exit {t.exit_code}"]))
    phase = (st.phase if st else None) or "Unknown"
    if meta.deletion_timestamp is not None:
        phase = "Terminating"
    healthy = phase == "Running" and ready and reason not in BAD_WAITING
    return PodStatus(
        name=meta.name, component=(meta.labels or {}).get("app.kubernetes.io/component", ""),
        phase=phase, ready=ready, restarts=sum(cs.restart_count or 0 for cs in statuses),
        node=(spec.node_name if spec else None) or "", gpus=sum(_gpus(c) for c in (spec.containers if spec else [])),
        ip=(st.pod_ip if st else None) or "", reason=reason, last_exit=last_exit, healthy=healthy)


def cluster_status(release: str, namespace: str | None = None, context: str | None = None,
                   timeout_s: float = 10.0) -> ClusterStatus:
    """The release's pods (raises StatusError when the API server cannot be asked)."""
    import urllib3
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    api_client, default_ns = _kube_client(context)
    namespace = namespace or default_ns
    selector = release_selector(release)
    try:
        with api_client:
            pods = CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector=selector,
                                                             _request_timeout=timeout_s).items
    except ApiException as exc:
        raise StatusError(f"Kubernetes API at {api_client.configuration.host}: listing pods in namespace "
                          f"{namespace}: {exc.status} {exc.reason}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise StatusError(f"Kubernetes API at {api_client.configuration.host} is unreachable: {exc}") from None
    statuses = sorted((pod_status(p) for p in pods), key=lambda p: (p.component, p.name))
    problems = []
    for p in statuses:
        if not p.healthy and p.phase != "Terminating":
            why = ", ".join(filter(None, [p.phase, "not ready" if not p.ready else "", p.reason]))
            last = f"; last exit: {p.last_exit}" if p.last_exit else ""
            problems.append(f"pod {p.name} ({p.component or 'no component'}): {why}, {p.restarts} restarts{last}")
    components = {p.component for p in statuses if p.healthy}
    for c in ("gateway", "encoder", "llm"):
        if c not in components:
            problems.append(f"no {c} pod of release {release} in namespace {namespace} is running and ready")
    return ClusterStatus(namespace, release, selector, statuses, problems)


# --- all together -----------------------------------------------------------------------

@dataclass
class KubeTarget:
    release: str = "livelens"
    namespace: str | None = None
    context: str | None = None


def collect(cfg: LivelensConfig, streams: Iterable[str] = (), kube: KubeTarget | None = None,
            supervised: Mapping[str, Any] | None = None, timeout_s: float = 10.0,
            health_timeout_s: float = 2.0) -> StatusReport:
    """The whole status. Without `kube`, the services' health comes from their gRPC health
    and the local supervisor (`supervised`); with it, from the release's pods (their
    readiness is the kubelet's gRPC health probe of the same service)."""
    groups = kafka_status(cfg, timeout_s)
    stream_rows = streams_status(streams, groups, cfg)
    services: list[ServiceHealth] = []
    cluster = None
    if kube is None:
        services = services_health(cfg, supervised or {}, health_timeout_s)
    else:
        cluster = cluster_status(kube.release, kube.namespace, kube.context, timeout_s)
        by_ip = {p.ip: p.name for p in cluster.pods if p.ip}
        for g in groups:
            for m in g.members:
                m.pod = by_ip.get(m.host, "")
    problems = [*services_problems(services), *(p for g in groups for p in g.problems),
                *(cluster.problems if cluster else [])]
    return StatusReport(cfg.kafka.bootstrap, groups, stream_rows, services, cluster, problems)


# --- the table ----------------------------------------------------------------------------

def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _ranges(parts: list[int]) -> str:
    return ",".join(str(p) for p in parts)


def render(report: StatusReport) -> str:
    """The report as an operator reads it."""
    lines = [f"livelens status: {'HEALTHY' if report.healthy else 'UNHEALTHY'} "
             f"(kafka {report.kafka_bootstrap}, {time.strftime('%H:%M:%S', time.localtime(report.time_unix))})"]
    if report.services:
        lines += ["", "SERVICES"]
        rows = [["NAME", "HEALTH", "TARGET", "RESTARTS", "LAST EXIT"]]
        for s in report.services:
            health = {True: "SERVING", False: "NOT SERVING", None: "-"}[s.serving]
            if s.state == "restarting":
                health += " (restarting)"
            last = ""
            if s.last_exit:
                last = f"{s.last_exit} at {time.strftime('%H:%M:%S', time.localtime(s.last_exit_unix))}"
            rows.append([s.name, health, s.target or "-", "-" if s.restarts is None else str(s.restarts), last])
        lines += _table(rows)
    if report.cluster is not None:
        c = report.cluster
        lines += ["", f"PODS (release {c.release}, namespace {c.namespace})"]
        rows = [["NAME", "COMPONENT", "PHASE", "READY", "RESTARTS", "NODE", "GPU", "REASON"]]
        for p in c.pods:
            reason = "; ".join(filter(None, [p.reason, f"last: {p.last_exit}" if p.last_exit else ""]))
            rows.append([p.name, p.component or "-", p.phase, "yes" if p.ready else "no", str(p.restarts),
                         p.node or "-", str(p.gpus), reason])
        lines += _table(rows) if c.pods else ["  (no pods)"]
    for g in report.groups:
        how = " (assignment derived: range assignor)" if g.assignment == RANGE and g.members else ""
        lines += ["", f"GROUP {g.group_id} ({g.service}): {g.state}, {len(g.members)} member"
                  f"{'' if len(g.members) == 1 else 's'}{how}"]
        names = {m.member_id: m.pod or m.client_id for m in g.members}
        if g.members:
            rows = [["MEMBER", "HOST", "PARTITIONS"]]
            for m in g.members:
                held = " ".join(f"{t}[{_ranges(ps)}]" for t, ps in sorted(m.partitions.items())) or "-"
                rows.append([names[m.member_id], m.host or "-", held])
            lines += _table(rows)
        rows = [["TOPIC", "PARTITION", "HELD BY", "COMMITTED", "END", "LAG"]]
        for r in g.partitions:
            rows.append([r.topic, str(r.partition), names.get(r.member or "", "-"),
                         "-" if r.committed is None else str(r.committed), str(r.end), str(r.lag)])
        lines += _table(rows) if g.partitions else ["  (no partitions)"]
    if report.streams:
        lines += ["", "STREAMS"]
        rows = [["STREAM", "PARTITION", "LLM REPLICA"]]
        rows += [[s.key, str(s.partition), s.client_id or "-"] for s in report.streams]
        lines += _table(rows)
    if report.problems:
        lines += ["", "PROBLEMS"] + [f"  - {p}" for p in report.problems]
    return "\n".join(lines)
