"""GPU readings modelled by an engine emulator, read over HTTP (demo and tests only).

The embedded demo runs engine emulators instead of GPUs. Each emulator serves the
GPU state its performance model implies at ``/emulator/gpu``; the sidecar reads it
only when started with ``--gpu-source emulator --emulator-gpu-url URL``, so a
real deployment can never mistake modelled numbers for measured ones (the mode
is ``"emulator"`` in the report and the gauge).

The page (JSON, ``GET``, status 200)::

    {"gpus": [{"gpu": "0",                     # label, string (an int is accepted)
               "utilization_ratio": 0.86,      # 0..1 or null
               "sm_activity_ratio": 0.41,      # 0..1 or null
               "memory_used_bytes": 7.1e10,    # >= 0 or null
               "power_watts": 512.0}]}         # >= 0 or null

A missing field means ``None``. Anything else (not JSON, wrong types, a ratio out
of 0..1, a duplicate label) rejects the whole page: the reader returns ``()`` and
counts the failure in ``errors_total`` by reason (``connect``, ``timeout``,
``http_status``, ``bad_document``). It never raises and never reports stale data.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp

from heteroscale.report import GpuReading

RATIO_FIELDS = ("utilization_ratio", "sm_activity_ratio")
AMOUNT_FIELDS = ("memory_used_bytes", "power_watts")


class EmulatorPageError(ValueError):
    """An ``/emulator/gpu`` document that cannot be trusted."""


def _number(item: dict[str, Any], name: str, *, upper: float | None) -> float | None:
    value = item.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EmulatorPageError(f"{name} is not a finite number: {value!r}")
    if value < 0 or (upper is not None and value > upper):
        raise EmulatorPageError(f"{name} out of range: {value!r}")
    return float(value)


def parse_emulator_gpu_page(doc: Any) -> tuple[GpuReading, ...]:
    """Validate an ``/emulator/gpu`` document (see module docstring) into readings."""
    if not isinstance(doc, dict) or not isinstance(doc.get("gpus"), list):
        raise EmulatorPageError('expected an object with a "gpus" list')
    readings = []
    for item in doc["gpus"]:
        if not isinstance(item, dict):
            raise EmulatorPageError(f"gpu entry is not an object: {item!r}")
        label = item.get("gpu")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label) == "":
            raise EmulatorPageError(f"gpu label missing or not a string: {label!r}")
        readings.append(GpuReading(
            gpu=str(label),
            utilization_ratio=_number(item, "utilization_ratio", upper=1.0),
            sm_activity_ratio=_number(item, "sm_activity_ratio", upper=1.0),
            memory_used_bytes=_number(item, "memory_used_bytes", upper=None),
            power_watts=_number(item, "power_watts", upper=None),
        ))
    labels = [r.gpu for r in readings]
    if len(set(labels)) != len(labels):
        raise EmulatorPageError(f"duplicate gpu labels: {labels}")
    return tuple(readings)


class EmulatorGpuReader:
    """``GpuReader`` over an emulator's ``/emulator/gpu`` page."""

    mode = "emulator"

    def __init__(self, url: str, *, timeout_s: float = 2.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"emulator GPU URL must be http(s)://, got {url!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = url
        self.reason = f"modelled GPUs from the engine emulator at {url}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._owns_session = session is None
        self.errors_total: dict[str, int] = {}
        """Failed reads by reason; the agent exports it."""

    def _count(self, reason: str) -> None:
        self.errors_total[reason] = self.errors_total.get(reason, 0) + 1

    async def read(self) -> tuple[GpuReading, ...]:
        if self._session is None:
            self._session = aiohttp.ClientSession()     # created inside the running loop
        try:
            async with self._session.get(self.url, timeout=self._timeout) as resp:
                if resp.status != 200:
                    self._count("http_status")
                    return ()
                doc = await resp.json(content_type=None)
            return parse_emulator_gpu_page(doc)
        except asyncio.TimeoutError:
            self._count("timeout")
        except aiohttp.ClientError:
            self._count("connect")
        except (ValueError, UnicodeDecodeError):      # JSON errors and EmulatorPageError
            self._count("bad_document")
        return ()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None
