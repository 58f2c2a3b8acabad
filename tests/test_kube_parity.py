"""The fake keeps faith with the real server: the same scenarios, run through ``Kube``
against ``tests/k8s_fake.FakeKube`` and against a real kube-apiserver (k8s-envtest),
must give the same answers (status codes, what is stored, what lists return).

The real half is marked ``k8s`` and skips when k8s-envtest is not installed; the fake
half always runs, so a drift shows up as a failure on the real tier."""

from __future__ import annotations

import uuid

import pytest

from heteroscale.coordinator.kube import (DEPLOYMENTS, EVENTS, LEASES, NAMESPACES, NODES, PODS, Kube,
                                      format_time)
from heteroscale.errors import ApiError
from tests.k8s_envtest import deployment_body, k8s_cluster  # noqa: F401
from tests.k8s_fake import FakeKube


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.k8s)])
async def api(request):
    """(Kube, namespace) on the fake or on the real server."""
    namespace = f"parity-{uuid.uuid4().hex[:6]}"
    if request.param == "fake":
        kube = Kube(FakeKube())
    else:
        from heteroscale.coordinator.kube import kube_from_config

        cluster = request.getfixturevalue("k8s_cluster")
        kube = kube_from_config(kubeconfig=str(cluster.kubeconfig))
    await kube.create(NAMESPACES, {"metadata": {"name": namespace}})
    yield kube, namespace
    try:
        await kube.delete(NAMESPACES, namespace)
    finally:
        await kube.close()


async def status_of(call) -> int:
    try:
        await call
    except ApiError as exc:
        return exc.status
    return 200


async def test_create_get_conflicts(api):
    kube, ns = api
    created = await kube.create(DEPLOYMENTS, deployment_body("d", 2), namespace=ns)
    assert created["metadata"]["generation"] == 1 and created["spec"]["replicas"] == 2
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    assert await status_of(kube.create(DEPLOYMENTS, deployment_body("d", 2), namespace=ns)) == 409
    assert await status_of(kube.get(DEPLOYMENTS, "nope", namespace=ns)) == 404
    assert await status_of(kube.create(DEPLOYMENTS, deployment_body("x", 1),
                                       namespace="no-such-namespace")) == 404
    stale = await kube.get(DEPLOYMENTS, "d", namespace=ns)
    fresh = await kube.patch(DEPLOYMENTS, "d", {"metadata": {"labels": {"k": "v"}}}, namespace=ns)
    assert fresh["metadata"]["resourceVersion"] != stale["metadata"]["resourceVersion"]
    assert await status_of(kube.replace(DEPLOYMENTS, "d", stale, namespace=ns)) == 409
    # a merge patch carrying a stale resourceVersion is a precondition: 409 too
    assert await status_of(kube.patch(DEPLOYMENTS, "d", {"metadata": {
        "resourceVersion": stale["metadata"]["resourceVersion"], "labels": {"k": "w"}}},
        namespace=ns)) == 409


async def test_scale_subresource(api):
    kube, ns = api
    await kube.create(DEPLOYMENTS, deployment_body("d", 2), namespace=ns)
    scale = await kube.get_scale(DEPLOYMENTS, "d", namespace=ns)
    assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"] == {"replicas": 2} and scale["status"]["selector"] == "app=d"
    written = await kube.patch(DEPLOYMENTS, "d", {"spec": {"replicas": 5}}, namespace=ns,
                               subresource="scale")
    assert written["spec"]["replicas"] == 5
    obj = await kube.get(DEPLOYMENTS, "d", namespace=ns)
    assert obj["spec"]["replicas"] == 5 and obj["metadata"]["generation"] == 2
    assert await status_of(kube.replace_scale(DEPLOYMENTS, "d", namespace=ns, replicas=7,
                                              resource_version="1")) == 409


async def test_status_subresource_and_strategic_merge(api):
    kube, ns = api
    pod = {"metadata": {"name": "p", "labels": {"app": "a", "tier": "x"}},
           "spec": {"containers": [{"name": "c", "image": "i"}]}}
    created = await kube.create(PODS, pod, namespace=ns)
    assert created["status"].get("phase") == "Pending"
    now = format_time(1_800_000_000)
    await kube.patch(PODS, "p", {"status": {"conditions": [
        {"type": "Ready", "status": "False", "lastTransitionTime": now},
        {"type": "example.com/gate", "status": "True", "lastTransitionTime": now}]}},
        namespace=ns, subresource="status", patch_type="strategic")
    await kube.patch(PODS, "p", {"status": {"conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": now}]}},
        namespace=ns, subresource="status", patch_type="strategic")
    got = await kube.get(PODS, "p", namespace=ns)
    conditions = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    # merged by type (the real scheduler may add its own PodScheduled: ignore it)
    conditions.pop("PodScheduled", None)
    assert conditions == {"Ready": "True", "example.com/gate": "True"}
    # the main endpoint ignores status
    await kube.patch(PODS, "p", {"status": {"phase": "Failed"}}, namespace=ns)
    assert (await kube.get(PODS, "p", namespace=ns))["status"]["phase"] != "Failed"


async def test_selectors_generate_name_and_cluster_scope(api):
    kube, ns = api
    for name, tier in (("p1", "x"), ("p2", "y"), ("p3", None)):
        labels = {"app": "a", **({"tier": tier} if tier else {})}
        await kube.create(PODS, {"metadata": {"name": name, "labels": labels},
                                 "spec": {"containers": [{"name": "c", "image": "i"}]}}, namespace=ns)

    async def names(selector: str) -> list[str]:
        return sorted(p["metadata"]["name"] for p in await kube.list(PODS, namespace=ns,
                                                                     label_selector=selector))

    assert await names("app=a") == ["p1", "p2", "p3"]
    assert await names("app=a,tier in (x,y)") == ["p1", "p2"]
    assert await names("tier notin (x)") == ["p2", "p3"]
    assert await names("!tier") == ["p3"]
    assert await names("tier,tier!=y") == ["p1"]
    assert await status_of(kube.list(PODS, namespace=ns, label_selector="tier in x")) == 400
    event = await kube.create(EVENTS, {"metadata": {"generateName": "d."},
                                       "involvedObject": {"kind": "Deployment", "name": "d-events",
                                                          "namespace": ns},
                                       "reason": "scale_out_tps", "message": "m", "type": "Normal"},
                              namespace=ns)
    assert event["metadata"]["name"].startswith("d.") and len(event["metadata"]["name"]) > 2
    listed = await kube.list(EVENTS, namespace=ns, field_selector="involvedObject.name=d-events")
    assert [e["reason"] for e in listed] == ["scale_out_tps"]
    node = f"node-{uuid.uuid4().hex[:6]}"
    await kube.create(NODES, {"metadata": {"name": node, "labels": {"nvidia.com/gpu.product": "H20"}}})
    await kube.patch(NODES, node, {"status": {"allocatable": {"nvidia.com/gpu": "8", "pods": "110"}}},
                     subresource="status")
    got = await kube.get(NODES, node)
    assert got["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    await kube.delete(NODES, node)
    assert await status_of(kube.get(NODES, node)) == 404


async def test_lease_optimistic_concurrency(api):
    kube, ns = api
    body = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}
    created = await kube.create(LEASES, body, namespace=ns)
    update = {"metadata": {"name": "l", "resourceVersion": created["metadata"]["resourceVersion"]},
              "spec": {"holderIdentity": "b", "leaseDurationSeconds": 15, "leaseTransitions": 1}}
    won = await kube.replace(LEASES, "l", update, namespace=ns)
    assert won["spec"]["holderIdentity"] == "b"
    # the loser of the race replays the same resourceVersion
    update["spec"]["holderIdentity"] = "c"
    assert await status_of(kube.replace(LEASES, "l", update, namespace=ns)) == 409
    # a write that changes nothing keeps the resourceVersion (no spurious renewal)
    same = dict(won)
    again = await kube.replace(LEASES, "l", same, namespace=ns)
    assert again["metadata"]["resourceVersion"] == won["metadata"]["resourceVersion"]
