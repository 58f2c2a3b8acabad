"""Drive a ``Cluster`` through a workload under a scaling controller (pure).

Owns the replay loop and the per-policy result: every ``interval_s`` of simulated
time it builds what the coordinator would see — every ready instance's sidecar
report (``simulator/model/sidecars.py``), pooled by the coordinator's own
``heteroscale.coordinator.core.aggregate.aggregate`` into an ``Observation`` —
hands it to the controller, and applies the counts it returns.
It also turns the run into the summary figures (GPU-hours, utilisation, SM
activity, latency quantiles, SLO attainment, scaling actions, reversals) and
per-minute series for plots. Time is simulated; a ``progress`` callback is how a
caller shows a progress bar (this module never prints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from heteroscale.coordinator.core import aggregate as coord_aggregate
from heteroscale.coordinator.core.settings import RoleConfig, ServiceConfig
from heteroscale.coordinator.core.types import Observation, PoolCounts, PoolStatus
from heteroscale.simulator import perfmodel as pm
from heteroscale.simulator.model.cluster import Cluster, ClusterSpec
from heteroscale.simulator.model.sidecars import Sidecars
from heteroscale.simulator.placement import Placement
from heteroscale.simulator.traces import Workload


@dataclass(frozen=True)
class Window:
    """Sidecar-like measurements over the last ``window_s`` seconds, summed over a role's
    ready instances (rates in tokens/s, latencies in seconds, utilisation 0..1)."""

    now_s: float
    window_s: float
    prefill_tps: float
    prefill_uncached_tps: float
    decode_tps: float
    ttft_p90_s: float | None
    tbt_p90_s: float | None
    prefill_gpu_util: float
    decode_gpu_util: float
    prefill_sm: float
    decode_sm: float


class Controller(Protocol):
    """A scaling policy as the simulator runs it: window + pools in, desired counts out."""

    name: str

    def step(self, *, now_s: float, window: Window, observation: Observation) -> PoolCounts:
        ...


@dataclass(frozen=True)
class RunSettings:
    """interval_s: policy tick (the coordinator's ``interval_s``);
    window_s: the sidecars' rate/quantile window; duration_s: simulated seconds (default:
    the workload's span + 60 s); seed: the cluster's and the sidecars' random draws;
    slo_ttft_s / slo_tbt_s: for SLO attainment; report_loss: share of sidecar pulls lost
    (0..1, seeded), each a ``timeout`` the coordinator's ``aggregate`` excludes."""

    interval_s: float = 15.0
    window_s: float = 30.0
    duration_s: float | None = None
    seed: int = 0
    slo_ttft_s: float | None = None
    slo_tbt_s: float | None = None
    report_loss: float = 0.0


@dataclass
class RunResult:
    policy: str
    summary: dict[str, Any]
    series: dict[str, np.ndarray] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)


def simulate(workload: Workload, spec: ClusterSpec, controller: Controller, *,
             settings: RunSettings, initial: PoolCounts,
             placement: Placement | None = None, service: ServiceConfig | None = None,
             progress: Callable[[float], None] | None = None) -> RunResult:
    """Replay ``workload`` through the cluster under ``controller``; see module docstring.

    With ``placement`` every change of counts goes through the coordinator's placement
    planner first: the cluster gets what was placed, and the KV cross-switch share
    follows the Deployment Groups. ``service`` (default: the controller's, else a neutral
    one) is what the coordinator's ``aggregate`` judges the sidecar reports against."""
    if placement is not None:
        initial = placement.apply(initial)
    duration = settings.duration_s if settings.duration_s is not None else workload.duration_s + 60.0
    duration = math.ceil(duration / spec.tick_s - 1e-9) * spec.tick_s   # whole decode ticks
    horizon = duration + 1.0
    cluster = Cluster(spec, workload, horizon_s=horizon, initial_prefill=initial.prefill,
                      initial_decode=initial.decode, seed=settings.seed)
    if placement is not None:
        placement.realise(cluster, now_s=0.0)
        cluster.cross_share = placement.cross_switch_share()
    service = service or getattr(controller, "service", None) or _neutral_service()
    sidecars = Sidecars(cluster, service_name=service.name, window_s=settings.window_s,
                        report_loss=settings.report_loss, seed=settings.seed)
    arrivals = workload.arrival_s
    n = int(np.searchsorted(arrivals, duration))
    nxt = 0
    decisions: list[dict[str, Any]] = []
    t = 0.0
    interval = settings.interval_s
    while t < duration - 1e-9:
        t_end = min(duration, t + max(interval, spec.tick_s))
        nxt = min(n, int(np.searchsorted(arrivals, t_end, side="left")))
        cluster.submit_through(nxt)
        cluster.advance_to(t_end)
        t = cluster.now_s
        window = _window(cluster, sidecars, t, settings.window_s)
        fetched = sidecars.reports(t)
        obs = coord_aggregate.aggregate(service, fetched, pools=pool_status(cluster, t), now_s=t)
        if placement is not None:
            placement.measure([f.report for f in fetched if f.report is not None], cluster, now_s=t)
        desired = controller.step(now_s=t, window=window, observation=obs)
        if desired != obs.pools.current:
            placed = desired if placement is None else placement.apply(desired)
            if placement is not None and placed == obs.pools.current:
                placement.realise(cluster, now_s=t)      # counts unchanged (a shortfall): keep to the plan
            if placed != obs.pools.current:
                entry = {"at": round(t, 1), "from": obs.pools.current.as_dict(), "to": placed.as_dict()}
                if placed != desired:
                    entry["asked"] = desired.as_dict()
                decisions.append(entry)
                if placement is None:
                    cluster.set_counts(placed.prefill, placed.decode, now_s=t)
                else:
                    placement.realise(cluster, now_s=t)
                    cluster.cross_share = placement.cross_switch_share()
        if progress is not None:
            progress(min(1.0, t / duration))
    cluster.rec.finish()
    summary = _summary(cluster, settings, duration, decisions, nxt)
    if settings.report_loss > 0:
        summary["reports_lost"] = sidecars.lost
        summary["reports_sent"] = sidecars.sent
    if placement is not None:
        summary["placement"] = {"plans": placement.plans, "plans_with_shortfall": placement.shortfalls,
                                "deployment_groups": len(placement.groups),
                                "bandwidth_aware": placement.bandwidth_aware,
                                "plans_with_bandwidth_hints": placement.plans_with_hints,
                                "instances_started_by_switch": {
                                    str(k): v for k, v in sorted(placement.started_by_switch.items())},
                                "instance_hours_by_switch": _hours_by_switch(cluster, duration)}
    reasons = getattr(controller, "reasons", None)      # the coordinator policy's reason counts
    if reasons:
        summary["decision_reasons"] = dict(sorted(reasons.items()))
    return RunResult(controller.name, summary, _series(cluster, duration), decisions)


def _hours_by_switch(cluster: Cluster, end_s: float) -> dict[str, float]:
    """Instance-hours held under each S1 switch (placed instances only)."""
    out: dict[str, float] = {}
    for inst in (*cluster.retired, *cluster.prefill, *cluster.decode):
        if inst.switch is None or inst.placed_s is None:
            continue
        until = inst.removed_s if inst.removed_s is not None else end_s
        key = str(inst.switch)
        out[key] = out.get(key, 0.0) + max(0.0, min(until, end_s) - inst.placed_s) / 3600.0
    return {k: round(v, 3) for k, v in sorted(out.items())}


def _neutral_service() -> ServiceConfig:
    """The service a run without one is judged as: default policy settings."""
    return ServiceConfig(name="simulated", pd_ratio=(1, 1), target_decode_tps_per_instance=1.0,
                         prefill=RoleConfig(), decode=RoleConfig())


def _window(cluster: Cluster, sidecars: Sidecars, now_s: float, window_s: float) -> Window:
    rec = cluster.rec
    hi = min(int(now_s), rec.seconds)
    lo = max(0, hi - int(window_s))
    span = max(1, hi - lo)
    sl = slice(lo, hi)
    # Sidecars report per ready instance; the coordinator sums them.
    p_inst = max(1e-9, cluster.instance_seconds("prefill", lo_s=lo, hi_s=hi, ready_only=True))
    d_inst = max(1e-9, cluster.instance_seconds("decode", lo_s=lo, hi_s=hi, ready_only=True))
    p_busy = sum(rec.prefill_busy_s[sl]) / p_inst
    d_active = sum(rec.decode_active_s[sl]) / d_inst
    d_compute = sum(rec.decode_compute_s[sl]) / max(1e-9, sum(rec.decode_active_s[sl]))
    eff = cluster.spec.decode.eff
    ttft_p90, tbt_p90 = sidecars.pooled_latency_p90(now_s)
    return Window(
        now_s=now_s, window_s=window_s,
        prefill_tps=sum(rec.prefill_tokens[sl]) / span,
        prefill_uncached_tps=sum(rec.prefill_uncached_tokens[sl]) / span,
        decode_tps=sum(rec.decode_tokens[sl]) / span,
        ttft_p90_s=ttft_p90, tbt_p90_s=tbt_p90,
        prefill_gpu_util=pm.gpu_utilization("prefill", busy_fraction=p_busy, eff=eff),
        decode_gpu_util=pm.gpu_utilization("decode", busy_fraction=d_active, eff=eff),
        prefill_sm=pm.sm_activity("prefill", busy_fraction=p_busy, eff=eff),
        decode_sm=pm.sm_activity("decode", busy_fraction=d_active, compute_share=d_compute, eff=eff),
    )


def pool_status(cluster: Cluster, now_s: float) -> PoolStatus:
    current = PoolCounts(*cluster.counts())
    ready = PoolCounts(*cluster.ready_counts(now_s))
    pending = PoolCounts(current.prefill - ready.prefill, current.decode - ready.decode)
    starting = [x.created_s for x in (*cluster.prefill, *cluster.decode)
                if x.accepting and x.ready_s > now_s]
    return PoolStatus(current=current, ready=ready, pending=pending,
                      pending_since_s=min(starting) if starting else None)


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    v = values[~np.isnan(values)]
    if not len(v):
        return {"p50": None, "p90": None, "p99": None}
    q = np.percentile(v, [50, 90, 99])
    return {"p50": round(float(q[0]), 4), "p90": round(float(q[1]), 4), "p99": round(float(q[2]), 4)}


def _reversals(decisions: list[dict[str, Any]]) -> int:
    dirs = []
    for d in decisions:
        delta = sum(d["to"].values()) - sum(d["from"].values())
        if delta:
            dirs.append(1 if delta > 0 else -1)
    return sum(1 for a, b in zip(dirs, dirs[1:]) if a != b)


def _summary(cluster: Cluster, settings: RunSettings, duration: float,
             decisions: list[dict[str, Any]], submitted: int) -> dict[str, Any]:
    rec = cluster.rec
    end = int(duration)
    sl = slice(0, end)
    p_gs, d_gs = cluster.gpu_seconds(duration)
    p_inst = max(1e-9, cluster.instance_seconds("prefill", lo_s=0.0, hi_s=duration))
    d_inst = max(1e-9, cluster.instance_seconds("decode", lo_s=0.0, hi_s=duration))
    p_busy = float(rec.prefill_busy_s[sl].sum() / p_inst)
    d_active = float(rec.decode_active_s[sl].sum() / d_inst)
    d_compute = float(rec.decode_compute_s[sl].sum() / max(1e-9, rec.decode_active_s[sl].sum()))
    eff = cluster.spec.decode.eff
    ttft = cluster.ttft_s[:submitted].copy()
    # A request still waiting for its first token at the end has waited at least this long.
    waiting = np.isnan(ttft)
    ttft[waiting] = duration - cluster.arrival_s[:submitted][waiting]
    tbt = cluster.tbt_s[:submitted]
    ok = ~np.isnan(tbt)
    if settings.slo_ttft_s is not None:
        ok &= ttft <= settings.slo_ttft_s
    if settings.slo_tbt_s is not None:
        ok &= tbt <= settings.slo_tbt_s
    t_q, b_q = _quantiles(ttft), _quantiles(tbt)
    return {
        "requests": int(submitted),
        "completed": int((~np.isnan(tbt)).sum()),
        "duration_s": round(duration, 1),
        "gpu_hours": round((p_gs + d_gs) / 3600.0, 3),
        "gpu_hours_by_role": {"prefill": round(p_gs / 3600.0, 3), "decode": round(d_gs / 3600.0, 3)},
        "mean_instances": {"prefill": round(float(p_inst) / max(1, end), 3),
                           "decode": round(float(d_inst) / max(1, end), 3)},
        "mean_gpu_utilization": {
            "prefill": round(pm.gpu_utilization("prefill", busy_fraction=p_busy, eff=eff), 4),
            "decode": round(pm.gpu_utilization("decode", busy_fraction=d_active, eff=eff), 4)},
        "mean_sm_activity": {
            "prefill": round(pm.sm_activity("prefill", busy_fraction=p_busy, eff=eff), 4),
            "decode": round(pm.sm_activity("decode", busy_fraction=d_active, compute_share=d_compute,
                                           eff=eff), 4)},
        "slo_attainment": round(float(ok.sum() / max(1, submitted)), 4),
        "ttft_s": t_q, "tbt_s": b_q,
        "ttft_p90_s": t_q["p90"], "tbt_p90_s": b_q["p90"],
        "scaling_actions": len(decisions),
        "direction_reversals": _reversals(decisions),
        "preemptions": int(cluster.preemptions),
        "prefill_stalls": int(cluster.prefill_stalls),
        "kv_transfer_wait_s": round(cluster.links.queued_s / max(1, cluster.links.transfers), 4),
        "cross_switch_transfer_share": round(cluster.cross_transfers / max(1, submitted), 4),
        "degraded_transfer_share": round(cluster.links.degraded_transfers / max(1, cluster.links.transfers), 4),
        "decode_tokens": round(float(rec.decode_tokens[sl].sum()), 0),
        "prefill_tokens": round(float(rec.prefill_tokens[sl].sum()), 0),
        "prefill_uncached_tokens": round(float(rec.prefill_uncached_tokens[sl].sum()), 0),
        "prefix_hit_ratio": round(float(1.0 - rec.prefill_uncached_tokens[sl].sum()
                                        / max(1.0, rec.prefill_tokens[sl].sum())), 4),
    }


def _series(cluster: Cluster, duration: float) -> dict[str, np.ndarray]:
    """Per-minute means (finer bins for runs under 10 minutes): load, instances,
    utilisation, SM activity, latency p90."""
    rec = cluster.rec
    end = int(duration)
    bin_s = 60 if end >= 600 else max(1, end // 10)
    nb = max(1, end // bin_s)
    cut = nb * bin_s

    def per_bin(arr: np.ndarray) -> np.ndarray:
        return arr[:cut].reshape(nb, bin_s).sum(axis=1)

    eff = cluster.spec.decode.eff
    p_inst = per_bin(cluster.instance_series("prefill", rec.seconds))
    d_inst = per_bin(cluster.instance_series("decode", rec.seconds))
    p_busy = per_bin(rec.prefill_busy_s) / np.maximum(p_inst, 1e-9)
    d_active = per_bin(rec.decode_active_s) / np.maximum(d_inst, 1e-9)
    d_comp = per_bin(rec.decode_compute_s) / np.maximum(per_bin(rec.decode_active_s), 1e-9)
    out = {
        "t_h": (np.arange(nb) * bin_s + bin_s / 2) / 3600.0,
        "arrival_rps": per_bin(rec.arrivals) / bin_s,
        "prefill_tps": per_bin(rec.prefill_tokens) / bin_s,
        "prefill_uncached_tps": per_bin(rec.prefill_uncached_tokens) / bin_s,
        "decode_tps": per_bin(rec.decode_tokens) / bin_s,
        "prefill_instances": p_inst / bin_s,
        "decode_instances": d_inst / bin_s,
        "prefill_gpu_util": np.array([pm.gpu_utilization("prefill", busy_fraction=float(b), eff=eff)
                                      for b in p_busy]),
        "decode_gpu_util": np.array([pm.gpu_utilization("decode", busy_fraction=float(b), eff=eff)
                                     for b in d_active]),
        "prefill_sm": np.array([pm.sm_activity("prefill", busy_fraction=float(b), eff=eff)
                                for b in p_busy]),
        "decode_sm": np.array([pm.sm_activity("decode", busy_fraction=float(b),
                                              compute_share=float(c), eff=eff)
                               for b, c in zip(d_active, d_comp)]),
    }
    out["ttft_p90_s"], out["tbt_p90_s"] = _latency_series(cluster, nb, bin_s)
    out["gpus"] = (out["prefill_instances"] * cluster.spec.prefill.tp
                   + out["decode_instances"] * cluster.spec.decode.tp)
    return out


def _latency_series(cluster: Cluster, nb: int, bin_s: int) -> tuple[np.ndarray, np.ndarray]:
    res = []
    for times, vals in ((cluster.first_token_s, cluster.ttft_s), (cluster.done_s, cluster.tbt_s)):
        ok = ~np.isnan(times)
        idx = (times[ok] // bin_s).astype(np.int64)
        v = vals[ok]
        keep = idx < nb
        idx, v = idx[keep], v[keep]
        out = np.full(nb, np.nan)
        if len(v):
            order = np.argsort(idx, kind="stable")
            idx, v = idx[order], v[order]
            bounds = np.searchsorted(idx, np.arange(nb + 1))
            for b in range(nb):
                lo, hi = bounds[b], bounds[b + 1]
                if hi > lo:
                    out[b] = np.percentile(v[lo:hi], 90)
        res.append(out)
    return res[0], res[1]

