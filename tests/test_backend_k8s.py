"""The kubernetes backend as the coordinator builds it (fast tier): per-service dispatch
between the scale actuator and the Deployment Group actuator over one fake API
(tests/k8s_fake.py), the ``coordinator.placement`` section and the role ``template``,
and what reaches the status API and ``/metrics`` (placement shortfall, the KV bandwidth
map). The same backend runs against a real control plane in tests/test_e2e_k8s.py."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from heteroscale.coordinator.actuators import make_actuator
from heteroscale.coordinator.actuators.cluster import KubernetesBackend
from heteroscale.coordinator.actuators.groups import DeploymentGroupActuator
from heteroscale.coordinator.actuators.kubernetes import KubernetesActuator
from heteroscale.coordinator.collect import Collector
from heteroscale.coordinator.seams import Collection, ReportTarget
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.kube import DEPLOYMENTS, NODES, Kube, RetryPolicy
from heteroscale.coordinator.metrics import registry_for
from heteroscale.coordinator.reconciler import Reconciler
from heteroscale.coordinator.core.types import Decision, PoolCounts, PoolStatus
from heteroscale.errors import ConfigError
from tests.k8s_fake import FakeClock, FakeKube
from tests.test_collect import ReportServer, report_doc
from tests.test_groups_k8s import H20, L20, template

NS = "llm"


def doc(*, placement: dict | None = None, dg_roles: bool = True) -> dict:
    plain = {"name": "plain", "namespace": NS, "pd_ratio": "1:1", "target_decode_tps_per_instance": 1000,
             "slo": {"tbt_s": 0.1}, "prefill": {"deployment": "plain-prefill"},
             "decode": {"deployment": "plain-decode"}}
    chat = {"name": "chat", "namespace": NS, "pd_ratio": "1:1", "target_decode_tps_per_instance": 1000,
            "slo": {"tbt_s": 0.1}, "affinity": "s2", "priority": 3,
            "prefill": {"template": "chat-prefill", "gpu_types": [L20]},
            "decode": {"template": "chat-decode", "gpu_types": [H20]}}
    coordinator: dict[str, Any] = {"backend": "kubernetes"}
    if placement is not None:
        coordinator["placement"] = placement
    return {"coordinator": coordinator, "services": [plain, chat] if dg_roles else [plain]}


def node(name: str, gpu_type: str, *, s2: str, s1: str, gpus: int = 4, labels: dict | None = None) -> dict:
    res = {"cpu": "64", "nvidia.com/gpu": str(gpus), "pods": "110"}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels or {"nvidia.com/gpu.product": gpu_type,
                                                            "heteroscale.io/s2": s2, "heteroscale.io/s1": s1}},
            "status": {"allocatable": res, "capacity": res, "conditions": [{"type": "Ready", "status": "True"}]}}


def plain_deployment(name: str, replicas: int) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "e", "image": "x"}]}}},
            "status": {"replicas": replicas, "readyReplicas": replicas}}


@pytest.fixture
def world():
    clock = FakeClock()
    fake = FakeKube(clock=clock.time)
    fake.add_namespace(NS)
    api = Kube(fake, retry=RetryPolicy(attempts=1))
    return fake, api, clock


async def seed(api: Kube) -> None:
    for n in (node("a-l20", L20, s2="a", s1="a1"), node("a-h20", H20, s2="a", s1="a2"),
              node("b-h20", H20, s2="b", s1="b1")):
        await api.create(NODES, n)
    for name, replicas in (("plain-prefill", 2), ("plain-decode", 2)):
        await api.create(DEPLOYMENTS, plain_deployment(name, replicas), namespace=NS)
    for role in ("prefill", "decode"):
        await api.create(DEPLOYMENTS, template(f"chat-{role}", role, NS), namespace=NS)


# ---------------------------------------------------------------- config


def test_template_roles_and_placement_section_are_read():
    cfg = load_config(doc(placement={"gpu_type_label": "example.com/gpu", "drain_window_s": 5,
                                     "ratio_tolerance": 0.1}))
    plain, chat = cfg.services
    assert not plain.uses_groups and chat.uses_groups
    assert chat.prefill.group_template == ("Deployment", "chat-prefill") and chat.prefill.workload is None
    p = cfg.coordinator.placement
    assert (p.gpu_type_label, p.s1_label, p.s2_label, p.gpu_resource) == (
        "example.com/gpu", "heteroscale.io/s1", "heteroscale.io/s2", "nvidia.com/gpu")
    assert (p.drain_window_s, p.ratio_tolerance) == (5.0, 0.1)


def test_every_placement_and_template_problem_at_once():
    bad = doc(placement={"gpu_type_label": "not a label!", "s1_label": "heteroscale.io/s2",
                         "drain_window_s": -1, "ratio_tolerance": 20, "spread": True})
    bad["services"][1]["prefill"]["deployment"] = "chat-prefill-too"
    bad["services"][1]["decode"] = {"deployment": "chat-decode"}
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    problems = err.value.problems
    for fragment in ("coordinator.placement.gpu_type_label: must be a Kubernetes label key",
                     "coordinator.placement.drain_window_s: must be >= 0",
                     "coordinator.placement.ratio_tolerance: must be <= 9.99",
                     "coordinator.placement.spread: unknown key",
                     "coordinator.placement: gpu_type_label, s1_label and s2_label must be three different",
                     "services[1].prefill.template: a Deployment Group template replaces deployment/statefulset",
                     "services[1]: both roles must give a template (Deployment Groups) or neither"):
        assert any(fragment in p for p in problems), (fragment, problems)


# ---------------------------------------------------------------- dispatch


async def test_plain_config_builds_no_group_actuator(world):
    _, api, _ = world
    backend = make_actuator(load_config(doc(dg_roles=False)), kube=api)
    assert isinstance(backend, KubernetesBackend)
    assert isinstance(backend.scale, KubernetesActuator) and backend.groups is None
    assert backend.switches == {}


async def test_each_service_goes_to_its_actuator_sharing_client_and_fence(world):
    fake, api, clock = world
    await seed(api)
    fences: list[str] = []

    class Fence:
        async def permit(self, what: str) -> float:
            fences.append(what)
            return 5.0

    cfg = load_config(doc(placement={"drain_window_s": 7}))
    fenced = api.fenced(Fence())
    backend = KubernetesBackend(cfg, api=fenced, clock=clock)
    assert isinstance(backend.groups, DeploymentGroupActuator)
    assert backend.scale.api is backend.groups.api is fenced
    assert backend.groups.settings.drain_window_s == 7
    plain, chat = cfg.services

    # the plain service: its named Deployments, scaled in place
    status = await backend.observe(plain)
    assert status.current == PoolCounts(2, 2) and status.groups == ()
    # the DG service: nothing yet; a write creates one DG pair from the templates
    assert (await backend.observe(chat)).current == PoolCounts(0, 0)
    result = await backend.apply(chat, Decision(service="chat", at=0.0, reason="scale_out_tps",
                                                current=PoolCounts(0, 0), desired=PoolCounts(2, 2)))
    assert result.applied == PoolCounts(2, 2) and result.shortfall == PoolCounts(0, 0)
    assert fences and all(not w.startswith("GET") for w in fences), "every DG write asked the shared fence"
    names = sorted(d["metadata"]["name"] for d in fake.objects("deployments", NS))
    assert names == ["chat-decode", "chat-g0-decode", "chat-g0-prefill", "chat-prefill",
                     "plain-decode", "plain-prefill"]
    # the plain Deployments were not touched
    assert [d["spec"]["replicas"] for d in fake.objects("deployments", NS)
            if d["metadata"]["name"].startswith("plain-")] == [2, 2]
    status = await backend.observe(chat)
    assert status.current == PoolCounts(2, 2)
    (group,) = status.groups
    # s2 affinity: L20 under a1 and H20 under a2 share S2 "a" (medium tier); B has no L20
    assert (group["level"], group["s2"], group["tier"]) == ("s2", "a", "medium")
    assert (group["prefill"]["gpu_type"], group["decode"]["gpu_type"]) == (L20, H20)
    assert backend.switches == {"a-l20": ("a", "a1"), "a-h20": ("a", "a2"), "b-h20": ("b", "b1")}


async def test_placement_labels_from_the_config_reach_the_dg_deployments(world):
    fake, api, clock = world
    keys = {"gpu_type_label": "example.com/gpu", "s1_label": "example.com/leaf", "s2_label": "example.com/spine"}
    for name, gpu, s1 in (("x-l20", L20, "x1"), ("x-h20", H20, "x1")):
        await api.create(NODES, node(name, gpu, s2="", s1="", labels={
            "example.com/gpu": gpu, "example.com/spine": "x", "example.com/leaf": s1}))
    for role in ("prefill", "decode"):
        await api.create(DEPLOYMENTS, template(f"chat-{role}", role, NS), namespace=NS)
    cfg = load_config(doc(placement=keys))
    backend = KubernetesBackend(cfg, api=api, clock=clock)
    result = await backend.apply(cfg.services[1], Decision(service="chat", at=0.0, reason="scale_out_tps",
                                                           current=PoolCounts(0, 0), desired=PoolCounts(1, 1)))
    assert result.applied == PoolCounts(1, 1)
    dep = next(d for d in fake.objects("deployments", NS) if d["metadata"]["name"] == "chat-g0-decode")
    terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys_used = {e["key"] for e in terms[0]["matchExpressions"]}
    assert keys_used == {"example.com/gpu", "example.com/spine"}


async def test_a_shortfall_is_shown_in_status_and_metrics(world):
    fake, api, clock = world
    await seed(api)
    cfg = load_config(doc())
    backend = KubernetesBackend(cfg, api=api, clock=clock)
    chat = cfg.services[1]
    # 4 L20 GPUs in the whole cluster: 6 prefill cannot be placed
    result = await backend.apply(chat, Decision(service="chat", at=0.0, reason="scale_out_tps",
                                                current=PoolCounts(0, 0), desired=PoolCounts(6, 6)))
    assert result.shortfall.total() > 0

    class NoReports:
        errors_total: dict = {}
        latest: dict = {}

        async def collect(self, service):
            return Collection(service=service.name, fetched=(), errors={})

        async def close(self) -> None:
            pass

    rec = Reconciler(config=cfg, actuator=backend, collector=NoReports(), clock=lambda: clock.time())
    rt = rec.services["chat"]
    rt.shortfall = result.shortfall          # as the write that fell short recorded it
    await rec.tick()                          # no reports: a hold, and the next snapshot
    status = rec.status(history=False)["services"][1]
    assert status["placement_shortfall"] == result.shortfall.as_dict()
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry_for(rec)).decode())}
    samples = {(s.labels["service"], s.labels["role"]): s.value
               for s in families["heteroscale_placement_shortfall"].samples}
    assert samples == {("chat", "prefill"): float(result.shortfall.prefill),
                       ("chat", "decode"): float(result.shortfall.decode)}


# ---------------------------------------------------------------- KV bandwidth map


class TwoTargets:
    def __init__(self, server: ReportServer) -> None:
        self.server = server

    async def targets(self, service: Any) -> list[ReportTarget]:
        return [ReportTarget(url=self.server.url("/p0"), role="prefill", pod="p0"),
                ReportTarget(url=self.server.url("/d0"), role="decode", pod="d0"),
                ReportTarget(url=self.server.url("/d1"), role="decode", pod="d1")]


async def test_kv_bandwidth_map_reaches_status_and_metrics_with_switches_from_the_backend(world):
    _, api, clock = world
    cfg = load_config(doc())
    backend = KubernetesBackend(cfg, api=api, clock=clock)
    assert backend.groups is not None
    backend.groups.switches = {"n-a": ("a", "a1"), "n-b": ("b", "b1")}
    now = time.time()
    peers = [{"peer": "d0", "measured_at": now - 5, "bytes_per_second": 10e9, "rtt_s": 1e-4},
             {"peer": "d1", "measured_at": now - 5, "bytes_per_second": 6e9, "rtt_s": 2e-4}]
    server = await ReportServer().start()
    try:
        server.routes["/p0"] = report_doc(role="prefill", pod="p0", observed_at=now, node="n-a",
                                          kv_transfer={"probe": {"peers": peers}})
        server.routes["/d0"] = report_doc(role="decode", pod="d0", observed_at=now, node="n-a")
        server.routes["/d1"] = report_doc(role="decode", pod="d1", observed_at=now, node="n-b")
        collector = Collector(source=TwoTargets(server), timeout_s=2)

        class Fixed:
            name, writes = "kubernetes", False
            switches, pod_groups = backend.switches, {}

            async def observe(self, service):
                return PoolStatus(current=PoolCounts(1, 2), ready=PoolCounts(1, 2), pending=PoolCounts(0, 0))

            async def close(self) -> None:
                pass

        rec = Reconciler(config=cfg, actuator=Fixed(), collector=collector, clock=time.time)
        await rec.tick()
        await collector.close()
    finally:
        await server.stop()
    chat = rec.status(history=False)["services"][1]
    bw = chat["kv_bandwidth"]
    assert {(p["decode"], p["locality"]) for p in bw["pairs"]} == {("d0", "same_switch"), ("d1", "cross_switch")}
    assert bw["same_switch_median_bytes_per_second"] == 10e9
    assert bw["cross_switch_median_bytes_per_second"] == 6e9
    assert [f["decode"] for f in bw["flagged"]] == ["d1"]           # 6 < 0.85 x 10
    assert rec.status(history=False)["services"][0]["kv_bandwidth"] is None
    text = generate_latest(registry_for(rec)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    medians = {s.labels["locality"]: s.value for s in families["heteroscale_kv_bandwidth_median_bytes_per_second"]
               .samples}
    assert medians == {"same_switch": 10e9, "cross_switch": 6e9}
    assert [s.value for s in families["heteroscale_kv_bandwidth_flagged_pairs"].samples] == [1.0]


async def test_an_event_names_the_decode_workload_and_is_written_through_the_fence(world):
    fake, api, clock = world
    await seed(api)
    asked: list[str] = []

    class Fence:
        async def permit(self, what: str) -> float:
            asked.append(what)
            return 5.0

    cfg = load_config(doc())
    backend = KubernetesBackend(cfg, api=api.fenced(Fence()), clock=clock)
    plain, chat = cfg.services
    await backend.record_event(plain, reason="PdRatioDrift", message="the traffic needs about 3:1", warning=True)
    await backend.record_event(chat, reason="PdRatioDrift", message="the traffic needs about 2:1")
    events = fake.objects("events", NS)
    about = {(e["involvedObject"]["kind"], e["involvedObject"]["name"], e["type"]) for e in events}
    assert ("Deployment", "plain-decode", "Warning") in about and ("Deployment", "chat-decode", "Normal") in about
    assert all(e["reason"] == "PdRatioDrift" for e in events) and len(asked) == 2
