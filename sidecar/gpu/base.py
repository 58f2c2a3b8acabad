"""The GPU seam of the sidecar: a ``GpuReader`` yields one ``GpuReading`` per GPU.

Implementations: ``NoGpuReader`` (no driver or no GPU: report nothing),
``heteroscale.sidecar.gpu.nvml`` (the default, the only module importing pynvml) and an
emulator source that reads an engine emulator's modelled GPU page (only when the
sidecar is started with that source explicitly). Readers never raise for a
missing or unsupported reading: they leave the field ``None``.
"""

from __future__ import annotations

from typing import Protocol

from heteroscale.report import GpuReading


class GpuReader(Protocol):
    mode: str            # "nvml" | "emulator" | "none"; exported as a gauge and in the report

    async def read(self) -> tuple[GpuReading, ...]:
        """Current readings, bounded in time; ``()`` when nothing can be read."""
        ...

    async def close(self) -> None:
        ...


class NoGpuReader:
    """No GPU visible to this sidecar: every reading is absent, never zero."""

    mode = "none"

    def __init__(self, reason: str = "no GPU") -> None:
        self.reason = reason

    async def read(self) -> tuple[GpuReading, ...]:
        return ()

    async def close(self) -> None:
        return None
