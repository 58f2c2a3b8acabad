"""The whole loop on a real control plane (issue 8; marker ``k8s``, k8s-envtest v1.20 with
the scheduler and the controllers).

What is real: kube-apiserver, scheduler, Deployment/ReplicaSet controllers, the
manifests' least-privilege RBAC as an operator installs it for a Deployment-Group service
(``manifests/base`` + ``manifests/placement`` + a ``manifests/service-namespace`` overlay
with its ``groups`` component for the test's namespace, rendered by kustomize), a
``heteroscale coordinator`` PROCESS that talks to the API with the ServiceAccount's own
token and elects itself on the one Lease the RBAC names (so a verb or a name missing from
those manifests fails this test), and one ``heteroscale emulate-engine`` + ``heteroscale
sidecar`` process pair per pod.

What stands in: the GPU machines are labelled Node objects (``nvidia.com/gpu.product``,
``heteroscale.io/s1``/``s2``, allocatable ``nvidia.com/gpu``); there is no kubelet, so
``PodRunner`` plays it: a pod the scheduler bound gets a loopback pod IP (127.R.0.N:
every 127.x address is local on Linux), its two processes are started bound to that
address on the ports the coordinator's pod discovery uses, and its status says
Running / ContainersReady once the engine answers, Ready when every readiness gate
(the coordinator's ready-ratio gate) is True too. Pods that are deleted lose their
processes.

The service runs as Deployment Groups with ``affinity: s1``, prefill on one GPU type
and decode on another. Only one S1 switch holds both types; a second switch holds
plenty of the decode type alone, so a pod on the wrong switch would be visible.
Load (completions to the decode emulators) goes up: both pools grow together and the
new pods are bound to the mixed switch's nodes of their type; load stops: one instance
per role leaves traffic (gate False, ``Draining``), and after the drain window the real
ReplicaSets remove exactly those pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml

from heteroscale.coordinator.actuators.groups import (ANNOTATION_GROUP, GATE, LABEL_DG, LABEL_ROLE, MANAGED_BY,
                                                  is_draining)
from heteroscale.coordinator.kube import DEPLOYMENTS, LEASES, NODES, PODS, Kube, format_time
from tests.conftest import free_port
from tests.k8s_envtest import (Cluster, apply_objects, delete_objects, eventually, k8s_cluster,  # noqa: F401
                               k8s_namespace, kube, service_account_kubeconfig)
from tests.test_groups_k8s import template
from tests.test_manifests import service_namespace, with_placement

pytestmark = pytest.mark.k8s

HETEROSCALE = [sys.executable, "-m", "heteroscale"]
SA_NAMESPACE, SA_NAME = "heteroscale-system", "heteroscale-coordinator"


# ---------------------------------------------------------------- cluster setup

RBAC_KINDS = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
LEASE = "heteroscale-coordinator"      # the one Lease the RBAC lets the coordinator renew


def rbac_objects(cluster: Cluster, namespace: str, work: Path) -> list[dict]:
    """Install the coordinator's least-privilege RBAC as an operator would for a Deployment
    Group service in ``namespace``: the base (ServiceAccount, the Lease Role), the placement
    component (cluster-wide reads), and the service-namespace overlay with the groups
    component. Returns what was created, for ``delete_objects`` (the session's control
    plane is shared: tests/test_manifests_k8s.py needs these absent)."""
    docs = [d for d in with_placement(work / "coordinator") + service_namespace(work / namespace, namespace)
            if d["kind"] in RBAC_KINDS]
    return apply_objects(cluster, docs)


def gpu_node(name: str, *, gpu_type: str, s2: str, s1: str, gpus: int) -> dict:
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "nvidia.com/gpu.product": gpu_type,
                                                  "heteroscale.io/s2": s2, "heteroscale.io/s1": s1}},
            "spec": {},
            "status": {"allocatable": resources, "capacity": resources,
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}


# ---------------------------------------------------------------- the kubelet stand-in

@dataclass
class PodProcs:
    ip: str
    role: str
    node: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    started_s: float = 0.0

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


class PodRunner:
    """Plays the kubelet for one namespace (see the module docstring)."""

    def __init__(self, api: Kube, namespace: str, *, logs: Path, sidecar_port: int, engine_port: int,
                 probe_port: int, gpu_of_role: dict[str, str]) -> None:
        self.api, self.namespace, self.logs = api, namespace, logs
        self.sidecar_port, self.engine_port, self.probe_port = sidecar_port, engine_port, probe_port
        self.secret = logs / "probe-secret"
        self.secret.write_text(uuid.uuid4().hex * 2)
        self.gpu_of_role = gpu_of_role
        self.net = random.randint(40, 250)
        self.next_host = 11
        self.pods: dict[str, PodProcs] = {}
        self.stopped: list[str] = []
        self.http: aiohttp.ClientSession | None = None

    def _spawn(self, name: str, role: str, node: str) -> PodProcs:
        ip = f"127.{self.net}.0.{self.next_host}"
        self.next_host += 1
        entry = PodProcs(ip=ip, role=role, node=node, started_s=time.monotonic())
        out = open(self.logs / f"{name}.log", "ab")   # noqa: SIM115 (closed with the process)
        # KV-transfer probes: decode sidecars serve them, a prefill sidecar probes the decode
        # pods running when it starts (the coordinator's bandwidth map joins the results)
        if role == "decode":
            probe = ["--probe-listen", f"{ip}:{self.probe_port}"]
        else:
            peers = ",".join(f"{n}={e.ip}:{self.probe_port}" for n, e in sorted(self.pods.items())
                             if e.role == "decode")
            probe = ["--probe-peers", peers, "--probe-interval-s", "1", "--probe-bytes", "262144"] if peers else []
        probe += ["--probe-secret-file", str(self.secret)] if probe else []
        entry.procs.append(subprocess.Popen(
            HETEROSCALE + ["emulate-engine", "--role", role, "--gpu", self.gpu_of_role[role], "--model", "8b",
                           "--host", ip, "--port", str(self.engine_port), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT))
        entry.procs.append(subprocess.Popen(
            HETEROSCALE + ["sidecar", "--engine", "vllm", "--engine-url", f"http://{ip}:{self.engine_port}",
                           "--role", role, "--service", "chat", "--listen", f"{ip}:{self.sidecar_port}",
                           "--interval", "0.5", "--window", "2", "--gpu-source", "none", "--no-rdma",
                           "--pod", name, "--node", node, "--log-level", "WARNING", *probe],
            stdout=out, stderr=subprocess.STDOUT))
        out.close()
        return entry

    async def _engine_up(self, entry: PodProcs) -> bool:
        assert self.http is not None
        try:
            async with self.http.get(f"http://{entry.ip}:{self.sidecar_port}/v1/report",
                                     timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
                return resp.status == 200 and (await resp.json()).get("engine_up", True) is not False
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return False

    async def step(self) -> None:
        pods = await self.api.list(PODS, namespace=self.namespace, label_selector=f"{MANAGED_BY}=heteroscale")
        live = {p["metadata"]["name"]: p for p in pods if not p["metadata"].get("deletionTimestamp")}
        for name in [n for n in self.pods if n not in live]:
            self.pods.pop(name).stop()
            self.stopped.append(name)
        for name, pod in sorted(live.items()):
            node = pod["spec"].get("nodeName")
            if not node:
                continue
            entry = self.pods.get(name)
            role = pod["metadata"]["labels"][LABEL_ROLE]
            if entry is None and role == "prefill" and not self.decode_ips():
                continue   # its sidecar's probe peers are the decode pods: start those first
            if entry is None:
                entry = self.pods[name] = self._spawn(name, role, node)
            engine = await self._engine_up(entry)
            conds = {c["type"]: c.get("status") for c in pod.get("status", {}).get("conditions") or []}
            gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
            ready = engine and all(conds.get(g) == "True" for g in gates)
            want = {"ContainersReady": "True" if engine else "False", "Ready": "True" if ready else "False"}
            if (pod["status"].get("phase") == "Running" and pod["status"].get("podIP") == entry.ip
                    and all(conds.get(k) == v for k, v in want.items())):
                continue
            now = format_time(time.time())
            await self.api.patch(PODS, name, {"status": {
                "phase": "Running", "podIP": entry.ip, "podIPs": [{"ip": entry.ip}],
                "conditions": [{"type": k, "status": v, "lastTransitionTime": now} for k, v in want.items()]}},
                namespace=self.namespace, subresource="status", patch_type="strategic")

    async def run(self) -> None:
        self.http = aiohttp.ClientSession()
        try:
            while True:
                await self.step()
                await asyncio.sleep(0.3)
        finally:
            await self.http.close()

    def close(self) -> None:
        for entry in self.pods.values():
            entry.stop()
        self.pods.clear()

    def decode_ips(self) -> list[str]:
        return [e.ip for e in self.pods.values() if e.role == "decode"]


async def drive_load(runner: PodRunner, *, streams: int) -> None:
    """``streams`` requests always in flight, spread over the running decode emulators."""
    async def one(session: aiohttp.ClientSession, index: int) -> None:
        while True:
            ips = runner.decode_ips()
            if not ips:
                await asyncio.sleep(0.2)
                continue
            ip = ips[index % len(ips)]
            try:
                async with session.post(f"http://{ip}:{runner.engine_port}/v1/completions",
                                        json={"model": "8b", "prompt": "hello " * 50, "max_tokens": 200},
                                        timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                await asyncio.sleep(0.2)   # a pod that just went away

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, i) for i in range(streams)))


# ---------------------------------------------------------------- helpers

async def stop_task(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def coordinator_config(*, namespace: str, port: int, sidecar_port: int, lease: str, types: dict[str, str]) -> dict:
    return {
        "coordinator": {
            "backend": "kubernetes", "interval_s": 1.0, "listen": f"127.0.0.1:{port}", "observe_timeout_s": 5,
            "lease": {"name": lease, "namespace": SA_NAMESPACE, "duration_s": 6, "renew_deadline_s": 4,
                      "retry_period_s": 1},
            # a write attempt must end well inside duration - renew_deadline (2 s)
            "api": {"write_timeout_s": 1.5},
            "collect": {"timeout_s": 0.5, "sidecar_port": sidecar_port},
            "placement": {"drain_window_s": 2, "ratio_tolerance": 0.25},
        },
        "services": [{
            "name": "chat", "namespace": namespace, "pd_ratio": "1:1", "affinity": "s1", "priority": 1,
            "target_decode_tps_per_instance": 200.0, "min_decode": 1, "max_decode": 2,
            "prefill": {"template": "chat-prefill", "gpu_types": [types["prefill"]]},
            "decode": {"template": "chat-decode", "gpu_types": [types["decode"]]},
            "policy": {"scale_out_cooldown_s": 0, "scale_in_stabilization_s": 3, "warmup_s": 0,
                       "smoothing_window_s": 0, "report_max_age_s": 10, "pending_timeout_s": 60,
                       "latency_net": {"enabled": False}},
        }],
    }


async def fetch_json(url: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return await resp.json()


async def fetch_text(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return await resp.text()


# ---------------------------------------------------------------- the test

async def test_load_up_and_down_through_a_real_coordinator_process(k8s_cluster, kube, k8s_namespace,  # noqa: F811
                                                                   tmp_path):
    tag = uuid.uuid4().hex[:6]
    types = {"prefill": f"E2E-{tag}-L20", "decode": f"E2E-{tag}-H20"}
    # switch A: one S1 with both types (the only place an s1-affine pair fits);
    # switch B: decode-type GPUs alone (a decode pod there would be on the wrong switch)
    nodes = [gpu_node(f"e2e-{tag}-a-l20", gpu_type=types["prefill"], s2=f"a-{tag}", s1="a1", gpus=2),
             gpu_node(f"e2e-{tag}-a-h20", gpu_type=types["decode"], s2=f"a-{tag}", s1="a1", gpus=2),
             gpu_node(f"e2e-{tag}-b-h20", gpu_type=types["decode"], s2=f"b-{tag}", s1="b1", gpus=8)]
    rbac = rbac_objects(k8s_cluster, k8s_namespace, tmp_path / "manifests")
    try:
        for node in nodes:
            await kube.create(NODES, node)
        for role in ("prefill", "decode"):
            await kube.create(DEPLOYMENTS, template(f"chat-{role}", role, k8s_namespace), namespace=k8s_namespace)
        await run_loop(k8s_cluster, kube, k8s_namespace, tmp_path, tag=tag, types=types, nodes=nodes)
    finally:
        delete_objects(k8s_cluster, rbac)
        with contextlib.suppress(Exception):
            await kube.delete(LEASES, LEASE, namespace=SA_NAMESPACE)
        for node in nodes:
            with contextlib.suppress(Exception):
                await kube.delete(NODES, node["metadata"]["name"])


async def run_loop(k8s_cluster: Cluster, kube: Kube, k8s_namespace: str, tmp_path: Path, *,  # noqa: F811
                   tag: str, types: dict[str, str], nodes: list[dict]) -> None:
    labels_of = {n["metadata"]["name"]: n["metadata"]["labels"] for n in nodes}
    kubeconfig = service_account_kubeconfig(k8s_cluster, tmp_path / "sa-kubeconfig", namespace=SA_NAMESPACE,
                                            name=SA_NAME)

    port, sidecar_port, engine_port, probe_port = free_port(), free_port(), free_port(), free_port()
    config = tmp_path / "coordinator.yaml"
    config.write_text(yaml.safe_dump(coordinator_config(namespace=k8s_namespace, port=port,
                                                        sidecar_port=sidecar_port, lease=LEASE,
                                                        types=types)))
    runner = PodRunner(kube, k8s_namespace, logs=tmp_path, sidecar_port=sidecar_port, engine_port=engine_port,
                       probe_port=probe_port, gpu_of_role={"prefill": "L20", "decode": "H20"})
    coordinator_log = open(tmp_path / "coordinator.log", "wb")   # noqa: SIM115
    started = time.monotonic()
    coordinator = subprocess.Popen(HETEROSCALE + ["coordinator", "--config", str(config), "--kubeconfig",
                                                  str(kubeconfig), "--identity", f"e2e-{tag}"],
                                   stdout=coordinator_log, stderr=subprocess.STDOUT)
    kubelet = asyncio.create_task(runner.run(), name="e2e-kubelet")
    load: asyncio.Task | None = None
    timings: dict[str, float] = {}
    base = f"http://127.0.0.1:{port}"

    async def service() -> dict:
        try:
            return (await fetch_json(f"{base}/api/v1/status?history=0"))["services"][0]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
            return {}

    async def deployments() -> dict[str, dict]:
        deps = await kube.list(DEPLOYMENTS, namespace=k8s_namespace, label_selector=f"{MANAGED_BY}=heteroscale")
        return {d["metadata"]["name"]: d for d in deps}

    async def live_pods() -> list[dict]:
        pods = await kube.list(PODS, namespace=k8s_namespace, label_selector=f"{MANAGED_BY}=heteroscale")
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    async def ready_pools(prefill: int, decode: int):
        svc = await service()
        pools = (svc.get("prefill", {}).get("ready"), svc.get("decode", {}).get("ready"),
                 svc.get("prefill", {}).get("current"), svc.get("decode", {}).get("current"))
        return svc if pools == (prefill, decode, prefill, decode) else None

    def spec_total(deps: dict[str, dict], role: str) -> int:
        return sum(d["spec"]["replicas"] for d in deps.values() if d["metadata"]["labels"][LABEL_ROLE] == role)

    def assert_placed(pods: list[dict], deps: dict[str, dict]) -> None:
        for pod in pods:
            labels = pod["metadata"]["labels"]
            dep = deps[f"{labels[LABEL_DG]}-{labels[LABEL_ROLE]}"]
            group = json.loads(dep["metadata"]["annotations"][ANNOTATION_GROUP])
            node = labels_of[pod["spec"]["nodeName"]]
            assert group["level"] == "s1", group
            assert node["nvidia.com/gpu.product"] == types[labels[LABEL_ROLE]], pod["spec"]["nodeName"]
            assert (node["heteroscale.io/s2"], node["heteroscale.io/s1"]) == (f"a-{tag}", "a1"), \
                pod["spec"]["nodeName"]

    try:
        # 1. no load: the coordinator creates the minimum pair (1P/1D) as one Deployment Group
        svc = await eventually(lambda: ready_pools(1, 1), what="1P/1D ready", timeout_s=40)
        timings["start_to_1p1d_ready_s"] = time.monotonic() - started
        deps = await deployments()
        assert (spec_total(deps, "prefill"), spec_total(deps, "decode")) == (1, 1)
        assert_placed(await live_pods(), deps)
        (group,) = svc["groups"]
        assert group["level"] == "s1" and group["tier"] == "high"
        assert (group["prefill"]["gpu_type"], group["decode"]["gpu_type"]) == (types["prefill"], types["decode"])
        # the prefill sidecar probes the decode pod; the two share S1 "a1" (node topology via the DG backend)
        async def probed():
            bw = (await service()).get("kv_bandwidth") or {}
            # the probe's pair (the engines' connector speeds may have given an estimate of it first)
            return bw if any(p["bytes_per_second"] and p["source"] == "probe" for p in bw.get("pairs", ())) else None
        bw = await eventually(probed, what="a probed prefill->decode pair in kv_bandwidth", timeout_s=20)
        timings["start_to_kv_pair_s"] = time.monotonic() - started
        (pair,) = bw["pairs"]
        assert pair["locality"] == "same_switch" and pair["shared_domain"] == "s1" and pair["group"] == "chat-g0"
        assert pair["source"] == "probe"
        assert bw["same_switch_median_bytes_per_second"] == pair["bytes_per_second"]
        assert "heteroscale_kv_bandwidth_median_bytes_per_second{" in await fetch_text(f"{base}/metrics")

        # 2. load up: decode tokens/s far above 1 x tau -> both pools grow to 2 in one step
        load = asyncio.create_task(drive_load(runner, streams=16), name="e2e-load")
        load_on = time.monotonic()

        async def grown():
            deps = await deployments()
            return deps if (spec_total(deps, "prefill"), spec_total(deps, "decode")) == (2, 2) else None
        deps = await eventually(grown, what="Deployments scaled to 2P/2D", timeout_s=30)
        timings["load_up_to_2p2d_spec_s"] = time.monotonic() - load_on
        svc = await eventually(lambda: ready_pools(2, 2), what="2P/2D ready", timeout_s=30)
        timings["load_up_to_2p2d_ready_s"] = time.monotonic() - load_on
        pods = await live_pods()
        assert len(pods) == 4 and all(p["spec"].get("nodeName") for p in pods)
        assert_placed(pods, await deployments())
        assert svc["decode_tps"] is not None and svc["decode_tps"] > 1.1 * 200.0   # above 1 x tau + tolerance
        scale_outs = [d for d in svc["decisions"] if d["direction"] == "out" and d["from"]["decode"] >= 1]
        assert scale_outs and all(d["to"] == {"prefill": 2, "decode": 2} for d in scale_outs), svc["decisions"]
        # the two pools never diverged: every decision keeps P == D (ratio 1:1)
        assert all(d["to"]["prefill"] == d["to"]["decode"] for d in svc["decisions"])
        metrics = await fetch_text(f"{base}/metrics")
        assert 'heteroscale_placement_shortfall{role="decode",service="chat"} 0.0' in metrics
        assert 'heteroscale_current_replicas{role="prefill",service="chat"} 2.0' in metrics

        # 3. load stops: one instance per role leaves traffic (gate False, Draining) ...
        await stop_task(load)
        load = None
        load_off = time.monotonic()

        def gate(pod: dict) -> dict:
            return next((c for c in pod["status"].get("conditions") or () if c["type"] == GATE), {})

        async def draining():
            # the drain is two writes (annotation, then the gate): wait for both
            pods = await live_pods()
            out = [p for p in pods if is_draining(p) and gate(p).get("status") == "False"]
            return out if len(out) == 2 else None
        drained = await eventually(draining, what="two instances draining", timeout_s=30, step_s=0.1)
        timings["load_down_to_drain_s"] = time.monotonic() - load_off
        assert sorted(p["metadata"]["labels"][LABEL_ROLE] for p in drained) == ["decode", "prefill"]
        assert all(gate(p)["reason"] == "Draining" for p in drained)
        drained_names = {p["metadata"]["name"] for p in drained}

        # ... and after the drain window the ReplicaSets delete exactly those pods
        async def removed():
            pods = await live_pods()
            names = {p["metadata"]["name"] for p in pods}
            deps = await deployments()
            done = (len(pods) == 2 and not names & drained_names
                    and (spec_total(deps, "prefill"), spec_total(deps, "decode")) == (1, 1))
            return pods if done else None
        pods = await eventually(removed, what="drained pods removed", timeout_s=30)
        timings["load_down_to_removed_s"] = time.monotonic() - load_off
        assert_placed(pods, await deployments())
        await eventually(lambda: ready_pools(1, 1), what="1P/1D ready after scale-in", timeout_s=15)
        await eventually(lambda: asyncio.sleep(0, drained_names <= set(runner.stopped)),
                         what="drained pods' processes stopped", timeout_s=10)
        timings["total_s"] = time.monotonic() - started
        print("e2e timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
        assert coordinator.poll() is None, "the coordinator process died"
    finally:
        if load is not None:
            await stop_task(load)
        await stop_task(kubelet)
        runner.close()
        if coordinator.poll() is None:
            coordinator.send_signal(signal.SIGTERM)
            try:
                coordinator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                coordinator.kill()
                coordinator.wait(timeout=5)
        coordinator_log.close()
        if os.environ.get("HETEROSCALE_E2E_LOG"):
            sys.stderr.write((tmp_path / "coordinator.log").read_text(errors="replace")[-8000:])
