"""``heteroscale.sidecar.gpu.open_reader``: the agent's one call to get its GPU reader."""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import heteroscale.sidecar.gpu
from heteroscale.errors import ConfigError, UsageError
from heteroscale.sidecar.gpu.emulator_source import EmulatorGpuReader
from heteroscale.sidecar.gpu.nvml import NvmlReader
from tests.conftest import REPO, free_port
from tests.test_gpu_fake_pynvml import FakeNvml, three_gpus


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "heteroscale.gpu" and r.levelno >= logging.WARNING]


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None,
                    reason="an NVIDIA driver is installed here")
async def test_default_source_on_this_machine_is_no_gpu_mode(caplog):
    caplog.set_level(logging.INFO, logger="heteroscale.gpu")
    reader = await heteroscale.sidecar.gpu.open_reader("nvml", None, None, env={})
    try:
        assert reader.mode == "none"
        for _ in range(3):
            assert await reader.read() == ()
        assert "NVML library not found" in reader.reason
        assert _warnings(caplog) == []          # the agent says it, once (test below)
    finally:
        await reader.close()


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None,
                    reason="an NVIDIA driver is installed here")
def test_real_sidecar_process_says_no_gpu_once_and_exports_the_mode():
    """``heteroscale sidecar`` on this driverless machine: one log line, gauge mode="none"."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "heteroscale", "sidecar", "--engine", "vllm",
         "--engine-url", f"http://127.0.0.1:{free_port()}", "--role", "decode", "--service", "t",
         "--listen", f"127.0.0.1:{port}", "--interval", "0.2", "--window", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        report = None
        for _ in range(150):       # until several cycles (each reads the GPUs) have run
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/report", timeout=2) as resp:
                    report = json.load(resp)
                if sum(report.get("scrape_errors", {}).values()) >= 3:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        assert report is not None and sum(report["scrape_errors"].values()) >= 3
        assert report["gpu_mode"] == "none" and report["gpus"] == []
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        mode = [(s.labels["mode"], s.value) for s in families["heteroscale_gpu_mode"].samples]
        assert mode == [("none", 1.0)]
        assert "heteroscale_gpu_utilization_ratio" not in families or \
            not families["heteroscale_gpu_utilization_ratio"].samples       # absent, not zero
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    no_gpu_lines = [line for line in out.splitlines() if "no-GPU mode" in line]
    assert len(no_gpu_lines) == 1, out
    assert "NVML library not found" in no_gpu_lines[0]


async def test_nvml_source_with_gpus_returns_the_nvml_reader(caplog):
    caplog.set_level(logging.INFO, logger="heteroscale.gpu")
    fake = FakeNvml(three_gpus())
    reader = await heteroscale.sidecar.gpu.open_reader("nvml", "1", None, env={}, nvml=fake.module)
    try:
        assert isinstance(reader, NvmlReader) and reader.mode == "nvml"
        assert [r.gpu for r in await reader.read()] == ["1"]
        assert _warnings(caplog) == []
    finally:
        await reader.close()


async def test_none_source_never_touches_nvml(caplog):
    caplog.set_level(logging.INFO, logger="heteroscale.gpu")
    fake = FakeNvml(three_gpus())
    reader = await heteroscale.sidecar.gpu.open_reader("none", "0", None, nvml=fake.module)
    assert reader.mode == "none" and "--gpu-source none" in reader.reason
    assert fake.calls == []


async def test_emulator_source_returns_the_http_reader():
    reader = await heteroscale.sidecar.gpu.open_reader("emulator", None, "http://127.0.0.1:9/emulator/gpu")
    try:
        assert isinstance(reader, EmulatorGpuReader) and reader.mode == "emulator"
    finally:
        await reader.close()


@pytest.mark.parametrize(("source", "url", "message"), [
    ("cuda", None, "--gpu-source: expected one of nvml, emulator, none, got 'cuda'"),
    ("emulator", None, "--gpu-source emulator needs --emulator-gpu-url URL"),
    ("emulator", "ftp://x/emulator/gpu", "--emulator-gpu-url: emulator GPU URL must be http(s)://"),
])
async def test_user_mistakes_are_one_line_usage_errors(source, url, message):
    with pytest.raises(UsageError) as err:
        await heteroscale.sidecar.gpu.open_reader(source, None, url)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


async def test_bad_gpus_flag_on_a_gpu_node_is_a_config_error():
    with pytest.raises(ConfigError):
        await heteroscale.sidecar.gpu.open_reader("nvml", "5", None, env={}, nvml=FakeNvml(three_gpus()).module)
