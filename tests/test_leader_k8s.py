"""Leader election against a real kube-apiserver (k8s-envtest v1.20): two candidates,
crash failover, clean handover, the fence, and two real processes with SIGKILL.

Short timings keep it fast: lease 2 s, renew deadline 1.5 s, retry 0.5 s. The documented
takeover bound after a crash is duration + 2 acquire intervals (retry × (1 + 1.2 jitter))
= 2 + 2 × 1.1 = 4.2 s; the assertions add 3 s for API latency on a loaded 2-core box
(CI shares two cores with everything else). The release test uses a 6 s lease so that
"handed over well before a lease duration" has room to show under load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from heteroscale.coordinator.actuators.kubernetes import KubernetesActuator
from heteroscale.errors import NotLeaderError
from heteroscale.coordinator.kube import DEPLOYMENTS, LEASES, Kube
from heteroscale.coordinator.leader import KubernetesLeaseElection
from heteroscale.coordinator.core.types import Decision, PoolCounts
from tests.k8s_fake import FaultyTransport
from tests.k8s_envtest import REPO, chat_service, deployment_body, k8s_cluster, k8s_namespace, kube  # noqa: F401

pytestmark = pytest.mark.k8s

DURATION, DEADLINE, RETRY = 2, 1.5, 0.5
TAKEOVER_BOUND_S = DURATION + 2 * RETRY * 2.2
SLACK_S = 3.0
LEASE = "heteroscale-coordinator"


def candidate(kube, namespace: str, identity: str, **kw) -> KubernetesLeaseElection:
    timing = dict(duration_s=DURATION, renew_deadline_s=DEADLINE, retry_period_s=RETRY)
    timing.update({k: kw.pop(k) for k in list(kw) if k in timing})
    return KubernetesLeaseElection(api=kube, name=LEASE, namespace=namespace, identity=identity,
                                   **timing, **kw)


async def wait_for(predicate, *, timeout_s: float, step_s: float = 0.05) -> float:
    """Poll until ``predicate()``; return the seconds waited (fails the test on timeout)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"condition not met within {timeout_s}s")
        await asyncio.sleep(step_s)
    return time.monotonic() - started


async def stop(*tasks: asyncio.Task) -> None:
    """Cancel and wait, bounded: a stop that never finishes is a bug, not a hang."""
    for task in tasks:
        task.cancel()
    async with asyncio.timeout(15):
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_lease(kube, namespace: str) -> dict:
    return (await kube.get(LEASES, LEASE, namespace=namespace))["spec"]


async def test_one_leader_then_crash_failover(kube, k8s_namespace):
    a = candidate(kube, k8s_namespace, "a", release_on_cancel=False)
    b = candidate(kube, k8s_namespace, "b")
    ta = asyncio.create_task(a.run(), name="election-a")
    await wait_for(lambda: a.is_leader, timeout_s=10)
    tb = asyncio.create_task(b.run(), name="election-b")
    try:
        await asyncio.sleep(3 * DURATION)               # b keeps polling; a keeps renewing
        assert a.is_leader and not b.is_leader and b.leader_identity == "a"
        spec = await read_lease(kube, k8s_namespace)
        assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == DURATION
        assert spec.get("leaseTransitions", 0) == 0
        await stop(ta)                                   # a crash: no release
        assert (await read_lease(kube, k8s_namespace))["holderIdentity"] == "a"
        waited = await wait_for(lambda: b.is_leader, timeout_s=TAKEOVER_BOUND_S + 10)
        print(f"crash takeover after {waited:.2f}s (bound {TAKEOVER_BOUND_S:.1f}s)")
        assert waited <= TAKEOVER_BOUND_S + SLACK_S
        spec = await read_lease(kube, k8s_namespace)
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    finally:
        await stop(ta, tb)


async def test_clean_release_hands_over_fast(kube, k8s_namespace):
    long = dict(duration_s=6, renew_deadline_s=4)      # a crash would need >= 6 s
    a = candidate(kube, k8s_namespace, "a", **long)
    b = candidate(kube, k8s_namespace, "b", **long)
    ta = asyncio.create_task(a.run(), name="election-a")
    await wait_for(lambda: a.is_leader, timeout_s=10)
    tb = asyncio.create_task(b.run(), name="election-b")
    try:
        await asyncio.sleep(1.0)
        await stop(ta)                                   # clean shutdown: releases
        spec = await read_lease(kube, k8s_namespace)
        assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1
        waited = await wait_for(lambda: b.is_leader, timeout_s=15)
        print(f"handover after release {waited:.2f}s")
        assert waited < 6 - 1                            # no lease duration to wait out
        assert (await read_lease(kube, k8s_namespace))["leaseTransitions"] == 1
    finally:
        await stop(ta, tb)


async def test_paused_old_leader_never_writes(kube, k8s_namespace):
    for name, n in (("chat-prefill", 1), ("chat-decode", 2)):
        await kube.create(DEPLOYMENTS, deployment_body(name, n), namespace=k8s_namespace)
    watched = FaultyTransport(kube.transport)
    old = candidate(kube, k8s_namespace, "old", release_on_cancel=False)
    new = candidate(kube, k8s_namespace, "new")
    actuator = KubernetesActuator(api=Kube(watched).fenced(old), identity="old")
    svc = chat_service(k8s_namespace)

    def decide(cur, new_counts):
        return Decision(service="chat", at=time.time(), reason="scale_out_tps",
                        current=PoolCounts(*cur), desired=PoolCounts(*new_counts))

    assert await old.tick()                              # old leads, acts
    await actuator.observe(svc)
    await actuator.apply(svc, decide((1, 2), (2, 3)))
    # old pauses (no renewals: a GC pause, a frozen VM); new takes over after expiry
    tn = asyncio.create_task(new.run(), name="election-new")
    try:
        await wait_for(lambda: new.is_leader, timeout_s=TAKEOVER_BOUND_S + 10)
        await actuator.observe(svc)
        watched.calls.clear()
        with pytest.raises(NotLeaderError):
            await actuator.apply(svc, decide((2, 3), (4, 6)))
        assert watched.writes() == []
        assert not await old.still_leader()
        scale = await kube.get_scale(DEPLOYMENTS, "chat-decode", namespace=k8s_namespace)
        assert scale["spec"]["replicas"] == 3            # untouched by the old leader
        # old wakes up and ticks: it sees new and does not take the lease back
        assert not await old.tick()
        assert (await read_lease(kube, k8s_namespace))["holderIdentity"] == "new"
    finally:
        await stop(tn)


def _spawn(k8s_cluster, namespace: str, identity: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.k8s_envtest", "candidate", "--kubeconfig",
         str(k8s_cluster.kubeconfig), "--namespace", namespace, "--identity", identity,
         "--duration", str(DURATION), "--renew-deadline", str(DEADLINE), "--retry", str(RETRY)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))


async def _lines(proc: subprocess.Popen, into: list[str]) -> None:
    while True:
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line:
            return
        into.append(line.strip())


async def test_two_processes_sigkill_and_sigint(kube, k8s_cluster, k8s_namespace):
    procs = {name: _spawn(k8s_cluster, k8s_namespace, name) for name in ("p1", "p2")}
    out: dict[str, list[str]] = {name: [] for name in procs}
    readers = [asyncio.create_task(_lines(p, out[n]), name=f"read-{n}") for n, p in procs.items()]
    try:
        await wait_for(lambda: any("LEADER" in l.split()[0] for v in out.values() for l in v),
                       timeout_s=20)
        leader = next(n for n, v in out.items() if f"LEADER {n}" in v)
        other = next(n for n in procs if n != leader)
        await asyncio.sleep(2 * DURATION)
        assert f"LEADER {other}" not in out[other]       # exactly one leader meanwhile
        assert (await read_lease(kube, k8s_namespace))["holderIdentity"] == leader
        procs[leader].send_signal(signal.SIGKILL)         # crash
        started = time.monotonic()
        await wait_for(lambda: f"LEADER {other}" in out[other], timeout_s=TAKEOVER_BOUND_S + 15)
        waited = time.monotonic() - started
        print(f"process crash takeover after {waited:.2f}s")
        assert waited <= TAKEOVER_BOUND_S + SLACK_S + 1.0   # + process/stdout latency
        spec = await read_lease(kube, k8s_namespace)
        assert spec["holderIdentity"] == other and spec["leaseTransitions"] == 1
        procs[other].send_signal(signal.SIGINT)           # clean shutdown: releases
        await asyncio.to_thread(procs[other].wait, 15)
        assert (await read_lease(kube, k8s_namespace))["holderIdentity"] == ""
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        await asyncio.gather(*readers, return_exceptions=True)
