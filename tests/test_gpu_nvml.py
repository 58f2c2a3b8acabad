"""The NVML reader: no-GPU mode with the real pynvml, the GPU path with a faithful fake.

This machine has no NVIDIA driver, so the real ``pynvml`` must take the no-GPU
path cleanly. The GPU path (selection, readings, GPM, errors, hangs) runs against
``tests/test_gpu_fake_pynvml.py``, which uses the real error classes and structs.
"""

from __future__ import annotations

import asyncio
import ctypes.util
import logging
import threading

import pynvml
import pytest

from heteroscale.errors import ConfigError, UsageError
from heteroscale.sidecar.gpu.base import NoGpuReader
from heteroscale.sidecar.gpu.nvml import (
    GpuSelection,
    NvmlReader,
    NvmlSettings,
    choose_selection,
    open_nvml_reader,
    parse_gpu_selectors,
)
from heteroscale.report import GpuReading
from tests.test_gpu_fake_pynvml import UUID_A, UUID_B, UUID_C, FakeGpu, FakeNvml, three_gpus

NO_ENV: dict[str, str] = {}


class FakeClock:
    """Monotonic seconds, moved by the test together with the fake devices."""

    def __init__(self, fake: FakeNvml) -> None:
        self.now_s = 100.0
        self.fake = fake

    def __call__(self) -> float:
        return self.now_s

    def advance(self, dt_s: float) -> None:
        self.now_s += dt_s
        self.fake.advance(dt_s)


async def open_fake(fake: FakeNvml, *, gpus: str | None = None, env=NO_ENV, **settings) -> tuple:
    clock = FakeClock(fake)
    reader = await open_nvml_reader(gpus=gpus, env=env, nvml=fake.module,
                                    settings=NvmlSettings(**settings), clock=clock)
    return reader, clock


# --------------------------------------------------------------------------- real pynvml, no driver


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None,
                    reason="an NVIDIA driver is installed here; this test is for machines without one")
async def test_real_pynvml_without_a_driver_gives_no_gpu_mode():
    reader = await open_nvml_reader(gpus=None, env=NO_ENV)      # the real module, imported inside
    assert isinstance(reader, NoGpuReader)
    assert reader.mode == "none"
    # What the real binding raises here: NVMLError_LibraryNotFound, "NVML Shared Library Not Found".
    assert reader.reason.startswith("NVML library not found")
    assert "NVML Shared Library Not Found" in reader.reason
    assert await reader.read() == ()
    await reader.close()


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None,
                    reason="an NVIDIA driver is installed here")
async def test_real_pynvml_no_gpu_mode_even_with_a_gpus_flag():
    # A --gpus flag cannot be checked without NVML: no-GPU mode, not a usage error.
    reader = await open_nvml_reader(gpus="0,1", env=NO_ENV)
    assert reader.mode == "none" and "NVML library not found" in reader.reason


# --------------------------------------------------------------------------- selection


def test_gpus_flag_may_come_split_already():
    # The agent hands the flag over as a tuple; same meaning as the text.
    assert choose_selection(("0", UUID_B), {}) == GpuSelection(("0", UUID_B), "--gpus")


def test_parse_gpu_selectors_accepts_indices_and_uuids():
    assert parse_gpu_selectors("0, 3") == ("0", "3")
    assert parse_gpu_selectors(f"{UUID_A},1") == (UUID_A, "1")


@pytest.mark.parametrize("text", ["", "0,,1", "gpu0", "-1", "0,0", "MIG-1234abcd", "GPU-zz"])
def test_parse_gpu_selectors_rejects_bad_lists_with_one_line(text):
    with pytest.raises(UsageError) as err:
        parse_gpu_selectors(text)
    assert "\n" not in str(err.value) and str(err.value).startswith("--gpus")


@pytest.mark.parametrize(("gpus", "env", "expected"), [
    ("1", {"NVIDIA_VISIBLE_DEVICES": UUID_A}, GpuSelection(("1",), "--gpus")),       # flag wins
    (None, {"NVIDIA_VISIBLE_DEVICES": f"{UUID_A},{UUID_B}"},
     GpuSelection((UUID_A, UUID_B), "NVIDIA_VISIBLE_DEVICES")),
    (None, {"NVIDIA_VISIBLE_DEVICES": "all"}, GpuSelection(None, "default")),
    (None, {}, GpuSelection(None, "default")),
    (None, {"CUDA_VISIBLE_DEVICES": UUID_B}, GpuSelection((UUID_B,), "CUDA_VISIBLE_DEVICES")),
    # CUDA's default device order is not NVML's: plain indices are not trusted ...
    (None, {"CUDA_VISIBLE_DEVICES": "1"}, GpuSelection(None, "default")),
    # ... unless CUDA is told to use PCI bus order, which is NVML's.
    (None, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
     GpuSelection(("1",), "CUDA_VISIBLE_DEVICES")),
    (None, {"NVIDIA_VISIBLE_DEVICES": "garbage!"}, GpuSelection(None, "default")),
])
def test_choose_selection_precedence(gpus, env, expected):
    assert choose_selection(gpus, env) == expected


@pytest.mark.parametrize("env", [{"NVIDIA_VISIBLE_DEVICES": "none"}, {"NVIDIA_VISIBLE_DEVICES": "void"},
                                 {"CUDA_VISIBLE_DEVICES": ""}])
async def test_environment_saying_no_gpu_gives_no_gpu_mode_without_touching_nvml(env):
    fake = FakeNvml(three_gpus())
    reader, _ = await open_fake(fake, env=env)
    assert reader.mode == "none" and "no GPU" in reader.reason
    assert fake.calls == []


async def test_all_gpus_by_default_labelled_by_index():
    fake = FakeNvml(three_gpus())
    reader, _ = await open_fake(fake)
    try:
        assert isinstance(reader, NvmlReader)
        assert reader.gpus == ("0", "1", "2")
        assert reader.uuids == (UUID_A, UUID_B, UUID_C)
    finally:
        await reader.close()


async def test_select_by_uuid_and_unique_prefix_keeps_the_order_given():
    fake = FakeNvml(three_gpus())
    reader, _ = await open_fake(fake, gpus=f"GPU-c0ffee,{UUID_A}")
    try:
        assert reader.uuids == (UUID_C, UUID_A)
        readings = await reader.read()
        assert [r.gpu for r in readings] == ["GPU-c0ffee", UUID_A]
        assert readings[0].power_watts == 250.0 and readings[1].power_watts == 512.25
    finally:
        await reader.close()


async def test_uuid_list_from_nvidia_visible_devices():
    fake = FakeNvml(three_gpus())
    reader, _ = await open_fake(fake, env={"NVIDIA_VISIBLE_DEVICES": UUID_B})
    try:
        assert reader.uuids == (UUID_B,)
        assert [r.utilization_ratio for r in await reader.read()] == [0.12]
    finally:
        await reader.close()


@pytest.mark.parametrize(("gpus", "problem"), [
    ("7", "GPU '7' not found"),
    ("GPU-8f3", "GPU 'GPU-8f3' is ambiguous"),       # prefix of both UUID_A and UUID_B
    (f"0,{UUID_A}", "selects GPU 0 twice"),
])
async def test_a_gpus_flag_naming_missing_gpus_is_a_config_error(gpus, problem):
    fake = FakeNvml(three_gpus())
    with pytest.raises(ConfigError) as err:
        await open_fake(fake, gpus=gpus)
    assert problem in str(err.value) and str(err.value).startswith("--gpus")
    assert fake.initialised == 0                      # NVML was shut down again


async def test_environment_naming_missing_gpus_degrades_to_no_gpu_mode():
    fake = FakeNvml(three_gpus())
    reader, _ = await open_fake(fake, env={"NVIDIA_VISIBLE_DEVICES": "GPU-deadbeef"})
    assert reader.mode == "none"
    assert "NVIDIA_VISIBLE_DEVICES names GPUs NVML does not see" in reader.reason
    assert fake.initialised == 0


# --------------------------------------------------------------------------- init failures


@pytest.mark.parametrize(("error", "reason"), [
    (pynvml.NVMLError_LibraryNotFound, "NVML library not found"),
    (pynvml.NVMLError_DriverNotLoaded, "NVIDIA kernel driver not loaded"),
    (pynvml.NVMLError_LibRmVersionMismatch, "NVML library and kernel driver versions differ"),
    (pynvml.NVMLError_Unknown, "NVML init failed"),
])
async def test_init_errors_give_no_gpu_mode_with_the_reason(error, reason):
    reader, _ = await open_fake(FakeNvml(three_gpus(), init_error=error))
    assert reader.mode == "none"
    assert reader.reason.startswith(reason)


async def test_no_devices_gives_no_gpu_mode():
    fake = FakeNvml([])
    reader, _ = await open_fake(fake)
    assert reader.mode == "none" and reader.reason == "NVML sees no GPU"
    assert fake.initialised == 0


async def test_hanging_init_gives_no_gpu_mode_and_does_not_block_the_loop():
    release = threading.Event()
    try:
        reader, _ = await open_fake(FakeNvml(three_gpus(), init_hang=release), init_timeout_s=0.05)
        assert reader.mode == "none" and "did not initialise within 0.05 s" in reader.reason
    finally:
        release.set()


# --------------------------------------------------------------------------- readings


async def test_readings_convert_units():
    fake = FakeNvml(three_gpus())
    reader, _ = await open_fake(fake)
    try:
        a, b, c = await reader.read()
        # utilisation percent/100; memory bytes as is; power mW/1000
        assert a == GpuReading(gpu="0", utilization_ratio=0.86, memory_used_bytes=70 * 2**30,
                               power_watts=512.25, sm_activity_ratio=None)   # GPM needs a 2nd sample
        assert (b.utilization_ratio, b.power_watts) == (0.12, 95.0)
        assert (c.utilization_ratio, c.memory_used_bytes) == (0.55, 3 * 2**30)
    finally:
        await reader.close()


async def test_sm_activity_is_gpm_over_the_span_between_reads():
    fake = FakeNvml(three_gpus())
    reader, clock = await open_fake(fake, gpm_min_interval_s=0.2)
    try:
        first = await reader.read()
        assert [r.sm_activity_ratio for r in first] == [None, None, None]
        clock.advance(1.0)                                   # GPU0 at 40 %, GPU1 at 5 %
        second = await reader.read()
        assert second[0].sm_activity_ratio == pytest.approx(0.40)
        assert second[1].sm_activity_ratio == pytest.approx(0.05)
        assert second[2].sm_activity_ratio is None           # Ampere: no GPM, no number
        fake.gpus[0].sm_util_percent = 90
        clock.advance(0.5)                                   # 0.5 s at 90 %
        third = await reader.read()
        assert third[0].sm_activity_ratio == pytest.approx(0.90)   # only the new span counts
        fake.gpus[0].sm_util_percent = 10
        clock.advance(0.1)                                   # closer than gpm_min_interval_s:
        fourth = await reader.read()
        assert fourth[0].sm_activity_ratio == pytest.approx(0.90)  # previous span's value, no new sample
        clock.advance(0.3)                                   # span 0.4 s: 0.1 s at 10 % + 0.3 s at 10 %
        fifth = await reader.read()
        assert fifth[0].sm_activity_ratio == pytest.approx(0.10)
    finally:
        await reader.close()


@pytest.mark.parametrize("gpm", ["ampere", "not_supported", "no_permission"])
async def test_gpm_unsupported_or_not_permitted_reports_none_not_a_number(gpm):
    fake = FakeNvml([FakeGpu(UUID_A, gpm=gpm, util_percent=50, sm_util_percent=30)])
    reader, clock = await open_fake(fake)
    try:
        for _ in range(3):
            clock.advance(1.0)
            (reading,) = await reader.read()
            assert reading.sm_activity_ratio is None
            assert reading.utilization_ratio == 0.5          # the other fields still work
        assert reader.errors_total == {}                      # unsupported is not an error
    finally:
        await reader.close()


async def test_gpm_percent_out_of_range_is_not_reported():
    fake = FakeNvml([FakeGpu(UUID_A, sm_util_percent=250)])  # a broken counter
    reader, clock = await open_fake(fake)
    try:
        await reader.read()
        clock.advance(1.0)
        (reading,) = await reader.read()
        assert reading.sm_activity_ratio is None
    finally:
        await reader.close()


async def test_not_supported_field_is_none_for_good_and_no_longer_asked():
    gpu = FakeGpu(UUID_A, util_percent=70, power_mw=300_000,
                  errors={"nvmlDeviceGetPowerUsage": pynvml.NVMLError_NotSupported})
    fake = FakeNvml([gpu])
    reader, _ = await open_fake(fake)
    try:
        for _ in range(3):
            (reading,) = await reader.read()
            assert reading.power_watts is None and reading.utilization_ratio == 0.7
        assert fake.calls.count("nvmlDeviceGetPowerUsage") == 1
        assert reader.errors_total == {}
    finally:
        await reader.close()


async def test_transient_nvml_error_drops_the_field_once_and_is_counted():
    gpu = FakeGpu(UUID_A, memory_used_bytes=5 * 2**30,
                  errors={"nvmlDeviceGetMemoryInfo": pynvml.NVMLError_GpuIsLost})
    fake = FakeNvml([gpu])
    reader, _ = await open_fake(fake)
    try:
        (reading,) = await reader.read()
        assert reading.memory_used_bytes is None
        assert reader.errors_total == {"gpu_is_lost": 1}
        del gpu.errors["nvmlDeviceGetMemoryInfo"]            # the GPU answers again
        (reading,) = await reader.read()
        assert reading.memory_used_bytes == 5 * 2**30
    finally:
        await reader.close()


async def test_hanging_call_marks_the_reading_absent_without_blocking():
    release = threading.Event()
    gpu = FakeGpu(UUID_A, util_percent=33, power_mw=100_000,
                  hang={"nvmlDeviceGetPowerUsage": release})
    fake = FakeNvml([gpu, FakeGpu(UUID_B, util_percent=44)])
    reader, _ = await open_fake(fake, call_timeout_s=0.05)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    tick_task = asyncio.create_task(ticker(), name="ticker")
    try:
        readings = await reader.read()
        # absent, not zero, for every GPU of this read
        assert readings == (GpuReading(gpu="0"), GpuReading(gpu="1"))
        assert ticks > 1                                    # the loop kept running meanwhile
        calls_before = len(fake.calls)
        assert await reader.read() == (GpuReading(gpu="0"), GpuReading(gpu="1"))
        assert len(fake.calls) == calls_before              # still stuck: absent again, no call got through
        assert reader.errors_total == {"timeout": 2}
        release.set()
        del gpu.hang["nvmlDeviceGetPowerUsage"]
        for _ in range(200):                                # the stuck call finishes in the thread
            readings = await reader.read()
            if readings[0].power_watts is not None:
                break
            await asyncio.sleep(0.01)
        assert readings[0].power_watts == 100.0 and readings[1].utilization_ratio == 0.44
    finally:
        release.set()
        tick_task.cancel()
        await asyncio.gather(tick_task, return_exceptions=True)
        await reader.close()


async def test_caller_cancelling_a_hung_read_also_marks_nvml_stuck():
    # The agent bounds each GPU read with its own wait_for; if that fires first,
    # later reads must still fail fast rather than queue behind the stuck call.
    release = threading.Event()
    gpu = FakeGpu(UUID_A, hang={"nvmlDeviceGetUtilizationRates": release})
    fake = FakeNvml([gpu])
    reader, _ = await open_fake(fake, call_timeout_s=5.0)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(), 0.05)
        assert await reader.read() == (GpuReading(gpu="0"),)
        assert reader.errors_total == {"timeout": 1}
    finally:
        release.set()
        await reader.close()


async def test_close_frees_gpm_samples_and_shuts_nvml_down():
    fake = FakeNvml(three_gpus())
    reader, _ = await open_fake(fake)
    assert fake.initialised == 1
    await reader.close()
    assert fake.initialised == 0
    assert len(fake.freed) == 4                              # two samples per Hopper GPU
    assert await reader.read() == ()
    await reader.close()                                     # idempotent
    assert fake.calls.count("nvmlShutdown") == 1


def test_settings_are_validated_all_at_once():
    with pytest.raises(ConfigError) as err:
        NvmlSettings(call_timeout_s=0, init_timeout_s=0, gpm_min_interval_s=-1)
    assert len(err.value.problems) == 3


async def test_open_logs_nothing_itself(caplog):
    # The caller (heteroscale.sidecar.gpu.factory) logs the no-GPU reason, once.
    caplog.set_level(logging.INFO, logger="heteroscale.gpu")
    reader, _ = await open_fake(FakeNvml([]))
    assert reader.mode == "none"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
