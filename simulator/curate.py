"""Policy curation: the pressure test and Algorithm 1 of the paper (PAPER §5.1).

``pressure_test`` sweeps P/D splits of a fixed instance count. For each split it
finds, by bisection on a constant Poisson arrival rate, the highest load at which
p90 TTFT and p90 TBT (measured after a warm-up) stay within the SLO, and records
the prefill and decode tokens/s served there ("throughput within SLO"). The best
split gives the ratio ``r``; its decode tokens/s per decode instance times a
safety ``margin`` gives the proportional target ``τ`` (the paper's m̂). The same
split's uncached prompt tokens/s per prefill instance times the margin is the prefill
target an operator would give the ``independent-tps`` baseline
(``prefill_target_tps_per_instance``; ``policies.from_pressure_test``).

``curate`` then simulates every candidate policy on the workload with that ``r``
and ``τ`` and picks the best (Algorithm 1): the fewest GPU-hours among policies
whose SLO attainment reaches ``slo_goal``; if none does, the highest attainment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from heteroscale.coordinator.core.settings import ServiceConfig
from heteroscale.coordinator.core.types import PoolCounts
from heteroscale.simulator import perfmodel as pm
from heteroscale.simulator import policies, traces
from heteroscale.simulator.model.cluster import ClusterSpec
from heteroscale.simulator.model.runner import RunResult, RunSettings, simulate
from heteroscale.simulator.placement import Placement
from heteroscale.simulator.traces import Workload


@dataclass(frozen=True)
class PressureSettings:
    """duration_s: simulated seconds per probe; warmup_s: ignored at the start of a probe;
    iterations: bisection steps per split; margin: τ = margin × best decode tps per instance."""

    duration_s: float = 240.0
    warmup_s: float = 60.0
    iterations: int = 9
    margin: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class RatioPoint:
    prefill: int
    decode: int
    max_rps: float
    prefill_tps: float
    decode_tps: float
    prefill_uncached_tps: float
    ttft_p90_s: float | None
    tbt_p90_s: float | None
    prefill_gpu_util: float
    decode_gpu_util: float
    prefill_sm: float
    decode_sm: float
    limited_by: str

    @property
    def label(self) -> str:
        return f"{self.prefill}P{self.decode}D"

    def as_dict(self) -> dict[str, Any]:
        return {"ratio": self.label, "prefill": self.prefill, "decode": self.decode,
                "max_rps_within_slo": round(self.max_rps, 3),
                "prefill_tps": round(self.prefill_tps, 1), "decode_tps": round(self.decode_tps, 1),
                "prefill_uncached_tps": round(self.prefill_uncached_tps, 1),
                "ttft_p90_s": _r(self.ttft_p90_s), "tbt_p90_s": _r(self.tbt_p90_s),
                "prefill_gpu_util": round(self.prefill_gpu_util, 4),
                "decode_gpu_util": round(self.decode_gpu_util, 4),
                "prefill_sm_activity": round(self.prefill_sm, 4),
                "decode_sm_activity": round(self.decode_sm, 4), "limited_by": self.limited_by}


def ratio_splits(total: int, *, low_prefill: int | None = None,
                 high_prefill: int | None = None) -> list[tuple[int, int]]:
    """(P, D) splits of ``total`` from ``low_prefill`` to ``high_prefill`` prefill instances."""
    lo = low_prefill if low_prefill is not None else max(1, total // 4)
    hi = high_prefill if high_prefill is not None else total - max(1, total // 4)
    return [(p, total - p) for p in range(max(1, lo), min(total - 1, hi) + 1)]


def _probe(spec: ClusterSpec, source: Workload, split: tuple[int, int], rate: float, *,
           service: ServiceConfig, ps: PressureSettings) -> tuple[bool, dict[str, Any], str]:
    wl = traces.poisson(source, rate_rps=rate, duration_s=ps.duration_s, seed=ps.seed)
    counts = PoolCounts(*split)
    res = simulate(wl, spec, policies.Static("probe", counts),
                   settings=RunSettings(duration_s=ps.duration_s, seed=ps.seed,
                                        slo_ttft_s=service.slo.ttft_s, slo_tbt_s=service.slo.tbt_s),
                   initial=counts)
    s = res.series
    keep = s["t_h"] * 3600.0 >= ps.warmup_s
    ttft = float(np.nanmax(s["ttft_p90_s"][keep])) if keep.any() and not np.isnan(s["ttft_p90_s"][keep]).all() else None
    tbt = float(np.nanmax(s["tbt_p90_s"][keep])) if keep.any() and not np.isnan(s["tbt_p90_s"][keep]).all() else None
    completed_share = res.summary["completed"] / max(1, res.summary["requests"])
    enough = res.summary["completed"] >= 50          # a p90 over a handful of requests means nothing
    ttft_ok = ttft is not None and (service.slo.ttft_s is None or ttft <= service.slo.ttft_s)
    tbt_ok = tbt is not None and (service.slo.tbt_s is None or tbt <= service.slo.tbt_s)
    limited = "" if ttft_ok and tbt_ok else ("prefill (TTFT)" if not ttft_ok else "decode (TBT)")
    obs = {
        "prefill_tps": float(s["prefill_tps"][keep].mean()), "decode_tps": float(s["decode_tps"][keep].mean()),
        "prefill_uncached_tps": float(s["prefill_uncached_tps"][keep].mean()),
        "ttft": ttft, "tbt": tbt,
        "pu": float(s["prefill_gpu_util"][keep].mean()), "du": float(s["decode_gpu_util"][keep].mean()),
        "ps": float(s["prefill_sm"][keep].mean()), "ds": float(s["decode_sm"][keep].mean()),
    }
    return ttft_ok and tbt_ok and completed_share > 0.9 and enough, obs, limited


def max_rate_within_slo(spec: ClusterSpec, source: Workload, split: tuple[int, int], *,
                        service: ServiceConfig, ps: PressureSettings) -> RatioPoint:
    """Bisection on the arrival rate for one (P, D) split."""
    p_time = float(sum(spec.prefill.prefill_time_s(int(x)) for x in source.prompt_tokens[:200]) / min(200, len(source)))
    hi = 2.0 * split[0] / max(p_time, 1e-6)          # twice the prefill pool's raw capacity
    lo = 0.0
    best = None
    last_limit = "prefill (TTFT)"
    for _ in range(ps.iterations):
        mid = (lo + hi) / 2.0
        ok, obs, limited = _probe(spec, source, split, mid, service=service, ps=ps)
        if ok:
            lo, best = mid, obs
        else:
            hi, last_limit = mid, limited or "incomplete"
    if best is None:
        best = {"prefill_tps": 0.0, "decode_tps": 0.0, "prefill_uncached_tps": 0.0, "ttft": None, "tbt": None,
                "pu": 0.0, "du": 0.0, "ps": 0.0, "ds": 0.0}
    return RatioPoint(split[0], split[1], lo, best["prefill_tps"], best["decode_tps"],
                      best["prefill_uncached_tps"], best["ttft"],
                      best["tbt"], best["pu"], best["du"], best["ps"], best["ds"], last_limit)


def pressure_test(spec: ClusterSpec, source: Workload, *, service: ServiceConfig,
                  splits: Sequence[tuple[int, int]], ps: PressureSettings = PressureSettings(),
                  progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Sweep ``splits``; return points, the best split, its ratio and τ."""
    points = []
    for i, split in enumerate(splits):
        points.append(max_rate_within_slo(spec, source, split, service=service, ps=ps))
        if progress is not None:
            progress((i + 1) / len(splits))
    best = max(points, key=lambda pt: (pt.decode_tps, pt.prefill_tps))
    tau = ps.margin * best.decode_tps / best.decode if best.decode else 0.0
    tau_p = ps.margin * best.prefill_uncached_tps / best.prefill if best.prefill else 0.0
    return {"points": [pt.as_dict() for pt in points], "best": best.label,
            "pd_ratio": f"{best.prefill}:{best.decode}",
            "target_decode_tps_per_instance": round(tau, 1),
            "prefill_target_tps_per_instance": round(tau_p, 1), "margin": ps.margin,
            "feasible": best.max_rps > 0 and tau > 0,
            "unloaded_ttft_p90_s": round(unloaded_ttft_p90_s(spec, source), 4)}


def unloaded_ttft_p90_s(spec: ClusterSpec, source: Workload) -> float:
    """p90 of prefill + KV-transfer time with no queueing: the floor no load can beat."""
    p = spec.prefill
    prefill = pm.prefill_times_s(p.model, p.gpu, p.tp, source.prompt_tokens, source.cached_tokens, eff=p.eff)
    kv = source.prompt_tokens * pm.kv_bytes_per_token(spec.decode.model) * 8.0 / (spec.kv_link_gbps * 1e9)
    return float(np.percentile(prefill + kv, 90))


def score(summary: dict[str, Any], slo_goal: float) -> tuple[int, float]:
    """Higher is better: meeting the SLO goal first, then fewer GPU-hours (or more attainment)."""
    if summary["slo_attainment"] >= slo_goal:
        return (1, -summary["gpu_hours"])
    return (0, summary["slo_attainment"])


def curate(spec: ClusterSpec, workload: Workload, *, service: ServiceConfig,
           pressure: dict[str, Any], candidates: Sequence[str], settings: RunSettings,
           slo_goal: float, baselines: policies.BaselineSettings = policies.BaselineSettings(),
           placement_for: Callable[[ServiceConfig], Placement | None] | None = None,
           progress: Callable[[str, float], None] | None = None) -> tuple[ServiceConfig, dict[str, RunResult], str]:
    """Algorithm 1: simulate each candidate with the pressure test's r and τ; pick the best.

    The baselines are configured from the same pressure test (``independent-tps``'s
    prefill and decode targets: ``policies.from_pressure_test``), the rest from ``baselines``."""
    baselines = policies.from_pressure_test(pressure, baselines)
    p, d = (int(x) for x in pressure["pd_ratio"].split(":"))
    tuned = replace(service, pd_ratio=(p, d),
                    target_decode_tps_per_instance=max(1.0, pressure["target_decode_tps_per_instance"]))
    results: dict[str, RunResult] = {}
    for name in candidates:
        ctl = policies.build(name, service=tuned, workload=workload, baselines=baselines)
        start = policies.counts_for_tps(tuned, float(policies.peak_decode_tps(workload)[:1].max()), 1.2)
        results[name] = simulate(workload, spec, ctl, settings=settings, initial=start, service=tuned,
                                 placement=None if placement_for is None else placement_for(tuned),
                                 progress=None if progress is None else (lambda f, n=name: progress(n, f)))
        if getattr(ctl, "oracle", False):
            results[name].summary["oracle_sized"] = True
    best = max(results, key=lambda n: score(results[n].summary, slo_goal))
    return tuned, results, best


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
