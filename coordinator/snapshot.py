"""What the reconciler publishes each tick, and the status document rendered from it.

``Snapshot`` and ``ServiceSnapshot`` are frozen: the reconciler builds a new one at the
end of every tick and swaps it in, and every reader (the status API, ``/metrics``, the
demo's page) reads that one object, so they agree with each other and never see a
half-updated tick. ``render_status`` turns one into the ``/api/v1/status`` document
(ARCHITECTURE §3.3). No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from heteroscale.coordinator.core.bandwidth import ServiceBandwidth
from heteroscale.coordinator.core.drift import DriftState, ratio_in_use
from heteroscale.coordinator.core.ratio import ratio_text
from heteroscale.coordinator.core.target import TargetState
from heteroscale.coordinator.core.settings import ServiceConfig
from heteroscale.coordinator.core.types import ApplyResult, Decision, Observation, PoolCounts, PoolStatus


@dataclass(frozen=True)
class ServiceSnapshot:
    """One service as of the end of the latest tick (immutable; shared with readers)."""

    config: ServiceConfig
    status: PoolStatus | None
    observation: Observation | None
    last: Decision | None
    decisions: tuple[Decision, ...]
    history: tuple[Mapping[str, Any], ...]
    last_apply: ApplyResult | None
    shortfall: PoolCounts | None
    bandwidth: ServiceBandwidth | None
    last_error: str | None
    tick_s: float | None
    kv_transfer: Mapping[str, Any] | None = None
    target: TargetState = TargetState()
    drift: DriftState = DriftState()

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class Snapshot:
    """The whole coordinator as of the end of the latest tick."""

    at: float
    identity: str
    leader: bool
    backend: str
    dry_run: bool
    writes: bool
    interval_s: float
    ticks: int
    last_tick_duration_s: float | None
    services: tuple[ServiceSnapshot, ...]
    decisions_total: Mapping[tuple[str, str, str], int]      # (service, direction, reason)
    errors_total: Mapping[tuple[str, str], int]              # (service, op)
    collection_errors_total: Mapping[tuple[str, str], int]   # (service, reason)


# ---------------------------------------------------------------- the status document

def render_status(snapshot: Snapshot, *, history: bool = True) -> dict[str, Any]:
    """The ``/api/v1/status`` document (ARCHITECTURE §3.3)."""
    return {
        "leader": snapshot.leader,
        "identity": snapshot.identity,
        "backend": snapshot.backend,
        "dry_run": snapshot.dry_run,
        "writes": snapshot.writes,
        "interval_s": snapshot.interval_s,
        "ticks": snapshot.ticks,
        "last_tick_duration_s": snapshot.last_tick_duration_s,
        "now": snapshot.at,
        "services": [_service_status(s, history=history) for s in snapshot.services],
    }


def _service_status(s: ServiceSnapshot, *, history: bool) -> dict[str, Any]:
    svc = s.config
    current = s.last.current if s.last else (s.status.current if s.status else None)
    desired = s.last.desired if s.last else None
    obs = s.observation
    doc: dict[str, Any] = {
        "name": svc.name,
        "namespace": svc.namespace,
        "prefill": _pool(current, desired, s.status, "prefill"),
        "decode": _pool(current, desired, s.status, "decode"),
        "decode_tps": obs.decode_tps if obs else None,
        "smoothed_decode_tps": s.last.inputs.get("smoothed_decode_tps") if s.last else None,
        "target_decode_tps_per_instance": svc.target_decode_tps_per_instance,
        "effective_target": {"decode_tps_per_instance": svc.target_decode_tps_per_instance * s.target.scale,
                             "scale": s.target.scale, "why": s.target.why or None, "since": s.target.changed_s},
        "capacity_tps": (current.decode * svc.target_decode_tps_per_instance) if current else None,
        "pd_ratio": svc.pd_ratio_text,
        "pd_ratio_drift": {"mode": svc.pd_ratio_mode,
                           "in_use": ratio_text(ratio_in_use(s.drift, svc.pd_ratio)),
                           "needed": ratio_text(s.drift.needed) if s.drift.needed is not None else None,
                           "advice": ratio_text(s.drift.advice) if s.drift.advice is not None else None,
                           "prefill_per_decode_token": s.drift.k_mean, "reference": s.drift.k_ref},
        "bounds": {"min_decode": svc.min_decode, "max_decode": svc.max_decode},
        "slo": {"ttft_s": svc.slo.ttft_s, "tbt_s": svc.slo.tbt_s},
        "latency": {"tbt_p90_s": obs.tbt_p90_s if obs else None,
                    "ttft_p90_s": obs.ttft_p90_s if obs else None,
                    "tbt_p90_max_s": obs.tbt_p90_max_s if obs else None,
                    "ttft_p90_max_s": obs.ttft_p90_max_s if obs else None},
        "reports": {"fresh_decode": obs.fresh_decode if obs else 0,
                    "expected_decode": obs.expected_decode if obs else 0,
                    "fresh_prefill": obs.fresh_prefill if obs else 0,
                    "expected_prefill": obs.expected_prefill if obs else 0,
                    "warming_decode": obs.warming_decode if obs else 0,
                    "excluded": dict(obs.excluded) if obs else {}},
        "last_decision": _decision(s.last) if s.last else None,
        "decisions": [_decision(d) for d in s.decisions],
        "last_apply": ({"applied": s.last_apply.applied.as_dict(), "note": s.last_apply.note,
                        "shortfall": s.last_apply.shortfall.as_dict()} if s.last_apply else None),
        "last_error": s.last_error,
        "manual_override": bool(s.status.manual_override) if s.status else False,
        "groups": [dict(g) for g in s.status.groups] if s.status else [],
        "placement_shortfall": s.shortfall.as_dict() if s.shortfall is not None else None,
        "kv_bandwidth": s.bandwidth.to_dict() if s.bandwidth is not None else None,
        "kv_transfer": dict(s.kv_transfer) if s.kv_transfer is not None else None,
        "kv_transfer_bottleneck": s.last.inputs.get("kv_transfer_bottleneck") if s.last else None,
    }
    if history:
        doc["history"] = [dict(h) for h in s.history]
    return doc


def _pool(current: PoolCounts | None, desired: PoolCounts | None, status: PoolStatus | None,
          role: str) -> dict[str, Any]:
    return {
        "current": getattr(current, role) if current else None,
        "desired": getattr(desired, role) if desired else None,
        "ready": getattr(status.ready, role) if status else None,
        "pending": getattr(status.pending, role) if status else None,
    }


def _decision(d: Decision) -> dict[str, Any]:
    out = d.as_dict()
    out["inputs"] = {k: v for k, v in out["inputs"].items() if v is None or isinstance(v, (int, float, str, list))}
    return out
