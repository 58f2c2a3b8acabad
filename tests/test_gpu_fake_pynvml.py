"""A fake ``pynvml`` module for the NVML reader's GPU path, and proof that it is faithful.

There is no GPU on the machines this suite runs on, so the GPU path of
``sidecar/gpu/nvml.py`` runs against this fake. It is built to behave like the
real binding, not like our code expects:

* functions have the real names and parameter lists (checked below with
  ``inspect.signature`` against the installed ``nvidia-ml-py``);
* errors are the real ``pynvml.NVMLError_*`` classes;
* return values are the real ctypes structs (``c_nvmlUtilization_t``,
  ``c_nvmlMemory_t``, ``c_nvmlGpmSupport_t``), GPM samples are real
  ``c_nvmlGpmSample_t`` pointers and ``nvmlGpmMetricsGet`` fills the real
  ``c_nvmlGpmMetricsGet_t`` (per-metric ``nvmlReturn``, percent ``value``);
* GPM SM utilisation is computed from what happened *between* the two samples
  (an integral of SM-busy time over device time), so a reader that pairs the
  wrong samples gets a wrong number, as it would on a real GPU;
* NVML must be initialised before device calls (``NVMLError_Uninitialized``).

Devices are ``FakeGpu``; tests move device time forward with ``FakeNvml.advance``.
"""

from __future__ import annotations

import ctypes
import inspect
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pynvml
import pytest

MIRRORED = (
    "nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetHandleByUUID", "nvmlDeviceGetUUID", "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetPowerUsage", "nvmlGpmQueryDeviceSupport",
    "nvmlGpmSampleAlloc", "nvmlGpmSampleGet", "nvmlGpmMetricsGet", "nvmlGpmSampleFree",
)
COPIED_NAMES = ("NVML_SUCCESS", "NVML_GPM_METRICS_GET_VERSION", "NVML_GPM_METRIC_SM_UTIL",
                "c_nvmlGpmMetricsGet_t", "c_nvmlGpmSample_t")


@dataclass
class FakeGpu:
    uuid: str
    gpm: str = "hopper"          # "hopper" | "ampere" (isSupportedDevice=0) | "not_supported" (query raises)
                                 # | "no_permission" (metric nvmlReturn = NO_PERMISSION)
    util_percent: int = 0
    memory_used_bytes: int = 0
    power_mw: int = 0
    sm_util_percent: float = 0.0  # current SM activity; integrated over device time
    errors: dict[str, type] = field(default_factory=dict)    # function name -> NVMLError class
    hang: dict[str, threading.Event] = field(default_factory=dict)  # function name -> released by test
    # device state
    time_s: float = 0.0
    sm_busy_s: float = 0.0


class _Handle:
    """Opaque like ``c_nvmlDevice_t``; only the fake looks inside."""

    def __init__(self, index: int) -> None:
        self.index = index


class FakeNvml:
    """Builds the fake module; keeps the call log and device state for assertions."""

    def __init__(self, gpus: list[FakeGpu], *, init_error: type | None = None,
                 init_hang: threading.Event | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.init_hang = init_hang
        self.initialised = 0
        self.calls: list[str] = []
        self.samples: dict[int, tuple[int, float, float] | None] = {}  # address -> (gpu, time, busy)
        self._buffers: dict[int, Any] = {}
        self.freed: list[int] = []
        self.module = self._build()

    def advance(self, dt_s: float) -> None:
        """Device time passes; SM-busy time accrues at each GPU's current activity."""
        for gpu in self.gpus:
            gpu.time_s += dt_s
            gpu.sm_busy_s += dt_s * gpu.sm_util_percent / 100.0

    # -- helpers

    def _gpu(self, handle: Any, fn: str) -> FakeGpu:
        self.calls.append(fn)
        if not self.initialised:
            raise pynvml.NVMLError_Uninitialized()
        gpu = self.gpus[handle.index]
        if fn in gpu.hang:
            gpu.hang[fn].wait(timeout=30)
        if fn in gpu.errors:
            raise gpu.errors[fn]()
        return gpu

    @staticmethod
    def _address(sample: Any) -> int:
        return ctypes.cast(sample, ctypes.c_void_p).value

    def _build(self) -> ModuleType:
        mod = ModuleType("fake_pynvml")
        for name in dir(pynvml):               # the real error classes, not look-alikes
            if name.startswith("NVMLError"):
                setattr(mod, name, getattr(pynvml, name))
        for name in COPIED_NAMES:
            setattr(mod, name, getattr(pynvml, name))

        def nvmlInit():
            self.calls.append("nvmlInit")
            if self.init_hang is not None:
                self.init_hang.wait(timeout=30)
            if self.init_error is not None:
                raise self.init_error()
            self.initialised += 1

        def nvmlShutdown():
            self.calls.append("nvmlShutdown")
            if not self.initialised:
                raise pynvml.NVMLError_Uninitialized()
            self.initialised -= 1

        def nvmlDeviceGetCount():
            self.calls.append("nvmlDeviceGetCount")
            if not self.initialised:
                raise pynvml.NVMLError_Uninitialized()
            return len(self.gpus)

        def nvmlDeviceGetHandleByIndex(index):
            self.calls.append("nvmlDeviceGetHandleByIndex")
            if not 0 <= index < len(self.gpus):
                raise pynvml.NVMLError_InvalidArgument()
            return _Handle(index)

        def nvmlDeviceGetHandleByUUID(uuid):
            self.calls.append("nvmlDeviceGetHandleByUUID")
            for i, gpu in enumerate(self.gpus):
                if gpu.uuid == uuid:
                    return _Handle(i)
            raise pynvml.NVMLError_NotFound()

        def nvmlDeviceGetUUID(handle):
            return self._gpu(handle, "nvmlDeviceGetUUID").uuid

        def nvmlDeviceGetUtilizationRates(handle):
            gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
            return pynvml.c_nvmlUtilization_t(gpu=gpu.util_percent, memory=0)

        def nvmlDeviceGetMemoryInfo(handle, version=None):
            gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
            total = 141 * 2**30
            return pynvml.c_nvmlMemory_t(total=total, free=total - gpu.memory_used_bytes,
                                         used=gpu.memory_used_bytes)

        def nvmlDeviceGetPowerUsage(handle):
            return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

        def nvmlGpmQueryDeviceSupport(device):
            gpu = self._gpu(device, "nvmlGpmQueryDeviceSupport")
            if gpu.gpm == "not_supported":
                raise pynvml.NVMLError_NotSupported()
            support = pynvml.c_nvmlGpmSupport_t()
            support.version = pynvml.NVML_GPM_SUPPORT_VERSION
            support.isSupportedDevice = 0 if gpu.gpm == "ampere" else 1
            return support

        def nvmlGpmSampleAlloc():
            self.calls.append("nvmlGpmSampleAlloc")
            buf = ctypes.create_string_buffer(16)
            sample = ctypes.cast(buf, pynvml.c_nvmlGpmSample_t)
            self._buffers[self._address(sample)] = buf
            self.samples[self._address(sample)] = None
            return sample

        def nvmlGpmSampleGet(device, gpmSample):
            gpu = self._gpu(device, "nvmlGpmSampleGet")
            if gpu.gpm in ("ampere", "not_supported"):
                raise pynvml.NVMLError_NotSupported()
            self.samples[self._address(gpmSample)] = (device.index, gpu.time_s, gpu.sm_busy_s)
            return gpmSample

        def nvmlGpmMetricsGet(metricsGet):
            self.calls.append("nvmlGpmMetricsGet")
            if metricsGet.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
                raise pynvml.NVMLError_ArgumentVersionMismatch()
            first = self.samples.get(self._address(metricsGet.sample1))
            second = self.samples.get(self._address(metricsGet.sample2))
            if first is None or second is None or first[0] != second[0]:
                raise pynvml.NVMLError_InvalidArgument()
            gpu = self.gpus[first[0]]
            for i in range(metricsGet.numMetrics):
                metric = metricsGet.metrics[i]
                if metric.metricId != pynvml.NVML_GPM_METRIC_SM_UTIL:
                    metric.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                elif gpu.gpm == "no_permission":
                    metric.nvmlReturn = pynvml.NVML_ERROR_NO_PERMISSION
                elif second[1] <= first[1]:
                    metric.nvmlReturn = pynvml.NVML_ERROR_INVALID_ARGUMENT   # samples out of order
                else:
                    metric.nvmlReturn = pynvml.NVML_SUCCESS
                    metric.value = 100.0 * (second[2] - first[2]) / (second[1] - first[1])
            return metricsGet

        def nvmlGpmSampleFree(gpmSample):
            self.calls.append("nvmlGpmSampleFree")
            address = self._address(gpmSample)
            if address not in self.samples:
                raise pynvml.NVMLError_InvalidArgument()
            del self.samples[address]
            self.freed.append(address)

        for fn in (nvmlInit, nvmlShutdown, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex,
                   nvmlDeviceGetHandleByUUID, nvmlDeviceGetUUID, nvmlDeviceGetUtilizationRates,
                   nvmlDeviceGetMemoryInfo, nvmlDeviceGetPowerUsage, nvmlGpmQueryDeviceSupport,
                   nvmlGpmSampleAlloc, nvmlGpmSampleGet, nvmlGpmMetricsGet, nvmlGpmSampleFree):
            setattr(mod, fn.__name__, fn)
        return mod


UUID_A = "GPU-8f3a1c2e-0000-1111-2222-333344445555"
UUID_B = "GPU-8f3b9d10-6666-7777-8888-99990000aaaa"
UUID_C = "GPU-c0ffee00-1234-5678-9abc-def012345678"


def three_gpus() -> list[FakeGpu]:
    """Two Hopper GPUs and one Ampere (GPM unsupported), with distinct readings."""
    return [
        FakeGpu(UUID_A, util_percent=86, memory_used_bytes=70 * 2**30, power_mw=512_250, sm_util_percent=40),
        FakeGpu(UUID_B, util_percent=12, memory_used_bytes=2**30, power_mw=95_000, sm_util_percent=5),
        FakeGpu(UUID_C, gpm="ampere", util_percent=55, memory_used_bytes=3 * 2**30, power_mw=250_000),
    ]


# --------------------------------------------------------------------------- fidelity


@pytest.mark.parametrize("name", MIRRORED)
def test_fake_functions_have_the_real_signatures(name):
    real = inspect.signature(getattr(pynvml, name))
    fake = inspect.signature(getattr(FakeNvml([]).module, name))
    assert list(fake.parameters) == list(real.parameters)
    assert [p.default for p in fake.parameters.values()] == [p.default for p in real.parameters.values()]


def test_fake_raises_the_real_error_classes():
    fake = FakeNvml(three_gpus())
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.module.nvmlDeviceGetCount()
    fake.module.nvmlInit()
    handle = fake.module.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(pynvml.NVMLError_NotSupported) as err:
        fake.module.nvmlGpmSampleGet(handle, fake.module.nvmlGpmSampleAlloc())
    assert err.value.value == pynvml.NVML_ERROR_NOT_SUPPORTED
    # the generic constructor maps a code to its subclass, as in the real binding
    assert type(fake.module.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)) is pynvml.NVMLError_NoPermission


def test_fake_gpm_integrates_sm_activity_between_the_two_samples():
    fake = FakeNvml(three_gpus())
    m = fake.module
    m.nvmlInit()
    h = m.nvmlDeviceGetHandleByIndex(0)
    s1, s2 = m.nvmlGpmSampleAlloc(), m.nvmlGpmSampleAlloc()
    m.nvmlGpmSampleGet(h, s1)
    fake.advance(1.0)                     # 1 s at 40 %
    fake.gpus[0].sm_util_percent = 80
    fake.advance(1.0)                     # 1 s at 80 %
    m.nvmlGpmSampleGet(h, s2)
    req = m.c_nvmlGpmMetricsGet_t()
    req.version, req.numMetrics, req.sample1, req.sample2 = m.NVML_GPM_METRICS_GET_VERSION, 1, s1, s2
    req.metrics[0].metricId = m.NVML_GPM_METRIC_SM_UTIL
    m.nvmlGpmMetricsGet(req)
    assert req.metrics[0].nvmlReturn == pynvml.NVML_SUCCESS
    assert req.metrics[0].value == pytest.approx(60.0)     # (0.4 + 0.8) s busy / 2 s
    req.sample1, req.sample2 = s2, s1                       # reversed: the real NVML refuses
    m.nvmlGpmMetricsGet(req)
    assert req.metrics[0].nvmlReturn == pynvml.NVML_ERROR_INVALID_ARGUMENT
