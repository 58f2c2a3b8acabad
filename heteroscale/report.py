"""The sidecar report: the JSON document behind ``/v1/report`` (pure).

This is the contract between a sidecar and the coordinator (ARCHITECTURE §3.2).
The sidecar builds a ``SidecarReport`` from its cached state; the coordinator
parses one with ``SidecarReport.from_dict``, which validates types and rejects
documents it cannot trust instead of guessing. Unknown keys are kept out, so a
newer sidecar can add fields without breaking an older coordinator.

Rates are per second over ``window_s`` ending at ``observed_at`` (unix seconds).
A value of ``None`` means "not measured" (engine does not expose it, or the
window has too little data) and is never the same as zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from collections.abc import Mapping
from typing import Any

ROLES = ("prefill", "decode")
SCHEMA_VERSION = 1


class ReportFormatError(ValueError):
    """A report document that cannot be trusted (missing or mistyped field)."""


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML (or the emulator GPU source) saw it. ``None`` = unsupported."""

    gpu: str                                   # index or UUID, as selected
    utilization_ratio: float | None = None     # kernel-active time share, 0..1
    sm_activity_ratio: float | None = None     # GPM SM activity, 0..1 (Hopper+)
    memory_used_bytes: float | None = None
    power_watts: float | None = None


@dataclass(frozen=True)
class SidecarReport:
    service: str
    role: str
    pod: str
    engine: str                                # "vllm" | "sglang" | "emulator"
    engine_up: bool                            # last scrape succeeded and parsed
    stale: bool                                # rates are older than the freshness bound
    observed_at: float                         # unix seconds of the newest engine sample
    window_s: float                            # span the rates were computed over
    started_at: float | None = None            # when this engine was first seen up (warm-up)
    decode_tps: float | None = None
    prefill_tps: float | None = None
    prefill_uncached_tps: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage_ratio: float | None = None
    ttft_p50_s: float | None = None
    ttft_p90_s: float | None = None
    ttft_p99_s: float | None = None
    tbt_p50_s: float | None = None
    tbt_p90_s: float | None = None
    tbt_p99_s: float | None = None
    gpu_mode: str = "none"                     # "nvml" | "emulator" | "none"
    gpus: tuple[GpuReading, ...] = ()
    kv_transfer: Mapping[str, Any] = field(default_factory=dict)
    node: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gpus"] = [asdict(g) for g in self.gpus]
        out["kv_transfer"] = dict(self.kv_transfer)
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "SidecarReport":
        if not isinstance(doc, Mapping):
            raise ReportFormatError("report is not a JSON object")
        kwargs: dict[str, Any] = {k: v for k, v in doc.items() if k in _KNOWN}
        for name in ("service", "role", "pod", "engine"):
            if not isinstance(kwargs.get(name), str) or not kwargs[name]:
                raise ReportFormatError(f"field '{name}' must be a non-empty string")
        if kwargs["role"] not in ROLES:
            raise ReportFormatError(f"field 'role' must be one of {ROLES}, got {kwargs['role']!r}")
        for name in ("engine_up", "stale"):
            if not isinstance(kwargs.get(name), bool):
                raise ReportFormatError(f"field '{name}' must be a boolean")
        for name in ("observed_at", "window_s"):
            kwargs[name] = _number(kwargs.get(name), name, required=True)
        for name in _OPTIONAL_NUMBERS:
            value = kwargs.get(name)
            # Fast path for the common case (a finite float); anything else is checked in full.
            if value is not None and not (type(value) is float and _isfinite(value)):
                value = _number(value, name, required=False)
            kwargs[name] = value
        for name in ("decode_tps", "prefill_tps", "prefill_uncached_tps"):
            if kwargs[name] is not None and kwargs[name] < 0:
                raise ReportFormatError(f"field '{name}' must not be negative")
        gpus = kwargs.get("gpus", [])
        if not isinstance(gpus, list):
            raise ReportFormatError("field 'gpus' must be a list")
        kwargs["gpus"] = tuple(_gpu(g) for g in gpus)
        if not isinstance(kwargs.get("kv_transfer", {}), Mapping):
            raise ReportFormatError("field 'kv_transfer' must be an object")
        if "node" in kwargs and kwargs["node"] is not None and not isinstance(kwargs["node"], str):
            raise ReportFormatError("field 'node' must be a string")
        if not isinstance(kwargs.get("gpu_mode", "none"), str):
            raise ReportFormatError("field 'gpu_mode' must be a string")
        if not isinstance(kwargs.get("schema_version", SCHEMA_VERSION), int):
            raise ReportFormatError("field 'schema_version' must be an integer")
        return cls(**kwargs)


_KNOWN = frozenset(f.name for f in fields(SidecarReport))
_OPTIONAL_NUMBERS = ("started_at", "decode_tps", "prefill_tps", "prefill_uncached_tps",
                     "requests_running", "requests_waiting", "kv_cache_usage_ratio",
                     "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tbt_p50_s", "tbt_p90_s", "tbt_p99_s")
_isfinite = math.isfinite


def _number(value: Any, name: str, *, required: bool) -> float | None:
    if value is None:
        if required:
            raise ReportFormatError(f"field '{name}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportFormatError(f"field '{name}' must be a number")
    if not math.isfinite(value):
        raise ReportFormatError(f"field '{name}' must be finite")
    return float(value)


def _gpu(doc: Any) -> GpuReading:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("gpu"), str):
        raise ReportFormatError("each entry of 'gpus' must be an object with a string 'gpu'")
    return GpuReading(
        gpu=doc["gpu"],
        utilization_ratio=_number(doc.get("utilization_ratio"), "gpus.utilization_ratio", required=False),
        sm_activity_ratio=_number(doc.get("sm_activity_ratio"), "gpus.sm_activity_ratio", required=False),
        memory_used_bytes=_number(doc.get("memory_used_bytes"), "gpus.memory_used_bytes", required=False),
        power_watts=_number(doc.get("power_watts"), "gpus.power_watts", required=False),
    )
