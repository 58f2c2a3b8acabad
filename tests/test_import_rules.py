"""STYLE.md habit 1, enforced: decision code imports no I/O library and reads no clock.

Pure modules are listed by path pattern below. A pure module may not import any
of FORBIDDEN (nor a submodule of one). Engine page parsers may use exactly one
piece of prometheus_client: its pure text parser. Only ``sidecar/gpu/nvml.py``
may import pynvml, anywhere in the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PURE_PATTERNS = (
    "heteroscale/report.py",
    "engine_adapters/snapshot.py",
    "engine_adapters/vllm.py",
    "engine_adapters/sglang.py",
    "engine_adapters/rates.py",
    "engine_adapters/quantiles.py",
    "coordinator/config.py",
    "coordinator/core/*.py",
    "coordinator/core/types.py",
    "coordinator/core/policy.py",
    "coordinator/core/aggregate.py",
    "coordinator/core/placement.py",
    "coordinator/core/topology.py",
    "coordinator/core/bandwidth.py",
    "kv_transfer/stats.py",
    "kv_transfer/connectors.py",
    "simulator/perfmodel.py",
    "simulator/model/*.py",
    "simulator/traces.py",
    "simulator/placement.py",
    "simulator/policies.py",
    "simulator/curate.py",
    "simulator/config.py",
    "demo/sizing.py",
)

# Modules allowed to use prometheus_client's pure text parser (and nothing else of it).
PARSER_ALLOWED = {"engine_adapters/vllm.py", "engine_adapters/sglang.py",
                  "engine_adapters/snapshot.py", "kv_transfer/connectors.py"}

FORBIDDEN = {
    "aiohttp", "kubernetes", "kubernetes_asyncio", "pynvml", "prometheus_client",
    "requests", "httpx", "urllib.request", "socket", "subprocess", "asyncio",
    "threading", "time", "multiprocessing",
}

PROJECT_DIRS = ("sidecar", "engine_adapters", "kv_transfer", "simulator")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _pure_modules() -> list[Path]:
    found: set[Path] = set()
    for pattern in PURE_PATTERNS:
        found.update(p for p in REPO.glob(pattern) if p.name != "__init__.py")
    return sorted(found)


def _violations(rel: str, names: list[str]) -> list[str]:
    bad = []
    for name in names:
        root_match = [f for f in FORBIDDEN if name == f or name.startswith(f + ".")]
        if not root_match:
            continue
        if rel in PARSER_ALLOWED and (name == "prometheus_client.parser"
                                      or name.startswith("prometheus_client.parser.")):
            continue
        if name == "prometheus_client" and rel in PARSER_ALLOWED:
            # "from prometheus_client import parser" shows up as the package too
            continue
        bad.append(name)
    return bad


def test_pure_modules_exist():
    # The rule must bite on something: the core pure modules are present.
    rels = {p.relative_to(REPO).as_posix() for p in _pure_modules()}
    assert "heteroscale/report.py" in rels


@pytest.mark.parametrize("path", _pure_modules(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_pure_module_imports_no_io(path: Path):
    rel = path.relative_to(REPO).as_posix()
    bad = _violations(rel, _imports(path))
    assert not bad, f"{rel} is pure but imports {bad}"


def test_only_nvml_module_imports_pynvml():
    offenders = []
    for top in PROJECT_DIRS:
        for path in (REPO / top).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if rel == "sidecar/gpu/nvml.py":
                continue
            if any(n == "pynvml" or n.startswith("pynvml.") for n in _imports(path)):
                offenders.append(rel)
    assert not offenders, f"only sidecar/gpu/nvml.py may import pynvml: {offenders}"


def test_rule_catches_a_violation(tmp_path: Path):
    # The checker itself must fail on an impure import.
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom aiohttp import web\nfrom prometheus_client.parser import x\n")
    assert set(_violations("coordinator/core/policy.py", _imports(bad))) >= {
        "time", "aiohttp", "aiohttp.web", "prometheus_client.parser"}
    assert _violations("engine_adapters/vllm.py", ["prometheus_client.parser"]) == []
