"""GPU readings for the sidecar. ``nvml`` is the only module that imports pynvml.

``open_reader(source, gpus, emulator_url)`` (``heteroscale.sidecar.gpu.factory``) is the entry
point the agent uses. It is imported lazily so that importing the package (for
example for ``heteroscale.sidecar.gpu.base``) does not pull in aiohttp.
"""

from __future__ import annotations

from typing import Any

__all__ = ["open_reader"]


def __getattr__(name: str) -> Any:
    if name == "open_reader":
        from heteroscale.sidecar.gpu.factory import open_reader
        return open_reader
    raise AttributeError(f"module 'heteroscale.sidecar.gpu' has no attribute {name!r}")
