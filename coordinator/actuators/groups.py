"""Deployment Groups on Kubernetes: placement realised, the ready-ratio gate, soft scale-in.

``DeploymentGroupActuator`` implements ``types.Actuator`` for services that use
topology-aware placement. It decides nothing itself: where instances go comes from
``placement.plan`` (pure), which it feeds with a resource view built from the cluster's
Node and Pod objects (``topology.build_view``) each time it acts.

Realisation
    Each DG is a pair of Deployments, ``<dg>-prefill`` and ``<dg>-decode`` (DG names are
    ``<service>-g<n>``), created from the service's role templates: the pod template of
    the Deployment (or StatefulSet) the config names for the role. The template object
    itself is never scaled by this actuator (keep it at 0 replicas). Each DG Deployment:

    * is labelled ``app.kubernetes.io/managed-by: heteroscale``, ``heteroscale.io/service``,
      ``heteroscale.io/role``, ``heteroscale.io/dg`` (pods too; the selector is dg + role);
    * carries the DG's domain in the annotation ``heteroscale.io/group`` (JSON: level,
      s2, s1, gpu_type);
    * pins its pods with a *required* node affinity to the DG's switch label values
      (S2, and S1 for s1-level DGs) and the role's GPU type, ANDed into every node
      selector term the template already had;
    * adds the Pod readiness gate ``heteroscale.io/ready-ratio``.

Ready-ratio gate (PAPER.md §3.7)
    A pod with a readiness gate is Ready only when the kubelet's own checks pass *and*
    the gate's condition is True, so Services, EndpointSlices and any router follow it
    without a change on their side. On every ``observe`` (when this process may write)
    the actuator admits engine-ready pods (``ContainersReady``) of each DG by setting the
    condition True, but only so far as the DG's admitted prefill:decode ratio stays within
    ``ratio_tolerance`` of the DG's own spec ratio (``admit``): the over-represented role
    waits, e.g. prefill pods wait until decode pods are up. Admitted pods are never
    un-gated for ratio reasons (only by a drain).

Soft scale-in
    Instances placement releases are not deleted at once. They *leave traffic*: gate
    condition False (reason ``Draining``), annotation ``heteroscale.io/draining-since``,
    and ``controller.kubernetes.io/pod-deletion-cost`` set to the minimum so that the
    ReplicaSet deletes exactly those. After ``drain_window_s`` the Deployment is scaled
    down by the number of drained pods (a DG left empty has its Deployments deleted).
    If the SLO degrades during the window, the next scale-out decision (any decision
    whose direction is ``out`` or whose reason is a latency one) restores the draining
    pods at once before placing anything new. Note: kube-apiserver < 1.22 ignores
    pod-deletion-cost; the ReplicaSet still removes the drained pods first because they
    are the NotReady ones (the ReplicaSet deletes not-ready pods before ready ones).

Counting: ``current`` is spec replicas minus draining pods; ``ready`` counts Ready pods
that are not draining. A placement shortfall is returned in ``ApplyResult.shortfall``
and recorded as a Kubernetes Event (reason ``PlacementShortfall``) on the template.

Limits: GPUs of DG pods that are not bound yet are not reserved in the view (the
scheduler has not chosen their node); the next cycle sees them once bound.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from heteroscale.coordinator.kube import (DEPLOYMENTS, EVENTS, NODES, PODS, WORKLOADS, Clock, Kube, SystemClock,
                                          event_body, format_time, parse_time, set_replicas)
from heteroscale.coordinator.core.bandwidth import PlacementHints, ServiceBandwidth, placement_hints
from heteroscale.coordinator.core.gate import admit
from heteroscale.coordinator.core.placement import (LEVEL_OF_AFFINITY, DeploymentGroup, PlacementPlan, RoleGroup,
                                                    demand_from_service, plan, with_bandwidth)
from heteroscale.coordinator.core.topology import TIER_VALUE, TopologyKeys, build_view
from heteroscale.coordinator.core.types import ROLES, ApplyResult, Decision, PoolCounts, PoolStatus
from heteroscale.coordinator.core.settings import PlacementConfig, ServiceConfig
from heteroscale.errors import ApiError, ConfigError, NotLeaderError

log = logging.getLogger(__name__)

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "heteroscale"
LABEL_SERVICE = "heteroscale.io/service"
LABEL_ROLE = "heteroscale.io/role"
LABEL_DG = "heteroscale.io/dg"
ANNOTATION_GROUP = "heteroscale.io/group"
ANNOTATION_DRAINING = "heteroscale.io/draining-since"
ANNOTATION_RELEASED = "heteroscale.io/released-at"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
MIN_DELETION_COST = str(-(2 ** 31))
GATE = "heteroscale.io/ready-ratio"
COMPONENT = "heteroscale-coordinator"


@dataclass(frozen=True)
class GroupSettings:
    """``ratio_tolerance``: how far (relative) the admitted P/D ratio of a DG may stray
    from the DG's spec ratio; smaller = stricter gate, slower to admit odd pods.
    ``drain_window_s``: how long a drained instance stays (out of traffic) before it is
    deleted; longer = safer restore, slower release of GPUs. ``keys``: node label keys."""

    ratio_tolerance: float = 0.25
    drain_window_s: float = 60.0
    keys: TopologyKeys = field(default_factory=TopologyKeys)

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.ratio_tolerance < 10:
            problems.append("ratio_tolerance must be in [0, 10)")
        if self.drain_window_s < 0:
            problems.append("drain_window_s must be >= 0")
        if problems:
            raise ConfigError(problems, source="deployment groups")

    @classmethod
    def from_config(cls, placement: PlacementConfig) -> GroupSettings:
        """From the validated ``coordinator.placement`` section (``config.PlacementConfig``)."""
        return cls(ratio_tolerance=placement.ratio_tolerance, drain_window_s=placement.drain_window_s,
                   keys=TopologyKeys(gpu_type_label=placement.gpu_type_label, s1_label=placement.s1_label,
                                     s2_label=placement.s2_label, gpu_resource=placement.gpu_resource))


def template_of(service: ServiceConfig, role: str) -> tuple[str, str] | None:
    """The role's DG template workload: ``template`` (config), else its deployment/statefulset."""
    cfg = service.role(role)
    return cfg.group_template or cfg.workload


# ---------------------------------------------------------------- object helpers


def dg_name_of(deployment: Mapping[str, Any]) -> str | None:
    return ((deployment.get("metadata") or {}).get("labels") or {}).get(LABEL_DG)


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _condition(pod: Mapping[str, Any], kind: str) -> str | None:
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if cond.get("type") == kind:
            return str(cond.get("status"))
    return None


def is_draining(pod: Mapping[str, Any]) -> bool:
    """Out of traffic, under observation, still counted in its Deployment's spec."""
    ann = _annotations(pod)
    return ANNOTATION_DRAINING in ann and ANNOTATION_RELEASED not in ann


def is_released(pod: Mapping[str, Any]) -> bool:
    """Its Deployment was already scaled down for it: it no longer counts anywhere."""
    return ANNOTATION_RELEASED in _annotations(pod)


def _spec_replicas(deployment: Mapping[str, Any]) -> int:
    return int((deployment.get("spec") or {}).get("replicas") or 0)


def _live(pod: Mapping[str, Any]) -> bool:
    return not (pod.get("metadata") or {}).get("deletionTimestamp") and \
        (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def node_affinity_terms(template_affinity: Mapping[str, Any] | None,
                        ours: list[dict[str, Any]]) -> dict[str, Any]:
    """The template's affinity with ``ours`` ANDed into every required node selector term."""
    affinity = json.loads(json.dumps(template_affinity or {}))
    node_aff = affinity.setdefault("nodeAffinity", {})
    required = node_aff.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    for term in terms:
        term["matchExpressions"] = list(term.get("matchExpressions") or []) + ours
    required["nodeSelectorTerms"] = terms
    return affinity


def group_deployment(*, template: Mapping[str, Any], service: str, namespace: str, dg: DeploymentGroup,
                     role: str, keys: TopologyKeys) -> dict[str, Any]:
    """The Deployment for one role of a DG, built from the role template's pod template."""
    pod_template = json.loads(json.dumps((template.get("spec") or {}).get("template") or {}))
    if not pod_template.get("spec", {}).get("containers"):
        raise ConfigError([f"{service}.{role}: the template {template.get('metadata', {}).get('name')} "
                           "has no pod template with containers"], source="kubernetes backend")
    own = {MANAGED_BY: MANAGER, LABEL_SERVICE: service, LABEL_ROLE: role, LABEL_DG: dg.name}
    meta = pod_template.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **own}
    spec = pod_template["spec"]
    group = dg.role(role)
    ours = [{"key": keys.gpu_type_label, "operator": "In", "values": [group.gpu_type]}]
    if dg.level in ("s1", "s2"):
        ours.append({"key": keys.s2_label, "operator": "In", "values": [dg.s2]})
    if dg.level == "s1":
        ours.append({"key": keys.s1_label, "operator": "In", "values": [dg.s1]})
    spec["affinity"] = node_affinity_terms(spec.get("affinity"), ours)
    gates = [g for g in spec.get("readinessGates") or [] if g.get("conditionType") != GATE]
    spec["readinessGates"] = gates + [{"conditionType": GATE}]
    info = {"level": dg.level, "s2": dg.s2, "s1": dg.s1, "gpu_type": group.gpu_type}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{dg.name}-{role}", "namespace": namespace,
                     "labels": {**(_labels(template)), **own},
                     "annotations": {ANNOTATION_GROUP: json.dumps(info, sort_keys=True)}},
        "spec": {"replicas": group.count,
                 "selector": {"matchLabels": {LABEL_DG: dg.name, LABEL_ROLE: role}},
                 "template": pod_template},
    }


def groups_from_objects(service: str, deployments: Iterable[Mapping[str, Any]],
                        pods: Iterable[Mapping[str, Any]]) -> list[DeploymentGroup]:
    """The service's DGs as placement sees them: counts exclude draining pods; nodes come
    from bound, live, non-draining pods."""
    parts: dict[str, dict[str, Any]] = {}
    for dep in deployments:
        labels = _labels(dep)
        name, role = labels.get(LABEL_DG), labels.get(LABEL_ROLE)
        if labels.get(LABEL_SERVICE) != service or not name or role not in ROLES:
            continue
        try:
            info = json.loads(_annotations(dep).get(ANNOTATION_GROUP) or "{}")
        except ValueError:
            info = {}
        entry = parts.setdefault(name, {"info": info})
        entry[role] = int((dep.get("spec") or {}).get("replicas") or 0)
        entry[f"{role}_type"] = str(info.get("gpu_type") or "")
    draining: dict[tuple[str, str], int] = {}
    nodes: dict[tuple[str, str], dict[str, int]] = {}
    for pod in pods:
        labels = _labels(pod)
        key = (labels.get(LABEL_DG, ""), labels.get(LABEL_ROLE, ""))
        if not _live(pod) or is_released(pod):
            continue
        if is_draining(pod):
            draining[key] = draining.get(key, 0) + 1
            continue
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            per = nodes.setdefault(key, {})
            per[node] = per.get(node, 0) + 1
    out = []
    for name, entry in sorted(parts.items()):
        info = entry["info"]
        roles = {}
        for role in ROLES:
            count = max(0, entry.get(role, 0) - draining.get((name, role), 0))
            pinned = dict(nodes.get((name, role), {}))
            if sum(pinned.values()) != count:
                pinned = {}  # not all bound yet: placement then counts without node detail
            roles[role] = RoleGroup(entry.get(f"{role}_type", ""), count, pinned)
        level = info.get("level") if info.get("level") in ("s1", "s2", "cluster") else "cluster"
        out.append(DeploymentGroup(name=name, service=service, level=level,
                                   s2=str(info.get("s2") or ""), s1=str(info.get("s1") or ""),
                                   prefill=roles["prefill"], decode=roles["decode"]))
    return out


def pick_for_drain(pods: list[Mapping[str, Any]], count: int, *,
                   worst_first: Sequence[str] = ()) -> list[Mapping[str, Any]]:
    """Which pods leave first: not-ready ones (cost nothing), then those in the worst-
    measured KV pairs (``worst_first``, worst first), then the newest."""
    rank = {name: i for i, name in enumerate(worst_first)}

    def key(pod: Mapping[str, Any]) -> tuple[int, int, float, str]:
        ready = _condition(pod, "Ready") == "True"
        created = parse_time((pod.get("metadata") or {}).get("creationTimestamp")) or 0.0
        name = pod["metadata"]["name"]
        return (1 if ready else 0, rank.get(name, len(rank)), -created, name)
    return sorted(pods, key=key)[:count]


# ---------------------------------------------------------------- the actuator


class DeploymentGroupActuator:
    """``types.Actuator``: Kubernetes Deployment Groups with placement (see the module docstring)."""

    name = "kubernetes"

    def __init__(self, *, api: Kube, settings: GroupSettings | None = None, clock: Clock | None = None,
                 dry_run: bool = False, identity: str = COMPONENT) -> None:
        """``api`` is the (fenced) client, owned by the caller; ``dry_run`` observes only."""
        self.dry_run = dry_run
        self.writes = not dry_run
        self.api = api
        self.settings = settings or GroupSettings()
        self.clock: Clock = clock or SystemClock()
        self.identity = identity
        self.last_plan: dict[str, PlacementPlan] = {}
        self.last_sync_error: str | None = None
        # node name -> (s2, s1), and per service pod name -> DG, as of the latest observe
        # (for the KV bandwidth map)
        self.switches: dict[str, tuple[str, str]] = {}
        self._pod_groups: dict[str, dict[str, str]] = {}
        self._bandwidth: dict[str, ServiceBandwidth | None] = {}

    # ------------------------------------------------------------ reads
    async def _objects(self, service: ServiceConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        selector = f"{MANAGED_BY}={MANAGER},{LABEL_SERVICE}={service.name}"
        namespace = service.namespace
        deps = await self.api.list(DEPLOYMENTS, namespace=namespace, label_selector=selector)
        pods = await self.api.list(PODS, namespace=namespace, label_selector=selector)
        return deps, [p for p in pods if _live(p)]

    async def observe(self, service: ServiceConfig) -> PoolStatus:
        deps, pods = await self._objects(service)
        if not self.dry_run:
            try:
                wrote = await self.sync(service, deps, pods)
            except NotLeaderError as exc:
                # a standby observes too; only the leader opens gates and finishes drains
                log.debug("%s: gate/drain sync skipped: %s", service.name, exc)
                wrote = False
            except ApiError as exc:
                # the counts can still be reported; the gate/drain work is retried next tick
                log.warning("%s: gate/drain sync failed: %s", service.name, exc)
                self.last_sync_error = str(exc)
                wrote = True
            else:
                self.last_sync_error = None
            if wrote:
                deps, pods = await self._objects(service)
        tiers = await self._topology(service.name, pods)
        return self._status(service, deps, pods, tiers=tiers)

    @property
    def pod_groups(self) -> dict[str, str]:
        """pod name -> DG, every service's pods as of its latest observe."""
        return {pod: dg for per in self._pod_groups.values() for pod, dg in per.items()}

    async def _topology(self, service: str, pods: list[dict[str, Any]]) -> dict[tuple[str, ...], str]:
        """Remember the node switches and pod groups; the tier of each switch domain."""
        view = build_view(await self.api.list(NODES), keys=self.settings.keys)
        self.switches = {n.name: (n.s2, n.s1) for n in view.nodes}
        self._pod_groups[service] = {pod["metadata"]["name"]: _labels(pod)[LABEL_DG] for pod in pods
                                     if _labels(pod).get(LABEL_DG)}
        tiers: dict[tuple[str, ...], str] = {("s2", s2): t for s2, t in view.s2_tiers().items()}
        tiers.update({("s1", s2, s1): t for (s2, s1), t in view.s1_tiers().items()})
        if view.nodes:
            tiers[("cluster",)] = max((n.tier for n in view.nodes), key=TIER_VALUE.__getitem__)
        return tiers

    async def list_pods(self, service: ServiceConfig, role: str) -> list[tuple[str, str]]:
        """``(pod name, pod IP)`` of the role's running DG pods that take traffic (not
        draining), for report collection."""
        _, pods = await self._objects(service)
        found = []
        for pod in pods:
            meta, status = pod.get("metadata") or {}, pod.get("status") or {}
            if (_labels(pod).get(LABEL_ROLE) != role or is_draining(pod) or is_released(pod)
                    or status.get("phase") != "Running" or not status.get("podIP")):
                continue
            found.append((str(meta.get("name")), str(status["podIP"])))
        return sorted(found)

    def _status(self, service: ServiceConfig, deps: list[dict[str, Any]], pods: list[dict[str, Any]], *,
                tiers: Mapping[tuple[str, ...], str] | None = None) -> PoolStatus:
        groups = groups_from_objects(service.name, deps, pods)
        current = {role: sum(g.role(role).count for g in groups) for role in ROLES}
        ready = {role: 0 for role in ROLES}
        unready_since: list[float] = []
        for pod in pods:
            role = _labels(pod).get(LABEL_ROLE)
            if role not in ROLES or is_draining(pod) or is_released(pod):
                continue
            if _condition(pod, "Ready") == "True":
                ready[role] += 1
            else:
                created = parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
                if created is not None:
                    unready_since.append(created)
        ready = {role: min(ready[role], current[role]) for role in ROLES}
        pending = {role: current[role] - ready[role] for role in ROLES}
        tiers = tiers or {}
        described = tuple(g.to_dict() | {"draining": sum(1 for p in pods if is_draining(p)
                                                          and _labels(p).get(LABEL_DG) == g.name),
                                         "tier": tiers.get(g.domain)}
                          for g in groups)
        return PoolStatus(current=PoolCounts(**current), ready=PoolCounts(**ready),
                          pending=PoolCounts(**pending),
                          pending_since_s=min(unready_since) if unready_since and sum(pending.values()) else None,
                          groups=described)

    # ------------------------------------------------------------ the periodic sync
    async def sync(self, service: ServiceConfig, deps: list[dict[str, Any]], pods: list[dict[str, Any]]) -> bool:
        """Finish drains whose window has passed, then open the ratio gate where allowed.
        Returns True if anything was written."""
        wrote = await self._finish_drains(service, deps, pods)
        if wrote:
            deps, pods = await self._objects(service)
        wrote = await self._open_gates(service, deps, pods) or wrote
        return wrote

    async def _finish_drains(self, service: ServiceConfig, deps: list[dict[str, Any]],
                             pods: list[dict[str, Any]]) -> bool:
        namespace = service.namespace
        now = self.clock.time()
        due: dict[str, list[dict[str, Any]]] = {}
        wrote = False
        for pod in pods:
            if is_released(pod):
                # the ReplicaSet removed another pod than the drained one (deletion cost not
                # honoured): after one more window, remove ours by name; the ReplicaSet
                # replaces it, so the count stays right and the drained instance is gone.
                released = float(_annotations(pod).get(ANNOTATION_RELEASED) or 0)
                if now - released >= self.settings.drain_window_s:
                    await self.api.delete(PODS, pod["metadata"]["name"], namespace=namespace)
                    wrote = True
                continue
            if not is_draining(pod):
                continue
            since = float(_annotations(pod).get(ANNOTATION_DRAINING) or 0)
            if now - since >= self.settings.drain_window_s:
                labels = _labels(pod)
                due.setdefault(f"{labels.get(LABEL_DG)}-{labels.get(LABEL_ROLE)}", []).append(pod)
        if not due:
            return wrote
        specs = {d["metadata"]["name"]: _spec_replicas(d) for d in deps}
        for dep_name, drained in sorted(due.items()):
            replicas = specs.get(dep_name, len(drained))
            new = max(0, replicas - len(drained))
            await self._set_replicas(namespace, dep_name, expect=replicas, replicas=new)
            log.info("%s/%s: drain window over, %d -> %d", namespace, dep_name, replicas, new)
            for pod in drained:
                await self.api.patch(PODS, pod["metadata"]["name"], {"metadata": {"annotations": {
                    ANNOTATION_RELEASED: repr(now)}}}, namespace=namespace)
        # a DG whose two Deployments are both at zero goes away
        deps = await self.api.list(DEPLOYMENTS, namespace=namespace,
                                   label_selector=f"{MANAGED_BY}={MANAGER},{LABEL_SERVICE}={service.name}")
        by_dg: dict[str, list[dict[str, Any]]] = {}
        for dep in deps:
            by_dg.setdefault(dg_name_of(dep) or "", []).append(dep)
        for name, pair in sorted(by_dg.items()):
            if name and all(int((d.get("spec") or {}).get("replicas") or 0) == 0 for d in pair):
                for dep in pair:
                    await self.api.delete(DEPLOYMENTS, dep["metadata"]["name"], namespace=namespace)
                log.info("%s: deployment group %s removed", service.name, name)
        return True

    async def _open_gates(self, service: ServiceConfig, deps: list[dict[str, Any]], pods: list[dict[str, Any]]) -> bool:
        groups = {g.name: g for g in groups_from_objects(service.name, deps, pods)}
        by_dg: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            if not is_draining(pod) and not is_released(pod):
                by_dg.setdefault(_labels(pod).get(LABEL_DG, ""), []).append(pod)
        wrote = False
        for name, members in sorted(by_dg.items()):
            group = groups.get(name)
            if group is None or not group.balanced() or group.prefill.count == 0:
                continue
            admitted = {r: 0 for r in ROLES}
            waiting: dict[str, list[dict[str, Any]]] = {r: [] for r in ROLES}
            unmarked: list[dict[str, Any]] = []
            for pod in members:
                role = _labels(pod).get(LABEL_ROLE)
                if role not in ROLES:
                    continue
                gate = _condition(pod, GATE)
                if gate == "True":
                    if _condition(pod, "ContainersReady") == "True":
                        admitted[role] += 1
                elif _condition(pod, "ContainersReady") == "True":
                    waiting[role].append(pod)
                elif gate is None:
                    unmarked.append(pod)
            let_p, let_d = admit(admitted=(admitted["prefill"], admitted["decode"]),
                                 waiting=(len(waiting["prefill"]), len(waiting["decode"])),
                                 target=(group.prefill.count, group.decode.count),
                                 tolerance=self.settings.ratio_tolerance)
            for role, count in (("prefill", let_p), ("decode", let_d)):
                chosen = sorted(waiting[role], key=lambda p: p["metadata"]["name"])
                for pod in chosen[:count]:
                    await self._set_gate(pod, True, "RatioWithinTolerance",
                                         f"ready P:D of {name} stays within tolerance")
                    wrote = True
                for pod in chosen[count:]:
                    if _condition(pod, GATE) != "False":
                        await self._set_gate(pod, False, "WaitingForRatio",
                                             f"{role} is over-represented among ready pods of {name}")
                        wrote = True
            for pod in unmarked:
                await self._set_gate(pod, False, "NotReadyYet", "the engine is not ready")
                wrote = True
        return wrote

    async def _set_gate(self, pod: Mapping[str, Any], value: bool, reason: str, message: str) -> None:
        meta = pod["metadata"]
        body = {"status": {"conditions": [{
            "type": GATE, "status": "True" if value else "False", "reason": reason, "message": message,
            "lastTransitionTime": format_time(self.clock.time()), "lastProbeTime": None}]}}
        await self.api.patch(PODS, meta["name"], body, namespace=meta["namespace"], subresource="status",
                             patch_type="strategic")

    # ------------------------------------------------------------ apply
    async def apply(self, service: ServiceConfig, decision: Decision) -> ApplyResult:
        if self.dry_run:
            return ApplyResult(applied=decision.current, note="dry-run: nothing written")
        namespace = service.namespace
        deps, pods = await self._objects(service)
        notes: list[str] = []
        if decision.direction == "out" or decision.reason.startswith("latency"):
            restored = await self._restore(pods)
            if restored:
                notes.append(f"restored {restored} draining instance(s)")
                deps, pods = await self._objects(service)
        nodes = await self.api.list(NODES)
        everything = await self.api.request("GET", "/api/v1/pods", query={
            "fieldSelector": "status.phase!=Succeeded,status.phase!=Failed"})
        # draining pods still hold their GPUs until deleted: keep them in the view
        view = build_view(nodes, pods=everything.get("items") or [], keys=self.settings.keys)
        current = groups_from_objects(service.name, deps, pods)
        demand = with_bandwidth(demand_from_service(service, cluster_types={n.gpu_type for n in view.nodes}),
                                self._hints(service, current))
        result = plan(view=view, services=[demand], current={service.name: current},
                      desired={service.name: decision.desired})
        self.last_plan[service.name] = result
        await self._realise(service, namespace, deps, pods, current, result)
        placed = result.placed(service.name)
        short = result.shortfall.get(service.name, PoolCounts(0, 0))
        notes.append(f"placed {placed.prefill}P/{placed.decode}D in "
                     f"{len(result.groups.get(service.name, ()))} group(s)")
        if short.total():
            notes.append(f"shortfall {short.prefill}P/{short.decode}D")
            await self._shortfall_event(service, short, result)
        notes += list(result.reasons.get(service.name, ()))
        # where the measured KV bandwidth steered this cycle (a slow domain avoided or released first)
        notes += list(dict.fromkeys(x.why for x in (*result.allocations, *result.releases)
                                    if "measured KV bandwidth" in x.why))
        return ApplyResult(applied=placed, note="; ".join(notes), shortfall=short)

    def use_bandwidth(self, service: str, bandwidth: ServiceBandwidth | None) -> None:
        """``seams.BandwidthAware``: the measured KV map the next placement of ``service`` uses."""
        self._bandwidth[service] = bandwidth

    def _hints(self, service: ServiceConfig, current: list[DeploymentGroup]) -> PlacementHints:
        return placement_hints(self._bandwidth.get(service.name), group_domains={g.name: g.domain for g in current},
                               affinity_level=LEVEL_OF_AFFINITY[service.affinity])

    async def _restore(self, pods: list[dict[str, Any]]) -> int:
        count = 0
        for pod in pods:
            if not is_draining(pod):
                continue
            meta = pod["metadata"]
            await self.api.patch(PODS, meta["name"], {"metadata": {"annotations": {
                ANNOTATION_DRAINING: None, DELETION_COST: None}}}, namespace=meta["namespace"])
            await self._set_gate(pod, True, "Restored", "scale-in cancelled: the SLO degraded")
            count += 1
        return count

    async def _realise(self, service: ServiceConfig, namespace: str, deps: list[dict[str, Any]],
                       pods: list[dict[str, Any]], current: list[DeploymentGroup],
                       result: PlacementPlan) -> None:
        before = {g.name: g for g in current}
        existing = {d["metadata"]["name"]: d for d in deps}
        templates: dict[str, Mapping[str, Any]] = {}
        for dg in result.groups.get(service.name, ()):
            for role in ROLES:
                dep_name = f"{dg.name}-{role}"
                old = before.get(dg.name)
                grow = dg.role(role).count - (old.role(role).count if old else 0)
                if dep_name not in existing:
                    if role not in templates:
                        templates[role] = await self._template(service, role)
                    body = group_deployment(template=templates[role], service=service.name,
                                            namespace=namespace, dg=dg, role=role, keys=self.settings.keys)
                    await self.api.create(DEPLOYMENTS, body, namespace=namespace)
                    log.info("%s: created %s (%d)", service.name, dep_name, dg.role(role).count)
                elif grow > 0:
                    spec = _spec_replicas(existing[dep_name])
                    await self._set_replicas(namespace, dep_name, expect=spec, replicas=spec + grow)
        for release in result.releases:
            if release.service != service.name:
                continue
            candidates = [p for p in pods if not is_draining(p) and not is_released(p)
                          and _labels(p).get(LABEL_DG) == release.dg and _labels(p).get(LABEL_ROLE) == release.role]
            chosen = pick_for_drain(candidates, release.count,
                                    worst_first=self._hints(service, current).worst_pods)
            if len(chosen) < release.count:
                # instances asked for but without a pod yet: shrink the spec directly
                dep_name = f"{release.dg}-{release.role}"
                spec = _spec_replicas(existing[dep_name]) if dep_name in existing else release.count
                await self._set_replicas(namespace, dep_name, expect=spec,
                                         replicas=max(0, spec - (release.count - len(chosen))))
            for pod in chosen:
                await self._drain(pod)

    async def _set_replicas(self, namespace: str, name: str, *, expect: int, replicas: int) -> None:
        """An absolute replica count, by compare-and-swap against the count this decision was
        made from (``kube.set_replicas``): after a 409 the fresh count is re-read and the same
        absolute count written again; a count someone else changed is not overwritten."""
        await set_replicas(self.api, DEPLOYMENTS, name, namespace=namespace, expect=expect, replicas=replicas)

    async def _drain(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        await self.api.patch(PODS, meta["name"], {"metadata": {"annotations": {
            ANNOTATION_DRAINING: repr(self.clock.time()), DELETION_COST: MIN_DELETION_COST}}},
            namespace=meta["namespace"])
        await self._set_gate(pod, False, "Draining", "chosen for scale-in: out of traffic, under observation")

    async def _template(self, service: ServiceConfig, role: str) -> Mapping[str, Any]:
        workload = template_of(service, role)
        if workload is None:
            raise ConfigError([f"{service.name}.{role}: needs a deployment or statefulset as the "
                               "template of its Deployment Groups"], source="kubernetes backend")
        kind, name = workload
        return await self.api.get(WORKLOADS[kind], name, namespace=service.namespace)

    async def _shortfall_event(self, service: ServiceConfig, short: PoolCounts, result: PlacementPlan) -> None:
        workload = template_of(service, "decode")
        if workload is None:
            return
        kind, name = workload
        reasons = "; ".join(result.reasons.get(service.name, ()))
        event = event_body(api_version="apps/v1", kind=kind, name=name, namespace=service.namespace,
                           reason="PlacementShortfall", warning=True, now_s=self.clock.time(),
                           message=f"could not place {short.prefill} prefill / {short.decode} decode: {reasons}",
                           component=COMPONENT, instance=self.identity)
        try:
            await self.api.create(EVENTS, event, namespace=service.namespace)
        except (ApiError, NotLeaderError) as exc:
            log.warning("%s: could not record the shortfall event: %s", service.name, exc)

    async def close(self) -> None:
        return None          # the client belongs to the caller
