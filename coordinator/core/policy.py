"""The scaling policy: decode tokens/s → both pools, in one pure decision (pure).

``decide(service=, observation=, state=, now_s=) -> (Decision, PolicyState)`` is the
one function the live reconciler and the simulator both call (Ray Serve style: the
previous state in, the new state out, time as an argument; no I/O, no clock).

One tick, in order (PAPER §5.3–5.5, PEERS §5):

1. A human changed the replicas (``manual_override``, newly seen): adopt their counts,
   start the cooldown and the stabilisation window from them; reason ``manual_override``.
   The next ticks decide normally from those counts (the backend keeps the flag up
   until our next write; the policy reacts to each new edit once).
2. A fixed-count schedule is active: use it. Reason ``schedule``. (A bounds schedule
   only narrows ``min_decode``/``max_decode`` and the policy runs on.)
3. Data: too few fresh decode reports (below ``min_fresh_reports_ratio``): hold
   (``hold_missing_data``). Some expected decode instance missing: the load is
   estimated (the mean of the reporting instances × the instances that should have
   reported, shown in the inputs as ``estimated_decode_tps``); a scale-out may go on it,
   but nothing shrinks, neither pool (``hold_partial_data``). Scale-in only on a complete
   view. Signals that are not finite, or negative, count as missing: ``decide`` never
   raises for any ``Observation``.
4. Proportional control: the decode tokens/s, smoothed over ``smoothing_window_s``,
   gives ``D = ceil(tps / τ)``; utilisation ``u = tps / (D_current · τ)`` is compared
   with the asymmetric band ``[1 − scale_in, 1 + scale_out]``.
5. Latency safety net: p90 TBT (and TTFT) over ``moderate``×SLO asks for
   ``+moderate_step`` (10%) of both pools, over ``severe``×SLO ``+severe_step`` (20%),
   at least +1. The larger of this and the proportional target wins; latency never
   scales in. A backlog that drains within ``demand.drain_horizon_s`` gets no step
   (``hold_draining``): instances ordered now would start after it is gone.
6. Scale-out: no new scale-out while pods are pending (unless they have been pending
   longer than ``pending_timeout_s``), nor within ``scale_out_cooldown_s`` of the last
   one; the step is damped to at most ``max_scale_out_factor``× (at least +1). A
   tokens/s scale-out the step bound cut goes on at the next tick, pending or not (the
   pending instances are in the count it starts from).
7. Scale-in: the HIGHEST recommendation over ``scale_in_stabilization_s`` wins (as in
   Kubernetes HPA; a tick's recommendation is the larger of the proportional target and
   the latency net's, so a latency step-up is held for the window); the step is damped to at least ``max_scale_in_factor``× (at least
   −1); a consolidation check keeps enough instances that the survivors carry the
   load (the larger of the smoothed and the latest tokens/s) at no more than
   ``consolidation_margin`` of their target. No scale-in before a whole smoothing and
   stabilisation window of data (``hold_cold_start``), nor below the size a scale-out
   restored soon after a scale-in (the scale-in backoff: ``hold_scale_in_backoff``).
8. Bounds: ``min_decode``/``max_decode`` (or a schedule's override), then the GPU
   budget across both pools, then prefill follows from the ratio.

Ratio rounding rule: for ``D`` decode instances and ratio ``p:d`` the prefill count is
``P = floor(D·p/d + 1/2)`` in exact rational arithmetic — the integer nearest to
``D·p/d``, ties rounded up (towards more prefill, which protects TTFT) — and at least
1 while ``D ≥ 1``. For a fixed ``D`` this minimises ``|P/D − p/d|``. Example 9:7 with
D = 8: 8·9/7 = 10.29 → P = 10.

The building blocks (``prefill_for_decode``, ``proportional_decode``, ``damp``,
``clamp``, ``latency_step``, ``active_schedule``, ``fit_budget``, ``smoothed_tps``,
``stabilized_recommendation``) are public so that other policies (the simulator's
HPA-style and independent baselines) reuse exactly the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable

from heteroscale.coordinator.core.demand import demand_tps, draining, is_backlog, kv_pressure, queued_requests
from heteroscale.coordinator.core.drift import DriftState, observe_drift, ratio_in_use
from heteroscale.coordinator.core.forecast import ForecastState, forecast_tps, remember_load
from heteroscale.coordinator.core.ratio import prefill_for_fraction, prefill_for_ratio, ratio_text
from heteroscale.coordinator.core.target import TargetState, learn_target
from heteroscale.coordinator.core.types import Decision, Observation, PoolCounts

if TYPE_CHECKING:
    from heteroscale.coordinator.core.settings import PolicyConfig, ScheduleEntry, ServiceConfig

REASONS = (
    "scale_out_tps", "scale_in_tps", "latency_moderate", "latency_severe",
    "kv_pressure", "hold_kv_transfer", "hold_missing_data", "hold_partial_data", "hold_pending", "hold_cooldown",
    "hold_stabilization", "hold_cold_start", "hold_tolerance", "hold_consolidation", "bounded_max", "bounded_min",
    "bounded_budget", "ratio_repair", "schedule", "manual_override", "hold_draining", "hold_prefill_busy",
    "hold_scale_in_backoff", "scale_in_prefill",
)
_EPS = 1e-9


@dataclass(frozen=True)
class ScaleInBackoff:
    """A size the latency net showed too small: keep at least ``floor`` instances (decode
    for the scale-in backoff, prefill for the prefill floor) until ``until_s``;
    ``backoff_s`` doubles on each repeat."""

    floor: int
    until_s: float
    backoff_s: float
    why: str


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between ticks (all times unix seconds)."""

    tps_samples: tuple[tuple[float, float], ...] = ()      # (at, summed decode tps)
    recommendations: tuple[tuple[float, int], ...] = ()   # (at, decode recommendation)
    last_scale_out_s: float | None = None
    last_scale_in_s: float | None = None
    pending_seen_s: float | None = None                    # first tick pending was seen
    adopted: PoolCounts | None = None                      # a human's counts, already adopted
    first_data_s: float | None = None                      # the first tick with data (cold start)
    target: TargetState = TargetState()                    # the effective τ (core.target)
    drift: DriftState = DriftState()                       # the P/D ratio in use and its advice
    forecast: ForecastState = ForecastState()              # load history for the predictive lead
    queued: tuple[float, float] | None = None              # (requests queued, at) last tick (core.demand)
    backlog: bool = False                                  # last tick drained a backlog (core.demand.is_backlog)
    ready_s: float | None = None                           # when the last pending instances were seen ready
    backoff: "ScaleInBackoff | None" = None                # a scale-in latency undid: its floor (below)
    kv_hold_since_s: float | None = None                   # the KV-transfer bottleneck seen since (bounded hold)
    cut_scale_out: int | None = None                       # decode ordered by a scale-out the step bound cut
    prefill_idle_since_s: float | None = None              # prefill above both ratio and load since (trim)
    prefill_floor: "ScaleInBackoff | None" = None          # a prefill count TTFT broke at: stay above it
    prefill_trim_s: float | None = None                    # the last scale_in_prefill written (settle)


# ---------------------------------------------------------------- building blocks

def prefill_for_decode(service: "ServiceConfig", decode: int) -> int:
    """The prefill count that keeps P:D nearest the configured ratio (``core.ratio``)."""
    return prefill_for_ratio(decode, service.pd_ratio)


MAX_INSTANCES = 10**7   # no fleet is larger: a recommendation above it is capped, not computed


def proportional_decode(tps: float, target_tps_per_instance: float) -> int:
    """``ceil(tps / τ)``; a hair of tolerance so 4800/2400 is 2, not 3 from float dust."""
    if not tps > 0:
        return 0
    ratio = tps / target_tps_per_instance
    if not ratio < MAX_INSTANCES:
        return MAX_INSTANCES
    return max(0, math.ceil(ratio - _EPS))


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def damp(current: int, desired: int, *, max_out_factor: float, max_in_factor: float) -> int:
    """Limit one step: up to ``current × max_out_factor`` (at least +1), down to
    ``current × max_in_factor`` (at least −1). From zero, go straight to ``desired``."""
    if current <= 0 or desired == current:
        return desired
    if desired > current:
        ceiling = max(current + 1, math.floor(current * max_out_factor + _EPS))
        return min(desired, ceiling)
    floor_ = min(current - 1, math.ceil(current * max_in_factor - _EPS))
    return max(desired, floor_)


def smoothed_tps(samples: tuple[tuple[float, float], ...]) -> float | None:
    """Plain mean of the samples kept in the window (ticks are evenly spaced); summed as
    ``v / n`` so that huge finite values cannot overflow to infinity."""
    if not samples:
        return None
    n = len(samples)
    return sum(v / n for _, v in samples)


def stabilized_recommendation(recommendations: tuple[tuple[float, int], ...], *, now_s: float,
                              window_s: float) -> int | None:
    """HPA's scale-down stabilisation: the highest recommendation within the window."""
    kept = [r for at, r in recommendations if now_s - at <= window_s]
    return max(kept) if kept else None


def latency_step(service: "ServiceConfig", *, tbt_p90_s: float | None,
                 ttft_p90_s: float | None) -> tuple[float, str | None, float | None]:
    """(step fraction, reason or None, worst latency/SLO ratio) for the safety net."""
    net = service.policy.latency_net
    ratios = []
    if tbt_p90_s is not None and service.slo.tbt_s:
        ratios.append(tbt_p90_s / service.slo.tbt_s)
    if net.use_ttft and ttft_p90_s is not None and service.slo.ttft_s:
        ratios.append(ttft_p90_s / service.slo.ttft_s)
    worst = max(ratios) if ratios else None
    if not net.enabled or worst is None:
        return 0.0, None, worst
    if worst > net.severe:
        return net.severe_step, "latency_severe", worst
    if worst > net.moderate:
        return net.moderate_step, "latency_moderate", worst
    return 0.0, None, worst


def latency_target(current: int, step: float) -> int:
    """``ceil(current × (1 + step))``, at least ``current + 1``."""
    return max(current + 1, math.ceil(current * (1.0 + step) - _EPS))


def active_schedule(service: "ServiceConfig", now_s: float) -> "ScheduleEntry | None":
    """The first schedule entry whose time-of-day window contains ``now_s``."""
    for entry in service.schedules:
        local_s = now_s + entry.utc_offset_min * 60
        day = (int(local_s // 86400) + 3) % 7          # 1970-01-01 was a Thursday; 0 = Monday
        minute = int((local_s % 86400) // 60)
        if entry.start_min < entry.end_min:
            inside = entry.start_min <= minute < entry.end_min
            start_day = day
        else:                                           # wraps past midnight
            inside = minute >= entry.start_min or minute < entry.end_min
            start_day = day if minute >= entry.start_min else (day - 1) % 7
        if inside and start_day in entry.days:
            return entry
    return None


def decode_bounds(service: "ServiceConfig", entry: "ScheduleEntry | None") -> tuple[int, int]:
    low, high = service.min_decode, service.max_decode
    if entry is not None and not entry.fixed:
        low = entry.min_decode if entry.min_decode is not None else low
        high = entry.max_decode if entry.max_decode is not None else high
        low = min(low, high)
    return low, high


def gpus_for(service: "ServiceConfig", pools: PoolCounts) -> int:
    return (pools.prefill * service.prefill.gpus_per_instance
            + pools.decode * service.decode.gpus_per_instance)


def pools_for_decode(service: "ServiceConfig", decode: int, *, ratio: Fraction | None = None) -> PoolCounts:
    """Both pools for ``decode`` instances: prefill by the ratio (the configured one, or
    the one in use under ``pd_ratio_mode: adapt``), then its own bounds."""
    prefill = prefill_for_decode(service, decode) if ratio is None else prefill_for_fraction(decode, ratio)
    if service.min_prefill is not None:
        prefill = max(prefill, service.min_prefill)
    if service.max_prefill is not None:
        prefill = min(prefill, service.max_prefill)
    return PoolCounts(prefill=prefill, decode=decode)


def fit_budget(service: "ServiceConfig", decode: int, *, low: int, ratio: Fraction | None = None) -> int:
    """The largest decode count ``<= decode`` (and ``>= low``) whose pools fit the GPU budget."""
    budget = service.policy.gpu_budget
    if budget is None:
        return decode
    while decode > low and gpus_for(service, pools_for_decode(service, decode, ratio=ratio)) > budget:
        decode -= 1
    return decode


def consolidation_decode(load_tps: float, *, target_tps_per_instance: float, margin: float) -> int:
    """Fewest instances that carry ``load_tps`` at no more than ``margin`` of their target."""
    return proportional_decode(load_tps, target_tps_per_instance * margin)


def enough_data(service: "ServiceConfig", observation: Observation) -> bool:
    expected = observation.expected_decode
    if observation.decode_tps is None or expected <= 0 or observation.fresh_decode <= 0:
        return False
    return observation.fresh_decode / expected >= service.policy.min_fresh_reports_ratio - _EPS


def estimated_load(observation: Observation) -> float | None:
    """The decode load: the measured sum when every expected instance reported; with some
    missing, the mean per reporting instance × (reporting + missing) — the missing ones
    serve traffic too, and leaving them out would read as a drop in load."""
    tps = observation.decode_tps
    if tps is None or observation.missing_decode <= 0 or observation.reporting_decode <= 0:
        return tps
    per = tps / observation.reporting_decode
    return per * (observation.reporting_decode + observation.missing_decode)


def sanitized(observation: Observation) -> Observation:
    """Signals the policy can act on: a value that is not finite (or a negative rate or
    latency, or a negative count) is treated as not measured."""
    def rate(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) and value >= 0 else None

    fields = {name: rate(getattr(observation, name)) for name in (
        "decode_tps", "tbt_p90_s", "ttft_p90_s", "tbt_p90_max_s", "ttft_p90_max_s", "prefill_tps",
        "prefill_uncached_tps", "decode_running", "decode_waiting", "decode_kv_waiting", "decode_kv_usage_max",
        "decode_preemptions_per_s", "prefill_waiting", "prefill_gpu_utilization")}
    counts = {name: max(0, getattr(observation, name)) for name in (
        "fresh_decode", "expected_decode", "reporting_decode", "missing_decode", "fresh_prefill",
        "expected_prefill", "warming_decode")}
    clean = replace(observation, **fields, **counts)
    return observation if clean == observation else clean


# ---------------------------------------------------------------- the decision

@dataclass(frozen=True)
class Proposal:
    """The one small value the stages pass along: a decode count, why, and how.

    ``keep_prefill``: a hold keeps today's prefill count as it is (no ratio repair on
    a tick that is not allowed to move)."""

    decode: int
    reason: str
    detail: str
    keep_prefill: bool = False

    def hold(self, *, current: int, reason: str, detail: str) -> "Proposal":
        return Proposal(decode=current, reason=reason, detail=detail, keep_prefill=True)

    def note(self, text: str) -> "Proposal":
        return replace(self, detail=f"{self.detail}; {text}" if self.detail else text)


def decide(*, service: "ServiceConfig", observation: Observation, state: PolicyState,
           now_s: float) -> tuple[Decision, PolicyState]:
    """One tick for one service. Pure: same inputs, same outputs.

    The returned state carries no cooldown stamps for this tick's move: the caller
    reports what was written with ``settle`` (a decision that was not applied must not
    start a cooldown)."""
    pol = service.policy
    observation = sanitized(observation)
    current = observation.pools.current
    valid = enough_data(service, observation)
    complete = valid and observation.missing_decode == 0
    load = estimated_load(observation)
    state = _remember(state, load_tps=load if valid else None, now_s=now_s, window_s=pol.smoothing_window_s)
    state = _track_pending(state, observation=observation, now_s=now_s)
    inputs: dict[str, Any] = {
        "decode_tps": observation.decode_tps,
        "fresh_decode": observation.fresh_decode,
        "expected_decode": observation.expected_decode,
        "target_decode_tps_per_instance": service.target_decode_tps_per_instance,
    }
    if valid and not complete:
        inputs.update(missing_decode=observation.missing_decode, estimated_decode_tps=round(load or 0.0, 3))

    def decision(reason: str, desired: PoolCounts, detail: str) -> Decision:
        return Decision(service=service.name, at=now_s, reason=reason, current=current, desired=desired,
                        detail=detail, inputs=inputs)

    adopted = _adopt_manual_edit(state, current=current, manual=observation.pools.manual_override, now_s=now_s)
    if adopted is not None:
        return decision("manual_override", current,
                        f"replicas changed outside HeteroScale to {current.prefill}P{current.decode}D; "
                        "adopted until the next decision"), adopted
    state = replace(state, adopted=None) if not observation.pools.manual_override and state.adopted else state

    entry = active_schedule(service, now_s)
    if entry is not None and entry.fixed:
        desired = PoolCounts(prefill=entry.prefill or 0, decode=entry.decode or 0)
        return decision("schedule", desired, f"fixed schedule {entry.name or _window(entry)}"), state
    low, high = decode_bounds(service, entry)
    inputs["bounds"] = [low, high]

    ratio = ratio_in_use(state.drift, service.pd_ratio)
    if not valid:
        proposal = Proposal(decode=current.decode, reason="hold_missing_data", keep_prefill=True, detail=(
            f"{observation.fresh_decode} fresh of {observation.expected_decode} expected decode reports "
            f"(need {pol.min_fresh_reports_ratio:.0%})"))
    else:
        tps = smoothed_tps(state.tps_samples) or 0.0
        tau = service.target_decode_tps_per_instance * state.target.scale
        inputs["effective_target_decode_tps_per_instance"] = round(tau, 3)
        state, scale_out_tps = _scale_out_load(service, state, observation=observation, tps=tps,
                                               latest_tps=load, now_s=now_s, inputs=inputs)
        proposal = _propose(service, tps=tps, scale_out_tps=scale_out_tps, tau=tau, current=current.decode,
                            inputs=inputs)
        proposal = _kv_pressure(service, proposal, observation=observation, current=current.decode, inputs=inputs)
        proposal, recommendation, decode_breach = _latency_net(service, proposal, observation=observation,
                                                               current=current.decode, inputs=inputs)
        proposal, recommendation = _kv_transfer_bottleneck(service, proposal, observation=observation,
                                                           current=current.decode, tps=tps, tau=tau,
                                                           recommendation=recommendation, inputs=inputs,
                                                           held_for_s=(None if state.kv_hold_since_s is None
                                                                       else now_s - state.kv_hold_since_s))
        if "kv_transfer_bottleneck" not in inputs:
            state = replace(state, kv_hold_since_s=None) if state.kv_hold_since_s is not None else state
        elif state.kv_hold_since_s is None:
            state = replace(state, kv_hold_since_s=now_s)
        # Nothing to learn where nothing could be added: a breach at the upper bound says the
        # bound is too low, not that τ is too high.
        # Nor where the fleet is short of instances rather than of τ: while decode instances
        # are still starting, or while requests queue faster than they are served (an
        # overload: the demand estimate). The rate per instance is the ready instances'.
        ready = observation.pools.ready.decode
        decode_breach = (decode_breach and "kv_transfer_bottleneck" not in inputs and current.decode < high
                         and observation.pools.pending.decode == 0 and "demand_decode_tps" not in inputs)
        state = replace(state, target=learn_target(
            state.target, settings=pol.adaptive_target, now_s=now_s, decode_breach=decode_breach,
            latency_ratio=inputs.get("latency_slo_ratio"), per_instance_tps=tps / ready if ready > 0 else None,
            tau=service.target_decode_tps_per_instance, cooldown_s=pol.scale_out_cooldown_s))
        # The window keeps each tick's final recommendation, the latency net's included (as
        # HPA keeps its computed replicas): a size that latency asked for is not given back
        # by a tokens/s scale-in before the stabilisation window has passed.
        state = replace(state, recommendations=_trim_recs(
            state.recommendations + ((now_s, recommendation),), now_s=now_s,
            window_s=pol.scale_in_stabilization_s))
        if proposal.decode > current.decode:
            wanted = proposal
            proposal = _gate_scale_out(service, proposal, state=state, current=current.decode, now_s=now_s,
                                       pending_total=observation.pools.pending.total(),
                                       pending_since_s=observation.pools.pending_since_s, complete=complete)
            cut = current.decode < proposal.decode < wanted.decode and proposal.reason == "scale_out_tps"
            state = replace(state, cut_scale_out=proposal.decode if cut else None)
        elif proposal.decode < current.decode:
            proposal = _stabilize_scale_in(service, proposal, state=state, current=current.decode, now_s=now_s,
                                           load_tps=max(tps, load or 0.0), tau=tau, inputs=inputs)
    proposal = _apply_bounds(service, proposal, low=low, high=high, ratio=ratio)
    desired, proposal = _apply_ratio(service, proposal, current=current, ratio=ratio)
    if valid:
        desired, proposal = _keep_prefill_for_its_load(service, desired, proposal, observation=observation,
                                                       current=current, state=state, now_s=now_s, inputs=inputs)
        state, desired, proposal = _trim_idle_prefill(service, state, desired, proposal, observation=observation,
                                                      current=current, ratio=ratio, now_s=now_s, inputs=inputs)
    if valid and not complete:
        desired, proposal = _hold_shrink_on_partial_data(desired, proposal, current=current,
                                                         missing=observation.missing_decode)
    if valid:
        state = _watch_ratio(service, state, observation=observation, load_tps=load, now_s=now_s, inputs=inputs)
        state = _learn_scale_in_backoff(service, state, reason=proposal.reason, current=current, desired=desired,
                                        now_s=now_s)
        state = _learn_prefill_floor(service, state, reason=proposal.reason, observation=observation,
                                     current=current, desired=desired, now_s=now_s,
                                     kv_bound="kv_transfer_bottleneck" in inputs)
    return decision(proposal.reason, desired, proposal.detail), state


def settle(state: PolicyState, *, decision: Decision, applied: bool) -> PolicyState:
    """The state after the caller acted on ``decision``: cooldown clocks start only
    for a move that was written (``applied``). A standby, a dry run, an advisory backend
    or a failed write leaves them as they were."""
    if not applied:
        return state
    current, desired, now_s = decision.current, decision.desired, decision.at
    if desired.decode > current.decode or (desired.decode == current.decode and desired.total() > current.total()):
        return replace(state, last_scale_out_s=now_s)
    if desired.decode < current.decode or desired.total() < current.total():
        trimmed = now_s if decision.reason == "scale_in_prefill" else state.prefill_trim_s
        return replace(state, last_scale_in_s=now_s, prefill_trim_s=trimmed)
    return state


# ---------------------------------------------------------------- stages

def _hold_shrink_on_partial_data(desired: PoolCounts, proposal: Proposal, *, current: PoolCounts,
                                 missing: int) -> tuple[PoolCounts, Proposal]:
    """Scale-in only on a complete view: with decode instances missing, neither pool
    shrinks (a scale-out, on the estimate, goes ahead)."""
    kept = PoolCounts(prefill=max(desired.prefill, current.prefill), decode=max(desired.decode, current.decode))
    if kept == desired:
        return desired, proposal
    detail = f"{missing} decode instance(s) sent no usable report: no scale-in on partial data"
    if kept == current:
        return kept, Proposal(decode=current.decode, reason="hold_partial_data", keep_prefill=True,
                              detail=f"{proposal.detail}; {detail}" if proposal.detail else detail)
    return kept, proposal.note(detail)


def _adopt_manual_edit(state: PolicyState, *, current: PoolCounts, manual: bool,
                       now_s: float) -> PolicyState | None:
    """A human's new counts, adopted once (an edge): the backend keeps flagging a manual
    edit until our next write. Cooldown and stabilisation start from them."""
    if not manual or state.adopted == current:
        return None
    return replace(state, last_scale_out_s=now_s, last_scale_in_s=now_s, adopted=current,
                   recommendations=((now_s, current.decode),))


def _scale_out_load(service: "ServiceConfig", state: PolicyState, *, observation: Observation, tps: float,
                    latest_tps: float | None, now_s: float, inputs: dict[str, Any]) -> tuple[PolicyState, float]:
    """The load a scale-out is judged on: the smoothed served rate or this tick's, if
    higher (a rise is acted on at once, as Knative's panic window does; a fall waits for
    the smoothing window), or more when requests queue (the demand estimate,
    ``core.demand``) or the forecast says more is coming (``core.forecast``). Scale-in
    never sees these."""
    pol = service.policy
    out = tps
    if latest_tps is not None and latest_tps > out:
        inputs["latest_decode_tps"] = round(latest_tps, 3)
        out = latest_tps
    queued = queued_requests(observation, settings=pol.demand)
    drain = draining(queued, previous=state.queued, now_s=now_s, settings=pol.demand, was_backlog=state.backlog)
    backlog = drain is not None and (queued == 0 or is_backlog(state.queued[0] if state.queued else 0.0,
                                                               observation.decode_running))
    if backlog:
        inputs["backlog_draining"] = True         # the latency net waits for it (see _latency_net)
    state = replace(state, queued=None if queued is None else (queued, now_s), backlog=backlog)
    demand = None
    if drain is not None:
        inputs["queue_draining"] = drain          # the backlog buys nothing (see _propose)
    else:
        demand = demand_tps(observation, served_tps=out, settings=pol.demand)
    if demand is not None and demand > out:
        inputs["demand_decode_tps"] = round(demand, 3)
        out = demand
    if pol.forecast.enabled:
        state = replace(state, forecast=remember_load(state.forecast, settings=pol.forecast, now_s=now_s,
                                                      load_tps=tps))
        ahead, how = forecast_tps(state.forecast, settings=pol.forecast, now_s=now_s)
        if ahead is not None and ahead > out:
            inputs.update(forecast_decode_tps=round(ahead, 3), forecast_from=how)
            out = ahead
    return state, out


def _propose(service: "ServiceConfig", *, tps: float, scale_out_tps: float, tau: float, current: int,
             inputs: dict[str, Any]) -> Proposal:
    """Proportional control against the asymmetric band, on the effective target ``tau``:
    scale-out on ``scale_out_tps`` (the demand, when it is more than what is served),
    scale-in on the served rate alone."""
    pol = service.policy
    want = proportional_decode(tps, tau)
    want_out = proportional_decode(scale_out_tps, tau)
    utilization = tps / (current * tau) if current > 0 else math.inf
    out_utilization = scale_out_tps / (current * tau) if current > 0 else math.inf
    inputs.update(smoothed_decode_tps=round(tps, 3), recommendation=max(want, want_out),
                  utilization=None if math.isinf(utilization) else round(utilization, 4))
    detail = (f"decode tps {tps:.0f} is {utilization:.0%} of {current}x{tau:g}" if current
              else f"decode tps {tps:.0f}, no decode instances")
    if out_utilization > 1 + pol.tolerance.scale_out and want_out > current and "queue_draining" in inputs:
        # The served rate includes the backlog being worked off: capacity already exceeds
        # the arrivals, and the rate falls back when the queue is gone.
        return Proposal(decode=current, reason="hold_draining",
                        detail=f"{detail}; {inputs['queue_draining']}, draining: no scale-out on the backlog")
    if out_utilization > 1 + pol.tolerance.scale_out and want_out > current:
        if scale_out_tps > tps:
            detail += f"; demand {scale_out_tps:.0f} tok/s is {out_utilization:.0%}"
        return Proposal(decode=want_out, reason="scale_out_tps", detail=detail)
    if utilization < 1 - pol.tolerance.scale_in and want < current:
        return Proposal(decode=want, reason="scale_in_tps", detail=detail)
    return Proposal(decode=current, reason="hold_tolerance", detail=detail)


def _kv_transfer_bottleneck(service: "ServiceConfig", proposal: Proposal, *, observation: Observation,
                            current: int, tps: float, tau: float, recommendation: int,
                            inputs: dict[str, Any], held_for_s: float | None) -> tuple[Proposal, int]:
    """Decode requests waiting for their KV to arrive (vLLM deferred, SGLang's transfer
    queue) at least as much as for decode or prefill capacity, with decode's own signals healthy (TBT
    inside the SLO, KV cache not full, tokens/s within the band): the bottleneck is the
    KV transfer, and more decode instances would wait on the same links. A scale-out the
    latency net, the demand estimate or KV pressure asked for is held (``hold_kv_transfer``)
    with the evidence; a scale-out that served decode tokens/s asks for still goes.

    The hold is bounded (``kv_transfer_hold_max_s``): a bottleneck that outlasts it while
    latency stays broken is not going away by itself, and new instances are placed where
    the measured links have headroom (``core.bandwidth``) — the fleet may sit entirely
    behind the slow links, where holding would starve it."""
    kv_wait = observation.decode_kv_waiting
    # Waiting on KV at least as much as on capacity — decode's or prefill's: a few transfers
    # in flight while hundreds of requests queue for prefill is a busy fleet, not slow links.
    queued = max(1.0, observation.decode_waiting or 0.0, observation.prefill_waiting or 0.0)
    if kv_wait is None or kv_wait <= 0 or kv_wait < queued:
        return proposal, recommendation
    net = service.policy.latency_net
    tbt_ratio = (observation.tbt_p90_s / service.slo.tbt_s
                 if observation.tbt_p90_s is not None and service.slo.tbt_s else None)
    kv_usage = observation.decode_kv_usage_max
    if (tbt_ratio is not None and tbt_ratio > net.moderate) or (
            kv_usage is not None and kv_usage >= service.policy.kv_pressure.usage):
        return proposal, recommendation
    evidence = (f"{kv_wait:.0f} decode request(s) waiting for their KV to arrive, "
                f"{observation.decode_waiting or 0:.0f} for decode capacity; TBT "
                + (f"at {tbt_ratio:.2f}x SLO" if tbt_ratio is not None else "not measured")
                + (f", decode KV cache {kv_usage:.0%}" if kv_usage is not None else ""))
    inputs["kv_transfer_bottleneck"] = evidence
    limit = service.policy.kv_transfer_hold_max_s
    if proposal.decode > current and (limit <= 0 or (held_for_s is not None and held_for_s >= limit)):
        held = held_for_s or 0.0
        inputs["kv_transfer_hold_lifted"] = f"held {held:.0f}s (limit {limit:g}s)"
        return proposal.note(f"{evidence}; the KV-transfer hold lifted after {held:.0f}s: "
                             "growing where the links have headroom"), recommendation
    served_want = proportional_decode(tps, tau)
    served_out = tps / (current * tau) > 1 + service.policy.tolerance.scale_out if current else False
    if proposal.decode > current and not (proposal.reason == "scale_out_tps" and served_out
                                          and served_want >= proposal.decode):
        wanted = proposal.decode
        keep = served_want if served_out and served_want > current else current
        return (Proposal(decode=keep, reason="hold_kv_transfer" if keep == current else "scale_out_tps",
                         keep_prefill=keep == current,
                         detail=f"{evidence}: the KV transfer is the bottleneck; not buying decode for it "
                                f"(wanted {wanted})"), max(keep, served_want))
    return proposal, recommendation


def _kv_pressure(service: "ServiceConfig", proposal: Proposal, *, observation: Observation, current: int,
                 inputs: dict[str, Any]) -> Proposal:
    """Decode KV cache nearly full, or preempting: a moderate step before TBT breaks
    (never a scale-in)."""
    why = kv_pressure(observation, settings=service.policy.kv_pressure)
    if why is None:
        return proposal
    inputs["kv_pressure"] = why
    step = latency_target(current, service.policy.latency_net.moderate_step)
    inputs["recommendation"] = max(inputs.get("recommendation", 0), step)
    if step > max(proposal.decode, current):
        return Proposal(decode=step, reason="kv_pressure",
                        detail=f"{why}: +{service.policy.latency_net.moderate_step:.0%} both pools")
    return proposal


def _latency_net(service: "ServiceConfig", proposal: Proposal, *, observation: Observation, current: int,
                 inputs: dict[str, Any]) -> tuple[Proposal, int, bool]:
    """The safety net: a breach asks for +step of both pools (at least +1), never less.
    Returns the proposal, this tick's recommendation for the stabilisation window, and
    whether the breach was on the decode side (TBT; or TTFT while decode queues or is
    under KV pressure) — the one that teaches the effective τ."""
    step, reason, ratio = latency_step(service, tbt_p90_s=observation.tbt_p90_s,
                                       ttft_p90_s=observation.ttft_p90_s)
    inputs["latency_slo_ratio"] = None if ratio is None else round(ratio, 4)
    want = inputs["recommendation"]
    if reason is None:
        return proposal, want, False
    if inputs.get("backlog_draining"):
        # A backlog that is gone within the drain horizon is what breaks latency now; an
        # instance ordered now would be ready after it (and the breach says nothing of τ).
        detail = f"p90 latency at {ratio:.2f}x SLO while {inputs['queue_draining']}: no step for a draining backlog"
        if proposal.decode <= current:
            proposal = proposal.hold(current=current, reason="hold_draining", detail=detail)
        return proposal, max(want, current), False
    net = service.policy.latency_net
    tbt_ratio = (observation.tbt_p90_s / service.slo.tbt_s
                 if observation.tbt_p90_s is not None and service.slo.tbt_s else None)
    decode_queues = (observation.decode_waiting or 0) > 0 or "kv_pressure" in inputs
    decode_breach = (tbt_ratio is not None and tbt_ratio > net.moderate) or decode_queues
    # The step is at least +1, so a breach always overrides a scale-in: latency never
    # lets the pools shrink. A larger proportional scale-out keeps its own reason.
    lat_d = latency_target(current, step)
    inputs["latency_recommendation"] = lat_d
    if lat_d > max(proposal.decode, current):
        proposal = Proposal(decode=lat_d, reason=reason,
                            detail=f"p90 latency at {ratio:.2f}x SLO: +{step:.0%} both pools")
    # With the ratio fixed (not ``adapt``), decode's count is the only lever for a
    # prefill-side breach too: both pools move together, so that breach teaches τ as well.
    # Under ``adapt`` a prefill-side breach is the ratio's to fix.
    return proposal, max(want, lat_d), decode_breach or service.pd_ratio_mode != "adapt"


def _gate_scale_out(service: "ServiceConfig", proposal: Proposal, *, state: PolicyState, current: int,
                    now_s: float, pending_total: int, pending_since_s: float | None,
                    complete: bool = True) -> Proposal:
    """No scale-out while earlier instances are pending (up to a timeout) or inside the
    cooldown; then the step is damped."""
    pol = service.policy
    if complete and state.cut_scale_out == current and proposal.reason == "scale_out_tps":
        # The last scale-out ordered less than the load asked for (the step bound): the
        # next step goes on while those instances start (they are counted in ``current``),
        # as HPA doubles every period. Only on the load's own evidence, never the net's,
        # and only on a complete view (an instance expected but not yet reporting would
        # make the estimate count the reporting ones' load twice).
        return _damp(service, proposal, current=current).note(
            f"continuing a scale-out the step bound cut ({pending_total} instance(s) pending)")
    if pending_total > 0:
        since = min(x for x in (pending_since_s, state.pending_seen_s, now_s) if x is not None)
        if now_s - since < pol.pending_timeout_s:
            return proposal.hold(current=current, reason="hold_pending",
                                 detail=f"{pending_total} instance(s) pending for {now_s - since:.0f}s "
                                        f"(timeout {pol.pending_timeout_s:g}s); wanted {proposal.decode} decode")
        proposal = proposal.note(f"{pending_total} pending past the {pol.pending_timeout_s:g}s timeout, ignored")
    if state.last_scale_out_s is not None and now_s - state.last_scale_out_s < pol.scale_out_cooldown_s:
        return proposal.hold(current=current, reason="hold_cooldown",
                             detail=f"last scale-out {now_s - state.last_scale_out_s:.0f}s ago "
                                    f"(cooldown {pol.scale_out_cooldown_s:g}s); wanted {proposal.decode} decode")
    if (state.ready_s is not None and state.last_scale_out_s is not None and state.ready_s > state.last_scale_out_s
            and now_s - state.ready_s < pol.scale_out_cooldown_s and proposal.reason == "scale_out_tps"):
        return proposal.hold(current=current, reason="hold_cooldown",
                             detail=f"the last scale-out's instances ready {now_s - state.ready_s:.0f}s ago "
                                    f"(cooldown {pol.scale_out_cooldown_s:g}s): their effect is not measured "
                                    f"yet; wanted {proposal.decode} decode")
    return _damp(service, proposal, current=current)


def _stabilize_scale_in(service: "ServiceConfig", proposal: Proposal, *, state: PolicyState, current: int,
                        now_s: float, load_tps: float, tau: float, inputs: dict[str, Any]) -> Proposal:
    """No scale-in on less than a full smoothing and stabilisation window of data; HPA's
    stabilisation window; the damped step; the consolidation check (on the effective τ)."""
    pol = service.policy
    since = state.first_data_s if state.first_data_s is not None else now_s
    # The stabilisation window is a maximum over the recommendations it holds; on fewer
    # than a whole window of them (after a start or a failover) it is not one yet.
    need_s = max(pol.smoothing_window_s, pol.scale_in_stabilization_s)
    if now_s - since < need_s:
        return proposal.hold(current=current, reason="hold_cold_start",
                             detail=f"{now_s - since:.0f}s of data, less than the {need_s:g}s smoothing and "
                                    "stabilisation windows: no scale-in yet")
    backoff = state.backoff
    if backoff is not None and now_s < backoff.until_s and proposal.decode < backoff.floor:
        inputs["scale_in_backoff"] = backoff.why
        if backoff.floor >= current:
            return proposal.hold(current=current, reason="hold_scale_in_backoff",
                                 detail=f"wants {proposal.decode} decode, but {backoff.why} "
                                        f"({backoff.until_s - now_s:.0f}s left)")
        proposal = replace(proposal, decode=backoff.floor).note(backoff.why)
    stable = stabilized_recommendation(state.recommendations, now_s=now_s, window_s=pol.scale_in_stabilization_s)
    stable = current if stable is None else stable
    inputs["stabilized_recommendation"] = stable
    if stable >= current:
        return proposal.hold(current=current, reason="hold_stabilization",
                             detail=f"wants {proposal.decode} decode, but the highest recommendation in the "
                                    f"last {pol.scale_in_stabilization_s:g}s was {stable} (>= {current} now): "
                                    "no scale-in yet")
    proposal = _damp(service, replace(proposal, decode=stable), current=current)
    need = consolidation_decode(load_tps, target_tps_per_instance=tau, margin=pol.consolidation_margin)
    inputs["consolidation_need"] = need
    if need >= current:
        return proposal.hold(current=current, reason="hold_consolidation",
                             detail=f"{current - 1} survivors could not carry {load_tps:.0f} tok/s within "
                                    f"{pol.consolidation_margin:.0%} of target")
    if need > proposal.decode:
        proposal = replace(proposal, decode=need).note(f"consolidation keeps {need}")
    return proposal


def _learn_scale_in_backoff(service: "ServiceConfig", state: PolicyState, *, reason: str, current: PoolCounts,
                            desired: PoolCounts, now_s: float) -> PolicyState:
    """A scale-out soon after a scale-in: that scale-in was a mistake — latency broke
    within ``scale_in_backoff_window_s`` (the two rules undoing each other), or the
    tokens/s came back within ``reversal_window_s`` (a swing the fleet followed down and
    up again: a flap). Keep the size the scale-out restored for a backoff that doubles on
    each repeat, as a crash-loop backoff does; forget it after a calm."""
    pol = service.policy
    old = _expired(state.backoff, now_s)
    state = replace(state, backoff=old) if old is not state.backoff else state
    if desired.decode <= current.decode or state.last_scale_in_s is None:
        return state
    since = now_s - state.last_scale_in_s
    if reason.startswith("latency") and 0 < pol.scale_in_backoff_window_s and since <= pol.scale_in_backoff_window_s:
        what = "latency broke"
    elif reason == "scale_out_tps" and 0 < pol.reversal_window_s and since <= pol.reversal_window_s:
        what = "the load came back"
    else:
        return state
    return replace(state, backoff=_escalate(
        pol, old, floor=desired.decode, now_s=now_s,
        why=lambda floor, backoff_s: f"{what} {since:.0f}s after a scale-in: keeping >= {floor} decode "
                                     f"for {backoff_s:g}s"))


def _expired(old: ScaleInBackoff | None, now_s: float) -> ScaleInBackoff | None:
    """A backoff is forgotten after a calm of twice its length."""
    return None if old is not None and now_s > old.until_s + old.backoff_s else old


def _escalate(pol: "PolicyConfig", old: ScaleInBackoff | None, *, floor: int, now_s: float,
              why: Callable[[int, float], str]) -> ScaleInBackoff:
    """The next backoff: the first one, or twice the last (capped); the floor never lower
    than a still-active one's. ``why(floor, backoff_s)`` words it."""
    backoff_s = pol.scale_in_backoff_s if old is None else min(pol.scale_in_backoff_max_s, 2 * old.backoff_s)
    floor = max(floor, old.floor if old is not None and now_s < old.until_s else 0)
    return ScaleInBackoff(floor=floor, until_s=now_s + backoff_s, backoff_s=backoff_s, why=why(floor, backoff_s))


def prefill_need(service: "ServiceConfig", *, util: float, ready: int) -> int:
    """The prefill instances a measured load needs: ``R`` = mean utilisation × ready
    instances (busy instances' worth), carried at no more than ``prefill_busy_utilization``
    each and with at least ``R + β·√R`` instances (square-root staffing: a small pool
    queues more at the same utilisation)."""
    pol = service.policy
    load = max(0.0, util * ready)
    need = math.ceil(load / pol.prefill_busy_utilization - _EPS) if pol.prefill_busy_utilization else 0
    if pol.prefill_staffing_beta > 0 and load > 0:
        need = max(need, math.ceil(load + pol.prefill_staffing_beta * math.sqrt(load) - _EPS))
    return need


def _learn_prefill_floor(service: "ServiceConfig", state: PolicyState, *, reason: str, observation: Observation,
                         current: PoolCounts, desired: PoolCounts, now_s: float, kv_bound: bool) -> PolicyState:
    """A latency scale-out on a prefill-side breach (TTFT over the SLO, TBT inside it,
    decode not queueing), or on any breach within ``scale_in_backoff_window_s`` of a
    prefill trim: the prefill count it broke at is too few for today's prompts, whatever
    its GPU utilisation says (long prompts queue behind each other on few instances). Not
    while requests wait on their KV transfer (``kv_transfer_bottleneck``): that TTFT is
    the links', not prefill's. Prefill stays above it for ``scale_in_backoff_s``, doubling
    on a repeat (up to ``scale_in_backoff_max_s``); forgotten after a calm of twice that."""
    pol = service.policy
    old = _expired(state.prefill_floor, now_s)
    state = replace(state, prefill_floor=old) if old is not state.prefill_floor else state
    if (pol.scale_in_backoff_window_s <= 0 or not reason.startswith("latency") or desired.prefill <= current.prefill
            or kv_bound):
        return state
    after_trim = state.prefill_trim_s is not None and now_s - state.prefill_trim_s <= pol.scale_in_backoff_window_s
    tbt_ok = (observation.tbt_p90_s is None or not service.slo.tbt_s
              or observation.tbt_p90_s <= service.slo.tbt_s * pol.latency_net.moderate)
    if not (after_trim or (tbt_ok and (observation.decode_waiting or 0) <= 0)):
        return state
    broke_at = current.prefill
    return replace(state, prefill_floor=_escalate(
        pol, old, floor=broke_at + 1, now_s=now_s,
        why=lambda floor, backoff_s: f"TTFT broke at {broke_at} prefill: keeping >= {floor} for {backoff_s:g}s"))


def _prefill_floor(state: PolicyState, now_s: float) -> int:
    floor = state.prefill_floor
    return floor.floor if floor is not None and now_s < floor.until_s else 0


def _keep_prefill_for_its_load(service: "ServiceConfig", desired: PoolCounts, proposal: Proposal, *,
                               observation: Observation, current: PoolCounts, state: PolicyState, now_s: float,
                               inputs: dict[str, Any]) -> tuple[PoolCounts, Proposal]:
    """Prefill never shrinks below what its measured load needs: the prefill pool's GPU
    load (mean utilisation × ready instances) at no more than ``prefill_busy_utilization``
    per instance. Decode still follows its own signal; with the ratio fixed on traffic whose
    prompts outgrew it, the ratio alone would shrink prefill into a TTFT breach."""
    limit = service.policy.prefill_busy_utilization
    util = observation.prefill_gpu_utilization
    ready = observation.pools.ready.prefill
    # Bounds and the GPU budget win: an operator's lower limit is never held off by the floor.
    if (limit is None or util is None or ready <= 0 or desired.prefill >= current.prefill
            or proposal.reason.startswith("bounded")):
        return desired, proposal
    learned = _prefill_floor(state, now_s)
    need = min(current.prefill, max(prefill_need(service, util=util, ready=ready), learned))
    if service.max_prefill is not None:
        need = min(need, service.max_prefill)
    if desired.prefill >= need:
        return desired, proposal
    inputs["prefill_need"] = need
    kept = PoolCounts(prefill=need, decode=desired.decode)
    note = (state.prefill_floor.why if state.prefill_floor is not None and need == learned
            else f"prefill at {util:.0%} GPU on {ready}: keeps {need} (at most {limit:.0%} each)")
    if kept == current:
        return kept, Proposal(decode=current.decode, reason="hold_prefill_busy", keep_prefill=True,
                              detail=f"{proposal.detail}; {note}" if proposal.detail else note)
    return kept, proposal.note(note)


def _trim_idle_prefill(service: "ServiceConfig", state: PolicyState, desired: PoolCounts, proposal: Proposal, *,
                       observation: Observation, current: PoolCounts, ratio: Fraction, now_s: float,
                       inputs: dict[str, Any]) -> tuple[PolicyState, PoolCounts, Proposal]:
    """Prefill that outlived its reason: above the ratio's count for today's decode and
    above what its measured load needs (the floor's arithmetic, ``prefill_busy_utilization``)
    for a whole ``scale_in_stabilization_s``, with latency calm and decode holding, comes
    down towards the larger of the two (``scale_in_prefill``, damped like any scale-in).
    Without it, prefill that a long-prompt hour or the latency net added stays while decode
    sits at its floor. Never while instances start or a scale-in backoff holds; the
    partial-data guard after it still keeps both pools on an incomplete view."""
    pol = service.policy
    limit, util = pol.prefill_busy_utilization, observation.prefill_gpu_utilization
    ready = observation.pools.ready.prefill
    latency = inputs.get("latency_slo_ratio")
    backoff = state.backoff is not None and now_s < state.backoff.until_s
    idle = not (limit is None or util is None or ready != current.prefill or ready <= 0 or desired != current
                or proposal.reason != "hold_tolerance" or observation.pools.pending.total() > 0 or backoff
                or latency is None or latency > pol.adaptive_target.calm_ratio)
    need = prefill_need(service, util=util, ready=ready) if idle else 0
    by_ratio = pools_for_decode(service, current.decode, ratio=ratio).prefill
    floor_ = max(by_ratio, need, _prefill_floor(state, now_s), 1)
    if not idle or floor_ >= current.prefill:
        return replace(state, prefill_idle_since_s=None), desired, proposal
    since = state.prefill_idle_since_s if state.prefill_idle_since_s is not None else now_s
    state = replace(state, prefill_idle_since_s=since)
    if now_s - since < pol.scale_in_stabilization_s:
        return state, desired, proposal
    prefill = damp(current.prefill, floor_, max_out_factor=pol.max_scale_out_factor,
                   max_in_factor=pol.max_scale_in_factor)
    inputs["prefill_need"] = need
    detail = (f"prefill at {util:.0%} GPU on {ready} for {now_s - since:.0f}s needs {need} "
              f"(at most {limit:.0%} each), the ratio {ratio_text(ratio)} wants {by_ratio}: "
              f"prefill {current.prefill} -> {prefill}")
    return (replace(state, prefill_idle_since_s=None), PoolCounts(prefill=prefill, decode=current.decode),
            Proposal(decode=current.decode, reason="scale_in_prefill", detail=detail))


def _damp(service: "ServiceConfig", proposal: Proposal, *, current: int) -> Proposal:
    pol = service.policy
    damped = damp(current, proposal.decode, max_out_factor=pol.max_scale_out_factor,
                  max_in_factor=pol.max_scale_in_factor)
    if damped == proposal.decode:
        return proposal
    return replace(proposal, decode=damped).note(f"step damped {proposal.decode} -> {damped}")


def _apply_bounds(service: "ServiceConfig", proposal: Proposal, *, low: int, high: int,
                  ratio: Fraction) -> Proposal:
    """The decode bounds (or a schedule's), then the GPU budget across both pools."""
    bounded = clamp(proposal.decode, low, high)
    if bounded != proposal.decode:
        proposal = replace(proposal, decode=bounded,
                           reason="bounded_max" if proposal.decode > high else "bounded_min"
                           ).note(f"bounded to [{low}, {high}]")
    budgeted = fit_budget(service, proposal.decode, low=low, ratio=ratio)
    if budgeted != proposal.decode:
        proposal = replace(proposal, decode=budgeted, reason="bounded_budget").note(
            f"GPU budget {service.policy.gpu_budget} allows {budgeted} decode")
    return proposal


def _apply_ratio(service: "ServiceConfig", proposal: Proposal, *, current: PoolCounts,
                 ratio: Fraction) -> tuple[PoolCounts, Proposal]:
    """Prefill follows decode by the ratio in use; a hold keeps today's prefill; a tolerance
    hold whose prefill drifted from the ratio repairs it (``ratio_repair``). While an
    adapted ratio is in use the two pools never move in opposite directions in one
    decision (the ratio catches up over the next ticks)."""
    if proposal.keep_prefill and proposal.decode == current.decode:
        return current, proposal
    desired = pools_for_decode(service, proposal.decode, ratio=ratio)
    adapted = ratio != Fraction(*service.pd_ratio)
    if adapted and ((desired.decode > current.decode and desired.prefill < current.prefill) or (
            desired.decode < current.decode and desired.prefill > current.prefill)):
        desired = PoolCounts(prefill=current.prefill, decode=desired.decode)
        proposal = proposal.note("prefill kept: the pools never move in opposite directions in one step")
    if proposal.reason == "hold_tolerance" and desired.prefill < current.prefill:
        # Prefill above the ratio on a hold is left for the next decode scale-in to take down
        # (through the prefill floor): trimming it on its own is a scale-in nobody asked for.
        return current, proposal
    if proposal.reason == "hold_tolerance" and desired != current:
        proposal = replace(proposal, reason="ratio_repair").note(
            f"prefill {current.prefill} -> {desired.prefill} to keep {ratio_text(ratio)}")
    return desired, proposal


def _watch_ratio(service: "ServiceConfig", state: PolicyState, *, observation: Observation,
                 load_tps: float | None, now_s: float, inputs: dict[str, Any]) -> PolicyState:
    """The P/D ratio drift detector (``core.drift``); its estimate and advice go in the
    decision's inputs."""
    if service.pd_ratio_mode == "fixed":
        return state
    ttft_ratio = (observation.ttft_p90_s / service.slo.ttft_s
                  if observation.ttft_p90_s is not None and service.slo.ttft_s else None)
    tbt_ratio = (observation.tbt_p90_s / service.slo.tbt_s
                 if observation.tbt_p90_s is not None and service.slo.tbt_s else None)
    prefill = observation.prefill_uncached_tps if observation.prefill_uncached_tps is not None \
        else observation.prefill_tps
    drift = observe_drift(state.drift, settings=service.policy.ratio_drift, mode=service.pd_ratio_mode,
                          configured=service.pd_ratio, now_s=now_s, prefill_tps=prefill, decode_tps=load_tps,
                          ttft_ratio=ttft_ratio, tbt_ratio=tbt_ratio, prefill_waiting=observation.prefill_waiting)
    if drift.needed is not None:
        inputs["pd_ratio_needed"] = ratio_text(drift.needed)
    if drift.advice is not None:
        inputs["pd_ratio_advice"] = ratio_text(drift.advice)
    if drift.ratio is not None:
        inputs["pd_ratio_in_use"] = ratio_text(drift.ratio)
    return replace(state, drift=drift)


def _remember(state: PolicyState, *, load_tps: float | None, now_s: float, window_s: float) -> PolicyState:
    kept = tuple(s for s in state.tps_samples if now_s - s[0] < window_s)
    if load_tps is not None:
        # The newest sample always counts, even with a zero-length window.
        kept = tuple(s for s in kept if s[0] < now_s) + ((now_s, load_tps),)
        if state.first_data_s is None:
            state = replace(state, first_data_s=now_s)
    return replace(state, tps_samples=kept)


def _trim_recs(recs: tuple[tuple[float, int], ...], *, now_s: float,
               window_s: float) -> tuple[tuple[float, int], ...]:
    return tuple(r for r in recs if now_s - r[0] <= window_s)


def _track_pending(state: PolicyState, *, observation: Observation, now_s: float) -> PolicyState:
    if observation.pools.pending.total() <= 0:
        # The tick the last pending instance was seen ready: the new capacity's effect on
        # queues and rates shows only from here (the scale-out cooldown counts from it).
        return replace(state, pending_seen_s=None, ready_s=now_s) if state.pending_seen_s is not None else state
    if state.pending_seen_s is None:
        return replace(state, pending_seen_s=now_s)
    return state


def _window(entry: "ScheduleEntry") -> str:
    return (f"{entry.start_min // 60:02d}:{entry.start_min % 60:02d}-"
            f"{entry.end_min // 60:02d}:{entry.end_min % 60:02d}")
