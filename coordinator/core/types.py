"""Values shared by the coordinator's parts and the simulator (pure).

``PoolCounts`` is a pair of instance counts; ``PoolStatus`` is what an actuator
observed of a service's two pools; ``Fetched`` is what one instance answered this
tick (a parsed report, or why there is none); ``Observation`` is one service's
aggregated signals; ``Decision`` is what the policy decided and why; ``ApplyResult``
is what an actuator did. The seams that produce and consume them are in
``coordinator.seams``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from heteroscale.report import SidecarReport

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class Fetched:
    """One instance's answer this tick, as a collector produced it (``/v1/report`` pulls,
    PromQL, or the simulator's sidecars). ``error`` is a short reason when ``report`` is
    None: ``timeout``, ``connect``, ``http_status``, ``invalid_json``, ``invalid_report``..."""

    url: str
    role: str | None
    report: "SidecarReport | None" = None
    error: str | None = None


@dataclass(frozen=True)
class PoolCounts:
    prefill: int
    decode: int

    def total(self) -> int:
        return self.prefill + self.decode

    def as_dict(self) -> dict[str, int]:
        return {"prefill": self.prefill, "decode": self.decode}


@dataclass(frozen=True)
class PoolStatus:
    """One service's pools as the actuator sees them now.

    ``current``: replicas asked for (spec); ``ready``: instances ready for traffic;
    ``pending``: asked for but not ready yet (pods Pending or starting);
    ``pending_since_s``: monotonic-free unix time the oldest pending instance was
    first seen, ``None`` if nothing is pending. ``manual_override`` is set when
    someone other than HeteroScale changed the replicas since our last write.
    ``groups`` describes Deployment Groups where placement is in use.
    """

    current: PoolCounts
    ready: PoolCounts
    pending: PoolCounts = PoolCounts(0, 0)
    pending_since_s: float | None = None
    manual_override: bool = False
    groups: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Decision:
    """A policy outcome. ``reason`` is machine-readable (``scale_out_tps``, ``hold_missing_data``, ...)."""

    service: str
    at: float                      # unix seconds
    reason: str
    current: PoolCounts
    desired: PoolCounts
    detail: str = ""
    inputs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        if self.desired.total() > self.current.total():
            return "out"
        if self.desired.total() < self.current.total():
            return "in"
        return "hold"

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "reason": self.reason, "direction": self.direction,
                "from": self.current.as_dict(), "to": self.desired.as_dict(),
                "detail": self.detail, "inputs": dict(self.inputs)}


@dataclass(frozen=True)
class Observation:
    """One service's measured state for one tick: built by ``aggregate``, read by ``policy``
    (and built directly by the simulator).

    ``decode_tps`` is the SUM of decode tokens/s over fresh decode reports (the load
    measured), ``None`` when nothing fresh was seen; ``reporting_decode`` is how many
    reports that sum covers (warming instances included). ``fresh_*``/``expected_*`` count
    reports used against instances that should have reported (instances still warming
    up are not expected); ``missing_decode`` is how many expected decode instances sent
    nothing usable: the view is complete only when it is 0. Latencies are p90 seconds over fresh, warmed-up instances: ``*_p90_s`` is
    the throughput-weighted fleet value the policy acts on, ``*_p90_max_s`` the worst
    single instance (shown, not acted on).
    ``excluded`` counts dropped reports by reason (``stale``, ``engine_down``, ``too_old``,
    ``invalid``, ``unreachable``, ``warming_latency``...).
    """

    pools: PoolStatus
    decode_tps: float | None
    fresh_decode: int = 0
    expected_decode: int = 0
    reporting_decode: int = 0
    missing_decode: int = 0
    fresh_prefill: int = 0
    expected_prefill: int = 0
    warming_decode: int = 0
    tbt_p90_s: float | None = None
    ttft_p90_s: float | None = None
    tbt_p90_max_s: float | None = None
    ttft_p90_max_s: float | None = None
    prefill_tps: float | None = None
    prefill_uncached_tps: float | None = None
    decode_running: float | None = None          # requests in the decode batches, summed
    decode_waiting: float | None = None          # requests queued for decode capacity, summed
    decode_kv_waiting: float | None = None       # decode requests waiting for their KV to arrive, summed
    decode_kv_usage_max: float | None = None     # the fullest decode instance's KV cache, 0..1
    decode_preemptions_per_s: float | None = None
    prefill_waiting: float | None = None         # requests queued on prefill, summed
    prefill_gpu_utilization: float | None = None  # mean GPU utilisation of the prefill instances
    excluded: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ApplyResult:
    """What an actuator did: ``applied`` the desired counts (possibly fewer if placement
    fell short), with a note for the status page. ``shortfall`` counts what could not
    be placed."""

    applied: PoolCounts
    note: str = ""
    shortfall: PoolCounts = PoolCounts(0, 0)
