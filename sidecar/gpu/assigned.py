"""GPUs assigned to this pod's engine, learnt after start-up: ``--gpus file:PATH`` and ``--gpus kubelet``.

In a Kubernetes pod the sidecar does not know, when it starts, which GPUs the
device plugin gave the engine container beside it. Two ways to learn it:

``file:PATH``
    The engine container writes its ``NVIDIA_VISIBLE_DEVICES`` (the UUIDs the
    device plugin assigned) to a shared ``emptyDir`` file before it starts the
    engine (manifests/examples). Works for a non-root sidecar.
``kubelet``
    Ask the kubelet's pod-resources API which ``nvidia.com/gpu`` devices this pod
    holds (``heteroscale.sidecar.gpu.podresources``), using ``POD_NAME`` and
    ``POD_NAMESPACE`` from the downward API. Exact under every device-plugin
    strategy; needs the kubelet socket (root).

Either may not be answerable yet when the sidecar starts (the engine has not
written the file; the kubelet has not admitted the pod), so resolution happens
on reads, retried every ``retry_s`` until it succeeds; until then the reader
reports mode ``pending`` and no readings. Once known, NVML is opened for exactly
those UUIDs. Each change of state is logged once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Sequence

from heteroscale.errors import ConfigError, UsageError
from heteroscale.sidecar.gpu.base import GpuReader, NoGpuReader
from heteroscale.sidecar.gpu.nvml import parse_gpu_selectors
from heteroscale.sidecar.gpu.podresources import PodResourcesError, query_gpu_ids
from heteroscale.report import GpuReading

log = logging.getLogger("heteroscale.gpu")

Resolver = Callable[[], Awaitable[tuple[str, ...]]]
Opener = Callable[[tuple[str, ...]], Awaitable[GpuReader]]

# Values of NVIDIA_VISIBLE_DEVICES that name no specific GPUs.
_NOT_A_LIST = {"all", "none", "void", ""}


class NotYetKnown(Exception):
    """The assignment cannot be read yet; try again later."""


def assignment_method(gpus: str | Sequence[str] | None) -> str | None:
    """``"file"`` / ``"kubelet"`` when ``--gpus`` names a deferred method, else None."""
    if gpus is None:
        return None
    items = [gpus] if isinstance(gpus, str) else list(gpus)
    if len(items) == 1 and items[0].strip() == "kubelet":
        return "kubelet"
    if len(items) == 1 and items[0].strip().startswith("file:"):
        return "file"
    if any(i.strip() == "kubelet" or i.strip().startswith("file:") for i in items):
        raise UsageError("--gpus: 'kubelet' and 'file:PATH' stand alone, not in a list")
    return None


def file_resolver(path: str) -> Resolver:
    if not path:
        raise UsageError("--gpus file:PATH needs a path")

    async def resolve() -> tuple[str, ...]:
        try:
            text = Path(path).read_text().strip()
        except FileNotFoundError:
            raise NotYetKnown(f"{path} not written yet by the engine container") from None
        except OSError as exc:
            raise NotYetKnown(f"{path}: {exc.strerror or exc}") from None
        if text.lower() in _NOT_A_LIST:
            # The engine saw no UUID list: the device plugin uses another strategy.
            return ()
        return parse_gpu_selectors(text, source=f"--gpus file:{path}")

    return resolve


def kubelet_resolver(env: Mapping[str, str], *, timeout_s: float = 2.0) -> Resolver:
    pod, namespace = env.get("POD_NAME"), env.get("POD_NAMESPACE")
    if not pod or not namespace:
        raise UsageError("--gpus kubelet needs POD_NAME and POD_NAMESPACE in the environment (downward API)")
    socket_path = env.get("HETEROSCALE_PODRESOURCES_SOCKET", "/var/lib/kubelet/pod-resources/kubelet.sock")
    container = env.get("HETEROSCALE_ENGINE_CONTAINER") or None

    async def resolve() -> tuple[str, ...]:
        try:
            return await query_gpu_ids(pod=pod, namespace=namespace, container=container,
                                       socket_path=socket_path, timeout_s=timeout_s)
        except (PodResourcesError, TimeoutError) as exc:
            raise NotYetKnown(str(exc) or "kubelet did not answer in time") from None

    return resolve


class AssignedGpuReader:
    """A GpuReader that first learns its GPU UUIDs, then delegates to the NVML reader."""

    def __init__(self, *, method: str, resolve: Resolver, open_reader: Opener,
                 retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.method = method
        self._resolve = resolve
        self._open = open_reader
        self._retry_s = retry_s
        self._clock = clock
        self._inner: GpuReader | None = None
        self._next_try_s = float("-inf")
        self._last_reason = ""
        self.reason = f"waiting for the GPU assignment ({method})"

    @property
    def mode(self) -> str:
        return self._inner.mode if self._inner is not None else "pending"

    async def read(self) -> tuple[GpuReading, ...]:
        if self._inner is None:
            now = self._clock()
            if now < self._next_try_s:
                return ()
            self._next_try_s = now + self._retry_s
            await self._try_resolve()
            if self._inner is None:
                return ()
        return await self._inner.read()

    async def _try_resolve(self) -> None:
        try:
            uuids = await self._resolve()
        except NotYetKnown as exc:
            self._say(f"GPU assignment ({self.method}) not known yet: {exc}; retrying every {self._retry_s:g} s")
            return
        except UsageError as exc:      # a file holding something that is no GPU list
            self._inner = NoGpuReader(str(exc))
            self._say(f"GPU assignment ({self.method}) unusable: {exc}: no-GPU mode", warn=True)
            return
        if not uuids:
            self._inner = NoGpuReader(f"the engine holds no specific GPU ({self.method})")
            self._say(f"{self._inner.reason}: no-GPU mode", warn=True)
            return
        try:
            self._inner = await self._open(uuids)
        except ConfigError as exc:
            # NVML does not see the engine's GPUs: the sidecar container was not given
            # them (NVIDIA_VISIBLE_DEVICES=all missing, or the toolkit refuses it).
            self._inner = NoGpuReader(f"engine GPUs {','.join(uuids)} are not visible to the sidecar: {exc}")
            self._say(f"{self._inner.reason}: no-GPU mode", warn=True)
            return
        self.reason = f"{self.method}: {','.join(uuids)}"
        self._say(f"GPU assignment ({self.method}): {','.join(uuids)}; mode {self._inner.mode}")

    def _say(self, message: str, *, warn: bool = False) -> None:
        if message != self._last_reason:
            (log.warning if warn else log.info)(message)
            self._last_reason = message
        self.reason = message

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()
