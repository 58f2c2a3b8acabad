"""Kubernetes actuator, fast tier on the in-memory API fake: observe, coordinated writes
in a documented order, compensation, fencing, manual edits, retries, dry-run."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from heteroscale.coordinator.actuators.kubernetes import (ANNOTATION_DECISION, ANNOTATION_REPLICAS,
                                                          KubernetesActuator, targets_of)
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.kube import (DEPLOYMENTS, EVENTS, PODS, STATEFULSETS, Kube, RetryPolicy,
                                      format_time)
from heteroscale.coordinator.leader import KubernetesLeaseElection
from heteroscale.coordinator.core.types import Decision, PoolCounts
from heteroscale.errors import ApiError, ConfigError, NotLeaderError
from tests.k8s_fake import FakeClock, FakeKube

NS = "llm"


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def workload(name: str, replicas: int, *, kind: str = "Deployment") -> dict:
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "engine", "image": "vllm"}]}}}}


def service(prefill: str = "chat-prefill", decode: str = "chat-decode", *, kind: str = "deployment"):
    return load_config({"coordinator": {"backend": "kubernetes"}, "services": [{
        "name": "chat", "namespace": NS, "pd_ratio": "1:1", "target_decode_tps_per_instance": 100,
        "slo": {"tbt_s": 0.05}, "prefill": {kind: prefill}, "decode": {kind: decode}}]}).services[0]


class Fence:
    """The election's side of ``Kube.fenced``: ``open()`` decides, each write attempt asks."""

    def __init__(self, open_: object, *, seconds: float = 3.0) -> None:
        self.open, self.seconds, self.asked = open_, seconds, []

    async def permit(self, what: str) -> float:
        self.asked.append(what)
        if not await self.open():
            raise NotLeaderError(f"fence closed: refused to {what}")
        return self.seconds


def decision(cur: tuple[int, int], new: tuple[int, int], reason: str = "scale_out_tps") -> Decision:
    return Decision(service="chat", at=1_800_000_000.0, reason=reason,
                    current=PoolCounts(*cur), desired=PoolCounts(*new), detail="tps 9000 > 2400 × 3")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock) -> FakeKube:
    fake = FakeKube(clock=clock.time)
    fake.add_namespace(NS)
    fake.concurrent_write("POST", DEPLOYMENTS.path(namespace=NS), workload("chat-prefill", 3), "application/json")
    fake.concurrent_write("POST", DEPLOYMENTS.path(namespace=NS), workload("chat-decode", 4), "application/json")
    return fake


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make(fake, clock, sleeps, *, fence: object = None, **kw) -> KubernetesActuator:
    api = Kube(fake, retry=RetryPolicy(attempts=3), sleep=sleeps, rng=random.Random(0))
    if fence is not None:
        api = api.fenced(fence if hasattr(fence, "permit") else Fence(fence))
    return KubernetesActuator(api=api, clock=clock, identity="coord-a", **kw)


def spec_replicas(fake: FakeKube, name: str) -> int:
    return next(o for o in fake.objects("deployments", NS) if o["metadata"]["name"] == name)["spec"]["replicas"]


def scale_writes(fake: FakeKube) -> list[str]:
    return [p.split("/")[-2] for m, p in fake.calls if m == "PUT" and p.endswith("/scale")]


def set_status(fake: FakeKube, name: str, **status) -> None:
    fake.concurrent_write("PATCH", DEPLOYMENTS.path(namespace=NS, name=name, subresource="status"),
                          {"status": status})


def add_pod(fake: FakeKube, name: str, app: str, *, ready: bool, ip: str = "") -> None:
    fake.concurrent_write("POST", PODS.path(namespace=NS), {
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"containers": [{"name": "engine", "image": "vllm"}]}}, "application/json")
    fake.concurrent_write("PATCH", PODS.path(namespace=NS, name=name, subresource="status"), {
        "status": {"phase": "Running" if ready else "Pending", **({"podIP": ip} if ip else {}),
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


# ---------------------------------------------------------------- observe

async def test_observe_counts_and_oldest_pending(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    for i in range(3):
        add_pod(fake, f"p{i}", "chat-prefill", ready=True)
    set_status(fake, "chat-prefill", replicas=3, readyReplicas=3, availableReplicas=3)
    add_pod(fake, "d0", "chat-decode", ready=True)
    add_pod(fake, "d1", "chat-decode", ready=True)
    first_pending = clock.time()
    add_pod(fake, "d2", "chat-decode", ready=False)
    await clock.advance(40)
    add_pod(fake, "d3", "chat-decode", ready=False)
    set_status(fake, "chat-decode", replicas=4, readyReplicas=2)
    status = await actuator.observe(service())
    assert status.current == PoolCounts(3, 4)
    assert status.ready == PoolCounts(3, 2)
    assert status.pending == PoolCounts(0, 2)          # 4 asked − 2 ready
    assert status.pending_since_s == pytest.approx(first_pending)   # the older of d2, d3
    assert not status.manual_override
    # no pod listing when nothing is pending
    fake.calls.clear()
    set_status(fake, "chat-decode", replicas=4, readyReplicas=4)
    status = await actuator.observe(service())
    assert status.pending == PoolCounts(0, 0) and status.pending_since_s is None
    assert not [c for c in fake.calls if "/pods" in c[1]]


async def test_observe_pending_before_pods_exist_uses_first_sight(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    seen_at = clock.time()
    status = await actuator.observe(service())          # 3 + 4 asked, nothing ready, no pods yet
    assert status.pending == PoolCounts(3, 4) and status.pending_since_s == pytest.approx(seen_at)
    await clock.advance(30)
    status = await actuator.observe(service())
    assert status.pending_since_s == pytest.approx(seen_at)   # still the first sighting


async def test_list_pods_for_report_collection(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    add_pod(fake, "d0", "chat-decode", ready=True, ip="10.0.0.5")
    add_pod(fake, "d1", "chat-decode", ready=True, ip="10.0.0.4")
    add_pod(fake, "d2", "chat-decode", ready=False)                 # Pending: no IP yet
    add_pod(fake, "p0", "chat-prefill", ready=True, ip="10.0.1.1")
    assert await actuator.list_pods(service(), "decode") == [("d0", "10.0.0.5"), ("d1", "10.0.0.4")]
    assert await actuator.list_pods(service(), "prefill") == [("p0", "10.0.1.1")]
    # a configured selector wins over the workload's
    svc = service()
    svc = replace(svc, decode=replace(svc.decode, selector="app=chat-prefill"))
    assert await actuator.list_pods(svc, "decode") == [("p0", "10.0.1.1")]


async def test_missing_workload_is_an_api_error(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    with pytest.raises(ApiError) as info:
        await actuator.observe(service(decode="nope"))
    assert info.value.status == 404


def test_targets_need_a_workload():
    svc = service()
    with pytest.raises(ConfigError, match="chat.prefill: needs a deployment or statefulset"):
        targets_of(replace(svc, prefill=replace(svc.prefill, deployment=None)))


def test_targets_from_the_coordinator_config():
    config = pytest.importorskip("heteroscale.coordinator.config")
    cfg = config.load_config({
        "coordinator": {"backend": "kubernetes"},
        "services": [{"name": "chat", "namespace": NS, "pd_ratio": "3:4",
                      "target_decode_tps_per_instance": 2400, "slo": {"tbt_s": 0.04},
                      "prefill": {"deployment": "chat-prefill"},
                      "decode": {"statefulset": "chat-decode"}}]})
    targets = targets_of(cfg.services[0])
    assert (targets["prefill"].kind, targets["prefill"].name) == ("Deployment", "chat-prefill")
    assert (targets["decode"].kind, targets["decode"].namespace) == ("StatefulSet", NS)


# ---------------------------------------------------------------- apply: order and records

async def test_scale_out_writes_decode_then_prefill_and_records(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    result = await actuator.apply(service(), decision((3, 4), (5, 7)))
    assert result.applied == PoolCounts(5, 7)
    assert scale_writes(fake) == ["chat-decode", "chat-prefill"]
    assert spec_replicas(fake, "chat-prefill") == 5 and spec_replicas(fake, "chat-decode") == 7
    for name, replicas in (("chat-prefill", 5), ("chat-decode", 7)):
        obj = next(o for o in fake.objects("deployments", NS) if o["metadata"]["name"] == name)
        annotations = obj["metadata"]["annotations"]
        assert annotations[ANNOTATION_REPLICAS] == str(replicas)
        assert json.loads(annotations[ANNOTATION_DECISION])["reason"] == "scale_out_tps"
    events = fake.objects("events", NS)
    assert sorted(e["involvedObject"]["name"] for e in events) == ["chat-decode", "chat-prefill"]
    for event in events:
        assert event["reason"] == "scale_out_tps" and event["type"] == "Normal"
        assert event["involvedObject"]["kind"] == "Deployment" and event["involvedObject"]["uid"]
        assert "prefill 3->5, decode 4->7" in event["message"]
        assert event["lastTimestamp"] == format_time(clock.time())
    # our own write is not a manual edit
    assert not (await actuator.observe(service())).manual_override


async def test_scale_in_writes_prefill_then_decode(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    await actuator.apply(service(), decision((3, 4), (2, 3), "scale_in_tps"))
    assert scale_writes(fake) == ["chat-prefill", "chat-decode"]


async def test_mixed_step_grows_before_it_shrinks(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    await actuator.apply(service(), decision((3, 4), (2, 6), "ratio"))   # prefill down, decode up
    assert scale_writes(fake) == ["chat-decode", "chat-prefill"]
    fake.calls.clear()
    await actuator.observe(service())
    await actuator.apply(service(), decision((2, 6), (4, 5), "ratio"))   # prefill up, decode down
    assert scale_writes(fake) == ["chat-prefill", "chat-decode"]


async def test_statefulsets_scale_too(clock, sleeps):
    fake = FakeKube(clock=clock.time)
    fake.add_namespace(NS)
    for name, n in (("p", 1), ("d", 2)):
        fake.concurrent_write("POST", STATEFULSETS.path(namespace=NS),
                              workload(name, n, kind="StatefulSet"), "application/json")
    actuator = make(fake, clock, sleeps)
    svc = service("p", "d", kind="statefulset")
    assert (await actuator.observe(svc)).current == PoolCounts(1, 2)
    await actuator.apply(svc, decision((1, 2), (2, 3)))
    assert [o["spec"]["replicas"] for o in fake.objects("statefulsets", NS)] == [3, 2]   # d, p
    assert {e["involvedObject"]["kind"] for e in fake.objects("events", NS)} == {"StatefulSet"}


# ---------------------------------------------------------------- manual edits

async def test_manual_edit_is_detected_and_not_overwritten(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    await actuator.apply(service(), decision((3, 4), (5, 7)))
    # a human: kubectl scale deployment chat-decode --replicas=10
    fake.concurrent_write("PATCH", DEPLOYMENTS.path(namespace=NS, name="chat-decode", subresource="scale"),
                          {"spec": {"replicas": 10}})
    status = await actuator.observe(service())
    assert status.manual_override and status.current == PoolCounts(5, 10)
    # the next decision is taken from the human's numbers and clears the override
    await actuator.apply(service(), decision((5, 10), (6, 12)))
    status = await actuator.observe(service())
    assert not status.manual_override and status.current == PoolCounts(6, 12)


async def test_edit_between_observe_and_apply_wins(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    fake.concurrent_write("PATCH", DEPLOYMENTS.path(namespace=NS, name="chat-decode", subresource="scale"),
                          {"spec": {"replicas": 9}})
    with pytest.raises(ApiError) as info:
        await actuator.apply(service(), decision((3, 4), (5, 7)))
    assert info.value.status == 409 and "not overwriting" in str(info.value)
    assert spec_replicas(fake, "chat-decode") == 9 and spec_replicas(fake, "chat-prefill") == 3


async def test_controller_churn_conflict_is_retried(fake, clock, sleeps):
    # status updates bump resourceVersion between our GET scale and PUT scale (the
    # Deployment controller does this right after a change): re-read and write again.
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    fake.inject(409, method="PUT", path_contains="chat-decode/scale", times=1)
    await actuator.apply(service(), decision((3, 4), (3, 6)))
    assert spec_replicas(fake, "chat-decode") == 6


# ---------------------------------------------------------------- failures

async def test_429_and_timeouts_are_retried_with_backoff(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    fake.inject(429, method="PUT", path_contains="chat-decode/scale", times=1, retry_after_s=1)
    fake.inject(0, method="PUT", path_contains="chat-prefill/scale", times=1)
    await actuator.apply(service(), decision((3, 4), (4, 6)))
    assert (spec_replicas(fake, "chat-prefill"), spec_replicas(fake, "chat-decode")) == (4, 6)
    assert sleeps.delays[0] == 1.0 and len(sleeps.delays) == 2


async def test_second_write_failing_compensates_the_first(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    fake.inject(500, method="PUT", path_contains="chat-prefill/scale", times=100)
    with pytest.raises(ApiError) as info:
        await actuator.apply(service(), decision((3, 4), (5, 7)))
    assert "compensated decode 7->4" in str(info.value)
    assert (spec_replicas(fake, "chat-prefill"), spec_replicas(fake, "chat-decode")) == (3, 4)
    assert scale_writes(fake).count("chat-prefill") == 3       # the bounded retries
    assert not fake.objects("events", NS)                       # nothing recorded for a failed step
    status = await actuator.observe(service())
    assert status.current == PoolCounts(3, 4) and not status.manual_override


async def test_failed_compensation_is_reported_loudly(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    fake.inject(500, method="PUT", path_contains="chat-prefill/scale", times=100)
    writes = {"n": 0}
    original = fake.request

    async def fail_decode_after_first_write(method, path, **kw):
        if method == "PUT" and "chat-decode/scale" in path:
            writes["n"] += 1
            if writes["n"] > 1:
                raise ApiError(f"{method} {path}: 503 ServiceUnavailable", status=503)
        return await original(method, path, **kw)

    fake.request = fail_decode_after_first_write
    with pytest.raises(ApiError) as info:
        await actuator.apply(service(), decision((3, 4), (5, 7)))
    assert "COMPENSATION FAILED" in str(info.value) and "decode left at 7" in str(info.value)
    # the actuator knows it wrote 7 itself: not mistaken for a human edit
    fake.request = original
    status = await actuator.observe(service())
    assert status.current == PoolCounts(3, 7) and not status.manual_override


async def test_record_failure_does_not_undo_the_scaling(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps)
    await actuator.observe(service())
    fake.inject(500, method="POST", path_contains="/events", times=100)
    result = await actuator.apply(service(), decision((3, 4), (4, 5)))
    assert result.applied == PoolCounts(4, 5) and "record failed" in result.note
    assert (spec_replicas(fake, "chat-prefill"), spec_replicas(fake, "chat-decode")) == (4, 5)


async def test_dry_run_never_writes(fake, clock, sleeps):
    actuator = make(fake, clock, sleeps, dry_run=True)
    assert not actuator.writes
    await actuator.observe(service())
    result = await actuator.apply(service(), decision((3, 4), (5, 7)))
    assert result.applied == PoolCounts(3, 4) and "dry-run" in result.note
    assert [c for c in fake.calls if c[0] != "GET"] == []


# ---------------------------------------------------------------- fencing

async def test_closed_fence_writes_nothing(fake, clock, sleeps):
    async def fence() -> bool:
        return False

    actuator = make(fake, clock, sleeps, fence=fence)
    await actuator.observe(service())
    with pytest.raises(NotLeaderError):
        await actuator.apply(service(), decision((3, 4), (5, 7)))
    assert [c for c in fake.calls if c[0] != "GET"] == []


async def test_fence_closing_midway_stops_even_compensation(fake, clock, sleeps):
    calls = {"n": 0}

    async def fence() -> bool:
        calls["n"] += 1
        return calls["n"] == 1            # open for the first write only

    actuator = make(fake, clock, sleeps, fence=fence)
    await actuator.observe(service())
    with pytest.raises(NotLeaderError):
        await actuator.apply(service(), decision((3, 4), (5, 7)))
    assert scale_writes(fake) == ["chat-decode"]      # the new leader will re-decide both


async def test_old_leader_refuses_after_losing_the_lease(fake, clock, sleeps):
    fake.add_namespace("system")

    def elect(identity):
        return KubernetesLeaseElection(api=Kube(fake), name="lease", namespace="system",
                                       identity=identity, clock=clock, duration_s=15,
                                       renew_deadline_s=10, retry_period_s=2)

    old, new = elect("old"), elect("new")
    actuator = make(fake, clock, sleeps, fence=old)
    assert await old.tick()
    await actuator.observe(service())
    await actuator.apply(service(), decision((3, 4), (4, 5)))     # leader: allowed
    assert not await new.tick()
    await clock.advance(16)                 # old is paused (no renew); new sees it expire
    assert await new.tick()
    await actuator.observe(service())
    fake.calls.clear()
    with pytest.raises(NotLeaderError):
        await actuator.apply(service(), decision((4, 5), (6, 8)))
    assert [c for c in fake.calls if c[0] != "GET"] == []
    assert (spec_replicas(fake, "chat-prefill"), spec_replicas(fake, "chat-decode")) == (4, 5)


async def test_a_client_retry_is_fenced_too(fake, clock, sleeps):
    """The client's own retry of a failed write (a 503 here) asks the fence again; a lease
    lost between the attempts stops the retry from going out."""
    calls = {"n": 0}

    async def open_until_first_attempt() -> bool:
        calls["n"] += 1
        return calls["n"] == 1

    fence = Fence(open_until_first_attempt)
    actuator = make(fake, clock, sleeps, fence=fence)
    await actuator.observe(service())
    fake.inject(503, method="PUT", path_contains="chat-decode/scale", times=1)
    fake.calls.clear()
    with pytest.raises(NotLeaderError):
        await actuator.apply(service(), decision((3, 4), (5, 7)))
    assert [c for c in fake.calls if c[0] != "GET"] == [("PUT", "/apis/apps/v1/namespaces/llm/deployments/chat-decode/scale")]
    assert len(fence.asked) == 2 and spec_replicas(fake, "chat-decode") == 4


async def test_each_write_attempt_is_bounded_by_the_time_the_fence_grants(fake, clock, sleeps):
    fence = Fence(lambda: _true(), seconds=0.75)
    actuator = make(fake, clock, sleeps, fence=fence)
    await actuator.observe(service())
    fake.timeouts.clear()
    fake.calls.clear()
    await actuator.apply(service(), decision((3, 4), (4, 5)))
    writes = [timeout for (method, _), timeout in zip(fake.calls, fake.timeouts) if method != "GET"]
    reads = [timeout for (method, _), timeout in zip(fake.calls, fake.timeouts) if method == "GET"]
    assert writes and all(timeout == 0.75 for timeout in writes)
    assert reads and all(timeout is None for timeout in reads)       # reads are never fenced


async def _true() -> bool:
    return True
