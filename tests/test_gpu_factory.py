"""``sidecar.gpu.open_reader``: the agent's one call to get its GPU reader."""

from __future__ import annotations

import ctypes.util
import logging

import pytest

import sidecar.gpu
from sidecar.errors import ConfigError, UsageError
from sidecar.gpu.emulator_source import EmulatorGpuReader
from sidecar.gpu.nvml import NvmlReader
from tests.test_gpu_fake_pynvml import FakeNvml, three_gpus


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "heteroscale.gpu" and r.levelno >= logging.WARNING]


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None,
                    reason="an NVIDIA driver is installed here")
async def test_default_source_on_this_machine_is_no_gpu_mode_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="heteroscale.gpu")
    reader = await sidecar.gpu.open_reader("nvml", None, None, env={})
    try:
        assert reader.mode == "none"
        for _ in range(3):
            assert await reader.read() == ()
        assert _warnings(caplog) == [f"no-GPU mode: {reader.reason}"]
        assert "NVML library not found" in reader.reason
    finally:
        await reader.close()


async def test_nvml_source_with_gpus_returns_the_nvml_reader(caplog):
    caplog.set_level(logging.INFO, logger="heteroscale.gpu")
    fake = FakeNvml(three_gpus())
    reader = await sidecar.gpu.open_reader("nvml", "1", None, env={}, nvml=fake.module)
    try:
        assert isinstance(reader, NvmlReader) and reader.mode == "nvml"
        assert [r.gpu for r in await reader.read()] == ["1"]
        assert _warnings(caplog) == []
    finally:
        await reader.close()


async def test_none_source_never_touches_nvml(caplog):
    caplog.set_level(logging.INFO, logger="heteroscale.gpu")
    fake = FakeNvml(three_gpus())
    reader = await sidecar.gpu.open_reader("none", "0", None, nvml=fake.module)
    assert reader.mode == "none" and "--gpu-source none" in reader.reason
    assert fake.calls == []
    assert len(_warnings(caplog)) == 1


async def test_emulator_source_returns_the_http_reader():
    reader = await sidecar.gpu.open_reader("emulator", None, "http://127.0.0.1:9/emulator/gpu")
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
        await sidecar.gpu.open_reader(source, None, url)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


async def test_bad_gpus_flag_on_a_gpu_node_is_a_config_error():
    with pytest.raises(ConfigError):
        await sidecar.gpu.open_reader("nvml", "5", None, env={}, nvml=FakeNvml(three_gpus()).module)
