"""The scaling policies the simulator compares, as ``Controller`` objects.

``heteroscale`` is a replay adapter, not a copy: every tick it calls
``heteroscale.coordinator.core.policy.decide`` — the very function the live reconciler
calls — with the coordinator's ``ServiceConfig`` and an ``Observation`` built from
the simulated sidecars, and carries the returned ``PolicyState`` to the next tick.
(The module attribute is looked up at call time, so a test can spy on it.)

The baselines reuse the coordinator policy's arithmetic (``damp``, ``clamp``,
``stabilized_recommendation``, ``prefill_for_decode``) with Kubernetes HPA rules
(10% tolerance, 300 s scale-down stabilisation) so that only the *signal* differs:

* ``hpa-gpu-util``: each pool on its own GPU utilisation against ``target_utilization``.
* ``independent-tps``: decode on decode tokens/s against τ, prefill on its uncached
  prompt tokens/s against ``τ_prefill`` — each pool alone, the ratio is not kept.
* ``latency-only``: prefill on p90 TTFT, decode on p90 TBT, against ``latency_target``
  × SLO (proportional on a cliff-shaped signal: the paper's Fig. 6 g/h).
* ``static-peak``: fixed counts sized for the workload's peak decode load (oracle).
* ``periodic``: the coordinator's own fixed-count schedules (``decide`` again), one
  entry per hour, sized from that hour's peak load in the workload (oracle of a
  previous day with the same shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from heteroscale.coordinator.core import policy as coord_policy
from heteroscale.coordinator.core.settings import ScheduleEntry, ServiceConfig
from heteroscale.coordinator.core.types import Observation, PoolCounts
from heteroscale.simulator.model.runner import Controller, Window
from heteroscale.simulator.traces import Workload

POLICY_NAMES = ("heteroscale", "hpa-gpu-util", "independent-tps", "latency-only",
                "static-peak", "periodic")


@dataclass(frozen=True)
class BaselineSettings:
    """Knobs of the baselines (documented in docs/simulator.md).

    target_utilization: HPA target GPU utilisation per pool (0..1).
    hpa_tolerance: HPA's no-action band around the target (Kubernetes default 0.1).
    scale_in_stabilization_s: HPA's scale-down stabilisation window.
    latency_target: latency-only aims p90 at this share of the SLO.
    peak_headroom: static-peak/periodic size for peak load × this.
    prefill_tps_target: τ_prefill for independent-tps (uncached prompt tok/s per prefill
        instance); ``None`` derives it from τ × the workload's prompt/output token ratio × D/P.
    """

    target_utilization: float = 0.7
    hpa_tolerance: float = 0.1
    scale_in_stabilization_s: float = 300.0
    latency_target: float = 0.8
    peak_headroom: float = 1.1
    prefill_tps_target: float | None = None


@dataclass
class HeteroScale:
    """Replay adapter around the coordinator's pure ``decide``."""

    service: ServiceConfig
    name: str = "heteroscale"
    state: Any = field(default_factory=coord_policy.PolicyState)
    reasons: dict[str, int] = field(default_factory=dict)

    def step(self, *, now_s: float, window: Window, observation: Observation) -> PoolCounts:
        decision, state = coord_policy.decide(service=self.service, observation=observation,
                                              state=self.state, now_s=now_s)
        # The simulated backend applies every decision (placement shortfalls aside).
        self.state = coord_policy.settle(state, decision=decision, applied=True)
        self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
        return decision.desired


@dataclass
class _HpaPool:
    """Kubernetes HPA for one pool: ceil(current × metric/target) with tolerance and
    scale-down stabilisation, via the coordinator policy's building blocks."""

    low: int
    high: int
    tolerance: float
    window_s: float
    max_out: float
    max_in: float
    recs: tuple[tuple[float, int], ...] = ()

    def desired(self, current: int, ratio: float | None, now_s: float) -> int:
        if ratio is None or current <= 0:
            return max(current, self.low)
        want = coord_policy.clamp(math.ceil(current * ratio - 1e-9), self.low, self.high)
        self.recs = tuple(r for r in self.recs if now_s - r[0] <= self.window_s) + ((now_s, want),)
        if abs(ratio - 1.0) <= self.tolerance:
            return current
        if want > current:
            return coord_policy.damp(current, want, max_out_factor=self.max_out, max_in_factor=self.max_in)
        stable = coord_policy.stabilized_recommendation(self.recs, now_s=now_s, window_s=self.window_s)
        stable = current if stable is None else min(current, stable)
        return coord_policy.damp(current, stable, max_out_factor=self.max_out, max_in_factor=self.max_in)


@dataclass
class TwoPoolHpa:
    """Each pool scaled alone on its own signal (``signal`` returns (prefill, decode) ratios)."""

    name: str
    prefill: _HpaPool
    decode: _HpaPool
    signal: Callable[[Window, PoolCounts], tuple[float | None, float | None]]

    def step(self, *, now_s: float, window: Window, observation: Observation) -> PoolCounts:
        pools = observation.pools
        if pools.pending.total() > 0:          # HPA does not stack scale-outs on unready pods either
            return pools.current
        r_p, r_d = self.signal(window, pools.ready)
        return PoolCounts(prefill=self.prefill.desired(pools.current.prefill, r_p, now_s),
                          decode=self.decode.desired(pools.current.decode, r_d, now_s))


@dataclass
class Static:
    name: str
    counts: PoolCounts

    def step(self, *, now_s: float, window: Window, observation: Observation) -> PoolCounts:
        return self.counts


def peak_decode_tps(workload: Workload, *, bin_s: float = 300.0) -> np.ndarray:
    """Decode tokens/s demanded per ``bin_s`` bin (arrivals × output tokens)."""
    if not len(workload):
        return np.zeros(1)
    nb = int(workload.duration_s // bin_s) + 1
    idx = (workload.arrival_s // bin_s).astype(np.int64)
    return np.bincount(idx, weights=workload.output_tokens.astype(np.float64), minlength=nb) / bin_s


def counts_for_tps(service: ServiceConfig, tps: float, headroom: float) -> PoolCounts:
    decode = coord_policy.clamp(coord_policy.proportional_decode(tps * headroom,
                                                                  service.target_decode_tps_per_instance),
                                service.min_decode, service.max_decode)
    return coord_policy.pools_for_decode(service, decode)


def build(name: str, *, service: ServiceConfig, workload: Workload,
          baselines: BaselineSettings = BaselineSettings()) -> Controller:
    """The controller called ``name`` (one of ``POLICY_NAMES``)."""
    if name == "heteroscale":
        return HeteroScale(service)
    pol = service.policy
    max_p = service.max_prefill or coord_policy.prefill_for_decode(service, service.max_decode) * 2

    def pool(low: int, high: int) -> _HpaPool:
        return _HpaPool(low=low, high=high, tolerance=baselines.hpa_tolerance,
                        window_s=baselines.scale_in_stabilization_s,
                        max_out=pol.max_scale_out_factor, max_in=pol.max_scale_in_factor)

    min_p = service.min_prefill or 1
    tau = service.target_decode_tps_per_instance
    if name == "hpa-gpu-util":
        target = baselines.target_utilization
        return TwoPoolHpa(name, pool(min_p, max_p), pool(service.min_decode, service.max_decode),
                          lambda w, ready: (w.prefill_gpu_util / target, w.decode_gpu_util / target))
    if name == "independent-tps":
        tau_p = baselines.prefill_tps_target or _prefill_target(service, workload)

        def tps_signal(w: Window, ready: PoolCounts) -> tuple[float | None, float | None]:
            r_p = w.prefill_uncached_tps / (max(1, ready.prefill) * tau_p)
            r_d = w.decode_tps / (max(1, ready.decode) * tau)
            return r_p, r_d
        return TwoPoolHpa(name, pool(min_p, max_p), pool(service.min_decode, service.max_decode), tps_signal)
    if name == "latency-only":
        slo = service.slo

        def lat_signal(w: Window, ready: PoolCounts) -> tuple[float | None, float | None]:
            r_p = (w.ttft_p90_s / (slo.ttft_s * baselines.latency_target)
                   if w.ttft_p90_s is not None and slo.ttft_s else None)
            r_d = (w.tbt_p90_s / (slo.tbt_s * baselines.latency_target)
                   if w.tbt_p90_s is not None and slo.tbt_s else None)
            return r_p, r_d
        return TwoPoolHpa(name, pool(min_p, max_p), pool(service.min_decode, service.max_decode), lat_signal)
    if name == "static-peak":
        peak = float(peak_decode_tps(workload).max())
        return Static(name, counts_for_tps(service, peak, baselines.peak_headroom))
    if name == "periodic":
        return HeteroScale(periodic_service(service, workload, headroom=baselines.peak_headroom),
                           name="periodic")
    raise KeyError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")


def periodic_service(service: ServiceConfig, workload: Workload, *, headroom: float) -> ServiceConfig:
    """``service`` with one fixed-count schedule entry per hour of the workload.

    Simulated time 0 is 1970-01-01 00:00 UTC, which is how ``decide`` reads ``now_s``.
    """
    hourly = peak_decode_tps(workload, bin_s=3600.0)
    fine = peak_decode_tps(workload, bin_s=300.0)
    entries = []
    for hour in range(min(24, len(hourly))):
        peak = float(fine[hour * 12:(hour + 1) * 12].max()) if len(fine) > hour * 12 else 0.0
        counts = counts_for_tps(service, peak, headroom)
        entries.append(ScheduleEntry(start_min=hour * 60, end_min=((hour + 1) % 24) * 60,
                                     prefill=counts.prefill, decode=counts.decode,
                                     name=f"hour-{hour:02d}"))
    return replace(service, schedules=tuple(entries))


def _prefill_target(service: ServiceConfig, workload: Workload) -> float:
    """τ_prefill consistent with τ at the configured ratio: the uncached prompt tokens that
    accompany τ decode tokens/s on one decode instance, spread over P/D prefill instances."""
    out = float(workload.output_tokens.sum()) or 1.0
    uncached = float((workload.prompt_tokens - workload.cached_tokens).sum())
    p, d = service.pd_ratio
    return service.target_decode_tps_per_instance * (uncached / out) * d / p
