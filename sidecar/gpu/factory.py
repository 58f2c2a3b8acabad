"""Pick and open the sidecar's GPU reader: ``open_reader(source, gpus, emulator_url)``.

The agent calls this once at start-up (``await``). Sources:

* ``"nvml"`` (default): real GPUs through NVML. No driver, no library or no GPU
  is not an error: the sidecar runs in no-GPU mode (``NoGpuReader`` with a
  ``reason``). This function does not log that; its caller does, once
  (``heteroscale.sidecar.agent.open_gpu_reader``: "no GPU readable (<reason>): no-GPU mode"),
  and exports ``heteroscale_gpu_mode{mode="none"}``.
* ``"emulator"``: modelled GPUs from an engine emulator's ``/emulator/gpu`` page
  (demo and tests); needs ``emulator_url``.
* ``"none"``: no GPU readings at all (e.g. a CPU engine).

With ``nvml``, ``gpus`` may also be ``kubelet`` or ``file:PATH``: the engine's
GPUs are learnt after start-up (``heteroscale.sidecar.gpu.assigned``) and the reader reports
mode ``pending`` until they are known.

Only user mistakes raise (``UsageError``/``ConfigError``: unknown source, bad
``--gpus``, emulator source without URL); the CLI turns them into one line, exit 2.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Mapping, Sequence

from heteroscale.errors import UsageError
from heteroscale.sidecar.gpu.assigned import (AssignedGpuReader, assignment_method, file_resolver,
                                  kubelet_resolver)
from heteroscale.sidecar.gpu.base import GpuReader, NoGpuReader
from heteroscale.sidecar.gpu.emulator_source import EmulatorGpuReader
from heteroscale.sidecar.gpu.nvml import NvmlSettings, open_nvml_reader

log = logging.getLogger("heteroscale.gpu")

SOURCES = ("nvml", "emulator", "none")


async def open_reader(source: str = "nvml", gpus: str | Sequence[str] | None = None,
                      emulator_url: str | None = None,
                      *, env: Mapping[str, str] | None = None, nvml: ModuleType | None = None,
                      settings: NvmlSettings | None = None) -> GpuReader:
    """Return the reader for ``source``; see the module docstring. Never raises for hardware."""
    if source not in SOURCES:
        raise UsageError(f"--gpu-source: expected one of {', '.join(SOURCES)}, got {source!r}")
    if source == "emulator":
        if not emulator_url:
            raise UsageError("--gpu-source emulator needs --emulator-gpu-url URL")
        try:
            reader: GpuReader = EmulatorGpuReader(emulator_url)
        except ValueError as err:
            raise UsageError(f"--emulator-gpu-url: {err}") from err
        log.info("GPU readings: %s", reader.reason)
        return reader
    if source == "none":
        return NoGpuReader("GPU readings switched off (--gpu-source none)")
    method = assignment_method(gpus)
    if method is not None:
        environ = os.environ if env is None else env
        first = gpus if isinstance(gpus, str) else gpus[0]  # type: ignore[index]
        resolve = (kubelet_resolver(environ) if method == "kubelet"
                   else file_resolver(first.strip()[len("file:"):]))

        async def open_for(uuids: tuple[str, ...]) -> GpuReader:
            return await open_nvml_reader(gpus=uuids, env=environ, nvml=nvml, settings=settings)

        return AssignedGpuReader(method=method, resolve=resolve, open_reader=open_for)
    reader = await open_nvml_reader(gpus=gpus, env=env, nvml=nvml, settings=settings)
    if reader.mode != "none":
        log.info("GPU readings: %s", reader.reason)
    return reader
