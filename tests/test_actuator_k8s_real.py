"""The Kubernetes actuator against a real kube-apiserver + controller-manager
(k8s-envtest v1.20): two real Deployments scaled together through the scale
subresource, Events and annotations on the server, a kubectl-scale-like manual edit,
the real Deployment controller's readiness counts, and injected failures (a transport
wrapper fails chosen calls; the real server answers the rest)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from heteroscale.coordinator.actuators.kubernetes import (ANNOTATION_DECISION, ANNOTATION_REPLICAS,
                                                      KubernetesActuator)
from heteroscale.coordinator.kube import DEPLOYMENTS, EVENTS, PODS, Kube, RetryPolicy
from heteroscale.coordinator.core.types import Decision, PoolCounts
from heteroscale.coordinator.core.settings import ServiceConfig
from heteroscale.errors import ApiError
from tests.k8s_envtest import (chat_service, deployment_body, eventually, k8s_cluster, k8s_namespace, kube,  # noqa: F401
                               mark_pods_ready)
from tests.k8s_fake import FaultyTransport

pytestmark = pytest.mark.k8s


def svc(namespace: str) -> ServiceConfig:
    return chat_service(namespace)


def decision(cur, new, reason="scale_out_tps") -> Decision:
    return Decision(service="chat", at=time.time(), reason=reason, current=PoolCounts(*cur),
                    desired=PoolCounts(*new), detail="decode tps 7400 > 2400 × 3")


async def setup(kube: Kube, namespace: str, prefill: int = 1, decode: int = 2) -> None:
    await kube.create(DEPLOYMENTS, deployment_body("chat-prefill", prefill), namespace=namespace)
    await kube.create(DEPLOYMENTS, deployment_body("chat-decode", decode), namespace=namespace)


async def replicas(kube: Kube, namespace: str) -> tuple[int, int]:
    p = await kube.get_scale(DEPLOYMENTS, "chat-prefill", namespace=namespace)
    d = await kube.get_scale(DEPLOYMENTS, "chat-decode", namespace=namespace)
    return p["spec"]["replicas"], d["spec"]["replicas"]


def scale_order(watched: FaultyTransport) -> list[str]:
    """Workloads in the order their scale was written; a PUT repeated after a 409 (the
    Deployment controller bumps resourceVersion right after a change) counts once."""
    puts = [p.split("/")[-2] for m, p in watched.calls if m == "PUT" and p.endswith("/scale")]
    return list(dict.fromkeys(puts))


def actuator_over(kube: Kube, **kw) -> tuple[KubernetesActuator, FaultyTransport]:
    watched = FaultyTransport(kube.transport)
    api = Kube(watched, retry=RetryPolicy(attempts=3, base_backoff_s=0.05, max_backoff_s=0.2))
    return KubernetesActuator(api=api, identity="coord-test", **kw), watched


async def test_observe_real_controller_counts(kube, k8s_namespace):
    await setup(kube, k8s_namespace, prefill=2, decode=3)
    actuator, _ = actuator_over(kube)
    # the Deployment controller creates the pods; without a kubelet they stay Pending
    status = await eventually(lambda: _observed_with_pods(actuator, k8s_namespace))
    assert status.current == PoolCounts(2, 3) and status.ready == PoolCounts(0, 0)
    assert status.pending == PoolCounts(2, 3)
    assert status.pending_since_s is not None and abs(status.pending_since_s - time.time()) < 120
    # act as the kubelet for 2 decode pods: the controller counts them ready
    await mark_pods_ready(kube, k8s_namespace, "chat-decode", 2)

    async def two_ready():
        s = await actuator.observe(svc(k8s_namespace))
        return s if s.ready.decode == 2 else None

    status = await eventually(two_ready)
    assert status.pending == PoolCounts(2, 1)
    # report collection finds exactly the running decode pods, with their IPs
    found = await actuator.list_pods(svc(k8s_namespace), "decode")
    assert sorted(ip for _, ip in found) == ["10.244.0.1", "10.244.0.2"]
    assert await actuator.list_pods(svc(k8s_namespace), "prefill") == []


async def _observed_with_pods(actuator, namespace):
    status = await actuator.observe(svc(namespace))
    pods = await actuator.api.list(PODS, namespace=namespace)
    return status if len(pods) == 5 else None


async def test_scales_both_together_with_events_and_annotations(kube, k8s_namespace):
    await setup(kube, k8s_namespace)
    actuator, watched = actuator_over(kube)
    assert (await actuator.observe(svc(k8s_namespace))).current == PoolCounts(1, 2)
    result = await actuator.apply(svc(k8s_namespace), decision((1, 2), (2, 4)))
    assert result.applied == PoolCounts(2, 4)
    assert await replicas(kube, k8s_namespace) == (2, 4)
    assert scale_order(watched) == ["chat-decode", "chat-prefill"]   # scale-out: decode first
    for name, n in (("chat-prefill", 2), ("chat-decode", 4)):
        obj = await kube.get(DEPLOYMENTS, name, namespace=k8s_namespace)
        assert obj["metadata"]["annotations"][ANNOTATION_REPLICAS] == str(n)
        assert json.loads(obj["metadata"]["annotations"][ANNOTATION_DECISION])["reason"] == "scale_out_tps"
        events = await kube.list(EVENTS, namespace=k8s_namespace,
                                 field_selector=f"involvedObject.name={name}")
        ours = [e for e in events if e.get("source", {}).get("component") == "heteroscale-coordinator"]
        assert [e["reason"] for e in ours] == ["scale_out_tps"]
        assert "prefill 1->2, decode 2->4" in ours[0]["message"]
        assert ours[0]["involvedObject"]["kind"] == "Deployment"
    # the controller follows: 6 pods in all
    await eventually(lambda: _pod_count(kube, k8s_namespace, 6))
    # scale-in: prefill first
    watched.calls.clear()
    await actuator.observe(svc(k8s_namespace))
    await actuator.apply(svc(k8s_namespace), decision((2, 4), (1, 3), "scale_in_tps"))
    assert scale_order(watched) == ["chat-prefill", "chat-decode"]
    assert await replicas(kube, k8s_namespace) == (1, 3)


async def _pod_count(kube, namespace, n):
    pods = await kube.list(PODS, namespace=namespace)
    return len([p for p in pods if not p["metadata"].get("deletionTimestamp")]) == n


async def test_manual_scale_is_detected(kube, k8s_cluster, k8s_namespace):
    await setup(kube, k8s_namespace)
    actuator, _ = actuator_over(kube)
    await actuator.observe(svc(k8s_namespace))
    await actuator.apply(svc(k8s_namespace), decision((1, 2), (2, 3)))
    assert not (await actuator.observe(svc(k8s_namespace))).manual_override
    stale, _ = actuator_over(kube)           # a second coordinator that decided before the edit
    await stale.observe(svc(k8s_namespace))
    # what `kubectl scale deployment chat-decode --replicas=7` does: patch the scale subresource
    _, apps = k8s_cluster.core()
    try:
        await asyncio.to_thread(apps.patch_namespaced_deployment_scale, "chat-decode",
                                k8s_namespace, {"spec": {"replicas": 7}})
    finally:
        apps.api_client.close()
    status = await actuator.observe(svc(k8s_namespace))
    assert status.manual_override and status.current == PoolCounts(2, 7)
    # a decision taken before the edit is not forced over it
    with pytest.raises(ApiError) as info:
        await stale.apply(svc(k8s_namespace), decision((2, 3), (3, 5)))
    assert info.value.status == 409
    assert await replicas(kube, k8s_namespace) == (2, 7)
    # the next decision made from the human's numbers re-stamps and clears the override
    await actuator.apply(svc(k8s_namespace), decision((2, 7), (3, 8)))
    status = await actuator.observe(svc(k8s_namespace))
    assert not status.manual_override and status.current == PoolCounts(3, 8)


async def test_survives_injected_failures_and_compensates(kube, k8s_namespace):
    await setup(kube, k8s_namespace)
    actuator, watched = actuator_over(kube)
    await actuator.observe(svc(k8s_namespace))
    # transient: one 429 with Retry-After and one timeout, both retried
    watched.inject(429, method="PUT", path_contains="chat-decode/scale", retry_after_s=0.2)
    watched.inject(0, method="PUT", path_contains="chat-prefill/scale")
    await actuator.apply(svc(k8s_namespace), decision((1, 2), (2, 3)))
    assert await replicas(kube, k8s_namespace) == (2, 3)
    # persistent 500 on prefill: decode is written, then compensated back
    await actuator.observe(svc(k8s_namespace))
    watched.inject(500, method="PUT", path_contains="chat-prefill/scale", times=100)
    with pytest.raises(ApiError) as info:
        await actuator.apply(svc(k8s_namespace), decision((2, 3), (3, 5)))
    assert "compensated decode 5->3" in str(info.value)
    assert await replicas(kube, k8s_namespace) == (2, 3)
    watched.clear_faults()
    status = await actuator.observe(svc(k8s_namespace))
    assert status.current == PoolCounts(2, 3) and not status.manual_override
    # and the next tick's decision goes through
    await actuator.apply(svc(k8s_namespace), decision((2, 3), (3, 5)))
    assert await replicas(kube, k8s_namespace) == (3, 5)


async def test_dry_run_writes_nothing_on_the_server(kube, k8s_namespace):
    await setup(kube, k8s_namespace)
    actuator, watched = actuator_over(kube, dry_run=True)
    await actuator.observe(svc(k8s_namespace))
    result = await actuator.apply(svc(k8s_namespace), decision((1, 2), (4, 8)))
    assert "dry-run" in result.note and watched.writes() == []
    assert await replicas(kube, k8s_namespace) == (1, 2)
