"""The whole coordinator against a REAL kube-apiserver + controller-manager (k8s-envtest):
the reconciler, the Kubernetes actuator and the Lease election together. Decode tokens/s
(served by loopback report servers, one per pod the API lists) moves both Deployments
together; pending pods hold further scale-out; missing reports hold; a second
coordinator takes over when the first hands its lease back, and the first never writes
again; the status page shows it."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from heteroscale.coordinator.actuators.kubernetes import KubernetesActuator
from heteroscale.coordinator.collect import Collector
from heteroscale.coordinator.seams import ReportTarget
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.kube import DEPLOYMENTS, PODS, Kube, format_time
from heteroscale.coordinator.leader import KubernetesLeaseElection
from heteroscale.coordinator.reconciler import Reconciler
from heteroscale.coordinator.status import make_status_app
from tests.k8s_envtest import deployment_body, k8s_cluster, k8s_namespace, kube  # noqa: F401
from tests.test_collect import ReportServer, report_doc

pytestmark = pytest.mark.k8s


def coordinator_config(namespace: str):
    return load_config({
        "coordinator": {"backend": "kubernetes", "interval_s": 5,
                        "lease": {"name": "heteroscale-test", "namespace": namespace,
                                  "duration_s": 3, "renew_deadline_s": 2, "retry_period_s": 0.5},
                        "api": {"write_timeout_s": 0.8}},
        "services": [{
            "name": "chat", "namespace": namespace, "pd_ratio": "3:2", "target_decode_tps_per_instance": 1000,
            "min_decode": 1, "max_decode": 20, "slo": {"tbt_s": 0.05},
            "prefill": {"deployment": "chat-prefill"}, "decode": {"deployment": "chat-decode"},
            "policy": {"smoothing_window_s": 0, "scale_out_cooldown_s": 0, "scale_in_stabilization_s": 0,
                       "warmup_s": 0}}]})


class PodReports:
    """Discovery through the real API (the actuator's ``list_pods``: Running pods), each
    pod's sidecar played by a path on one loopback report server; the service's decode
    load is spread over the decode pods that exist."""

    def __init__(self, actuator: KubernetesActuator, server: ReportServer) -> None:
        self.actuator, self.server = actuator, server
        self.load_tps = 0.0
        self.broken = False
        self.decode_pods = 1

    async def targets(self, service: Any) -> list[ReportTarget]:
        out = []
        for role in ("prefill", "decode"):
            pods = await self.actuator.list_pods(service, role)
            if role == "decode":
                self.decode_pods = max(1, len(pods))
            for pod, _ip in pods:
                path = f"/{role}/{pod}"
                self.server.routes[path] = (lambda role=role, pod=pod: 500 if self.broken else report_doc(
                    role=role, pod=pod, observed_at=time.time() - 0.5,
                    decode_tps=self.load_tps / self.decode_pods))
                out.append(ReportTarget(url=self.server.url(path), role=role, pod=pod))
        return out


async def replicas(kube: Kube, namespace: str) -> tuple[int, int]:
    p = await kube.get_scale(DEPLOYMENTS, "chat-prefill", namespace=namespace)
    d = await kube.get_scale(DEPLOYMENTS, "chat-decode", namespace=namespace)
    return p["spec"]["replicas"], d["spec"]["replicas"]


_IPS = itertools.count(1)


async def _mark_new_pods_ready(kube: Kube, namespace: str, app: str) -> int:
    """Act as the kubelet for the app's pods that are not Running yet (each gets its own
    made-up IP); returns how many Running pods the app has."""
    pods = await kube.list(PODS, namespace=namespace, label_selector=f"app={app}")
    now = format_time(time.time())
    running = 0
    for pod in pods:
        if (pod.get("status") or {}).get("phase") == "Running":
            running += 1
            continue
        n = next(_IPS)
        ip = f"10.244.{n // 250}.{n % 250 + 1}"
        await kube.patch(PODS, pod["metadata"]["name"], {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}]}},
            namespace=namespace, subresource="status", patch_type="merge")
        running += 1
    return running


async def ready_all(kube: Kube, namespace: str, prefill: int, decode: int) -> None:
    """Act as the kubelet once the controller has created the pods."""
    deadline = time.monotonic() + 30
    while True:
        p = await _mark_new_pods_ready(kube, namespace, "chat-prefill")
        d = await _mark_new_pods_ready(kube, namespace, "chat-decode")
        if p >= prefill and d >= decode:
            break
        if time.monotonic() > deadline:
            pytest.fail("the controller did not create the pods in time")
        await asyncio.sleep(0.2)
    # ... and until the Deployment controller has counted them ready (what observe reads).
    for name, want in (("chat-prefill", prefill), ("chat-decode", decode)):
        async def counted(name: str = name, want: int = want) -> bool:
            obj = await kube.get(DEPLOYMENTS, name, namespace=namespace)
            return ((obj.get("status") or {}).get("readyReplicas") or 0) >= want
        await until(counted, timeout_s=30)


async def until(check, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.1)


class Coordinator:
    """One coordinator's parts over the shared API server."""

    def __init__(self, kube: Kube, namespace: str, server: ReportServer, identity: str) -> None:
        cfg = coordinator_config(namespace)
        lease = cfg.coordinator.lease
        self.election = KubernetesLeaseElection(api=kube, name=lease.name, namespace=lease.namespace,
                                                identity=identity, duration_s=lease.duration_s,
                                                renew_deadline_s=lease.renew_deadline_s,
                                                retry_period_s=lease.retry_period_s)
        self.actuator = KubernetesActuator(api=kube.fenced(self.election), identity=identity)
        self.source = PodReports(self.actuator, server)
        self.collector = Collector(source=self.source, timeout_s=2)
        self.reconciler = Reconciler(config=cfg, actuator=self.actuator, collector=self.collector,
                                     election=self.election)
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.election.run(), name=f"election-{self.election.identity}")

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.collector.close()

    async def tick(self, load_tps: float) -> Any:
        self.source.load_tps = load_tps
        (decision,) = await self.reconciler.tick()
        return decision


@pytest.fixture
async def report_server():
    server = await ReportServer().start()
    yield server
    await server.stop()


async def test_scales_both_deployments_holds_and_shows_it(kube, k8s_namespace, report_server):
    ns = k8s_namespace
    await kube.create(DEPLOYMENTS, deployment_body("chat-prefill", 3), namespace=ns)
    await kube.create(DEPLOYMENTS, deployment_body("chat-decode", 2), namespace=ns)
    await ready_all(kube, ns, 3, 2)
    c = Coordinator(kube, ns, report_server, "coord-a")
    c.start()
    try:
        await until(lambda: _true(c.election.is_leader))
        assert (await c.tick(2000.0)).reason == "hold_tolerance"          # 2000 on 2 x 1000
        # 6000 tok/s: want 6 decode, damped to 2 x 2 = 4; prefill round(4 x 3/2) = 6.
        d = await c.tick(6000.0)
        assert (d.reason, d.desired.prefill, d.desired.decode) == ("scale_out_tps", 6, 4)
        assert await replicas(kube, ns) == (6, 4)
        # The step bound cut that one: it goes on at the next tick while the new pods are
        # Pending (no kubelet), counting them: 6000 / 1000 = 6 decode, P = 9.
        d = await c.tick(6000.0)
        assert (d.reason, d.desired.prefill, d.desired.decode) == ("scale_out_tps", 9, 6)
        assert "continuing a scale-out the step bound cut" in d.detail
        assert await replicas(kube, ns) == (9, 6)
        # A further rise waits for the Pending pods.
        assert (await c.tick(9000.0)).reason == "hold_pending"
        assert await replicas(kube, ns) == (9, 6)
        await ready_all(kube, ns, 9, 6)
        # Every sidecar answers 500: missing data holds, even at "zero" load.
        c.source.broken = True
        assert (await c.tick(0.0)).reason == "hold_missing_data"
        assert await replicas(kube, ns) == (9, 6)
        # Data back at 2500 tok/s: scale in together (6 -> ceil(2.5) = 3, damped to 3; P = 5).
        c.source.broken = False
        d = await c.tick(2500.0)
        assert (d.reason, d.desired.prefill, d.desired.decode) == ("scale_in_tps", 5, 3)
        assert await replicas(kube, ns) == (5, 3)
        client = TestClient(TestServer(make_status_app(c.reconciler)))
        await client.start_server()
        try:
            doc = await (await client.get("/api/v1/status")).json()
        finally:
            await client.close()
        chat = doc["services"][0]
        assert doc["leader"] is True and doc["identity"] == "coord-a"
        reasons = [x["reason"] for x in chat["decisions"]]
        for reason in ("scale_in_tps", "hold_missing_data", "scale_out_tps", "hold_pending", "hold_tolerance"):
            assert reason in reasons
        assert chat["prefill"]["current"] == 9 and chat["prefill"]["desired"] == 5
    finally:
        await c.stop()


async def test_failover_the_old_leader_never_writes_again(kube, k8s_namespace, report_server):
    ns = k8s_namespace
    await kube.create(DEPLOYMENTS, deployment_body("chat-prefill", 3), namespace=ns)
    await kube.create(DEPLOYMENTS, deployment_body("chat-decode", 2), namespace=ns)
    await ready_all(kube, ns, 3, 2)
    a = Coordinator(kube, ns, report_server, "coord-a")
    b = Coordinator(kube, ns, report_server, "coord-b")
    a.start()
    try:
        await until(lambda: _true(a.election.is_leader))
        b.start()
        d = await b.tick(6000.0)                     # the standby decides, read-only
        assert d.reason == "scale_out_tps" and b.reconciler.services["chat"].last_apply is None
        assert await replicas(kube, ns) == (3, 2)
        await a.tick(6000.0)                         # the leader writes
        assert await replicas(kube, ns) == (6, 4)
        await ready_all(kube, ns, 6, 4)
        # A shuts down cleanly: its lease is released and B takes over.
        a.task.cancel()
        await asyncio.gather(a.task, return_exceptions=True)
        await until(lambda: _true(b.election.is_leader), timeout_s=10)
        assert not a.election.is_leader
        d = await a.tick(12000.0)                    # A still computes, but must not write
        assert d.desired.decode > 4 and a.reconciler.services["chat"].last_apply is None
        assert await replicas(kube, ns) == (6, 4)
        d = await b.tick(12000.0)                    # B writes: 12000 / 4 = 300% -> damped to 8
        assert (d.desired.prefill, d.desired.decode) == (12, 8)
        assert await replicas(kube, ns) == (12, 8)
    finally:
        await a.stop()
        await b.stop()


async def _true(value: bool) -> bool:
    return value
