"""kube.py: retries, error translation (with the real kubernetes client against a real
HTTP server on loopback), resources and selectors; and the fake's faithfulness rules."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from aiohttp import web

from heteroscale.coordinator.kube import (DEPLOYMENTS, EVENTS, LEASES, NAMESPACES, NO_RETRY, NODES,
                                      PODS, ApiClientTransport, Kube, RetryPolicy,
                                      api_error_from_exception, format_micro_time, format_time,
                                      kube_from_config, label_selector_text, parse_retry_after,
                                      parse_time)
from heteroscale.errors import ApiError, UsageError
from tests.k8s_fake import FakeKube, merge_patch, selector_matches


class Sleeps:
    """Records requested sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def deployment(name: str, replicas: int = 2) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "x"}]}}}}


@pytest.fixture
def fake() -> FakeKube:
    fake = FakeKube()
    fake.add_namespace("ns")
    return fake


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def kube(fake: FakeKube, sleeps: Sleeps) -> Kube:
    return Kube(fake, sleep=sleeps, rng=random.Random(1))


# ---------------------------------------------------------------- pure helpers

def test_resource_paths():
    assert DEPLOYMENTS.path(namespace="a", name="d", subresource="scale") == \
        "/apis/apps/v1/namespaces/a/deployments/d/scale"
    assert PODS.path(namespace="a") == "/api/v1/namespaces/a/pods"
    assert NODES.path(name="n1") == "/api/v1/nodes/n1"
    assert LEASES.path(namespace="kube-system", name="l") == \
        "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/l"
    with pytest.raises(ValueError):
        PODS.path()


def test_retry_delay_backoff_and_retry_after():
    policy = RetryPolicy(attempts=5, base_backoff_s=0.2, max_backoff_s=1.0, max_retry_after_s=3.0)
    plain = ApiError("x", status=500)
    # jitter 1.0 keeps the full backoff: 0.2, 0.4, 0.8, then capped at 1.0
    assert [policy.delay_s(i, plain, 1.0) for i in range(4)] == pytest.approx([0.2, 0.4, 0.8, 1.0])
    # jitter 0 halves it
    assert policy.delay_s(1, plain, 0.0) == pytest.approx(0.2)
    # Retry-After 2 s beats a 0.2 s backoff; 60 s is capped at 3 s
    assert policy.delay_s(0, ApiError("x", status=429, retry_after_s=2), 1.0) == pytest.approx(2.0)
    assert policy.delay_s(0, ApiError("x", status=429, retry_after_s=60), 1.0) == pytest.approx(3.0)
    assert policy.retryable(ApiError("x", status=0)) and policy.retryable(ApiError("x", status=503))
    assert not policy.retryable(ApiError("x", status=409))
    assert not policy.retryable(ApiError("x", status=404))


def test_retry_policy_validation():
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_backoff_s=2, max_backoff_s=1)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None


def test_label_selector_text():
    selector = {"matchLabels": {"b": "2", "a": "1"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x", "y"]},
                                     {"key": "gone", "operator": "DoesNotExist"}]}
    text = label_selector_text(selector)
    assert text == "a=1,b=2,tier in (x,y),!gone"
    assert selector_matches(text, {"a": "1", "b": "2", "tier": "y"})
    assert not selector_matches(text, {"a": "1", "b": "2", "tier": "z"})
    assert not selector_matches(text, {"a": "1", "b": "2", "tier": "x", "gone": ""})
    assert label_selector_text(None) == ""
    with pytest.raises(ValueError):
        label_selector_text({"matchExpressions": [{"key": "k", "operator": "Near"}]})


def test_times_round_trip():
    assert format_micro_time(1_800_000_000.25) == "2027-01-15T08:00:00.250000Z"
    assert format_time(1_800_000_000.25) == "2027-01-15T08:00:00Z"
    assert parse_time("2027-01-15T08:00:00.250000Z") == pytest.approx(1_800_000_000.25)
    assert parse_time("garbage") is None and parse_time(None) is None


def test_translates_the_real_api_exception():
    from kubernetes.client.exceptions import ApiException

    exc = ApiException(status=429, reason="Too Many Requests")
    exc.body = json.dumps({"kind": "Status", "reason": "TooManyRequests",
                           "message": "slow down", "code": 429})
    exc.headers = {"Retry-After": "4"}
    error = api_error_from_exception(exc, "GET /x")
    assert (error.status, error.retry_after_s) == (429, 4.0)
    assert str(error) == "GET /x: 429 TooManyRequests: slow down"


# ---------------------------------------------------------------- retries over the seam

async def test_429_is_retried_honouring_retry_after(kube, fake, sleeps):
    await kube.create(DEPLOYMENTS, deployment("d"), namespace="ns")
    fake.inject(429, method="GET", times=2, retry_after_s=1.5)
    got = await kube.get(DEPLOYMENTS, "d", namespace="ns")
    assert got["metadata"]["name"] == "d"
    assert sleeps.delays == [1.5, 1.5]          # Retry-After beats the 0.1-0.4 s backoff
    assert [c for c in fake.calls if c[0] == "GET"] == [("GET", DEPLOYMENTS.path(namespace="ns", name="d"))] * 3


async def test_5xx_and_timeouts_give_up_after_the_bound(kube, fake, sleeps):
    await kube.create(DEPLOYMENTS, deployment("d"), namespace="ns")
    fake.inject(500, method="GET", times=2)
    fake.inject(0, method="GET", times=10)
    with pytest.raises(ApiError) as info:
        await kube.get(DEPLOYMENTS, "d", namespace="ns")
    assert info.value.status == 0
    assert len([c for c in fake.calls if c[0] == "GET"]) == kube.retry.attempts == 4
    assert len(sleeps.delays) == 3 and all(0 < d <= kube.retry.max_backoff_s for d in sleeps.delays)


async def test_conflict_and_not_found_are_not_retried(kube, fake, sleeps):
    with pytest.raises(ApiError) as info:
        await kube.get(DEPLOYMENTS, "missing", namespace="ns")
    assert info.value.status == 404
    assert await kube.get_or_none(DEPLOYMENTS, "missing", namespace="ns") is None
    created = await kube.create(DEPLOYMENTS, deployment("d"), namespace="ns")
    stale = dict(created, metadata=dict(created["metadata"], resourceVersion="1"))
    with pytest.raises(ApiError) as info:
        await kube.replace(DEPLOYMENTS, "d", stale, namespace="ns")
    assert info.value.status == 409
    assert sleeps.delays == []


async def test_no_retry_policy(kube, fake):
    fake.inject(503, times=1)
    with pytest.raises(ApiError):
        await kube.with_retry(NO_RETRY).list(PODS, namespace="ns")


async def test_read_modify_write_rereads_on_conflict(kube, fake):
    await kube.create(DEPLOYMENTS, deployment("d", 2), namespace="ns")
    path = DEPLOYMENTS.path(namespace="ns", name="d")
    seen = []

    def mutate(obj: dict) -> dict:
        seen.append(obj["metadata"].get("labels"))
        if len(seen) == 1:   # someone else writes between our GET and our PUT, once
            fake.concurrent_write("PATCH", path, {"metadata": {"labels": {"other": "writer"}}})
        obj["metadata"].setdefault("annotations", {})["mine"] = "yes"
        return obj

    result = await kube.read_modify_write(DEPLOYMENTS, "d", mutate, namespace="ns")
    assert seen == [None, {"other": "writer"}]          # the second round saw their write
    assert result["metadata"]["annotations"] == {"mine": "yes"}
    assert result["metadata"]["labels"] == {"other": "writer"}   # and kept it
    assert [c[0] for c in fake.calls if c[0] == "PUT"] == ["PUT", "PUT"]   # one 409, one success


async def test_read_modify_write_no_change_writes_nothing(kube, fake):
    await kube.create(DEPLOYMENTS, deployment("d"), namespace="ns")
    await kube.read_modify_write(DEPLOYMENTS, "d", lambda obj: None, namespace="ns")
    assert fake.writes("/deployments/d") == []


# ---------------------------------------------------------------- the fake's rules

async def test_fake_resource_versions_and_conflicts(kube, fake):
    created = await kube.create(DEPLOYMENTS, deployment("d", 2), namespace="ns")
    assert created["metadata"]["generation"] == 1
    with pytest.raises(ApiError) as info:
        await kube.create(DEPLOYMENTS, deployment("d"), namespace="ns")
    assert info.value.status == 409 and "already exists" in str(info.value)
    scale = await kube.get_scale(DEPLOYMENTS, "d", namespace="ns")
    assert scale["spec"] == {"replicas": 2} and scale["status"]["selector"] == "app=d"
    assert scale["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    after = await kube.replace_scale(DEPLOYMENTS, "d", namespace="ns", replicas=5,
                                     resource_version=scale["metadata"]["resourceVersion"])
    assert after["spec"]["replicas"] == 5
    with pytest.raises(ApiError) as info:   # the same, now stale, version again
        await kube.replace_scale(DEPLOYMENTS, "d", namespace="ns", replicas=6,
                                 resource_version=scale["metadata"]["resourceVersion"])
    assert info.value.status == 409
    obj = await kube.get(DEPLOYMENTS, "d", namespace="ns")
    assert obj["spec"]["replicas"] == 5 and obj["metadata"]["generation"] == 2


async def test_fake_status_is_separate_and_namespaces_must_exist(kube, fake):
    await kube.create(DEPLOYMENTS, deployment("d"), namespace="ns")
    await kube.patch(DEPLOYMENTS, "d", {"status": {"readyReplicas": 9}}, namespace="ns")
    assert "readyReplicas" not in (await kube.get(DEPLOYMENTS, "d", namespace="ns"))["status"]
    await kube.patch(DEPLOYMENTS, "d", {"status": {"readyReplicas": 1}}, namespace="ns",
                     subresource="status")
    assert (await kube.get(DEPLOYMENTS, "d", namespace="ns"))["status"]["readyReplicas"] == 1
    with pytest.raises(ApiError) as info:
        await kube.create(DEPLOYMENTS, deployment("x"), namespace="nowhere")
    assert info.value.status == 404


async def test_fake_generate_name_and_field_selector(kube, fake):
    body = {"metadata": {"generateName": "d."}, "involvedObject": {"name": "d", "kind": "Deployment"},
            "reason": "r"}
    first = await kube.create(EVENTS, body, namespace="ns")
    second = await kube.create(EVENTS, body, namespace="ns")
    assert first["metadata"]["name"].startswith("d.") and first["metadata"]["name"] != second["metadata"]["name"]
    assert len(await kube.list(EVENTS, namespace="ns", field_selector="involvedObject.name=d")) == 2
    assert await kube.list(EVENTS, namespace="ns", field_selector="involvedObject.name=e") == []


def test_strategic_merge_merges_conditions_by_type():
    pod = {"status": {"conditions": [{"type": "Ready", "status": "False"},
                                     {"type": "PodScheduled", "status": "True"}]}}
    patch = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    merged = merge_patch(pod, patch, strategic=True)
    assert merged["status"]["conditions"] == [{"type": "Ready", "status": "True"},
                                              {"type": "PodScheduled", "status": "True"}]
    # plain merge patch replaces the list
    assert merge_patch(pod, patch)["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    assert merge_patch({"a": 1, "b": 2}, {"a": None}) == {"b": 2}


# ---------------------------------------------------------------- the real client on loopback

@pytest.fixture
async def fake_apiserver(unused_port):
    """A tiny HTTP server that answers like kube-apiserver does in bad moments."""
    hang = asyncio.Event()

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                "reason": {409: "Conflict", 429: "TooManyRequests", 500: "InternalError"}[code],
                "message": f"answer {code}"}
        headers = {"Retry-After": "2"} if code == 429 else {}
        return web.json_response(body, status=code, headers=headers)

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"kind": "Namespace", "metadata": {"name": "x"},
                                  "auth": request.headers.get("Authorization", ""),
                                  "query": dict(request.query),
                                  "ctype": request.headers.get("Content-Type", ""),
                                  "body": await request.json() if request.can_read_body else None})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(hang.wait(), timeout=5)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/status{code}", status)
    app.router.add_route("*", "/api/v1/namespaces/ok", ok)
    app.router.add_route("*", "/api/v1/namespaces/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_port)
    await site.start()
    yield f"http://127.0.0.1:{unused_port}"
    hang.set()
    await runner.cleanup()


def _transport(host: str, timeout_s: float = 2.0, write_timeout_s: float = 2.0) -> ApiClientTransport:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = host
    configuration.api_key = {"authorization": "sekret"}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    configuration.retries = False
    return ApiClientTransport(client.ApiClient(configuration), timeout_s=timeout_s,
                              write_timeout_s=write_timeout_s)


async def test_real_client_errors_are_translated(fake_apiserver):
    transport = _transport(fake_apiserver)
    try:
        for code in (409, 429, 500):
            with pytest.raises(ApiError) as info:
                await transport.request("GET", f"/api/v1/namespaces/status{code}")
            assert info.value.status == code
            assert f"answer {code}" in str(info.value)
            assert info.value.retry_after_s == (2.0 if code == 429 else None)
        answer = await transport.request("PATCH", "/api/v1/namespaces/ok", query={"labelSelector": "a=b"},
                                         body={"metadata": {"labels": {"x": "y"}}},
                                         content_type="application/merge-patch+json")
        assert answer["auth"] == "Bearer sekret"
        assert answer["query"] == {"labelSelector": "a=b"}
        assert answer["ctype"] == "application/merge-patch+json"
        assert answer["body"] == {"metadata": {"labels": {"x": "y"}}}
    finally:
        await transport.close()


async def test_real_client_timeout_and_refused(fake_apiserver):
    from tests.conftest import free_port

    transport = _transport(fake_apiserver, timeout_s=0.3)
    try:
        with pytest.raises(ApiError) as info:
            await transport.request("GET", "/api/v1/namespaces/slow")
        assert info.value.status == 0 and "no answer" in str(info.value)
    finally:
        await transport.close()
    refused = _transport(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(ApiError) as info:
            await refused.request("GET", "/api/v1/namespaces")
        assert info.value.status == 0
    finally:
        await refused.close()


async def test_writes_have_their_own_shorter_timeout(fake_apiserver):
    # reads may wait 30 s here, writes only 0.3 s: a slow write gives up on its own bound
    transport = _transport(fake_apiserver, timeout_s=30, write_timeout_s=0.3)
    try:
        with pytest.raises(ApiError) as info:
            await transport.request("PUT", "/api/v1/namespaces/slow", body={"x": 1})
        assert info.value.status == 0
    finally:
        await transport.close()
        await transport.close()          # idempotent


async def test_retries_over_the_real_client(fake_apiserver):
    sleeps = Sleeps()
    kube = Kube(_transport(fake_apiserver), retry=RetryPolicy(attempts=3), sleep=sleeps)
    try:
        with pytest.raises(ApiError) as info:
            await kube.request("GET", "/api/v1/namespaces/status429")
        assert info.value.status == 429
        assert sleeps.delays == [2.0, 2.0]      # two retries, each honouring Retry-After: 2
    finally:
        await kube.close()


def test_bad_kubeconfig_is_a_usage_error(tmp_path):
    bad = tmp_path / "kubeconfig"
    bad.write_text("this: [is not a kubeconfig")
    with pytest.raises(UsageError) as info:
        kube_from_config(kubeconfig=str(bad))
    assert "kubeconfig" in str(info.value)
    with pytest.raises(UsageError):
        kube_from_config(kubeconfig=str(tmp_path / "missing"))


def test_namespaces_resource_is_cluster_scoped():
    assert NAMESPACES.path(name="x") == "/api/v1/namespaces/x"


def test_in_cluster_outside_a_pod_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(UsageError) as info:
        kube_from_config(in_cluster=True)
    assert "in-cluster" in str(info.value)


async def test_a_write_that_waited_past_its_deadline_is_not_sent(unused_port):
    """The write's time (the fence's grant) runs from the call, not from when a worker
    thread gets to it: a write queued behind busy workers past its deadline is refused
    unsent (status 0, retried through the fence), never sent late."""
    import concurrent.futures
    import time as time_

    hits: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        hits.append(request.method)
        return web.json_response({"kind": "Namespace"})

    app = web.Application()
    app.router.add_route("*", "/api/v1/namespaces/ok", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_port).start()
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(pool)
    transport = _transport(f"http://127.0.0.1:{unused_port}", write_timeout_s=5)
    try:
        busy = loop.run_in_executor(None, time_.sleep, 0.6)      # the only worker is busy
        with pytest.raises(ApiError) as info:
            await transport.request("PUT", "/api/v1/namespaces/ok", body={"x": 1}, timeout_s=0.2)
        assert info.value.status == 0 and "not sent" in str(info.value)
        await busy
        assert hits == []
        # with time to spare the same write goes out
        await transport.request("PUT", "/api/v1/namespaces/ok", body={"x": 1}, timeout_s=2)
        assert hits == ["PUT"]
    finally:
        await transport.close()
        await runner.cleanup()
