"""GPU readings through NVML (``nvidia-ml-py``); the only module that imports pynvml.

What it owns
    * Choosing this sidecar's GPUs: the ``--gpus`` flag (NVML indices or UUIDs,
      comma separated) or, without it, ``NVIDIA_VISIBLE_DEVICES`` and then
      ``CUDA_VISIBLE_DEVICES`` (see ``choose_selection``).
    * Opening NVML once (``open_nvml_reader``). No library, no driver, no
      device, or an init that hangs: the sidecar runs in no-GPU mode
      (``NoGpuReader`` with a ``reason``); the caller logs that reason once.
    * Per-GPU readings: utilisation (``nvmlDeviceGetUtilizationRates().gpu``/100:
      the share of the sample period in which at least one kernel ran -- not SM
      occupancy), memory used (bytes, ``nvmlDeviceGetMemoryInfo`` v1 ``used``),
      power (``nvmlDeviceGetPowerUsage`` mW / 1000) and SM activity from GPM
      (``NVML_GPM_METRIC_SM_UTIL``/100, Hopper and newer).

SM activity needs two GPM samples over an interval longer than the driver's
refresh. Instead of sleeping inside every read, the reader keeps the previous
sample per GPU and computes the metric over the span between two consecutive
reads (the sidecar's read interval, ~1 s). The first read, and reads closer than
``gpm_min_interval_s`` to the last sample, report the previous value (``None``
at first). Where GPM is unsupported (pre-Hopper, old driver, MIG, profiling not
permitted) the field stays ``None``: no number is better than a wrong one.

Bounded and off the loop: every NVML call runs on one dedicated daemon thread
(NVML is serialised anyway) and the caller waits at most ``call_timeout_s``. A
call that hangs marks that read absent (every field ``None``) and, while it is
still stuck, later reads fail fast instead of queueing behind it. A daemon
thread is used rather than ``asyncio.to_thread`` so that a call stuck in the
driver can neither exhaust the shared executor nor block interpreter exit.

Errors: ``NVMLError_NotSupported``/``NoPermission``/``FunctionNotFound`` on a
field make that field ``None`` for good (GPU capability does not change);
any other ``NVMLError`` makes it ``None`` for this read and is counted in
``errors_total`` (reason = the error class without ``NVMLError_``, snake case).

Not supported: MIG device UUIDs (``MIG-...``) as selectors, per-MIG readings.
Nothing here has been run on GPU hardware in this project yet (docs/gpu.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

from heteroscale.errors import ConfigError, UsageError
from heteroscale.sidecar.gpu.base import NoGpuReader
from heteroscale.report import GpuReading

log = logging.getLogger("heteroscale.gpu")

_UUID_RE = re.compile(r"^GPU-[0-9a-fA-F-]+$")
# Field errors that mean "this GPU/driver cannot do it": stop asking.
_PERMANENT = ("NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_FunctionNotFound")
# Init errors that mean "no usable NVML here": no-GPU mode.
_NO_GPU_INIT = {
    "NVMLError_LibraryNotFound": "NVML library not found (libnvidia-ml.so.1 does not load: no NVIDIA driver visible here)",
    "NVMLError_DriverNotLoaded": "NVIDIA kernel driver not loaded",
    "NVMLError_NoPermission": "no permission to open the NVIDIA devices",
    "NVMLError_LibRmVersionMismatch": "NVML library and kernel driver versions differ",
}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class NvmlSettings:
    """How NVML is read. Both bounds trade freshness against load on the driver."""

    call_timeout_s: float = 0.5
    """Longest wait for one read of all GPUs (or shutdown). NVML calls take
    microseconds to milliseconds; half a second means the driver is wedged. Keep it
    below the agent's own bound on a GPU read (its scrape timeout)."""
    init_timeout_s: float = 10.0
    """Longest wait for ``nvmlInit`` plus device discovery, once at start-up. Without
    persistence mode the driver may need seconds per GPU to wake up."""
    gpm_min_interval_s: float = 0.2
    """Shortest span between two GPM samples used for SM activity. NVIDIA asks for
    more than the GPM refresh (~0.1 s); shorter spans give noisy ratios."""

    def __post_init__(self) -> None:
        problems = []
        if not self.call_timeout_s > 0:
            problems.append(f"call_timeout_s must be > 0, got {self.call_timeout_s}")
        if not self.init_timeout_s > 0:
            problems.append(f"init_timeout_s must be > 0, got {self.init_timeout_s}")
        if not self.gpm_min_interval_s > 0:
            problems.append(f"gpm_min_interval_s must be > 0, got {self.gpm_min_interval_s}")
        if problems:
            raise ConfigError(problems, source="nvml settings")


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class GpuSelection:
    """Which GPUs belong to this engine, and where that came from.

    ``selectors`` is ``None`` for "every GPU NVML sees"; otherwise NVML indices
    (``"0"``) and/or UUIDs or UUID prefixes (``"GPU-8f3a"``). ``disabled_reason``
    is set when the environment says this container has no GPU at all.
    """

    selectors: tuple[str, ...] | None
    source: str                      # "--gpus" | "NVIDIA_VISIBLE_DEVICES" | "CUDA_VISIBLE_DEVICES" | "default"
    disabled_reason: str | None = None


def parse_gpu_selectors(text: str, *, source: str = "--gpus") -> tuple[str, ...]:
    """Split ``"0,1"`` / ``"GPU-aaa,GPU-bbb"``; raise ``UsageError`` on anything else."""
    items = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise UsageError(f"{source}: expected a comma list of GPU indices or UUIDs, got {text!r}")
    for item in items:
        if item.upper().startswith("MIG-"):
            raise UsageError(f"{source}: MIG devices ({item}) are not supported; give the parent GPU")
        if not (item.isdigit() or _UUID_RE.match(item)):
            raise UsageError(f"{source}: {item!r} is neither a GPU index nor a GPU-... UUID")
    if len(set(items)) != len(items):
        raise UsageError(f"{source}: GPU {text!r} lists a device twice")
    return tuple(items)


def choose_selection(gpus: str | Sequence[str] | None, env: Mapping[str, str] | None = None) -> GpuSelection:
    """Flag first, then ``NVIDIA_VISIBLE_DEVICES``, then ``CUDA_VISIBLE_DEVICES``.

    ``NVIDIA_VISIBLE_DEVICES``: ``all`` (or unset/empty) means every GPU NVML
    sees; ``none``/``void`` means none. ``CUDA_VISIBLE_DEVICES`` is used only
    when it names UUIDs, or indices with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``: CUDA's
    default order (fastest first) is not NVML's (PCI bus), so plain CUDA indices
    could name the wrong GPU. A bad flag raises ``UsageError``; a bad variable
    is ignored with a warning (it was not written for us).
    """
    if gpus is not None:
        text = gpus if isinstance(gpus, str) else ",".join(gpus)
        return GpuSelection(parse_gpu_selectors(text), "--gpus")
    env = os.environ if env is None else env
    nvd = env.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if nvd.lower() in ("none", "void"):
        return GpuSelection((), "NVIDIA_VISIBLE_DEVICES",
                            disabled_reason=f"NVIDIA_VISIBLE_DEVICES={nvd}: this container has no GPU")
    if nvd and nvd.lower() != "all":
        try:
            return GpuSelection(parse_gpu_selectors(nvd, source="NVIDIA_VISIBLE_DEVICES"),
                                "NVIDIA_VISIBLE_DEVICES")
        except UsageError as err:
            log.warning("ignoring %s", err)
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() == "":
        return GpuSelection((), "CUDA_VISIBLE_DEVICES",
                            disabled_reason="CUDA_VISIBLE_DEVICES is empty: no GPU for this engine")
    if cvd:
        try:
            selectors = parse_gpu_selectors(cvd, source="CUDA_VISIBLE_DEVICES")
        except UsageError as err:
            log.warning("ignoring %s", err)
        else:
            pci_order = env.get("CUDA_DEVICE_ORDER", "") == "PCI_BUS_ID"
            if pci_order or all(not s.isdigit() for s in selectors):
                return GpuSelection(selectors, "CUDA_VISIBLE_DEVICES")
            log.warning("ignoring CUDA_VISIBLE_DEVICES=%s: indices in CUDA's default order do not "
                        "match NVML's; set CUDA_DEVICE_ORDER=PCI_BUS_ID, use UUIDs or --gpus", cvd)
    return GpuSelection(None, "default")


# --------------------------------------------------------------------------- the NVML thread


class NvmlCallTimeout(Exception):
    """An NVML hop did not finish in time (or an earlier one is still stuck)."""


class _NvmlThread:
    """One daemon thread that runs NVML calls in order; callers wait with a bound."""

    def __init__(self, name: str = "heteroscale-nvml") -> None:
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future, Callable[..., Any], tuple] | None] = (
            queue.SimpleQueue())
        self._stuck: concurrent.futures.Future | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue        # its caller gave up before it started
            try:
                result = fn(*args)
            except BaseException as err:  # noqa: BLE001 -- handed to the waiting caller
                future.set_exception(err)
            else:
                future.set_result(result)

    @property
    def stuck(self) -> bool:
        return self._stuck is not None and not self._stuck.done()

    async def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        if self.stuck:
            raise NvmlCallTimeout("an earlier NVML call is still running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            if future.running():
                self._stuck = future
            raise NvmlCallTimeout(f"NVML call {getattr(fn, '__name__', fn)} took over {timeout_s} s") from None
        except asyncio.CancelledError:
            # The caller's own bound fired first: same meaning for later calls.
            if future.running():
                self._stuck = future
            raise

    def stop(self) -> None:
        self._jobs.put(None)


# --------------------------------------------------------------------------- devices


@dataclass
class _GpmState:
    """Two GPM sample buffers and the last SM activity of one GPU (NVML thread only)."""

    samples: list[Any]
    prev_at: float | None = None     # monotonic time of samples[0]
    last_ratio: float | None = None


@dataclass
class _Device:
    index: int
    uuid: str
    handle: Any
    label: str                                   # what readings are labelled with
    gpm: _GpmState | None = None                 # None: GPM unsupported
    unsupported: set[str] = field(default_factory=set)


def _error_name(err: BaseException) -> str:
    return type(err).__name__


def _reason(err: BaseException) -> str:
    name = _error_name(err).removeprefix("NVMLError_")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() or "nvml_error"


def _is_permanent(nvml: ModuleType, err: BaseException) -> bool:
    return isinstance(err, tuple(getattr(nvml, name) for name in _PERMANENT if hasattr(nvml, name)))


def _to_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _enumerate(nvml: ModuleType) -> list[tuple[int, str, Any]]:
    """(index, uuid, handle) for every device NVML sees; a device that errors is skipped."""
    out = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            out.append((index, _to_str(nvml.nvmlDeviceGetUUID(handle)), handle))
        except nvml.NVMLError as err:
            log.warning("GPU %d skipped: %s", index, err)
    return out


def _resolve(found: list[tuple[int, str, Any]],
             selectors: tuple[str, ...] | None) -> tuple[list[_Device], list[str]]:
    """Match selectors to devices: index, exact UUID, or a unique UUID prefix."""
    if selectors is None:
        return [_Device(i, u, h, label=str(i)) for i, u, h in found], []
    chosen: list[_Device] = []
    problems: list[str] = []
    for sel in selectors:
        if sel.isdigit():
            hits = [d for d in found if d[0] == int(sel)]
        else:
            hits = [d for d in found if d[1].lower() == sel.lower()] or \
                   [d for d in found if d[1].lower().startswith(sel.lower())]
        if len(hits) != 1:
            problems.append(f"GPU {sel!r} {'is ambiguous' if hits else 'not found'} "
                            f"(NVML sees {', '.join(f'{i}={u}' for i, u, _ in found) or 'no GPU'})")
            continue
        i, u, h = hits[0]
        if any(d.index == i for d in chosen):
            problems.append(f"GPU {sel!r} selects GPU {i} twice")
            continue
        chosen.append(_Device(i, u, h, label=sel))
    return chosen, problems


def _setup_gpm(nvml: ModuleType, dev: _Device) -> None:
    """Allocate GPM buffers if this GPU supports GPM; leave ``gpm`` None otherwise."""
    try:
        support = nvml.nvmlGpmQueryDeviceSupport(dev.handle)
        if not support.isSupportedDevice:
            return
        dev.gpm = _GpmState(samples=[nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()])
    except nvml.NVMLError as err:
        log.info("GPU %s: no GPM SM activity (%s)", dev.label, err)


def _open_blocking(nvml: ModuleType, selectors: tuple[str, ...] | None) -> tuple[list[_Device], list[str]]:
    nvml.nvmlInit()
    try:
        found = _enumerate(nvml)
        devices, problems = _resolve(found, selectors)
        if not problems:
            for dev in devices:
                _setup_gpm(nvml, dev)
        return devices, problems
    except BaseException:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass            # the original error is the one worth reporting
        raise


def _close_blocking(nvml: ModuleType, devices: list[_Device]) -> None:
    for dev in devices:
        if dev.gpm is not None:
            for sample in dev.gpm.samples:
                try:
                    nvml.nvmlGpmSampleFree(sample)
                except nvml.NVMLError:
                    pass
    nvml.nvmlShutdown()


# --------------------------------------------------------------------------- the reader


def _ratio_from_percent(value: float) -> float | None:
    """0..100 → 0..1; a tiny overshoot is rounding, anything else is not trusted."""
    if not (value == value) or value < 0 or value > 100.5:   # NaN or out of range
        return None
    return min(value, 100.0) / 100.0


class NvmlReader:
    """Reads the selected GPUs through NVML; see the module docstring."""

    mode = "nvml"

    def __init__(self, *, nvml: ModuleType, devices: list[_Device], thread: _NvmlThread,
                 settings: NvmlSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._devices = devices
        self._thread = thread
        self._settings = settings
        self._clock = clock
        self._closed = False
        self.reason = f"NVML, GPUs {', '.join(f'{d.label} ({d.uuid})' for d in devices)}"
        self.errors_total: dict[str, int] = {}
        """Failed readings by reason (``timeout``, ``gpu_is_lost``, ...); the agent exports it."""

    @property
    def gpus(self) -> tuple[str, ...]:
        """Labels of the selected GPUs, in selection order."""
        return tuple(d.label for d in self._devices)

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(d.uuid for d in self._devices)

    def _count(self, reason: str) -> None:
        self.errors_total[reason] = self.errors_total.get(reason, 0) + 1

    async def read(self) -> tuple[GpuReading, ...]:
        if self._closed:
            return ()
        try:
            return await self._thread.call(self._read_blocking,
                                           timeout_s=self._settings.call_timeout_s)
        except NvmlCallTimeout as err:
            self._count("timeout")
            log.debug("NVML read absent: %s", err)
            return tuple(GpuReading(gpu=d.label) for d in self._devices)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._thread.call(_close_blocking, self._nvml, self._devices,
                                    timeout_s=self._settings.call_timeout_s)
        except Exception as err:  # noqa: BLE001 -- shutdown is best effort (incl. NvmlCallTimeout)
            log.debug("NVML shutdown: %s", err)
        finally:
            self._thread.stop()

    # -- below here: runs on the NVML thread only

    def _field(self, dev: _Device, name: str, fn: Callable[[], float | None]) -> float | None:
        if name in dev.unsupported:
            return None
        try:
            return fn()
        except self._nvml.NVMLError as err:
            if _is_permanent(self._nvml, err):
                dev.unsupported.add(name)
                log.info("GPU %s: %s not available (%s)", dev.label, name, err)
            else:
                self._count(_reason(err))
            return None

    def _read_blocking(self) -> tuple[GpuReading, ...]:
        nvml = self._nvml
        out = []
        for dev in self._devices:
            h = dev.handle
            out.append(GpuReading(
                gpu=dev.label,
                utilization_ratio=self._field(
                    dev, "utilization", lambda: _ratio_from_percent(float(nvml.nvmlDeviceGetUtilizationRates(h).gpu))),
                memory_used_bytes=self._field(
                    dev, "memory", lambda: float(nvml.nvmlDeviceGetMemoryInfo(h).used)),
                power_watts=self._field(
                    dev, "power", lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
                sm_activity_ratio=self._field(dev, "sm_activity", lambda: self._sm_activity(dev)),
            ))
        return tuple(out)

    def _sm_activity(self, dev: _Device) -> float | None:
        """GPM SM_UTIL between the previous sample and a new one (see module docstring)."""
        state = dev.gpm
        if state is None:
            return None
        nvml = self._nvml
        now = self._clock()
        if state.prev_at is None:
            nvml.nvmlGpmSampleGet(dev.handle, state.samples[0])
            state.prev_at = now
            return None
        if now - state.prev_at < self._settings.gpm_min_interval_s:
            return state.last_ratio
        nvml.nvmlGpmSampleGet(dev.handle, state.samples[1])
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = 1
        request.sample1 = state.samples[0]
        request.sample2 = state.samples[1]
        request.metrics[0].metricId = nvml.NVML_GPM_METRIC_SM_UTIL
        nvml.nvmlGpmMetricsGet(request)
        # The newer sample becomes the start of the next span.
        state.samples.reverse()
        state.prev_at = now
        metric = request.metrics[0]
        if metric.nvmlReturn != nvml.NVML_SUCCESS:
            # Per-metric status: raise the matching NVMLError so _field classifies it.
            raise nvml.NVMLError(metric.nvmlReturn)
        state.last_ratio = _ratio_from_percent(float(metric.value))
        return state.last_ratio


# --------------------------------------------------------------------------- opening


def _import_pynvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


async def open_nvml_reader(*, gpus: str | Sequence[str] | None, env: Mapping[str, str] | None = None,
                           nvml: ModuleType | None = None, settings: NvmlSettings | None = None,
                           clock: Callable[[], float] = time.monotonic) -> NvmlReader | NoGpuReader:
    """Open NVML for this engine's GPUs, or explain (``NoGpuReader.reason``) why not.

    ``gpus`` is the ``--gpus`` flag, as text or already split. Raises
    ``UsageError``/``ConfigError`` only for a bad ``--gpus`` flag (syntax, or a GPU
    that does not exist on this node). Logs nothing: the caller says once why it
    runs without GPUs. ``nvml`` is the pynvml module; tests pass
    a fake with the same functions and the real error classes.
    """
    settings = settings or NvmlSettings()
    selection = choose_selection(gpus, env)
    if selection.disabled_reason:
        return NoGpuReader(selection.disabled_reason)
    nvml = nvml or _import_pynvml()
    if nvml is None:
        return NoGpuReader("nvidia-ml-py (pynvml) is not installed")
    thread = _NvmlThread()
    try:
        devices, problems = await thread.call(_open_blocking, nvml, selection.selectors,
                                              timeout_s=settings.init_timeout_s)
    except NvmlCallTimeout:
        thread.stop()
        return NoGpuReader(f"NVML did not initialise within {settings.init_timeout_s} s")
    except nvml.NVMLError as err:
        thread.stop()
        known = _NO_GPU_INIT.get(_error_name(err))
        return NoGpuReader(f"{known or 'NVML init failed'}: {err}")
    if problems or not devices:
        try:
            await thread.call(_close_blocking, nvml, devices, timeout_s=settings.call_timeout_s)
        except (NvmlCallTimeout, nvml.NVMLError):
            pass
        thread.stop()
        if problems and selection.source == "--gpus":
            raise ConfigError(problems, source="--gpus")
        if problems:
            return NoGpuReader(f"{selection.source} names GPUs NVML does not see: {problems[0]}")
        return NoGpuReader("NVML sees no GPU")
    return NvmlReader(nvml=nvml, devices=devices, thread=thread, settings=settings, clock=clock)
