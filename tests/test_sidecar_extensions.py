"""The extension seam: modules add flags and build extensions; absent modules are skipped;
the kv_transfer sample becomes heteroscale_kv_transfer_bytes_per_second{direction,source}."""

from __future__ import annotations

import argparse
import types

import pytest

from heteroscale.sidecar.extensions import (
    SidecarExtension, add_extension_arguments, build_extensions, default_kv_direction, extension_modules,
)
from heteroscale.sidecar.metrics import view_kv


class Ext:
    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None: ...

    async def sample(self, now_s: float):
        return {}

    def collect(self):
        return []

    async def close(self) -> None: ...


def fake_module(build_result) -> types.ModuleType:
    mod = types.ModuleType("fake_ext")

    def add_arguments(parser):
        parser.add_argument("--kv-probe", action="store_true")

    mod.add_arguments = add_arguments
    mod.build = lambda args: build_result if args.kv_probe else None
    return mod


def test_module_adds_flags_and_builds():
    mod = fake_module(Ext("kv_transfer"))
    parser = argparse.ArgumentParser()
    add_extension_arguments(parser, [mod])
    assert build_extensions(parser.parse_args([]), [mod]) == []
    built = build_extensions(parser.parse_args(["--kv-probe"]), [mod])
    assert [e.name for e in built] == ["kv_transfer"] and isinstance(built[0], SidecarExtension)


def test_build_may_return_several():
    mod = fake_module([Ext("a"), Ext("b")])
    parser = argparse.ArgumentParser()
    add_extension_arguments(parser, [mod])
    assert [e.name for e in build_extensions(parser.parse_args(["--kv-probe"]), [mod])] == ["a", "b"]


def test_absent_module_is_skipped_but_a_broken_one_is_loud(tmp_path, monkeypatch):
    assert extension_modules(["no_such_package.sidecar_ext"]) == []
    (tmp_path / "broken_ext.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        extension_modules(["broken_ext"])


def test_kv_sample_to_metric_value():
    assert default_kv_direction("prefill") == "send" and default_kv_direction("decode") == "receive"
    # a headline alone counts under its source (default engine)
    assert view_kv({"bytes_per_second": 2e9}, default_direction="send") == ((("engine", 2e9),), "send")
    assert view_kv({"bytes_per_second": 5, "direction": "receive", "source": "rdma"},
                   default_direction="send") == ((("rdma", 5.0),), "receive")
    assert view_kv({"bytes_per_second": 5, "direction": "up"}, default_direction="send") == ((("engine", 5.0),), "send")
    # per-source values win over the headline; a source without a number is left out
    sample = {"bytes_per_second": 7.0, "source": "engine", "direction": "send",
              "sources": {"engine": {"bytes_per_second": 7.0}, "probe": {"bytes_per_second": 9e8},
                          "rdma": {"bytes_per_second": None}}}
    assert view_kv(sample, default_direction="send") == ((("engine", 7.0), ("probe", 9e8)), "send")
    for bad in (None, {}, {"bytes_per_second": None}, {"bytes_per_second": -1}, {"bytes_per_second": "x"},
                {"bytes_per_second": float("nan")}, {"bytes_per_second": float("inf")}, {"bytes_per_second": True},
                {"sources": {"engine": {"bytes_per_second": -3}}}, {"sources": {"engine": 5}}):
        assert view_kv(bad, default_direction="receive") == ((), "receive")
