"""Deployment Groups on Kubernetes, fast tier: the pure pieces (gate arithmetic, the DG
Deployment body, DGs read back from objects) and the actuator against the in-memory fake
API (tests/k8s_fake.py). The same flows run against a real kube-apiserver with the
scheduler and controllers in tests/test_groups_k8s_envtest.py.

Helpers here (nodes, templates, config, a kubelet stand-in) are shared with that tier.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from heteroscale.coordinator.actuators.groups import (
    ANNOTATION_DRAINING, DELETION_COST, GATE, LABEL_DG, LABEL_ROLE, MANAGED_BY, DeploymentGroupActuator,
    GroupSettings, group_deployment, groups_from_objects, is_draining, node_affinity_terms, pick_for_drain)
from heteroscale.coordinator.core.gate import admit, within
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.kube import DEPLOYMENTS, NODES, PODS, Kube, RetryPolicy
from heteroscale.coordinator.core.placement import DeploymentGroup, RoleGroup
from heteroscale.coordinator.core.topology import TopologyKeys
from heteroscale.coordinator.core.types import Decision, PoolCounts
from heteroscale.errors import NotLeaderError
from tests.k8s_fake import FakeClock, FakeKube

DATA = Path(__file__).resolve().parent / "data"
L20, H20 = "NVIDIA-L20", "NVIDIA-H20"


# ---------------------------------------------------------------- shared helpers


def tier_nodes(prefix: str) -> list[dict]:
    """tests/data/nodes_tiers.yaml with node names and switch values prefixed, so that
    tests sharing one control plane do not share capacity."""
    doc = yaml.safe_load((DATA / "nodes_tiers.yaml").read_text())
    out = []
    for item in doc["items"]:
        node = copy.deepcopy(item)
        meta = node["metadata"]
        for key in ("resourceVersion", "uid"):
            meta.pop(key, None)
        meta["name"] = f"{prefix}-{meta['name']}"
        labels = meta["labels"]
        labels["kubernetes.io/hostname"] = meta["name"]
        for key in ("heteroscale.io/s1", "heteroscale.io/s2"):
            if key in labels:
                labels[key] = f"{prefix}-{labels[key]}"
        out.append(node)
    return out


def template(name: str, role: str, namespace: str) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "chat", "role": role}},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "chat", "role": role, "tmpl": "yes"}},
                     "template": {"metadata": {"labels": {"app": "chat", "role": role, "tmpl": "yes"}},
                                  "spec": {"terminationGracePeriodSeconds": 0,
                                           "containers": [{"name": "engine", "image": "registry.invalid/engine:1",
                                                           "resources": {"limits": {"nvidia.com/gpu": "1"},
                                                                         "requests": {"cpu": "10m"}}}]}}}}


def service_config(namespace: str, *, affinity: str = "s2", ratio: str = "9:7",
                   prefill_types=(L20, H20), decode_types=(H20,)):
    text = yaml.safe_dump({
        "coordinator": {"backend": "kubernetes"},
        "services": [{"name": "chat", "namespace": namespace, "priority": 5, "affinity": affinity,
                      "pd_ratio": ratio, "target_decode_tps_per_instance": 1000.0, "slo": {"tbt_s": 0.1},
                      "prefill": {"deployment": "chat-prefill", "gpu_types": list(prefill_types)},
                      "decode": {"deployment": "chat-decode", "gpu_types": list(decode_types)}}]})
    return load_config(text).services[0]


def decision(current: PoolCounts, desired: PoolCounts, reason: str = "scale_out_tps") -> Decision:
    return Decision(service="chat", at=0.0, reason=reason, current=current, desired=desired)


async def kubelet(api: Kube, namespace: str, *, engine_ready: set[str] | None = None,
                  roles: tuple[str, ...] = ("prefill", "decode")) -> list[dict]:
    """Stand in for the kubelet (there is none): bound pods go Running; ContainersReady is
    True for pods of ``roles`` (or named in ``engine_ready``); Ready = ContainersReady AND
    every readiness gate condition True, as the kubelet computes it."""
    pods = await api.list(PODS, namespace=namespace, label_selector=f"{MANAGED_BY}=heteroscale")
    out = []
    for pod in pods:
        if not pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
            continue
        name = pod["metadata"]["name"]
        role = pod["metadata"]["labels"][LABEL_ROLE]
        engine = name in engine_ready if engine_ready is not None else role in roles
        conds = {c["type"]: c for c in pod.get("status", {}).get("conditions") or []}
        gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
        gates_ok = all(conds.get(g, {}).get("status") == "True" for g in gates)
        ready = engine and gates_ok
        body = {"status": {"phase": "Running", "conditions": [
            {"type": "ContainersReady", "status": "True" if engine else "False"},
            {"type": "Ready", "status": "True" if ready else "False"}]}}
        out.append(await api.patch(PODS, name, body, namespace=namespace, subresource="status",
                                   patch_type="strategic"))
    return out


def gate_of(pod: dict) -> str | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond["type"] == GATE:
            return cond["status"]
    return None


# ---------------------------------------------------------------- pure pieces


def test_within_worked_examples():
    # target 9:7 = 1.2857; tolerance 0.25 -> band 0.3214
    assert within(1, 1, (9, 7), 0.25)          # |1 - 1.2857| = 0.2857
    assert not within(2, 1, (9, 7), 0.25)      # 0.714
    assert within(9, 7, (9, 7), 0.0)
    assert not within(3, 0, (9, 7), 0.25) and not within(0, 3, (9, 7), 0.25)


def test_admit_holds_prefill_until_decode_is_up():
    # 3 prefill engines ready, no decode: nothing takes traffic (prefill alone is useless)
    assert admit(admitted=(0, 0), waiting=(3, 0), target=(9, 7), tolerance=0.25) == (0, 0)
    # decode arrives: the largest in-band set: 3P needs d with |3/d - 1.286| <= 0.321 -> d=2 or 3
    assert admit(admitted=(0, 0), waiting=(3, 3), target=(9, 7), tolerance=0.25) == (3, 3)
    assert admit(admitted=(0, 0), waiting=(3, 2), target=(9, 7), tolerance=0.25) == (3, 2)
    # 2 decode admitted, 4 prefill waiting: 3P/2D = 1.5 is in band (<= 1.607), 4P/2D = 2 is not
    assert admit(admitted=(0, 2), waiting=(4, 0), target=(9, 7), tolerance=0.25) == (3, 0)


def test_admit_moves_toward_the_ratio_when_out_of_band():
    # admitted 5P/1D (decode died): no in-band set reachable with 1 waiting decode -> 5/2=2.5 is
    # still out of band but closer to 1.286 than 5/1, so it is admitted
    assert admit(admitted=(5, 1), waiting=(0, 1), target=(9, 7), tolerance=0.1) == (0, 1)
    # admitting the extra prefill would move away: refused
    assert admit(admitted=(5, 1), waiting=(2, 0), target=(9, 7), tolerance=0.1) == (0, 0)


def test_group_deployment_body():
    dg = DeploymentGroup("chat-g0", "chat", "s1", "S", "x", RoleGroup(L20, 3), RoleGroup(H20, 2))
    tmpl = template("chat-prefill", "prefill", "ns")
    tmpl["spec"]["template"]["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                              {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}]}}}
    body = group_deployment(template=tmpl, service="chat", namespace="ns", dg=dg, role="prefill",
                            keys=TopologyKeys())
    assert body["metadata"]["name"] == "chat-g0-prefill" and body["spec"]["replicas"] == 3
    assert body["metadata"]["labels"][MANAGED_BY] == "heteroscale"
    assert body["spec"]["selector"]["matchLabels"] == {LABEL_DG: "chat-g0", LABEL_ROLE: "prefill"}
    pod = body["spec"]["template"]
    assert pod["metadata"]["labels"]["app"] == "chat" and pod["metadata"]["labels"][LABEL_DG] == "chat-g0"
    assert pod["spec"]["readinessGates"] == [{"conditionType": GATE}]
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    # our constraints are ANDed into each of the template's ORed terms
    assert len(terms) == 2
    for term in terms:
        keys = {(e["key"], tuple(e["values"])) for e in term["matchExpressions"]}
        assert {("nvidia.com/gpu.product", (L20,)), ("heteroscale.io/s2", ("S",)),
                ("heteroscale.io/s1", ("x",))} <= keys
    assert json.loads(body["metadata"]["annotations"]["heteroscale.io/group"]) == {
        "level": "s1", "s2": "S", "s1": "x", "gpu_type": L20}
    # the template object is not modified
    assert "readinessGates" not in tmpl["spec"]["template"]["spec"]


def test_node_affinity_without_template_affinity():
    aff = node_affinity_terms(None, [{"key": "k", "operator": "In", "values": ["v"]}])
    assert aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "k", "operator": "In", "values": ["v"]}]}]


def test_groups_from_objects_subtracts_draining_and_pins_bound_pods():
    dg = DeploymentGroup("chat-g0", "chat", "s2", "S", "", RoleGroup(L20, 2), RoleGroup(H20, 1))
    deps = [group_deployment(template=template("t", r, "ns"), service="chat", namespace="ns", dg=dg, role=r,
                             keys=TopologyKeys()) for r in ("prefill", "decode")]

    def pod(name, role, node, draining=False):
        ann = {ANNOTATION_DRAINING: "1"} if draining else {}
        return {"metadata": {"name": name, "labels": {LABEL_DG: "chat-g0", LABEL_ROLE: role}, "annotations": ann},
                "spec": {"nodeName": node}, "status": {"phase": "Running"}}
    pods = [pod("p1", "prefill", "n1"), pod("p2", "prefill", "n2", draining=True), pod("d1", "decode", "n3")]
    (got,) = groups_from_objects("chat", deps, pods)
    assert got.counts == PoolCounts(1, 1)
    assert got.prefill.nodes == {"n1": 1} and got.decode.nodes == {"n3": 1}
    assert (got.level, got.s2, got.prefill.gpu_type) == ("s2", "S", L20)


def test_pick_for_drain_prefers_unready_then_newest():
    def pod(name, ready, created):
        return {"metadata": {"name": name, "creationTimestamp": created},
                "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
    pods = [pod("old", True, "2026-01-01T00:00:00Z"), pod("new", True, "2026-01-02T00:00:00Z"),
            pod("sick", False, "2025-01-01T00:00:00Z")]
    assert [p["metadata"]["name"] for p in pick_for_drain(pods, 2)] == ["sick", "new"]


def test_settings_validation():
    with pytest.raises(ValueError):
        GroupSettings(ratio_tolerance=-1)
    with pytest.raises(ValueError):
        GroupSettings(drain_window_s=-5)


# ---------------------------------------------------------------- the actuator on the fake API


@pytest.fixture
async def fake():
    clock = FakeClock()
    transport = FakeKube(clock=clock.time)
    api = Kube(transport, retry=RetryPolicy(attempts=1))
    transport.add_namespace("ns")
    for node in tier_nodes("f"):
        await api.create(NODES, node)
    for role in ("prefill", "decode"):
        await api.create(DEPLOYMENTS, template(f"chat-{role}", role, "ns"), namespace="ns")
    act = DeploymentGroupActuator(api=api, clock=clock, settings=GroupSettings(drain_window_s=60))
    yield api, transport, clock, act


async def _replicaset(api: Kube, namespace: str, node_of: dict[str, str]) -> None:
    """Stand in for the Deployment+ReplicaSet controllers and the scheduler (the fake has
    none): make each DG Deployment's pod count match spec, bound to a node of its domain."""
    deps = await api.list(DEPLOYMENTS, namespace=namespace, label_selector=f"{MANAGED_BY}=heteroscale")
    for dep in deps:
        name = dep["metadata"]["name"]
        want = dep["spec"]["replicas"]
        pods = [p for p in await api.list(PODS, namespace=namespace,
                                          label_selector=f"{LABEL_DG}={dep['metadata']['labels'][LABEL_DG]},"
                                                         f"{LABEL_ROLE}={dep['metadata']['labels'][LABEL_ROLE]}")]
        for i in range(len(pods), want):
            body = copy.deepcopy(dep["spec"]["template"])
            body["metadata"]["name"] = f"{name}-{i}"
            body["spec"]["nodeName"] = node_of[dep["metadata"]["labels"][LABEL_ROLE]]
            await api.create(PODS, {"apiVersion": "v1", "kind": "Pod", **body}, namespace=namespace)
        # scale-down: the ReplicaSet deletes NotReady pods first
        extra = len(pods) - want
        if extra > 0:
            ranked = sorted(pods, key=lambda p: (gate_of(p) == "True", p["metadata"]["name"]))
            for pod in ranked[:extra]:
                await api.delete(PODS, pod["metadata"]["name"], namespace=namespace)


async def test_fake_scale_out_gate_and_soft_scale_in(fake):
    api, transport, clock, act = fake
    svc = service_config("ns")
    result = await act.apply(svc, decision(PoolCounts(0, 0), PoolCounts(3, 2)))
    assert result.applied == PoolCounts(3, 2) and result.shortfall == PoolCounts(0, 0)
    deps = {d["metadata"]["name"]: d for d in await api.list(DEPLOYMENTS, namespace="ns",
                                                             label_selector=f"{MANAGED_BY}=heteroscale")}
    assert set(deps) == {"chat-g0-prefill", "chat-g0-decode"}
    expr = deps["chat-g0-prefill"]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
    assert {"key": "heteroscale.io/s2", "operator": "In", "values": ["f-s2-het"]} in expr
    assert deps["chat-g0-prefill"]["spec"]["replicas"] == 3

    await _replicaset(api, "ns", {"prefill": "f-het-l20-0", "decode": "f-het-h20-0"})
    # only prefill engines are up: the gate keeps them out of traffic
    await kubelet(api, "ns", roles=("prefill",))
    status = await act.observe(svc)
    pods = await api.list(PODS, namespace="ns")
    assert {gate_of(p) for p in pods} == {"False"}
    assert status.ready == PoolCounts(0, 0) and status.current == PoolCounts(3, 2)
    # decode engines come up: both roles admitted together
    await kubelet(api, "ns")
    await act.observe(svc)
    await kubelet(api, "ns")
    status = await act.observe(svc)
    assert status.ready == PoolCounts(3, 2)

    # scale in to 2:1 -> one prefill and one decode drain (out of traffic), nothing deleted yet
    result = await act.apply(svc, decision(PoolCounts(3, 2), PoolCounts(2, 1), reason="scale_in_tps"))
    pods = await api.list(PODS, namespace="ns")
    drained = [p for p in pods if is_draining(p)]
    assert len(drained) == 2 and {gate_of(p) for p in drained} == {"False"}
    assert all(p["metadata"]["annotations"][DELETION_COST] == str(-(2 ** 31)) for p in drained)
    await kubelet(api, "ns")
    status = await act.observe(svc)
    assert status.current == PoolCounts(2, 1) and status.ready == PoolCounts(2, 1)
    assert (await api.get(DEPLOYMENTS, "chat-g0-prefill", namespace="ns"))["spec"]["replicas"] == 3

    # the window passes: Deployments shrink; the (stand-in) ReplicaSet deletes the drained pods
    await clock.advance(61)
    await act.observe(svc)
    assert (await api.get(DEPLOYMENTS, "chat-g0-prefill", namespace="ns"))["spec"]["replicas"] == 2
    assert (await api.get(DEPLOYMENTS, "chat-g0-decode", namespace="ns"))["spec"]["replicas"] == 1
    await _replicaset(api, "ns", {})
    left = {p["metadata"]["name"] for p in await api.list(PODS, namespace="ns")}
    assert not left & {p["metadata"]["name"] for p in drained}
    status = await act.observe(svc)
    assert status.current == PoolCounts(2, 1)


async def test_fake_restore_on_slo_degradation(fake):
    api, transport, clock, act = fake
    svc = service_config("ns", prefill_types=(H20,))
    await act.apply(svc, decision(PoolCounts(0, 0), PoolCounts(2, 2)))
    await _replicaset(api, "ns", {"prefill": "f-homo-a-h20-0", "decode": "f-homo-a-h20-1"})
    await kubelet(api, "ns")
    await act.observe(svc)
    await act.apply(svc, decision(PoolCounts(2, 2), PoolCounts(1, 1), reason="scale_in_tps"))
    assert sum(is_draining(p) for p in await api.list(PODS, namespace="ns")) == 2
    await clock.advance(10)   # inside the window: the latency net fires
    result = await act.apply(svc, decision(PoolCounts(1, 1), PoolCounts(2, 2), reason="latency_moderate"))
    assert "restored 2" in result.note
    pods = await api.list(PODS, namespace="ns")
    assert not any(is_draining(p) for p in pods) and {gate_of(p) for p in pods} == {"True"}
    # nothing new was created: the restored pods were enough
    assert (await api.get(DEPLOYMENTS, "chat-g0-prefill", namespace="ns"))["spec"]["replicas"] == 2
    assert not transport.writes("/deployments/chat-g1")


async def test_fake_shortfall_event_and_dg_removal(fake):
    api, transport, clock, act = fake
    svc = service_config("ns", affinity="s1", prefill_types=(L20,))
    # only S1 "mix" has L20+H20 under one switch: 8+8 GPUs; ask 10:10
    result = await act.apply(svc, decision(PoolCounts(0, 0), PoolCounts(10, 10)))
    assert result.applied == PoolCounts(8, 8) and result.shortfall == PoolCounts(2, 2)
    events = transport.objects("events", "ns")
    assert [e["reason"] for e in events] == ["PlacementShortfall"]
    # scale to zero: the whole DG drains, then its Deployments go
    await _replicaset(api, "ns", {"prefill": "f-mix-l20-0", "decode": "f-mix-h20-0"})
    await act.apply(svc, decision(PoolCounts(8, 8), PoolCounts(0, 0), reason="scale_in_tps"))
    await clock.advance(61)
    await act.observe(svc)
    assert await api.list(DEPLOYMENTS, namespace="ns", label_selector=f"{MANAGED_BY}=heteroscale") == []


async def test_fake_dry_run_and_fence(fake):
    api, transport, clock, act = fake
    svc = service_config("ns")
    dry = DeploymentGroupActuator(api=api, clock=clock, dry_run=True)
    assert not dry.writes
    result = await dry.apply(svc, decision(PoolCounts(0, 0), PoolCounts(2, 2)))
    assert "dry-run" in result.note and not transport.writes("/deployments/chat-g")

    class Closed:
        async def permit(self, what: str) -> float:
            raise NotLeaderError(f"not the leader: refused to {what}")

    fenced = DeploymentGroupActuator(api=api.fenced(Closed()), clock=clock)
    with pytest.raises(NotLeaderError, match="not the leader"):
        await fenced.apply(svc, decision(PoolCounts(0, 0), PoolCounts(2, 2)))
    assert not transport.writes("/deployments/chat-g")


async def test_fake_sync_failure_still_reports_counts(fake):
    api, transport, clock, act = fake
    svc = service_config("ns", prefill_types=(H20,))
    await act.apply(svc, decision(PoolCounts(0, 0), PoolCounts(1, 1)))
    await _replicaset(api, "ns", {"prefill": "f-homo-a-h20-0", "decode": "f-homo-a-h20-1"})
    await kubelet(api, "ns")
    transport.inject(500, method="PATCH", path_contains="/status", times=1)
    status = await act.observe(svc)
    assert status.current == PoolCounts(1, 1) and status.ready == PoolCounts(0, 0)
    assert "500" in act.last_sync_error
    # next tick the gate opens
    await act.observe(svc)
    await kubelet(api, "ns")
    assert (await act.observe(svc)).ready == PoolCounts(1, 1) and act.last_sync_error is None


async def test_fake_scale_writes_survive_conflicts(fake):
    # The Deployment controller bumps resourceVersion right after every change, so a
    # compare-and-swap on the scale subresource meets 409s on a real server: the
    # actuator re-reads and writes again instead of failing the tick.
    api, transport, clock, act = fake
    svc = service_config("ns")
    await act.apply(svc, decision(PoolCounts(0, 0), PoolCounts(3, 2)))
    transport.inject(409, method="PUT", path_contains="/scale", times=2)
    # no pods exist yet, so the scale-in shrinks the specs directly
    await act.apply(svc, decision(PoolCounts(3, 2), PoolCounts(2, 1), reason="scale_in_tps"))
    assert (await api.get(DEPLOYMENTS, "chat-g0-prefill", namespace="ns"))["spec"]["replicas"] == 2
    assert (await api.get(DEPLOYMENTS, "chat-g0-decode", namespace="ns"))["spec"]["replicas"] == 1
