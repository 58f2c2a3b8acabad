"""Deployment Groups against a REAL kube-apiserver with the real scheduler and controllers
(k8s-envtest v1.20, marker ``k8s``; skipped when it is not installed).

Labelled fake Node objects (status.allocatable nvidia.com/gpu, Ready condition) stand for
the GPU machines. The actuator creates each DG's Deployments; the real Deployment and
ReplicaSet controllers create the pods and the real scheduler binds them. The tests
assert on ``pod.spec.nodeName``: every pod sits on a node of its DG's switch and GPU
type. There is no kubelet, so a helper (``kubelet`` in test_groups_k8s.py) plays its part
in pod status to exercise the ready-ratio gate and soft scale-in.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from heteroscale.coordinator.actuators.groups import (ANNOTATION_GROUP, LABEL_DG, LABEL_ROLE, MANAGED_BY,
                                                  DeploymentGroupActuator, GroupSettings, is_draining)
from heteroscale.coordinator.kube import DEPLOYMENTS, EVENTS, NODES, PODS, Kube
from heteroscale.coordinator.core.types import PoolCounts
from tests.k8s_envtest import eventually, k8s_cluster, k8s_namespace, kube  # noqa: F401
from tests.k8s_fake import FakeClock
from tests.test_groups_k8s import (H20, L20, decision, gate_of, kubelet, service_config, template,
                                   tier_nodes)

pytestmark = pytest.mark.k8s


@pytest.fixture
async def cluster_nodes(kube: Kube):  # noqa: F811
    """This test's GPU nodes (unique names and switch values), removed afterwards."""
    prefix = f"n{uuid.uuid4().hex[:5]}"
    nodes = tier_nodes(prefix)
    for node in nodes:
        await kube.create(NODES, node)
    yield prefix, {n["metadata"]["name"]: n["metadata"]["labels"] for n in nodes}
    for node in nodes:
        await kube.delete(NODES, node["metadata"]["name"])


async def dg_pods(kube: Kube, namespace: str) -> list[dict]:  # noqa: F811
    pods = await kube.list(PODS, namespace=namespace, label_selector=f"{MANAGED_BY}=heteroscale")
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


async def all_bound(kube: Kube, namespace: str, count: int):  # noqa: F811
    async def check():
        pods = await dg_pods(kube, namespace)
        return pods if len(pods) == count and all(p["spec"].get("nodeName") for p in pods) else None
    return await eventually(check, timeout_s=45)


async def setup_templates(kube: Kube, namespace: str) -> None:  # noqa: F811
    for role in ("prefill", "decode"):
        await kube.create(DEPLOYMENTS, template(f"chat-{role}", role, namespace), namespace=namespace)


def assert_on_dg_nodes(pods: list[dict], deployments: list[dict], labels_of: dict[str, dict]) -> None:
    """Every pod is bound to a node of its DG's switch(es) and its role's GPU type."""
    info = {(d["metadata"]["labels"][LABEL_DG], d["metadata"]["labels"][LABEL_ROLE]):
            json.loads(d["metadata"]["annotations"][ANNOTATION_GROUP]) for d in deployments}
    for pod in pods:
        key = (pod["metadata"]["labels"][LABEL_DG], pod["metadata"]["labels"][LABEL_ROLE])
        group = info[key]
        node = labels_of[pod["spec"]["nodeName"]]
        assert node["nvidia.com/gpu.product"] == group["gpu_type"], pod["metadata"]["name"]
        if group["level"] in ("s1", "s2"):
            assert node["heteroscale.io/s2"] == group["s2"]
        if group["level"] == "s1":
            assert node["heteroscale.io/s1"] == group["s1"]


async def test_real_scheduler_binds_dg_pods_to_switch_and_gpu_type(kube, k8s_namespace, cluster_nodes):  # noqa: F811
    prefix, labels_of = cluster_nodes
    await setup_templates(kube, k8s_namespace)
    act = DeploymentGroupActuator(api=kube)
    svc = service_config(k8s_namespace)                     # s2 affinity, L20 prefill, H20 decode
    result = await act.apply(svc, decision(PoolCounts(0, 0), PoolCounts(9, 7)))
    assert result.applied == PoolCounts(9, 7) and result.shortfall == PoolCounts(0, 0)
    pods = await all_bound(kube, k8s_namespace, 16)
    deps = await kube.list(DEPLOYMENTS, namespace=k8s_namespace, label_selector=f"{MANAGED_BY}=heteroscale")
    assert sorted(d["metadata"]["name"] for d in deps) == ["chat-g0-decode", "chat-g0-prefill"]
    assert_on_dg_nodes(pods, deps, labels_of)
    # the medium-tier S2 (an L20 S1 beside an H20 S1) was chosen, as the plan said
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert {labels_of[n]["heteroscale.io/s2"] for n in nodes} == {f"{prefix}-s2-het"}
    by_role = {r: {labels_of[p["spec"]["nodeName"]]["nvidia.com/gpu.product"] for p in pods
                   if p["metadata"]["labels"][LABEL_ROLE] == r} for r in ("prefill", "decode")}
    assert by_role == {"prefill": {L20}, "decode": {H20}}
    status = await act.observe(svc)
    assert status.current == PoolCounts(9, 7) and status.ready == PoolCounts(0, 0)


async def test_s1_affinity_high_tier_and_shortfall_leaves_nothing_pending(kube, k8s_namespace,  # noqa: F811
                                                                          cluster_nodes):
    prefix, labels_of = cluster_nodes
    await setup_templates(kube, k8s_namespace)
    act = DeploymentGroupActuator(api=kube)
    svc = service_config(k8s_namespace, affinity="s1", prefill_types=(L20,))
    # only S1 "mix" joins L20 and H20 under one switch: 8 + 8 GPUs; asked 10:10
    result = await act.apply(svc, decision(PoolCounts(0, 0), PoolCounts(10, 10)))
    assert result.applied == PoolCounts(8, 8) and result.shortfall == PoolCounts(2, 2)
    pods = await all_bound(kube, k8s_namespace, 16)       # every created pod is bound: none Pending forever
    deps = await kube.list(DEPLOYMENTS, namespace=k8s_namespace, label_selector=f"{MANAGED_BY}=heteroscale")
    assert_on_dg_nodes(pods, deps, labels_of)
    assert {p["spec"]["nodeName"] for p in pods} == {f"{prefix}-mix-l20-0", f"{prefix}-mix-h20-0"}
    events = await kube.list(EVENTS, namespace=k8s_namespace)
    assert any(e["reason"] == "PlacementShortfall" for e in events)


async def test_ready_ratio_gate_and_soft_scale_in_with_real_replicasets(kube, k8s_namespace,  # noqa: F811
                                                                        cluster_nodes):
    prefix, labels_of = cluster_nodes
    await setup_templates(kube, k8s_namespace)
    clock = FakeClock(start_s=time.time())
    act = DeploymentGroupActuator(api=kube, clock=clock, settings=GroupSettings(drain_window_s=60))
    svc = service_config(k8s_namespace, ratio="1:1", prefill_types=(H20,))
    await act.apply(svc, decision(PoolCounts(0, 0), PoolCounts(3, 3)))
    await all_bound(kube, k8s_namespace, 6)

    # prefill engines up, decode not: the gate keeps prefill out of traffic
    await kubelet(kube, k8s_namespace, roles=("prefill",))
    await act.observe(svc)
    pods = await dg_pods(kube, k8s_namespace)
    assert {gate_of(p) for p in pods} == {"False"}
    await kubelet(kube, k8s_namespace, roles=("prefill",))
    assert (await act.observe(svc)).ready == PoolCounts(0, 0)

    # decode up too: both admitted; the kubelet stand-in turns them Ready
    await kubelet(kube, k8s_namespace)
    await act.observe(svc)
    await kubelet(kube, k8s_namespace)
    status = await act.observe(svc)
    assert status.ready == PoolCounts(3, 3)

    # soft scale-in to 2:2: one of each role leaves traffic, nothing is deleted yet
    await act.apply(svc, decision(PoolCounts(3, 3), PoolCounts(2, 2), reason="scale_in_tps"))
    await kubelet(kube, k8s_namespace)
    pods = await dg_pods(kube, k8s_namespace)
    drained = {p["metadata"]["name"] for p in pods if is_draining(p)}
    assert len(drained) == 2 and len(pods) == 6
    status = await act.observe(svc)
    assert status.current == PoolCounts(2, 2) and status.ready == PoolCounts(2, 2)

    # the window passes: the Deployments shrink and the real ReplicaSets delete exactly the drained pods
    await clock.advance(61)
    await act.observe(svc)

    async def settled():
        live = {p["metadata"]["name"] for p in await dg_pods(kube, k8s_namespace)}
        return live if len(live) == 4 else None
    live = await eventually(settled, timeout_s=45)
    assert not live & drained
    for name in ("chat-g0-prefill", "chat-g0-decode"):
        assert (await kube.get(DEPLOYMENTS, name, namespace=k8s_namespace))["spec"]["replicas"] == 2
    status = await act.observe(svc)
    assert status.current == PoolCounts(2, 2)
