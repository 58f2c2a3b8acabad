"""The manifests against a real kube-apiserver (v1.20.2 from k8s-envtest).

Every object of the base and the examples overlay goes through a server-side dry
run (``dryRun=All``: admission, defaulting and validation run, nothing is
stored), except objects whose API version the server does not serve: those are
named in the skip list of the test result. The RBAC is then applied for real and
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


def _apply(dyn, doc: dict, *, dry_run: bool) -> None:
    resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    kwargs = {"dry_run": "All"} if dry_run else {}
    namespace = doc["metadata"].get("namespace")
    if resource.namespaced:
        dyn.create(resource, body=doc, namespace=namespace, **kwargs)
    else:
        dyn.create(resource, body=doc, **kwargs)


@pytest.fixture(scope="module")
def dynamic(k8s_cluster):  # noqa: F811
    from kubernetes import config, dynamic

    api_client = config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    client = dynamic.DynamicClient(api_client)
    yield client
    api_client.close()


def _ensure_namespaces(dyn, docs: list[dict]) -> None:
    from kubernetes.dynamic.exceptions import ConflictError

    for doc in docs:
        if doc["kind"] == "Namespace":
            try:
                _apply(dyn, doc, dry_run=False)
            except ConflictError:
                pass


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


def _allowed(dyn, *, verb: str, resource: str, group: str = "", namespace: str = "llm",
             subresource: str = "") -> bool:
    review = dyn.resources.get(api_version="authorization.k8s.io/v1", kind="SubjectAccessReview")
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": SA, "groups": ["system:serviceaccounts", "system:serviceaccounts:heteroscale-system"],
                     "resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                            "subresource": subresource, "namespace": namespace}}}
    return bool(dyn.create(review, body=body).status.allowed)


def test_service_account_may_do_what_the_coordinator_does_and_no_more(dynamic):
    from kubernetes.dynamic.exceptions import ConflictError

    docs = render("base")
    _ensure_namespaces(dynamic, docs)
    for doc in docs:
        if doc["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
            try:
                _apply(dynamic, doc, dry_run=False)
            except ConflictError:
                pass
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
