"""The manifests against a real kube-apiserver (v1.20.2 from k8s-envtest).

Every object of the base and the examples overlay goes through a server-side dry
run (``dryRun=All``: admission, defaulting and validation run, nothing is
stored), fresh and over an existing install (server-side apply), except objects
whose API version the server does not serve: those are named in the skip list
of the test result.

The least-privilege RBAC is then installed for real, as docs/kubernetes.md tells an
operator to (the base, the placement component, one scale-only and one Deployment-Group
service namespace), and
* the API server's own authorizer (SubjectAccessReview) is asked whether the
  coordinator's ServiceAccount may do what the code does, and may not do more;
* requests made with the ServiceAccount's own token are refused where they must be
  (a privileged Deployment in kube-system, even as a dry run);
* the coordinator's election and in-place actuator run with that token and scale out.
The Deployment-Group path runs with that token in tests/test_e2e_k8s.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from types import SimpleNamespace

import pytest
import yaml

from heteroscale.coordinator.actuators.kubernetes import KubernetesActuator
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.types import Decision, PoolCounts
from heteroscale.coordinator.kube import (DEPLOYMENTS, EVENTS, LEASES, NO_RETRY, PODS, STATEFULSETS,
                                          kube_from_config)
from heteroscale.coordinator.leader import KubernetesLeaseElection
from heteroscale.errors import ApiError
from tests.k8s_envtest import (apply_objects, delete_objects, deployment_body, eventually,  # noqa: F401
                               k8s_cluster, kube, service_account_kubeconfig)
from tests.test_manifests import render, service_namespace, with_placement

pytestmark = pytest.mark.k8s

SA = "system:serviceaccount:heteroscale-system:heteroscale-coordinator"
RBAC_KINDS = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def _served(dyn, api_version: str, kind: str) -> bool:
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    try:
        dyn.resources.get(api_version=api_version, kind=kind)
        return True
    except ResourceNotFoundError:
        return False


def _apply(dyn, doc: dict, *, dry_run: bool) -> bool:
    """Create ``doc`` (for real, or as a server-side dry run). Returns False when it
    already existed. A dry run of an object that exists (an upgrade; or another test
    on the shared control plane made it) is checked as a dry-run server-side apply,
    as ``kubectl apply --server-side --dry-run=server`` does: a plain replace would
    drop server-set fields such as a Service's clusterIP."""
    from kubernetes.dynamic.exceptions import ConflictError

    resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    kwargs = {"dry_run": "All"} if dry_run else {}
    scope = {"namespace": doc["metadata"].get("namespace")} if resource.namespaced else {}
    try:
        dyn.create(resource, body=doc, **scope, **kwargs)
        return True
    except ConflictError:
        if not dry_run:
            return False
    dyn.server_side_apply(resource, body=doc, name=doc["metadata"]["name"], field_manager="heteroscale-test",
                          force_conflicts=True, **scope, **kwargs)
    return False


def _delete(dyn, doc: dict) -> None:
    resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    scope = {"namespace": doc["metadata"].get("namespace")} if resource.namespaced else {}
    dyn.delete(resource, name=doc["metadata"]["name"], **scope)


@pytest.fixture(scope="module")
def dynamic(k8s_cluster):  # noqa: F811
    from kubernetes import config, dynamic

    api_client = config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    client = dynamic.DynamicClient(api_client)
    yield client
    api_client.close()


def _ensure_namespaces(dyn, docs: list[dict]) -> None:
    for doc in docs:
        if doc["kind"] == "Namespace":
            _apply(dyn, doc, dry_run=False)


def _install(overlay: str, work) -> list[dict]:
    if overlay != "groups":
        return render(overlay)
    # a Deployment-Group install: the placement component and a namespace with the groups component
    return with_placement(work / "coordinator") + [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "llm-groups"}}] + \
        service_namespace(work / "llm-groups", "llm-groups")


@pytest.mark.parametrize("overlay", ["base", "examples", "groups"])
def test_every_object_passes_a_server_side_dry_run(dynamic, overlay, tmp_path):
    docs = _install(overlay, tmp_path)
    _ensure_namespaces(dynamic, docs)
    skipped, checked = [], []
    for doc in docs:
        if doc["kind"] == "Namespace":
            continue
        if not _served(dynamic, doc["apiVersion"], doc["kind"]):
            skipped.append(f"{doc['kind']} {doc['apiVersion']}")
            continue
        _apply(dynamic, doc, dry_run=True)
        checked.append(doc["kind"])
    # v1.20 serves everything but policy/v1 PodDisruptionBudget (added in 1.21).
    assert skipped == ["PodDisruptionBudget policy/v1"]
    assert {"Deployment", "Role", "RoleBinding"} <= set(checked)
    if overlay == "examples":
        assert checked.count("NetworkPolicy") == 3 and checked.count("Role") == 2
    if overlay == "groups":
        assert {"ClusterRole", "ClusterRoleBinding", "NetworkPolicy"} <= set(checked)


def test_dry_run_over_an_existing_install(dynamic):
    # An upgrade: the objects are already there, so each is checked as a dry-run server-side apply.
    docs = [d for d in render("base") if _served(dynamic, d["apiVersion"], d["kind"])]
    _ensure_namespaces(dynamic, docs)
    installed = [d for d in docs if d["kind"] != "Namespace" and _apply(dynamic, d, dry_run=False)]
    try:
        assert installed, "nothing was installed, so the replace path would go unchecked"
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert _apply(dynamic, doc, dry_run=True) is False     # existed: applied, as a dry run
    finally:
        for doc in reversed(installed):
            _delete(dynamic, doc)


def _allowed(dyn, *, verb: str, resource: str, group: str = "", namespace: str = "",
             subresource: str = "", name: str = "") -> bool:
    review = dyn.resources.get(api_version="authorization.k8s.io/v1", kind="SubjectAccessReview")
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": SA, "groups": ["system:serviceaccounts", "system:serviceaccounts:heteroscale-system",
                                            "system:authenticated"],
                     "resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                            "subresource": subresource, "namespace": namespace,
                                            "name": name}}}
    return bool(dyn.create(review, body=body).status.allowed)


@pytest.fixture
def installed(k8s_cluster, tmp_path):  # noqa: F811
    """The least-privilege install: base + placement, a scale-only service namespace and a
    Deployment-Group one (both overlays as docs/kubernetes.md tells an operator to write them)."""
    tag = uuid.uuid4().hex[:6]
    scale_ns, groups_ns = f"hs-scale-{tag}", f"hs-groups-{tag}"
    docs = [d for d in with_placement(tmp_path / "coordinator") if d["kind"] in RBAC_KINDS]
    docs += [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in (scale_ns, groups_ns)]
    docs += service_namespace(tmp_path / scale_ns, scale_ns, groups=False)
    docs += service_namespace(tmp_path / groups_ns, groups_ns)
    created = apply_objects(k8s_cluster, docs)
    try:
        yield SimpleNamespace(scale=scale_ns, groups=groups_ns)
    finally:
        delete_objects(k8s_cluster, created)
        core, _ = k8s_cluster.core()
        try:
            for name in (scale_ns, groups_ns):
                core.delete_namespace(name, grace_period_seconds=0)
        finally:
            core.api_client.close()


def test_service_account_may_do_what_the_coordinator_does_and_no_more(dynamic, installed):
    scale, groups, own = installed.scale, installed.groups, "heteroscale-system"
    lease = dict(resource="leases", group="coordination.k8s.io", namespace=own)
    may = [
        # cluster-wide, read only: the placement view
        dict(verb="list", resource="nodes"),
        dict(verb="list", resource="pods"),                                          # every namespace
        # leader election on the one Lease
        dict(verb="get", name="heteroscale-coordinator", **lease),
        dict(verb="update", name="heteroscale-coordinator", **lease),
        dict(verb="create", **lease),
        # scaling in place, in every service namespace
        *[dict(verb=v, resource=r, group="apps", namespace=ns)
          for ns in (scale, groups) for r in ("deployments", "statefulsets") for v in ("get", "patch")],
        *[dict(verb=v, resource=r, group="apps", subresource="scale", namespace=ns)
          for ns in (scale, groups) for r in ("deployments", "statefulsets") for v in ("get", "update")],
        *[dict(verb="list", resource="pods", namespace=ns) for ns in (scale, groups)],
        *[dict(verb="create", resource="events", namespace=ns) for ns in (scale, groups)],
        # Deployment Groups, only where the groups component is installed
        *[dict(verb=v, resource="deployments", group="apps", namespace=groups) for v in ("list", "create", "delete")],
        dict(verb="patch", resource="pods", namespace=groups),
        dict(verb="delete", resource="pods", namespace=groups),
        dict(verb="patch", resource="pods", subresource="status", namespace=groups),
    ]
    may_not = [
        # the takeover: a Deployment (or any pod) in kube-system, or across the cluster
        dict(verb="create", resource="deployments", group="apps", namespace="kube-system"),
        dict(verb="create", resource="deployments", group="apps"),
        dict(verb="patch", resource="deployments", group="apps", namespace="kube-system"),
        dict(verb="update", resource="deployments", group="apps", subresource="scale", namespace="kube-system"),
        dict(verb="create", resource="pods", namespace=groups),
        dict(verb="create", resource="pods", subresource="exec", namespace=groups),
        # Deployment-Group writes where the groups component is not installed, or nowhere listed
        dict(verb="create", resource="deployments", group="apps", namespace=scale),
        dict(verb="delete", resource="deployments", group="apps", namespace=scale),
        dict(verb="delete", resource="pods", namespace=scale),
        dict(verb="delete", resource="pods", namespace="kube-system"),
        dict(verb="patch", resource="pods", namespace="kube-system"),
        dict(verb="patch", resource="pods", subresource="status", namespace=scale),
        dict(verb="patch", resource="pods", subresource="status", namespace="kube-system"),
        dict(verb="patch", resource="pods", subresource="status"),
        # verbs the code never uses
        dict(verb="watch", resource="nodes"),
        dict(verb="watch", resource="pods", namespace=groups),
        dict(verb="watch", resource="deployments", group="apps", namespace=groups),
        dict(verb="get", resource="nodes", name="gpu-node-1"),
        dict(verb="get", resource="pods", namespace=groups),
        dict(verb="update", resource="deployments", group="apps", namespace=groups),
        dict(verb="patch", resource="deployments", group="apps", subresource="scale", namespace=groups),
        dict(verb="create", resource="statefulsets", group="apps", namespace=groups),
        dict(verb="delete", resource="statefulsets", group="apps", namespace=groups),
        dict(verb="list", resource="statefulsets", group="apps", namespace=groups),
        dict(verb="patch", resource="events", namespace=groups),
        dict(verb="list", resource="deployments", group="apps", namespace=scale),
        # leases: only the named one, only here
        dict(verb="update", name="someone-elses-lease", **lease),
        dict(verb="get", name="someone-elses-lease", **lease),
        dict(verb="delete", name="heteroscale-coordinator", **lease),
        dict(verb="update", resource="leases", group="coordination.k8s.io", namespace=scale,
             name="heteroscale-coordinator"),
        dict(verb="create", resource="leases", group="coordination.k8s.io", namespace="kube-system"),
        # nothing else at all
        dict(verb="get", resource="secrets", namespace=groups),
        dict(verb="list", resource="secrets"),
        dict(verb="delete", resource="nodes", name="gpu-node-1"),
        dict(verb="patch", resource="nodes", name="gpu-node-1"),
        dict(verb="create", resource="rolebindings", group="rbac.authorization.k8s.io", namespace=groups),
        dict(verb="escalate", resource="roles", group="rbac.authorization.k8s.io", namespace=groups),
        dict(verb="impersonate", resource="serviceaccounts", namespace=own),
    ]
    assert [a for a in may if not _allowed(dynamic, **a)] == []
    assert [a for a in may_not if _allowed(dynamic, **a)] == []


def _privileged_deployment(namespace: str) -> dict:
    """A privileged pod with the node's root mounted: the cluster takeover to refuse."""
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "takeover", "namespace": namespace},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "takeover"}},
                     "template": {"metadata": {"labels": {"app": "takeover"}}, "spec": {
                         "containers": [{"name": "c", "image": "example.invalid/shell:0",
                                         "securityContext": {"privileged": True},
                                         "volumeMounts": [{"name": "root", "mountPath": "/host"}]}],
                         "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}}}


async def test_as_the_service_account_the_api_server_refuses_what_the_rbac_does_not_grant(
        k8s_cluster, installed, tmp_path):  # noqa: F811
    api = kube_from_config(kubeconfig=str(service_account_kubeconfig(k8s_cluster, tmp_path / "sa")),
                           timeout_s=10, retry=NO_RETRY)
    try:
        refused = []
        for namespace in ("kube-system", installed.scale):
            try:
                await api.request("POST", DEPLOYMENTS.path(namespace=namespace), query={"dryRun": "All"},
                                  body=_privileged_deployment(namespace))
            except ApiError as exc:
                refused.append((namespace, exc.status))
        assert refused == [("kube-system", 403), (installed.scale, 403)]
        # The cluster-wide read is a list of every namespace's pods: what placement asks for.
        assert isinstance((await api.request("GET", "/api/v1/pods")).get("items"), list)
        with pytest.raises(ApiError) as err:
            await api.get(DEPLOYMENTS, "coredns", namespace="kube-system")
        assert err.value.status == 403
    finally:
        await api.close()


async def test_the_scale_path_runs_as_the_service_account(k8s_cluster, kube, installed, tmp_path):  # noqa: F811
    """The coordinator's election and in-place actuator, authenticated as the ServiceAccount
    in a scale-only namespace: elect on the named Lease, observe, scale out both roles (a
    Deployment and a StatefulSet), annotate them and record Events, all within the RBAC."""
    ns = installed.scale
    await kube.create(DEPLOYMENTS, deployment_body("chat-prefill", 1), namespace=ns)
    sts = deployment_body("chat-decode", 1)
    sts["kind"], sts["spec"]["serviceName"] = "StatefulSet", "chat-decode"
    await kube.create(STATEFULSETS, sts, namespace=ns)
    service = load_config({"coordinator": {"backend": "kubernetes"}, "services": [{
        "name": "chat", "namespace": ns, "pd_ratio": "1:1", "target_decode_tps_per_instance": 100,
        "slo": {"tbt_s": 0.05}, "prefill": {"deployment": "chat-prefill"},
        "decode": {"statefulset": "chat-decode"}}]}).services[0]
    api = kube_from_config(kubeconfig=str(service_account_kubeconfig(k8s_cluster, tmp_path / "sa")), timeout_s=10)
    timing = dict(duration_s=3, renew_deadline_s=2, retry_period_s=0.5)
    election = KubernetesLeaseElection(api=api, name="heteroscale-coordinator", namespace="heteroscale-system",
                                       identity="sa-test", **timing)
    elsewhere = KubernetesLeaseElection(api=api, name="another-lease", namespace="heteroscale-system",
                                        identity="sa-test", **timing)
    tasks = [asyncio.create_task(e.run(), name=f"election-{i}") for i, e in enumerate((election, elsewhere))]
    try:
        await eventually(lambda: asyncio.sleep(0, election.is_leader), what="leader on the named Lease")
        # On a Lease the RBAC does not name, the election's first read is refused: never leader
        # (create is allowed by any name, but a Lease it can neither get nor update is useless).
        await eventually(lambda: asyncio.sleep(0, elsewhere.last_error), what="another Lease refused")
        assert "403" in str(elsewhere.last_error) and not elsewhere.is_leader
        actuator = KubernetesActuator(api=api.fenced(election), identity="sa-test")
        status = await actuator.observe(service)
        assert status.current == PoolCounts(1, 1)
        result = await actuator.apply(service, Decision(service="chat", at=time.time(), reason="scale_out_tps",
                                                        current=PoolCounts(1, 1), desired=PoolCounts(3, 2)))
        assert result.applied == PoolCounts(3, 2)
        assert "record failed" not in result.note, result.note     # annotations and Events went through
        assert (await kube.get_scale(DEPLOYMENTS, "chat-prefill", namespace=ns))["spec"]["replicas"] == 3
        assert (await kube.get_scale(STATEFULSETS, "chat-decode", namespace=ns))["spec"]["replicas"] == 2
        events = await kube.list(EVENTS, namespace=ns, label_selector="app.kubernetes.io/managed-by=heteroscale")
        assert sorted(e["involvedObject"]["name"] for e in events) == ["chat-decode", "chat-prefill"]
        assert await actuator.list_pods(service, "decode") == []        # listed; none Running (no kubelet)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await api.close()
        for name in ("heteroscale-coordinator", "another-lease"):
            with contextlib.suppress(ApiError):
                await kube.delete(LEASES, name, namespace="heteroscale-system")


def test_configmap_from_the_base_mounts_where_the_coordinator_reads_it():
    docs = render("base")
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    pod = deploy["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]   # kustomize rewrote the hashed name
    assert "--config" in pod["containers"][0]["args"]
    assert yaml.safe_load(cm["data"]["config.yaml"])["coordinator"]["backend"] == "kubernetes"
