"""The sidecar report: the JSON document behind ``/v1/report`` (pure).

This is the contract between a sidecar and the coordinator (ARCHITECTURE §3.2).
The sidecar builds a ``SidecarReport`` from its cached state; the coordinator
decodes a body with ``parse_report_json`` (or a decoded object with
``SidecarReport.from_dict``), which validates types and bounds and rejects
documents it cannot trust instead of guessing. Unknown keys are kept out, so a
newer sidecar can add fields without breaking an older coordinator.

The engine signals of one window (rates, queue gauges, latency quantiles) are
defined once, in ``EngineSignals``: the sidecar's window statistics
(``heteroscale.engine_adapters.rates.WindowStats``) and the report both are
``EngineSignals``, and ``SidecarReport.from_signals`` copies every one of those
fields without a hand-written list.

Rates are per second over ``window_s`` ending at ``observed_at`` (unix seconds).
A value of ``None`` means "not measured" (engine does not expose it, or the
window has too little data) and is never the same as zero.

Bounds (docs/sidecar.md, "Report bounds"): every number is finite and inside a
generous physical range (``BOUNDS``): tokens/s per instance at most
``MAX_TOKENS_PER_S``, request counts at most ``MAX_REQUESTS``, ratios in [0, 1],
latencies in [0, ``MAX_LATENCY_S``], timestamps within ``MAX_UNIX_S`` of 1970. A
document outside them is a ``ReportFormatError``; the sidecar drops such a
value to ``None`` before it reports (``clean_signals``), so it never serves a
report its coordinator would reject.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

ROLES = ("prefill", "decode")
SCHEMA_VERSION = 1
UNKNOWN_ENGINE = "unknown"      # a report that does not name its engine (ARCHITECTURE §3.2 does not require it)

# -- bounds --------------------------------------------------------------------------
MAX_TOKENS_PER_S = 1e8          # one instance; ~100x the fastest prefill engine of 2026
MAX_REQUESTS = 1e7              # requests in one engine's queues
MAX_EVENTS_PER_S = 1e7          # preemptions per second
MAX_LATENCY_S = 86_400.0        # one day: a quantile from the highest finite bucket stays far below
MAX_UNIX_S = 4_102_444_800.0    # 2100-01-01; |t| above it is not a timestamp (0 = "never observed";
#                                 tests with a fake wall clock put started_at below 0)
MAX_WINDOW_S = 86_400.0
MAX_GPU_MEMORY_BYTES = float(2 ** 50)   # 1 PiB
MAX_GPU_POWER_W = 1e5
MAX_NAME_CHARS = 253            # a Kubernetes object name (DNS subdomain)
MAX_SHORT_CHARS = 64            # engine, gpu_mode, a KV stage name
MAX_GPU_ID_CHARS = 128          # an index or a GPU UUID
MAX_GPUS = 64
MAX_KV_STAGES = 32
MAX_REPORT_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 32

BOUNDS: dict[str, tuple[float, float]] = {
    "decode_tps": (0.0, MAX_TOKENS_PER_S),
    "prefill_tps": (0.0, MAX_TOKENS_PER_S),
    "prefill_uncached_tps": (0.0, MAX_TOKENS_PER_S),
    "requests_running": (0.0, MAX_REQUESTS),
    "requests_waiting": (0.0, MAX_REQUESTS),
    "requests_deferred": (0.0, MAX_REQUESTS),
    "kv_cache_usage_ratio": (0.0, 1.0),
    "preemptions_per_s": (0.0, MAX_EVENTS_PER_S),
    "ttft_p50_s": (0.0, MAX_LATENCY_S), "ttft_p90_s": (0.0, MAX_LATENCY_S), "ttft_p99_s": (0.0, MAX_LATENCY_S),
    "tbt_p50_s": (0.0, MAX_LATENCY_S), "tbt_p90_s": (0.0, MAX_LATENCY_S), "tbt_p99_s": (0.0, MAX_LATENCY_S),
    "observed_at": (-MAX_UNIX_S, MAX_UNIX_S),
    "started_at": (-MAX_UNIX_S, MAX_UNIX_S),
    "window_s": (0.0, MAX_WINDOW_S),
    "gpus.utilization_ratio": (0.0, 1.0),
    "gpus.sm_activity_ratio": (0.0, 1.0),
    "gpus.memory_used_bytes": (0.0, MAX_GPU_MEMORY_BYTES),
    "gpus.power_watts": (0.0, MAX_GPU_POWER_W),
    "requests_by_kv_stage.*": (0.0, MAX_REQUESTS),
}


class ReportFormatError(ValueError):
    """A report document that cannot be trusted (missing, mistyped or out-of-bounds field)."""


class ReportJsonError(ReportFormatError):
    """A report body that is not a JSON document this contract reads: not JSON, a bare
    ``Infinity``/``NaN``, nested deeper than ``MAX_JSON_DEPTH``, or over ``MAX_REPORT_BYTES``."""


# -- the signals, defined once ---------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class EngineSignals:
    """What one engine did over one window. ``None`` = not measured (never zero)."""

    decode_tps: float | None = None             # generated tokens/s
    prefill_tps: float | None = None            # prompt tokens/s (all)
    prefill_uncached_tps: float | None = None   # prompt tokens/s computed here (missed every cache)
    requests_running: float | None = None       # in the engine's running batch
    requests_waiting: float | None = None       # queued for capacity (vLLM reason="capacity" when exposed)
    requests_deferred: float | None = None      # waiting, deferred for a transient constraint (vLLM; on a
    #                                             P/D decode pod mostly requests whose KV has not arrived)
    requests_by_kv_stage: Mapping[str, float] = field(default_factory=dict)
    #                                             requests per KV-transfer stage: vLLM num_requests_kv_fetch_by_stage
    #                                             (waiting_to_start, in_progress, completed_waiting), SGLang P/D queues
    #                                             (prefill_bootstrap, prefill_inflight, decode_prealloc,
    #                                             decode_transfer, decode_host_receive); empty when not exposed
    kv_cache_usage_ratio: float | None = None   # 0..1
    preemptions_per_s: float | None = None      # vLLM preemptions / SGLang retractions per second
    ttft_p50_s: float | None = None
    ttft_p90_s: float | None = None
    ttft_p99_s: float | None = None
    tbt_p50_s: float | None = None
    tbt_p90_s: float | None = None
    tbt_p99_s: float | None = None


SIGNAL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EngineSignals))
# Quantile -> field, per latency histogram.
QUANTILE_FIELDS: dict[str, dict[float, str]] = {
    "ttft": {0.5: "ttft_p50_s", 0.9: "ttft_p90_s", 0.99: "ttft_p99_s"},
    "tbt": {0.5: "tbt_p50_s", 0.9: "tbt_p90_s", 0.99: "tbt_p99_s"},
}


def in_bounds(name: str, value: Any) -> bool:
    """Whether ``value`` is a finite number inside ``BOUNDS[name]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        value = float(value)
    except OverflowError:
        return False
    lo, hi = BOUNDS[name]
    return math.isfinite(value) and lo <= value <= hi


def clean_signals(signals: EngineSignals) -> tuple[EngineSignals, tuple[str, ...]]:
    """``signals`` with every non-finite or out-of-bounds number replaced by ``None``
    (a KV stage by its absence), and the names of the fields that were dropped."""
    changes: dict[str, Any] = {}
    for name in SIGNAL_FIELDS:
        if name == "requests_by_kv_stage":
            stages = getattr(signals, name)
            kept = {k: float(v) for k, v in list(stages.items())[:MAX_KV_STAGES]
                    if isinstance(k, str) and 0 < len(k) <= MAX_SHORT_CHARS and in_bounds("requests_by_kv_stage.*", v)}
            if len(kept) != len(stages):
                changes[name] = kept
            continue
        value = getattr(signals, name)
        if value is not None and not in_bounds(name, value):
            changes[name] = None
    if not changes:
        return signals, ()
    return replace(signals, **changes), tuple(changes)


def finite_json(value: Any, *, depth: int = 0) -> Any:
    """A copy of a JSON-like value with every non-finite float replaced by ``None``
    (``Infinity``/``NaN`` are not JSON); containers nested too deeply become ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_JSON_DEPTH:
        return None if isinstance(value, (Mapping, list, tuple)) else value
    if isinstance(value, Mapping):
        return {k: finite_json(v, depth=depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, depth=depth + 1) for v in value]
    return value


# -- the report --------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML (or the emulator GPU source) saw it. ``None`` = unsupported."""

    gpu: str                                   # index or UUID, as selected
    utilization_ratio: float | None = None     # kernel-active time share, 0..1
    sm_activity_ratio: float | None = None     # GPM SM activity, 0..1 (Hopper+)
    memory_used_bytes: float | None = None
    power_watts: float | None = None


@dataclass(frozen=True, kw_only=True)
class SidecarReport(EngineSignals):
    service: str
    role: str
    pod: str
    engine: str = UNKNOWN_ENGINE               # "vllm" | "sglang" | "emulator" | ...
    engine_up: bool                            # last scrape succeeded and parsed
    stale: bool                                # do not act on these numbers (last scrape failed, or too old)
    observed_at: float                         # unix seconds of the newest engine sample
    window_s: float                            # span the rates were computed over
    started_at: float | None = None            # when this engine was first seen up (warm-up)
    gpu_mode: str = "none"                     # "nvml" | "emulator" | "none"
    gpus: tuple[GpuReading, ...] = ()
    kv_transfer: Mapping[str, Any] = field(default_factory=dict)
    node: str | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_signals(cls, signals: EngineSignals, **rest: Any) -> "SidecarReport":
        """A report carrying every ``EngineSignals`` field of ``signals`` plus ``rest``."""
        return cls(**{name: getattr(signals, name) for name in SIGNAL_FIELDS}, **rest)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gpus"] = [asdict(g) for g in self.gpus]
        out["kv_transfer"] = dict(self.kv_transfer)
        out["requests_by_kv_stage"] = dict(self.requests_by_kv_stage)
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "SidecarReport":
        """Validate a decoded report; ``ReportFormatError`` names the first problem."""
        if not isinstance(doc, Mapping):
            raise ReportFormatError("report is not a JSON object")
        kwargs: dict[str, Any] = {k: v for k, v in doc.items() if k in _KNOWN}
        for name in ("service", "role", "pod"):
            kwargs[name] = _string(kwargs.get(name), name, max_chars=MAX_NAME_CHARS)
        engine = kwargs.get("engine")
        kwargs["engine"] = UNKNOWN_ENGINE if engine is None else _string(engine, "engine", max_chars=MAX_SHORT_CHARS)
        if kwargs["role"] not in ROLES:
            raise ReportFormatError(f"field 'role' must be one of {ROLES}, got {kwargs['role']!r}")
        for name in ("engine_up", "stale"):
            if not isinstance(kwargs.get(name), bool):
                raise ReportFormatError(f"field '{name}' must be a boolean")
        for name in ("observed_at", "window_s"):
            kwargs[name] = _number(kwargs.get(name), name, required=True)
        for name in _OPTIONAL_NUMBERS:
            value = kwargs.get(name)
            # Fast path for the common case (a finite float inside its bounds); anything else in full.
            if value is not None:
                lo, hi = BOUNDS[name]
                if not (type(value) is float and lo <= value <= hi):
                    value = _number(value, name, required=False)
            kwargs[name] = value
        kwargs["requests_by_kv_stage"] = _stages(kwargs.get("requests_by_kv_stage", {}))
        gpus = kwargs.get("gpus", [])
        if not isinstance(gpus, list):
            raise ReportFormatError("field 'gpus' must be a list")
        if len(gpus) > MAX_GPUS:
            raise ReportFormatError(f"field 'gpus' lists {len(gpus)} GPUs (at most {MAX_GPUS})")
        kwargs["gpus"] = tuple(_gpu(g) for g in gpus)
        kv = kwargs.get("kv_transfer", {})
        if not isinstance(kv, Mapping):
            raise ReportFormatError("field 'kv_transfer' must be an object")
        _check_nested(kv, "kv_transfer")
        node = kwargs.get("node")
        if node is not None:
            kwargs["node"] = _string(node, "node", max_chars=MAX_NAME_CHARS)
        kwargs["gpu_mode"] = _string(kwargs.get("gpu_mode", "none"), "gpu_mode", max_chars=MAX_SHORT_CHARS)
        version = kwargs.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 1_000_000:
            raise ReportFormatError("field 'schema_version' must be a positive integer")
        return cls(**kwargs)


_KNOWN = frozenset(f.name for f in fields(SidecarReport))
_OPTIONAL_NUMBERS = tuple(n for n in SIGNAL_FIELDS if n != "requests_by_kv_stage") + ("started_at",)


def _string(value: Any, name: str, *, max_chars: int) -> str:
    if not isinstance(value, str) or not value:
        raise ReportFormatError(f"field '{name}' must be a non-empty string")
    if len(value) > max_chars:
        raise ReportFormatError(f"field '{name}' is longer than {max_chars} characters")
    return value


def _number(value: Any, name: str, *, required: bool) -> float | None:
    if value is None:
        if required:
            raise ReportFormatError(f"field '{name}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportFormatError(f"field '{name}' must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise ReportFormatError(f"field '{name}' is out of range") from None
    if not math.isfinite(number):
        raise ReportFormatError(f"field '{name}' must be finite")
    lo, hi = BOUNDS[name]
    if not lo <= number <= hi:
        raise ReportFormatError(f"field '{name}' = {number:g} is outside [{lo:g}, {hi:g}]")
    return number


def _stages(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ReportFormatError("field 'requests_by_kv_stage' must be an object")
    if len(value) > MAX_KV_STAGES:
        raise ReportFormatError(f"field 'requests_by_kv_stage' has more than {MAX_KV_STAGES} stages")
    out = {}
    for stage, count in value.items():
        _string(stage, "requests_by_kv_stage key", max_chars=MAX_SHORT_CHARS)
        out[stage] = _number(count, "requests_by_kv_stage.*", required=True)
    return out


def _gpu(doc: Any) -> GpuReading:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("gpu"), str):
        raise ReportFormatError("each entry of 'gpus' must be an object with a string 'gpu'")
    return GpuReading(
        gpu=_string(doc["gpu"], "gpus.gpu", max_chars=MAX_GPU_ID_CHARS),
        utilization_ratio=_number(doc.get("utilization_ratio"), "gpus.utilization_ratio", required=False),
        sm_activity_ratio=_number(doc.get("sm_activity_ratio"), "gpus.sm_activity_ratio", required=False),
        memory_used_bytes=_number(doc.get("memory_used_bytes"), "gpus.memory_used_bytes", required=False),
        power_watts=_number(doc.get("power_watts"), "gpus.power_watts", required=False),
    )


def _check_nested(value: Any, name: str) -> None:
    """Free-form objects (``kv_transfer``): bounded depth, and no non-finite or oversized number."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ReportFormatError(f"field '{name}' holds a non-finite number")
        elif isinstance(item, int) and not isinstance(item, bool):
            if abs(item) > 2 ** 63:
                raise ReportFormatError(f"field '{name}' holds an integer out of range")
        elif isinstance(item, (Mapping, list, tuple)):
            if depth > MAX_JSON_DEPTH:
                raise ReportFormatError(f"field '{name}' is nested deeper than {MAX_JSON_DEPTH}")
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1) for child in children)


# -- decoding a body -------------------------------------------------------------------------

def _no_constant(token: str) -> Any:
    raise ReportJsonError(f"'{token}' is not JSON")


def _depth_ok(doc: Any) -> bool:
    stack = [(doc, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def parse_report_json(body: bytes | str) -> SidecarReport:
    """Decode and validate one ``/v1/report`` body.

    Raises ``ReportJsonError`` for a body that is not JSON this contract reads (too
    large, not JSON, ``Infinity``/``NaN`` tokens, an integer with more digits than
    Python converts, nesting deeper than ``MAX_JSON_DEPTH`` - which also keeps
    ``json.loads``' ``RecursionError`` out of the caller) and ``ReportFormatError``
    for a JSON document that is not a valid report. Nothing else escapes.
    """
    if len(body) > MAX_REPORT_BYTES:
        raise ReportJsonError(f"report of {len(body)} bytes exceeds {MAX_REPORT_BYTES}")
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except ReportJsonError:
        raise
    except RecursionError:
        raise ReportJsonError(f"report is nested deeper than {MAX_JSON_DEPTH}") from None
    except (ValueError, TypeError) as exc:     # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise ReportJsonError(f"report is not JSON: {exc}"[:200]) from None
    if not _depth_ok(doc):
        raise ReportJsonError(f"report is nested deeper than {MAX_JSON_DEPTH}")
    return SidecarReport.from_dict(doc)
