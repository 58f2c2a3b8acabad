"""The scaling policies the simulator compares, as ``Controller`` objects.

``heteroscale`` is a replay adapter, not a copy: every tick it calls
``heteroscale.coordinator.core.policy.decide`` — the very function the live reconciler
calls — with the coordinator's ``ServiceConfig`` and an ``Observation`` built from
the simulated sidecars, and carries the returned ``PolicyState`` to the next tick.
(The module attribute is looked up at call time, so a test can spy on it.)

``heteroscale-adapt`` is the same adapter with the service's ``pd_ratio_mode`` set
to ``adapt`` (the coordinator moves the ratio in use when the measured one drifts).
``heteroscale-blind`` is the same adapter blind to the KV links: the policy never sees
decode requests waiting for their KV (so its KV-transfer bottleneck hold cannot fire) and,
with a topology, placement ignores the measured bandwidth map (``bandwidth_aware``).

The baselines reuse the coordinator policy's arithmetic (``damp``, ``clamp``,
``stabilized_recommendation``, ``prefill_for_decode``) with Kubernetes HPA rules
(10% tolerance, 300 s scale-down stabilisation) so that only the *signal* differs.
Each is configured as an operator would configure it — from ``curate``'s pressure
test or from documented defaults, never from the workload being replayed:

* ``hpa-gpu-util``: each pool on its own GPU utilisation against ``target_utilization``
  (default 0.7; HPA's own 10% tolerance and 300 s scale-down window, PEERS.md).
* ``independent-tps``: decode on decode tokens/s against ``decode_target_tps_per_instance``
  (default: the service's τ), prefill on its uncached prompt tokens/s against
  ``prefill_target_tps_per_instance`` — the per-prefill-instance capacity at the SLO that
  ``curate``'s pressure test measured (× its margin). Each pool alone; the ratio is not kept.
  Without a prefill target ``build`` refuses (there is no honest default).
* ``latency-only``: prefill on p90 TTFT, decode on p90 TBT, against ``latency_target``
  (0.8) × SLO (proportional on a cliff-shaped signal: the paper's Fig. 6 g/h).
* ``static-peak``: fixed counts — ``static_counts`` if given, else sized for the
  forecast ``peak_decode_tps`` × ``peak_headroom``; with neither, for the replayed
  workload's own peak (an *oracle*, flagged ``oracle = True`` on the controller).
* ``periodic``: the coordinator's own fixed-count schedules (``decide`` again), one
  entry per hour, sized from ``hourly_decode_tps`` (a forecast, e.g. yesterday's peaks
  per hour); without it, from the replayed workload (oracle, flagged likewise).
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
from heteroscale.errors import UsageError
from heteroscale.simulator.traces import Workload

POLICY_NAMES = ("heteroscale", "heteroscale-adapt", "heteroscale-blind", "hpa-gpu-util", "independent-tps",
                "latency-only", "static-peak", "periodic")


@dataclass(frozen=True)
class BaselineSettings:
    """Knobs of the baselines (documented in docs/simulator.md); config
    ``simulation.baselines``. None of them is derived from the replayed workload.

    target_utilization: HPA target GPU utilisation per pool (0..1; default 0.7).
    hpa_tolerance: HPA's no-action band around the target (Kubernetes default 0.1).
    scale_in_stabilization_s: HPA's scale-down stabilisation window, seconds.
    latency_target: latency-only aims p90 at this share of the SLO.
    peak_headroom: static-peak/periodic size for the forecast peak load × this.
    prefill_target_tps_per_instance: independent-tps: uncached prompt tokens/s per prefill
        instance (``curate`` fills it from its pressure test); None = not configured.
    decode_target_tps_per_instance: independent-tps: decode tokens/s per decode instance;
        None = the service's ``target_decode_tps_per_instance`` (τ).
    static_counts: static-peak: (prefill, decode) instances; None = size from ``peak_decode_tps``.
    peak_decode_tps: static-peak: the forecast peak decode tokens/s (e.g. yesterday's);
        None with no ``static_counts`` = the replayed workload's peak (oracle).
    hourly_decode_tps: periodic: forecast peak decode tokens/s per hour of day (24 values);
        None = the replayed workload's hourly peaks (oracle).
    """

    target_utilization: float = 0.7
    hpa_tolerance: float = 0.1
    scale_in_stabilization_s: float = 300.0
    latency_target: float = 0.8
    peak_headroom: float = 1.1
    prefill_target_tps_per_instance: float | None = None
    decode_target_tps_per_instance: float | None = None
    static_counts: tuple[int, int] | None = None
    peak_decode_tps: float | None = None
    hourly_decode_tps: tuple[float, ...] | None = None


BASELINE_KEYS = {
    "independent-tps": ("prefill_target_tps_per_instance", "decode_target_tps_per_instance"),
    "static-peak": ("prefill", "decode", "peak_decode_tps"),
    "periodic": ("hourly_decode_tps",),
}
"""Per-policy sub-mappings of ``simulation.baselines`` and the keys each takes."""


def parse_baselines(raw: Any, problems: list[str], *, where: str = "simulation.baselines") -> BaselineSettings | None:
    """``simulation.baselines``: the HPA knobs at the top, per-policy blocks beneath
    (``independent-tps: {prefill_target_tps_per_instance, decode_target_tps_per_instance}``,
    ``static-peak: {prefill, decode} | {peak_decode_tps}``, ``periodic: {hourly_decode_tps: [24]}``).
    Problems are appended one line each; None when absent or invalid."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping")
        return None
    d = BaselineSettings()
    before = len(problems)
    flat = {"target_utilization": (0.01, 1.0), "hpa_tolerance": (0.0, 0.9), "scale_in_stabilization_s": (0.0, None),
            "latency_target": (0.05, 2.0), "peak_headroom": (1.0, 5.0)}
    problems.extend(f"{where}.{k}: unknown key" for k in sorted(set(raw) - set(flat) - set(BASELINE_KEYS)))
    kw: dict[str, Any] = {}

    def number(node: Any, key: str, w: str, lo: float, hi: float | None, *, strict: bool = False) -> float | None:
        v = node.get(key)
        if v is None:
            return None
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (strict and v <= lo)
                or (hi is not None and v > hi)):
            problems.append(f"{w}.{key}: must be a number {'>' if strict else '>='} {lo:g}"
                            + (f" and <= {hi:g}" if hi is not None else "") + f", got {v!r}")
            return None
        return float(v)

    for key, (lo, hi) in flat.items():
        v = number(raw, key, where, lo, hi)
        if v is not None:
            kw[key] = v
    for policy, keys in BASELINE_KEYS.items():
        node = raw.get(policy)
        if node is None:
            continue
        w = f"{where}.{policy}"
        if not isinstance(node, dict):
            problems.append(f"{w}: must be a mapping")
            continue
        problems.extend(f"{w}.{k}: unknown key" for k in sorted(set(node) - set(keys)))
        if policy == "independent-tps":
            for key in keys:
                v = number(node, key, w, 0.0, None, strict=True)
                if v is not None:
                    kw[key] = v
        elif policy == "static-peak":
            p, dd = number(node, "prefill", w, 1.0, None), number(node, "decode", w, 1.0, None)
            if (p is None) != (dd is None):
                problems.append(f"{w}: give both prefill and decode, or neither")
            elif p is not None and dd is not None:
                kw["static_counts"] = (int(p), int(dd))
            v = number(node, "peak_decode_tps", w, 0.0, None, strict=True)
            if v is not None:
                kw["peak_decode_tps"] = v
        else:
            hours = node.get("hourly_decode_tps")
            if (not isinstance(hours, list) or len(hours) != 24
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in hours)):
                problems.append(f"{w}.hourly_decode_tps: must be a list of 24 non-negative numbers")
            else:
                kw["hourly_decode_tps"] = tuple(float(x) for x in hours)
    if len(problems) > before:
        return None
    return replace(d, **kw)


def from_pressure_test(pressure: dict[str, Any], base: BaselineSettings = BaselineSettings()) -> BaselineSettings:
    """``base`` with independent-tps's targets set from ``curate``'s pressure test: the best
    split's uncached prompt tokens/s per prefill instance and decode tokens/s per decode
    instance, × the test's margin (the same rule that gives τ)."""
    return replace(base, prefill_target_tps_per_instance=pressure["prefill_target_tps_per_instance"],
                   decode_target_tps_per_instance=pressure["target_decode_tps_per_instance"])


@dataclass
class HeteroScale:
    """Replay adapter around the coordinator's pure ``decide``."""

    service: ServiceConfig
    name: str = "heteroscale"
    state: Any = field(default_factory=coord_policy.PolicyState)
    reasons: dict[str, int] = field(default_factory=dict)
    oracle: bool = False
    bandwidth_aware: bool = True     # False: no KV-arrival signal, placement blind to the map

    def step(self, *, now_s: float, window: Window, observation: Observation) -> PoolCounts:
        if not self.bandwidth_aware:
            observation = replace(observation, decode_kv_waiting=None)
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
    oracle: bool = False

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
    """The controller called ``name`` (one of ``POLICY_NAMES``).

    ``workload`` is read only by ``static-peak`` and ``periodic`` when no forecast is
    configured (the oracle fallback, flagged ``oracle = True``); nothing else sees it."""
    if name == "heteroscale":
        return HeteroScale(service)
    if name == "heteroscale-adapt":
        return HeteroScale(replace(service, pd_ratio_mode="adapt"), name="heteroscale-adapt")
    if name == "heteroscale-blind":
        return HeteroScale(service, name="heteroscale-blind", bandwidth_aware=False)
    pol = service.policy
    max_p = service.max_prefill or coord_policy.prefill_for_decode(service, service.max_decode) * 2

    def pool(low: int, high: int) -> _HpaPool:
        return _HpaPool(low=low, high=high, tolerance=baselines.hpa_tolerance,
                        window_s=baselines.scale_in_stabilization_s,
                        max_out=pol.max_scale_out_factor, max_in=pol.max_scale_in_factor)

    min_p = service.min_prefill or 1
    if name == "hpa-gpu-util":
        target = baselines.target_utilization
        return TwoPoolHpa(name, pool(min_p, max_p), pool(service.min_decode, service.max_decode),
                          lambda w, ready: (w.prefill_gpu_util / target, w.decode_gpu_util / target))
    if name == "independent-tps":
        tau_p = baselines.prefill_target_tps_per_instance
        if tau_p is None:
            raise UsageError("independent-tps needs simulation.baselines.independent-tps."
                             "prefill_target_tps_per_instance (uncached prompt tok/s per prefill instance "
                             "at the SLO): `heteroscale curate` measures it in its pressure test")
        tau = baselines.decode_target_tps_per_instance or service.target_decode_tps_per_instance

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
        if baselines.static_counts is not None:
            return Static(name, PoolCounts(*baselines.static_counts))
        if baselines.peak_decode_tps is not None:
            return Static(name, counts_for_tps(service, baselines.peak_decode_tps, baselines.peak_headroom))
        peak = float(peak_decode_tps(workload).max())
        return Static(name, counts_for_tps(service, peak, baselines.peak_headroom), oracle=True)
    if name == "periodic":
        hourly = baselines.hourly_decode_tps
        ctl = HeteroScale(periodic_service(service, workload, headroom=baselines.peak_headroom, hourly=hourly),
                          name="periodic")
        ctl.oracle = hourly is None
        return ctl
    raise KeyError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")


def hourly_peak_decode_tps(workload: Workload) -> tuple[float, ...]:
    """Peak 5-minute decode tokens/s in each hour of ``workload`` (24 values; hours past its
    end are 0): what ``periodic`` and ``static-peak`` take as a forecast from a previous day."""
    fine = peak_decode_tps(workload, bin_s=300.0)
    return tuple(float(fine[h * 12:(h + 1) * 12].max()) if len(fine) > h * 12 else 0.0 for h in range(24))


def periodic_service(service: ServiceConfig, workload: Workload, *, headroom: float,
                     hourly: tuple[float, ...] | None = None) -> ServiceConfig:
    """``service`` with one fixed-count schedule entry per hour, sized from ``hourly``
    (forecast peak decode tokens/s per hour of day) or, without it, from ``workload``.

    Simulated time 0 is 1970-01-01 00:00 UTC, which is how ``decide`` reads ``now_s``.
    """
    if hourly is None:
        peaks = hourly_peak_decode_tps(workload)
        hours = min(24, len(peak_decode_tps(workload, bin_s=3600.0)))
    else:
        peaks, hours = hourly, 24
    entries = []
    for hour in range(hours):
        counts = counts_for_tps(service, peaks[hour], headroom)
        entries.append(ScheduleEntry(start_min=hour * 60, end_min=((hour + 1) % 24) * 60,
                                     prefill=counts.prefill, decode=counts.decode,
                                     name=f"hour-{hour:02d}"))
    return replace(service, schedules=tuple(entries))
