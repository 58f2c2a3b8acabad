"""The architecture, checked: import-linter contracts (pyproject.toml) on an installed copy.

ARCHITECTURE §2.1 and STYLE.md habit 1 as contracts: the layers of the package and of
the coordinator, the sidecar and the coordinator independent, ``coordinator.core`` and
the other decision modules free of I/O and clocks, the simulator on ``coordinator.core``
and ``coordinator.config`` only, pynvml in one module, no import cycles. They run on a
copy installed the way users install it (``pip install .``), which is also where we check
that an install adds exactly one top-level name. A deliberately broken copy proves the
contracts bite. Two rules import-linter cannot express stay as small AST checks: tests
import only ``heteroscale.*``, and parsers take nothing from prometheus_client but its
text parser.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"
TOP_LEVEL_FOLDERS = {"heteroscale", "sidecar", "engine_adapters", "kv_transfer", "coordinator", "simulator", "demo"}
PARSER_ONLY = ("engine_adapters", "kv_transfer/connectors.py")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --no-deps --target DIR .``: the package exactly as a wheel lays it out
    (built from a clean copy of the sources, so no stale build/ output can sneak in)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in TOP_LEVEL_FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("installed")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                          "--disable-pip-version-check", "--target", str(target), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return target


def lint(site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not LINT.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return subprocess.run([str(LINT), "--no-cache", str(REPO / "pyproject.toml")], cwd=cwd,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_an_install_adds_one_top_level_name(installed: Path):
    names = {p.name for p in installed.iterdir()} - {"bin"}
    assert {n for n in names if not n.endswith(".dist-info")} == {"heteroscale"}, names
    package = installed / "heteroscale"
    assert {"sidecar", "engine_adapters", "kv_transfer", "coordinator", "simulator", "demo"} <= {
        p.name for p in package.iterdir() if p.is_dir()}


def test_the_contracts_hold(installed: Path, tmp_path: Path):
    out = lint(installed, tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_a_broken_contract_is_caught(installed: Path, tmp_path: Path):
    site = tmp_path / "site"
    shutil.copytree(installed / "heteroscale", site / "heteroscale")
    core = site / "heteroscale" / "coordinator" / "core"
    (core / "policy.py").write_text((core / "policy.py").read_text() + "\nimport time  # a clock in core\n")
    sidecar = site / "heteroscale" / "sidecar" / "agent.py"
    sidecar.write_text(sidecar.read_text() + "\nfrom heteroscale.coordinator import reconciler  # noqa\n")
    out = lint(site, tmp_path)
    assert out.returncode != 0
    assert "heteroscale.coordinator.core.policy -> time" in out.stdout
    assert "The sidecar and the coordinator do not import each other BROKEN" in out.stdout.replace("\n", " ")


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_tests_and_benchmarks_import_only_the_package():
    offenders = []
    for folder in ("tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            bad = [n for n in _imports(path) if n.split(".")[0] in TOP_LEVEL_FOLDERS - {"heteroscale"}]
            if bad:
                offenders.append(f"{path.relative_to(REPO)}: {sorted(set(bad))}")
    assert not offenders, offenders


def test_parsers_use_only_the_prometheus_text_parser():
    """Engine and connector parsers may take prometheus_client's public text parser (and its
    sample type), nothing else of it: never the private helpers, whose bodies change
    between releases."""
    offenders = []
    for rel in PARSER_ONLY:
        paths = [REPO / rel] if rel.endswith(".py") else sorted((REPO / rel).rglob("*.py"))
        for path in paths:
            if path.name == "scrape.py":          # the I/O module of engine_adapters
                continue
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] != "prometheus_client":
                    continue
                private = any(part.startswith("_") for part in parts)
                if private or (len(parts) > 1 and parts[1] not in ("parser", "samples")):
                    offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, offenders
