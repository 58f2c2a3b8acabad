"""Benchmark: the scaling policies side by side on curated days (issue #14's yardstick).

Every policy runs on the same simulated days with the same hardware; every policy's
settings come from ``curate``'s pressure test on a *tuning* source — the day's first
hour, or the recorded trace a day is built from — never from the day being reported:

* ``heteroscale`` / ``heteroscale-adapt``: ratio r and target τ from the pressure test
  (``-adapt``: the same with ``pd_ratio_mode: adapt``);
* ``independent-tps``: its prefill and decode targets from the same pressure test;
* ``hpa-gpu-util`` (70% GPU utilisation, HPA's 10% tolerance and 300 s scale-down window),
  ``latency-only`` (0.8 × SLO): documented defaults;
* ``static-peak`` / ``periodic``: sized from *yesterday* (the same day built with
  another seed): its peak, its hourly peaks.

Days (``--days`` takes keys or their letters; each is tagged ``tune`` or ``held_out``:
the lead tunes the policy only on ``tune`` days and judges it on ``held_out`` ones):

* ``a-drift`` (tune): chat (Azure conversation sizes) → RAG (Azure code sizes: long
  prompts, short answers) → agent (conversation prompts ×1.5, answers ×3) over a diurnal
  day; curated on its first hour (chat only).
* ``b-cache`` (held_out): Mooncake sample sizes; the prefix-cache share of prompt
  tokens swings 10% → 70% → 20% → 80% over the day; curated on its first hour.
* ``c-dialogue`` (held_out): the dialogue day of docs/reproductions/ (32B, 2×A100
  prefill, 2×H20 decode, Azure conversation sizes kept in trace order, peak 60 req/s);
  curated on the recorded Azure hour.
* ``d-small`` (tune), ``d-medium`` (held_out), ``d-large`` (tune): 30 minutes of
  stationary Poisson load (BurstGPT sample sizes) at ~2.5, ~8 and ~24 decode
  instances' worth of τ; curated on the BurstGPT sample.
* ``f-swing`` (tune): Azure conversation sizes kept in trace order on the 8B hardware
  of a/b, peak 120 req/s: the trace's own size drift makes decode demand swing ±20%
  within tens of minutes on top of the diurnal shape (the flapping case); curated on
  the recorded Azure hour.
* ``e-step`` (tune): a generated mix (prompts 2,000 ± 50%, outputs 300 ± 50%) at ~3
  decode instances' worth for 20 minutes, then 3× for 40; curated on that mix.

Metrics per policy per day: GPU-hours and their ratio to static-peak; SLO attainment
(share of requests with TTFT and mean TBT within the SLO; the run continues 300 s past
the last arrival so that requests in flight can finish); the share of minutes whose
p90 TTFT / p90 TBT is within its SLO (the runner reports attainment per request only
for both together); direction reversals, in total and per 2 hours; for the step, the
time from the step to the first scale-out and to the SLO restored (the start of the
first 5 consecutive minutes with both p90s within the SLO after the first breach; 0
when nothing breached).

    .venv/bin/python benchmarks/control_bench.py [--quick] [--days a,c] [--replace | --out PATH]

``--quick`` compresses the diurnal days to 3 hours (the same profile and drift, rate
kept), the stationary days to 10 minutes and the step to 10 + 20 minutes, with a
smaller pressure test: a few CPU-minutes in all. Results go through
``benchmarks/record.py`` (``--replace`` writes benchmarks/results/control.json, merging
days not rerun, and re-renders docs/control.md). A benchmark never fails on its numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

import record

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from heteroscale.coordinator.core.settings import ServiceConfig  # noqa: E402
from heteroscale.simulator import curate as curation  # noqa: E402
from heteroscale.simulator import figures, policies, traces  # noqa: E402
from heteroscale.simulator.config import SimConfig, load_sim_config  # noqa: E402
from heteroscale.simulator.curate import PressureSettings  # noqa: E402
from heteroscale.simulator.model.runner import RunResult, RunSettings, simulate  # noqa: E402
from heteroscale.simulator.traces import Workload  # noqa: E402

TRACES = REPO.parent / "shared" / "traces"
DATA = REPO / "tests" / "data"
DRAIN_S = 300.0
POLICIES = ("heteroscale", "heteroscale-adapt", "independent-tps", "hpa-gpu-util", "latency-only",
            "static-peak", "periodic")

SMALL = """
coordinator: {interval_s: 15}
services:
  - name: bench
    pd_ratio: "1:1"
    target_decode_tps_per_instance: 1000
    slo: {ttft_s: 1.0, tbt_s: 0.04}
    max_decode: 64
    prefill: {gpus_per_instance: 1}
    decode: {gpus_per_instance: 1}
simulation:
  model: 8b
  prefill: {gpu: L40S, tp: 1}
  decode: {gpu: H20, tp: 1}
  startup_s: 120
"""


@dataclass(frozen=True)
class Day:
    key: str
    tag: str
    title: str
    sources: str
    config: str                                    # YAML text or a path under the repo
    duration_s: Callable[[bool], float]
    build: Callable[[int, bool, float], Workload]  # (seed, quick, τ) -> the day
    tuning: Callable[[bool], Workload]             # (quick) -> what curate's pressure test runs on
    tuning_label: str
    step_s: Callable[[bool], float] | None = None


# ------------------------------------------------------------------ sources and day builders

def _load(name: str) -> Workload:
    path = TRACES / name if name.startswith("Azure") else DATA / name
    return traces.load_trace(path)


def _compress(day: Workload, factor: float) -> Workload:
    """A 24-hour day squeezed into 24/factor hours (its rates kept by building it at peak/factor)."""
    return Workload(day.name, day.arrival_s / factor, day.prompt_tokens, day.output_tokens, day.cached_tokens,
                    day.block_hashes)


def _diurnal(source: Workload, *, peak_rps: float, seed: int, quick: bool, order: str = "keep",
             drift: traces.Drift | None = None) -> Workload:
    factor = 8.0 if quick else 1.0
    day = traces.diurnal_day(source, peak_rps=peak_rps / factor, duration_h=24.0, seed=seed, order=order)
    if drift is not None:
        day = traces.apply_drift(day, drift)
    return _compress(day, factor) if quick else day


def _phase_mix(day: Workload, phases: list[tuple[Workload, tuple[float, ...]]], *, seed: int,
               hours_per_day: float) -> Workload:
    """Give each arrival the sizes of a phase drawn by its hourly weight (24 weights per phase,
    interpolated), a request of that phase's source picked at random."""
    rng = np.random.default_rng(seed + 7)
    hour = (day.arrival_s / 3600.0) * (24.0 / hours_per_day)
    xs = np.arange(25)
    w = np.stack([np.interp(hour, xs, np.append(np.asarray(ws), ws[0])) for _, ws in phases])
    w = w / w.sum(axis=0)
    which = (rng.random(len(day))[None, :] > np.cumsum(w, axis=0)).sum(axis=0)
    prompt, out, cached = day.prompt_tokens.copy(), day.output_tokens.copy(), day.cached_tokens.copy()
    for k, (src, _) in enumerate(phases):
        sel = np.flatnonzero(which == k)
        pick = rng.integers(0, len(src), len(sel))
        prompt[sel], out[sel], cached[sel] = src.prompt_tokens[pick], src.output_tokens[pick], src.cached_tokens[pick]
    return Workload(f"{day.name}-mix", day.arrival_s, prompt, out, cached)


def _hours(*pairs: tuple[float, float]) -> tuple[float, ...]:
    """24 hourly weights from (hour, weight) points, linear between them, wrapping."""
    hs = [h for h, _ in pairs] + [pairs[0][0] + 24]
    vs = [v for _, v in pairs] + [pairs[0][1]]
    return tuple(float(np.interp(h if h >= hs[0] else h + 24, hs, vs)) for h in range(24))


CHAT = _hours((0, 1), (6, 1), (9, 0), (21, 0), (23, 1))
RAG = _hours((0, 0), (6, 0), (9, 1), (13, 1), (16, 0))
AGENT = _hours((0, 0), (13, 0), (16, 1), (21, 1), (23, 0))


def _agent_source() -> Workload:
    conv = _load("AzureLLMInferenceTrace_conv.csv")
    return traces.apply_drift(conv, traces.Drift((traces.DriftPoint(hour=0, prompt_scale=1.5, output_scale=3.0),)))


def build_drift_day(seed: int, quick: bool, tau: float) -> Workload:
    conv = _load("AzureLLMInferenceTrace_conv.csv")
    arrivals = _diurnal(conv, peak_rps=12.0, seed=seed, quick=quick, order="shuffle")
    return _phase_mix(arrivals, [(conv, CHAT), (_load("AzureLLMInferenceTrace_code.csv"), RAG),
                                 (_agent_source(), AGENT)], seed=seed, hours_per_day=3.0 if quick else 24.0)


CACHE_SWING = traces.Drift(tuple(traces.DriftPoint(hour=h, cache_share=c)
                                 for h, c in ((0, 0.1), (5, 0.7), (11, 0.2), (17, 0.8), (21, 0.3))))


def build_cache_day(seed: int, quick: bool, tau: float) -> Workload:
    return _diurnal(_load("mooncake_sample.jsonl"), peak_rps=8.0, seed=seed, quick=quick, order="shuffle",
                    drift=CACHE_SWING)


def _conversation_in_order(peak_rps: float) -> Callable[[int, bool, float], Workload]:
    """A diurnal day of Azure conversation sizes kept in trace order (the dialogue day's build)."""
    def build(seed: int, quick: bool, tau: float) -> Workload:
        return _diurnal(_load("AzureLLMInferenceTrace_conv.csv"), peak_rps=peak_rps, seed=seed, quick=quick)
    return build


build_dialogue_day = _conversation_in_order(60.0)
build_swing_day = _conversation_in_order(120.0)


def _stationary(level: float) -> Callable[[int, bool, float], Workload]:
    def build(seed: int, quick: bool, tau: float) -> Workload:
        src = _load("burstgpt_sample.csv")
        rps = level * tau / float(src.output_tokens.mean())
        return traces.poisson(src, rate_rps=rps, duration_s=600.0 if quick else 1800.0, seed=seed)
    return build


STEP_MIX = dict(prompt_mean=2000, output_mean=300, spread_ratio=0.5)


def build_step_day(seed: int, quick: bool, tau: float) -> Workload:
    src = traces.synthetic_sizes(**STEP_MIX, count=20_000, seed=11)
    before, after = (600.0, 1200.0) if quick else (1200.0, 2400.0)
    rps = 3.0 * tau / float(src.output_tokens.mean())
    lo = traces.poisson(src, rate_rps=rps, duration_s=before, seed=seed)
    hi = traces.poisson(src, rate_rps=3.0 * rps, duration_s=after, seed=seed + 1000)
    return traces.make_workload("step", np.concatenate([lo.arrival_s, before + hi.arrival_s]),
                                np.concatenate([lo.prompt_tokens, hi.prompt_tokens]),
                                np.concatenate([lo.output_tokens, hi.output_tokens]))


def _first_hour(build: Callable[[int, bool, float], Workload]) -> Callable[[bool], Workload]:
    def tuning(quick: bool) -> Workload:
        day = build(0, quick, 0.0)
        return day.window(0.0, 3600.0 / (8.0 if quick else 1.0))
    return tuning


DAYS: tuple[Day, ...] = (
    Day("a-drift", "tune", "mix drifts chat → RAG → agent", "Azure conversation + code traces",
        SMALL, lambda q: 3 * 3600.0 if q else 86400.0, build_drift_day, _first_hour(build_drift_day),
        "the day's first hour"),
    Day("b-cache", "held_out", "prefix-cache share swings 10% ↔ 80%", "Mooncake sample (tests/data)",
        SMALL, lambda q: 3 * 3600.0 if q else 86400.0, build_cache_day, _first_hour(build_cache_day),
        "the day's first hour"),
    Day("c-dialogue", "held_out", "the dialogue day (docs/reproductions)", "Azure conversation trace",
        "docs/reproductions/dialogue.yaml", lambda q: 3 * 3600.0 if q else 86400.0, build_dialogue_day,
        lambda q: _load("AzureLLMInferenceTrace_conv.csv"), "the recorded Azure conversation hour"),
    Day("d-small", "tune", "30 min stationary, ~2.5 decode instances", "BurstGPT sample (tests/data)",
        SMALL, lambda q: 600.0 if q else 1800.0, _stationary(2.5), lambda q: _load("burstgpt_sample.csv"),
        "the BurstGPT sample"),
    Day("d-medium", "held_out", "30 min stationary, ~8 decode instances", "BurstGPT sample (tests/data)",
        SMALL, lambda q: 600.0 if q else 1800.0, _stationary(8.0), lambda q: _load("burstgpt_sample.csv"),
        "the BurstGPT sample"),
    Day("d-large", "tune", "30 min stationary, ~24 decode instances", "BurstGPT sample (tests/data)",
        SMALL, lambda q: 600.0 if q else 1800.0, _stationary(24.0), lambda q: _load("burstgpt_sample.csv"),
        "the BurstGPT sample"),
    Day("e-step", "tune", "3× step in load", "generated mix (2,000 / 300 tokens ± 50%)",
        SMALL, lambda q: 1800.0 if q else 3600.0, build_step_day,
        lambda q: traces.synthetic_sizes(**STEP_MIX, count=5000, seed=12), "the generated mix",
        step_s=lambda q: 600.0 if q else 1200.0),
    Day("f-swing", "tune", "demand swings ±20% within the hour (8B)", "Azure conversation trace",
        SMALL, lambda q: 3 * 3600.0 if q else 86400.0, build_swing_day,
        lambda q: _load("AzureLLMInferenceTrace_conv.csv"), "the recorded Azure conversation hour"),
)


# ------------------------------------------------------------------ curation and runs

def _config(day: Day) -> SimConfig:
    text = day.config if "\n" in day.config else (REPO / day.config).read_text()
    return load_sim_config(text, origin=day.key)


def _pressure(cfg: SimConfig, service: ServiceConfig, source: Workload, quick: bool,
              cache: dict[str, Any], key: str) -> dict[str, Any]:
    if key in cache:
        return cache[key]
    total = 8 if quick else 12
    splits = curation.ratio_splits(total, low_prefill=max(1, total // 4), high_prefill=total - max(1, total // 4))
    ps = PressureSettings(duration_s=120.0 if quick else 240.0, warmup_s=30.0 if quick else 60.0,
                          iterations=6 if quick else 8, margin=0.9)
    cache[key] = curation.pressure_test(cfg.cluster, source, service=service, splits=splits, ps=ps)
    return cache[key]


def per_minute_ok(series: dict[str, np.ndarray], key: str, slo: float | None) -> float | None:
    if slo is None:
        return None
    v = series[key]
    v = v[~np.isnan(v)]
    return round(float((v <= slo).mean()), 4) if len(v) else None


def step_times(res: RunResult, step_s: float, slo_ttft: float | None, slo_tbt: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"first_scale_out_s": None, "slo_restored_s": None}
    for d in res.decisions:
        if d["at"] >= step_s and sum(d["to"].values()) > sum(d["from"].values()):
            out["first_scale_out_s"] = round(d["at"] - step_s, 1)
            break
    s = res.series
    start = s["t_h"] * 3600.0 - 30.0                     # per-minute bins
    after = start >= step_s - 1e-6
    ok = np.ones(len(start), dtype=bool)
    if slo_ttft is not None:
        ok &= ~(s["ttft_p90_s"] > slo_ttft)
    if slo_tbt is not None:
        ok &= ~(s["tbt_p90_s"] > slo_tbt)
    idx = np.flatnonzero(after)
    bad = idx[~ok[idx]]
    if not len(bad):
        out["slo_restored_s"] = 0.0
        return out
    for i in range(int(bad[0]) + 1, len(ok) - 4):
        if ok[i:i + 5].all():
            out["slo_restored_s"] = round(float(start[i] - step_s), 1)
            break
    return out


def run_day(day: Day, *, quick: bool, names: tuple[str, ...], pressure_cache: dict[str, Any],
            log: Callable[[str], None]) -> dict[str, Any]:
    cfg = _config(day)
    base = cfg.coordinator.services[0]
    t0 = time.process_time()
    tuning = day.tuning(quick)
    # Days curated on the same source share one pressure test.
    pkey = day.key if day.tuning_label == "the day's first hour" else f"{day.config}|{day.tuning_label}"
    pressure = _pressure(cfg, base, tuning, quick, pressure_cache, pkey)
    p, d = (int(x) for x in pressure["pd_ratio"].split(":"))
    tau = max(1.0, float(pressure["target_decode_tps_per_instance"]))
    service = replace(base, pd_ratio=(p, d), target_decode_tps_per_instance=tau)
    workload = day.build(1, quick, tau)
    yesterday = day.build(2, quick, tau)
    hourly = policies.hourly_peak_decode_tps(yesterday)
    baselines = policies.from_pressure_test(pressure, replace(
        policies.BaselineSettings(), peak_decode_tps=float(policies.peak_decode_tps(yesterday).max()),
        hourly_decode_tps=hourly))
    duration = day.duration_s(quick)
    # Arrivals stop at the day's end; the run goes on DRAIN_S so that requests in flight
    # finish (otherwise every policy "misses" the last minute's long answers alike).
    settings = RunSettings(interval_s=cfg.interval_s, window_s=cfg.window_s, duration_s=duration + DRAIN_S, seed=1,
                           slo_ttft_s=service.slo.ttft_s, slo_tbt_s=service.slo.tbt_s)
    initial = policies.counts_for_tps(service, float(policies.peak_decode_tps(yesterday)[:1].max()), 1.2)
    log(f"{day.key}: curated on {day.tuning_label}: {pressure['pd_ratio']}, τ {tau:g}, "
        f"τ_prefill {pressure['prefill_target_tps_per_instance']:g}; {len(workload):,} requests, "
        f"{duration / 3600:.2f} h ({time.process_time() - t0:.0f} CPU-s)")
    results: dict[str, RunResult] = {}
    for name in names:
        t1 = time.process_time()
        ctl = policies.build(name, service=service, workload=yesterday, baselines=baselines)
        results[name] = simulate(workload, cfg.cluster, ctl, settings=settings, initial=initial)
        log(f"  {name}: {results[name].summary['gpu_hours']:.1f} GPU-h, "
            f"SLO {results[name].summary['slo_attainment']:.2%} ({time.process_time() - t1:.0f} CPU-s)")
    static = results["static-peak"].summary["gpu_hours"] if "static-peak" in results else None
    rows: dict[str, Any] = {}
    for name, res in results.items():
        s = res.summary
        row = {"gpu_hours": s["gpu_hours"],
               "vs_static_peak": round(s["gpu_hours"] / static, 4) if static else None,
               "slo_attainment": s["slo_attainment"],
               "ttft_minutes_ok": per_minute_ok(res.series, "ttft_p90_s", service.slo.ttft_s),
               "tbt_minutes_ok": per_minute_ok(res.series, "tbt_p90_s", service.slo.tbt_s),
               "ttft_p90_s": s["ttft_p90_s"], "tbt_p90_s": s["tbt_p90_s"],
               "scaling_actions": s["scaling_actions"], "reversals": s["direction_reversals"],
               "reversals_per_2h": round(s["direction_reversals"] / (duration / 7200.0), 2),
               "mean_instances": s["mean_instances"],
               "decision_reasons": s.get("decision_reasons")}
        if day.step_s is not None:
            row.update(step_times(res, day.step_s(quick), service.slo.ttft_s, service.slo.tbt_s))
        rows[name] = row
    return {"tag": day.tag, "title": day.title, "sources": day.sources, "quick": quick,
            "duration_h": round(duration / 3600.0, 3), "requests": len(workload),
            "workload": workload.summary(),
            "curated": {"on": day.tuning_label, "pd_ratio": pressure["pd_ratio"], "tau": tau,
                        "prefill_target_tps_per_instance": pressure["prefill_target_tps_per_instance"],
                        "static_peak_from": "yesterday's peak decode tok/s",
                        "yesterday_peak_decode_tps": round(float(policies.peak_decode_tps(yesterday).max()), 1)},
            "step_at_s": day.step_s(quick) if day.step_s is not None else None,
            "cpu_s": round(time.process_time() - t0, 1), "policies": rows}


def select(text: str | None) -> list[Day]:
    if not text:
        return list(DAYS)
    picked = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        found = [d for d in DAYS if d.key == token or d.key.split("-")[0] == token]
        if not found:
            raise SystemExit(f"control_bench: unknown day {token!r}; known: {', '.join(d.key for d in DAYS)}")
        picked += [d for d in found if d not in picked]
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", help="comma-separated day keys or letters (default: all)")
    parser.add_argument("--quick", action="store_true", help="shorter days and pressure tests (minutes)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    record.add_output_arguments(parser, "control")
    args = parser.parse_args(argv)
    names = tuple(n.strip() for n in args.policies.split(",") if n.strip())
    unknown = [n for n in names if n not in policies.POLICY_NAMES]
    if unknown:
        parser.error(f"unknown policy {', '.join(unknown)}")
    days = select(args.days)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    cache: dict[str, Any] = {}
    results = {}
    for day in days:
        results[day.key] = run_day(day, quick=args.quick, names=names, pressure_cache=cache,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
        results[day.key]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = record.output_path(args, "control")
    doc: dict[str, Any] = {"benchmark": "control: policies side by side on curated days",
                           "command": "python benchmarks/control_bench.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
                           "days": results}
    if args.replace and path.is_file():                 # keep days not rerun
        old = json.loads(path.read_text()).get("days", {})
        doc["days"] = {k: results.get(k, old.get(k)) for k in [d.key for d in DAYS] if k in results or k in old}
    doc["cpu_s"] = round(time.process_time() - cpu0, 1)
    doc["wall_s"] = round(time.perf_counter() - wall0, 1)
    doc["host"] = record.machine()
    out = record.write(path, doc)
    table = figures.control_lines(doc)
    print("\n".join(table))
    if args.replace:
        changed = figures.sync(REPO, figures.extract(REPO))
        print(f"re-rendered {', '.join(map(str, changed)) or 'nothing'}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
