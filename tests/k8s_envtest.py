"""A real Kubernetes control plane for the ``k8s`` test tier (../shared/tools/k8s-envtest).

``k8s_cluster`` (session): starts etcd + kube-apiserver + controller-manager + scheduler
once per test session on 127.0.0.1 and stops them at the end; skips the test when
``k8s-envtest install --check`` fails (not built on this machine) or the tool is absent.
Import the fixtures you use into a test module; however many modules import them, one
control plane serves the whole session (a process-wide singleton, stopped by the last
session-fixture teardown).

``k8s_namespace``: a fresh namespace per test (deleted afterwards; the controllers clean
it up in the background). ``kube``: a ``Kube`` client for the cluster (closed afterwards).

Limits of v1.20 envtest: no kubelet, so pods stay Pending unless a test acts as the kubelet
(``mark_pods_ready`` patches pod status); nodes need ``status.allocatable``.

Also runnable as ``python -m tests.k8s_envtest candidate --kubeconfig K --namespace N
--identity I`` (or ``--lease-file PATH`` for the local lease): one election candidate
process for the multi-process failover tests; it prints ``LEADER <identity>`` /
``FOLLOWER <identity>`` on every change. SIGKILL is a crash, SIGINT a clean shutdown.
``python -m tests.k8s_envtest failover [--runs N] [--out FILE]`` measures crash takeover
and release handover times on a real control plane (docs/kubernetes.md quotes it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.settings import ServiceConfig

REPO = Path(__file__).resolve().parents[1]
TOOL = Path(os.environ.get("HETEROSCALE_K8S_ENVTEST", REPO.parent / "shared" / "tools" / "k8s-envtest"))


@dataclass(frozen=True)
class Cluster:
    run_dir: Path
    kubeconfig: Path

    def core(self):
        """A synchronous CoreV1Api/AppsV1Api pair for setup steps (like kubectl)."""
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=str(self.kubeconfig))
        return client.CoreV1Api(api_client), client.AppsV1Api(api_client)


def envtest_available() -> tuple[bool, str]:
    if not TOOL.is_file() or not os.access(TOOL, os.X_OK):
        return False, f"{TOOL} not found"
    try:
        check = subprocess.run([str(TOOL), "install", "--check"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"k8s-envtest install --check failed: {exc}"
    if check.returncode != 0:
        return False, "k8s-envtest is not installed (run: k8s-envtest install)"
    return True, ""


class _Singleton:
    cluster: Cluster | None = None
    users = 0
    failure: str = ""


def _start() -> Cluster:
    run_dir = Path(tempfile.mkdtemp(prefix="heteroscale-k8s-"))
    started = subprocess.run([str(TOOL), "start", str(run_dir), "--controllers"],
                             capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        subprocess.run([str(TOOL), "stop", str(run_dir)], capture_output=True, timeout=60)
        raise RuntimeError(f"k8s-envtest start failed ({started.returncode}): "
                           f"{started.stderr.strip()[-2000:]}")
    kubeconfig = Path(started.stdout.strip().splitlines()[-1])
    return Cluster(run_dir=run_dir, kubeconfig=kubeconfig)


def _stop(cluster: Cluster) -> None:
    subprocess.run([str(TOOL), "stop", str(cluster.run_dir)], capture_output=True, timeout=60)
    shutil.rmtree(cluster.run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def k8s_cluster():
    ok, why = envtest_available()
    if not ok:
        pytest.skip(why)
    if _Singleton.failure:
        pytest.fail(_Singleton.failure)
    if _Singleton.cluster is None:
        try:
            _Singleton.cluster = _start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            _Singleton.failure = str(exc)
            pytest.fail(str(exc))
    _Singleton.users += 1
    try:
        yield _Singleton.cluster
    finally:
        _Singleton.users -= 1
        if _Singleton.users == 0 and _Singleton.cluster is not None:
            _stop(_Singleton.cluster)
            _Singleton.cluster = None


@pytest.fixture
def k8s_namespace(k8s_cluster: Cluster, request) -> str:
    from kubernetes import client

    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    core, _ = k8s_cluster.core()
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name, grace_period_seconds=0)
    finally:
        core.api_client.close()


@pytest.fixture
async def kube(k8s_cluster: Cluster):
    from heteroscale.coordinator.kube import kube_from_config

    api = kube_from_config(kubeconfig=str(k8s_cluster.kubeconfig), timeout_s=10)
    yield api
    await api.close()


def apply_objects(cluster: Cluster, docs: list[dict]) -> list[dict]:
    """Create ``docs`` as the admin (Namespaces first); returns the objects this call
    created. One that exists already (another test of the session made it) is left to its
    creator. Undo with ``delete_objects``."""
    from kubernetes import config, dynamic
    from kubernetes.dynamic.exceptions import ConflictError

    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    created: list[dict] = []
    try:
        dyn = dynamic.DynamicClient(api_client)
        for doc in sorted(docs, key=lambda d: d["kind"] != "Namespace"):
            resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
            where = {"namespace": doc["metadata"]["namespace"]} if resource.namespaced else {}
            try:
                dyn.create(resource, body=doc, **where)
                created.append(doc)
            except ConflictError:
                pass
    finally:
        api_client.close()
    return created


def delete_objects(cluster: Cluster, docs: list[dict]) -> None:
    """Delete what ``apply_objects`` created, in reverse order, Namespaces excepted (other
    tests of the session may use them; their contents are gone with these deletions)."""
    from kubernetes import config, dynamic
    from kubernetes.dynamic.exceptions import NotFoundError

    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        dyn = dynamic.DynamicClient(api_client)
        for doc in reversed(docs):
            if doc["kind"] == "Namespace":
                continue
            resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
            where = {"namespace": doc["metadata"]["namespace"]} if resource.namespaced else {}
            try:
                dyn.delete(resource, name=doc["metadata"]["name"], **where)
            except NotFoundError:
                pass
    finally:
        api_client.close()


def service_account_kubeconfig(cluster: Cluster, path: Path, *, namespace: str = "heteroscale-system",
                               name: str = "heteroscale-coordinator") -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (its token Secret, made by the
    v1.20 token controller), with the admin kubeconfig's server and CA: the API server
    then authorizes every call with that ServiceAccount's RBAC, as in a pod."""
    import base64

    import yaml

    core, _ = cluster.core()
    try:
        deadline = time.monotonic() + 30
        while True:
            sa = core.read_namespaced_service_account(name, namespace)
            if sa.secrets:
                secret = core.read_namespaced_secret(sa.secrets[0].name, namespace)
                if secret.data and secret.data.get("token"):
                    break
            assert time.monotonic() < deadline, f"no token Secret for the ServiceAccount {namespace}/{name}"
            time.sleep(0.2)
        token = base64.b64decode(secret.data["token"]).decode()
    finally:
        core.api_client.close()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "sa",
           "clusters": [{"name": "envtest", "cluster": {"server": server["server"],
                                                        "certificate-authority-data":
                                                            server["certificate-authority-data"]}}],
           "users": [{"name": "sa", "user": {"token": token}}],
           "contexts": [{"name": "sa", "context": {"cluster": "envtest", "user": "sa"}}]}
    path.write_text(yaml.safe_dump(doc))
    return path


def deployment_body(name: str, replicas: int) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "engine", "image": "example.invalid/vllm:0"}]}}}}


async def eventually(check, *, timeout_s: float = 30, step_s: float = 0.25, what: str = "condition"):
    """Poll an async ``check`` until it returns a truthy value, which is returned (real
    controllers and processes are asynchronous); fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(step_s)


async def mark_pods_ready(api, namespace: str, app: str, count: int) -> list[str]:
    """Act as the kubelet for ``count`` of the app's pods: phase Running, Ready True, and a
    pod IP from 10.244.0.0/16 (made up: nothing listens there)."""
    from heteroscale.coordinator.kube import PODS, format_time

    pods = await api.list(PODS, namespace=namespace, label_selector=f"app={app}")
    names = sorted(p["metadata"]["name"] for p in pods)[:count]
    now = format_time(time.time())
    for index, name in enumerate(names):
        await api.patch(PODS, name, {"status": {
            "phase": "Running", "podIP": f"10.244.0.{index + 1}",
            "podIPs": [{"ip": f"10.244.0.{index + 1}"}], "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}]}},
            namespace=namespace, subresource="status", patch_type="strategic")
    return names


# ---------------------------------------------------------------- candidate process

async def _candidate(args: argparse.Namespace) -> None:
    from heteroscale.coordinator.kube import kube_from_config
    from heteroscale.coordinator.leader import KubernetesLeaseElection, LocalLeaseElection

    def changed(leader: bool) -> None:
        print(f"{'LEADER' if leader else 'FOLLOWER'} {args.identity}", flush=True)

    timing = dict(duration_s=args.duration, renew_deadline_s=args.renew_deadline,
                  retry_period_s=args.retry)
    api = None
    if args.lease_file:
        election = LocalLeaseElection(path=args.lease_file, identity=args.identity,
                                      on_change=changed, **timing)
    else:
        api = kube_from_config(kubeconfig=args.kubeconfig, timeout_s=2)
        election = KubernetesLeaseElection(api=api, name=args.lease, namespace=args.namespace,
                                           identity=args.identity, on_change=changed, **timing)
    print(f"STARTED {args.identity}", flush=True)
    try:
        await election.run()
    finally:
        if api is not None:
            await api.close()


async def _measure_once(api, namespace: str, *, release: bool, timing: dict, pause_s: float) -> float:
    from heteroscale.coordinator.leader import KubernetesLeaseElection

    lease = f"failover-{uuid.uuid4().hex[:8]}"
    a, b = (KubernetesLeaseElection(api=api, name=lease, namespace=namespace, identity=ident,
                                    release_on_cancel=rel, **timing)
            for ident, rel in (("a", release), ("b", True)))
    ta = asyncio.create_task(a.run(), name="measure-a")
    async with asyncio.timeout(30):
        while not a.is_leader:
            await asyncio.sleep(0.02)
    tb = asyncio.create_task(b.run(), name="measure-b")
    await asyncio.sleep(pause_s)
    ta.cancel()
    await asyncio.gather(ta, return_exceptions=True)
    started = time.monotonic()
    try:
        async with asyncio.timeout(60):
            while not b.is_leader:
                await asyncio.sleep(0.01)
        return time.monotonic() - started
    finally:
        tb.cancel()
        await asyncio.gather(tb, return_exceptions=True)


async def _measure(args: argparse.Namespace) -> dict:
    import json
    import random
    import statistics

    from heteroscale.coordinator.kube import NAMESPACES, kube_from_config

    api = kube_from_config(kubeconfig=args.kubeconfig, timeout_s=5)
    namespace = f"failover-{uuid.uuid4().hex[:6]}"
    timing = dict(duration_s=args.duration, renew_deadline_s=args.renew_deadline,
                  retry_period_s=args.retry)
    rng = random.Random(args.seed)
    results: dict = {"timing_s": timing, "runs": args.runs, "cores": os.cpu_count()}
    try:
        await api.create(NAMESPACES, {"metadata": {"name": namespace}})
        for release in (False, True):
            # kill at a random point of the renew cycle
            samples = [await _measure_once(api, namespace, release=release, timing=timing,
                                           pause_s=1.0 + rng.random() * 2 * args.retry)
                       for _ in range(args.runs)]
            results["release_handover_s" if release else "crash_takeover_s"] = {
                "min": min(samples), "median": statistics.median(samples), "max": max(samples),
                "samples": [round(x, 3) for x in samples]}
        results["crash_bound_s"] = args.duration + 2 * args.retry * 2.2
        await api.delete(NAMESPACES, namespace)
    finally:
        await api.close()
    print(json.dumps(results, indent=1))
    return results


def _failover(args: argparse.Namespace) -> int:
    import json

    cluster = None
    if not args.kubeconfig:
        ok, why = envtest_available()
        if not ok:
            print(f"failover: {why}", file=sys.stderr)
            return 2
        cluster = _start()
        args.kubeconfig = str(cluster.kubeconfig)
    try:
        results = asyncio.run(_measure(args))
    finally:
        if cluster is not None:
            _stop(cluster)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.k8s_envtest")
    sub = parser.add_subparsers(dest="command", required=True)
    cand = sub.add_parser("candidate")
    cand.add_argument("--kubeconfig")
    cand.add_argument("--namespace", default="default")
    cand.add_argument("--lease-file", help="use the local lease file instead of Kubernetes")
    cand.add_argument("--identity", required=True)
    cand.add_argument("--lease", default="heteroscale-coordinator")
    cand.add_argument("--duration", type=float, default=2)
    cand.add_argument("--renew-deadline", type=float, default=1.5)
    cand.add_argument("--retry", type=float, default=0.5)
    measure = sub.add_parser("failover", help="measure crash takeover and release handover times")
    measure.add_argument("--kubeconfig", help="default: start a throw-away control plane")
    measure.add_argument("--runs", type=int, default=10)
    measure.add_argument("--duration", type=float, default=2)
    measure.add_argument("--renew-deadline", type=float, default=1.5)
    measure.add_argument("--retry", type=float, default=0.5)
    measure.add_argument("--seed", type=int, default=1)
    measure.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.command == "failover":
        return _failover(args)
    try:
        asyncio.run(_candidate(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())


def chat_service(namespace: str) -> ServiceConfig:
    """A one-service kubernetes config whose roles are the Deployments chat-prefill/chat-decode."""
    return load_config({"coordinator": {"backend": "kubernetes"}, "services": [{
        "name": "chat", "namespace": namespace, "pd_ratio": "1:1", "target_decode_tps_per_instance": 100,
        "slo": {"tbt_s": 0.05}, "prefill": {"deployment": "chat-prefill"},
        "decode": {"deployment": "chat-decode"}}]}).services[0]
