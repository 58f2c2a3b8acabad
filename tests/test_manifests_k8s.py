"""The manifests against a real kube-apiserver (v1.20.2 from k8s-envtest).

Every object of the base and the examples overlay goes through a server-side dry
run (``dryRun=All``: admission, defaulting and validation run, nothing is
stored), fresh and over an existing install (server-side apply), except objects
whose API version the server does not serve: those are named in the skip list
of the test result. The RBAC is then applied for real and
the API server's own authorizer (SubjectAccessReview) is asked whether the
coordinator's ServiceAccount may do what the code does, and may not do more.
"""

from __future__ import annotations

import pytest
import yaml

from tests.k8s_envtest import k8s_cluster  # noqa: F401  (session fixture)
from tests.test_manifests import render

pytestmark = pytest.mark.k8s

SA = "system:serviceaccount:heteroscale-system:heteroscale-coordinator"


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


@pytest.mark.parametrize("overlay", ["base", "examples"])
def test_every_object_passes_a_server_side_dry_run(dynamic, overlay):
    docs = render(overlay)
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
    assert "Deployment" in checked and "ClusterRole" in checked


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


def _allowed(dyn, *, verb: str, resource: str, group: str = "", namespace: str = "llm",
             subresource: str = "") -> bool:
    review = dyn.resources.get(api_version="authorization.k8s.io/v1", kind="SubjectAccessReview")
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": SA, "groups": ["system:serviceaccounts", "system:serviceaccounts:heteroscale-system"],
                     "resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                            "subresource": subresource, "namespace": namespace}}}
    return bool(dyn.create(review, body=body).status.allowed)


def test_service_account_may_do_what_the_coordinator_does_and_no_more(dynamic):
    docs = render("base")
    _ensure_namespaces(dynamic, docs)
    created = [doc for doc in docs
               if doc["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
               and _apply(dynamic, doc, dry_run=False)]
    try:
        _check_authorization(dynamic)
    finally:
        for doc in reversed(created):      # the control plane is shared by the session
            _delete(dynamic, doc)


def _check_authorization(dynamic) -> None:
    may = [
        dict(verb="list", resource="nodes", namespace=""),
        dict(verb="patch", resource="deployments", group="apps", subresource="scale"),
        dict(verb="update", resource="deployments", group="apps", subresource="scale"),
        dict(verb="create", resource="deployments", group="apps"),
        dict(verb="delete", resource="deployments", group="apps"),            # an emptied Deployment Group
        dict(verb="get", resource="deployments", group="apps", subresource="scale"),
        dict(verb="list", resource="pods", namespace=""),                      # free GPUs: pods of every namespace
        dict(verb="patch", resource="pods"),                                   # drain annotations, deletion cost
        dict(verb="patch", resource="statefulsets", group="apps", subresource="scale"),
        dict(verb="patch", resource="pods", subresource="status"),
        dict(verb="delete", resource="pods"),
        dict(verb="create", resource="events"),
        dict(verb="update", resource="leases", group="coordination.k8s.io", namespace="heteroscale-system"),
    ]
    may_not = [
        dict(verb="get", resource="secrets"),
        dict(verb="update", resource="leases", group="coordination.k8s.io", namespace="llm"),
        dict(verb="delete", resource="nodes", namespace=""),
        dict(verb="create", resource="pods"),
        dict(verb="update", resource="deployments", group="apps"),
        dict(verb="create", resource="pods", subresource="exec"),
    ]
    assert [a for a in may if not _allowed(dynamic, **a)] == []
    assert [a for a in may_not if _allowed(dynamic, **a)] == []


def test_configmap_from_the_base_mounts_where_the_coordinator_reads_it():
    docs = render("base")
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    pod = deploy["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]   # kustomize rewrote the hashed name
    assert "--config" in pod["containers"][0]["args"]
    assert yaml.safe_load(cm["data"]["config.yaml"])["coordinator"]["backend"] == "kubernetes"
