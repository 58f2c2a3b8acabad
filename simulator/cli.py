"""``heteroscale simulate`` and ``heteroscale curate``: the simulator's command line.

The I/O shell around the pure simulator: reads the config and the trace, runs the
policies with a progress bar on stderr, and writes ``summary.json``, ``report.md``
and PNG plots to ``--out``. User mistakes (missing file, bad config, unknown
policy) raise ``UsageError``/``ConfigError``: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from heteroscale.coordinator.config import read_text
from heteroscale.coordinator.core.settings import ServiceConfig
from heteroscale.coordinator.core.types import PoolCounts
from heteroscale.errors import UsageError
from heteroscale.simulator import curate as curation
from heteroscale.simulator import policies, report, traces
from heteroscale.simulator.config import SimConfig, load_sim_config
from heteroscale.simulator.model.runner import RunResult, RunSettings, simulate
from heteroscale.simulator.placement import Placement, demand_for
from heteroscale.simulator.traces import Workload


# ------------------------------------------------------------------ arguments

def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML: services (coordinator format) + simulation block")
    parser.add_argument("--trace", required=True,
                        help="trace file: Azure CSV, Mooncake JSONL or BurstGPT CSV (format detected)")
    parser.add_argument("--service", help="service name in the config (default: the first)")
    parser.add_argument("--diurnal", action="store_true",
                        help="build a diurnal day from the trace's sizes and simulation.diurnal")
    parser.add_argument("--diurnal-order", choices=traces.ORDERS,
                        help="with --diurnal: keep = the trace's order of sizes stretched over the day "
                             "(its mix changes as the trace's did); shuffle = sizes drawn from the whole "
                             "trace all day (default: simulation.diurnal.order, itself default keep)")
    parser.add_argument("--duration-h", type=float, help="hours to simulate (default: the trace, or 24 with --diurnal)")
    parser.add_argument("--peak-rps", type=float, help="override simulation.diurnal.peak_rps")
    parser.add_argument("--format", default="auto", choices=("auto", "azure", "mooncake", "burstgpt"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--policies", default="heteroscale,hpa-gpu-util,static-peak",
                        help=f"comma-separated, from: {', '.join(policies.POLICY_NAMES)}")
    parser.add_argument("--out", required=True, help="output directory")


def add_curate_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--policies", default=",".join(n for n in policies.POLICY_NAMES if n != "heteroscale-blind"),
                        help="candidate policies (comma-separated)")
    parser.add_argument("--instances", type=int, help="override simulation.pressure.instances")
    parser.add_argument("--out", help="output directory (default: curate-<service>)")


# ------------------------------------------------------------------ shared steps

class Progress:
    """A one-line progress bar on stderr, redrawn per whole percent (off with --no-progress)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self.last = -1

    def __call__(self, label: str, fraction: float) -> None:
        if not self.enabled:
            return
        pct = int(fraction * 100)
        if pct == self.last:
            return
        self.last = pct
        bar = "#" * (pct // 4) + "-" * (25 - pct // 4)
        sys.stderr.write(f"\r{label:<18} [{bar}] {pct:3d}% {time.monotonic() - self.started:6.1f}s")
        if pct >= 100:
            sys.stderr.write("\n")
            self.last = -1
        sys.stderr.flush()


def _load(args: argparse.Namespace) -> tuple[SimConfig, ServiceConfig, Workload, Workload]:
    cfg_path = Path(args.config)
    cfg = load_sim_config(read_text(cfg_path), origin=str(cfg_path))
    if args.service:
        try:
            service = cfg.coordinator.service(args.service)
        except KeyError:
            names = ", ".join(s.name for s in cfg.coordinator.services)
            raise UsageError(f"no service {args.service!r} in {cfg_path} (have: {names})") from None
    else:
        service = cfg.coordinator.services[0]
    source = traces.load_trace(args.trace, fmt=args.format)
    if cfg.sizes is not None:
        # Keep the trace's arrivals, replace its sizes (e.g. the paper's Service A/B).
        sizes = traces.synthetic_sizes(prompt_mean=cfg.sizes.prompt_mean, output_mean=cfg.sizes.output_mean,
                                       spread_ratio=cfg.sizes.spread_ratio, count=len(source), seed=cfg.seed)
        source = traces.make_workload(f"{source.name}-sized", source.arrival_s, sizes.prompt_tokens,
                                      sizes.output_tokens)
    if args.duration_h is not None and args.duration_h <= 0:
        raise UsageError("--duration-h must be positive")
    if getattr(args, "diurnal_order", None) and not args.diurnal:
        raise UsageError("--diurnal-order needs --diurnal (a replayed trace keeps its recorded order)")
    if args.diurnal:
        peak = args.peak_rps if args.peak_rps is not None else cfg.diurnal.peak_rps
        if peak <= 0:
            raise UsageError("--peak-rps must be positive")
        workload = traces.diurnal_day(source, peak_rps=peak, duration_h=args.duration_h or 24.0,
                                      profile=cfg.diurnal.profile, start_hour=cfg.diurnal.start_hour,
                                      seed=cfg.seed, order=_order(args, cfg))
    else:
        workload = source if args.duration_h is None else source.window(0.0, args.duration_h * 3600.0)
    if cfg.drift is not None:
        workload = traces.apply_drift(workload, cfg.drift,
                                      start_hour=cfg.diurnal.start_hour if args.diurnal else 0.0)
    if not len(workload):
        raise UsageError(f"trace {args.trace}: no requests in the simulated span")
    return cfg, service, source, workload


def _order(args: argparse.Namespace, cfg: SimConfig) -> str:
    return getattr(args, "diurnal_order", None) or cfg.diurnal.order


def _policy_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in policies.POLICY_NAMES]
    if unknown or not names:
        raise UsageError(f"unknown policy {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(policies.POLICY_NAMES)}")
    return names


def _settings(cfg: SimConfig, service: ServiceConfig, duration_s: float) -> RunSettings:
    return RunSettings(interval_s=cfg.interval_s, window_s=cfg.window_s, duration_s=duration_s,
                       seed=cfg.seed, slo_ttft_s=service.slo.ttft_s, slo_tbt_s=service.slo.tbt_s,
                       report_loss=cfg.report_loss)


def _initial(cfg: SimConfig, service: ServiceConfig, workload: Workload) -> PoolCounts:
    if cfg.initial is not None:
        return PoolCounts(*cfg.initial)
    first = float(policies.peak_decode_tps(workload)[:2].max())
    return policies.counts_for_tps(service, first, 1.2)


def _run_policies(names: list[str], *, cfg: SimConfig, service: ServiceConfig, workload: Workload,
                  duration_s: float, progress: Progress) -> dict[str, RunResult]:
    results: dict[str, RunResult] = {}
    settings = _settings(cfg, service, duration_s)
    initial = _initial(cfg, service, workload)
    for name in names:
        ctl = policies.build(name, service=service, workload=workload, baselines=cfg.baselines)
        if not cfg.bandwidth_aware and isinstance(ctl, policies.HeteroScale):
            ctl.bandwidth_aware = False
        results[name] = simulate(workload, cfg.cluster, ctl, settings=settings, initial=initial, service=service,
                                 placement=_placement(cfg, service, aware=getattr(ctl, "bandwidth_aware", True)),
                                 progress=lambda f, n=name: progress(n, f))
        if getattr(ctl, "oracle", False):
            results[name].summary["oracle_sized"] = True
        progress(name, 1.0)
    return results


def _placement(cfg: SimConfig, service: ServiceConfig, *, aware: bool = True) -> Placement | None:
    """A fresh replay of the coordinator's placement planner, if a topology is configured
    (steered by the measured KV bandwidth map unless ``simulation.bandwidth_aware: false``
    or the policy is blind to it)."""
    if cfg.topology is None:
        return None
    return Placement(cfg.topology, demand_for(service, cfg.cluster), bandwidth_aware=cfg.bandwidth_aware and aware)


def _duration(args: argparse.Namespace, workload: Workload) -> float:
    if args.duration_h is not None:
        return args.duration_h * 3600.0
    return 24 * 3600.0 if args.diurnal else workload.duration_s + 60.0


def _meta(cfg: SimConfig, service: ServiceConfig, args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    c = cfg.cluster
    return {
        "command": "heteroscale " + " ".join(sys.argv[1:]) if sys.argv else "",
        "service": service.name,
        "pd_ratio": service.pd_ratio_text,
        "target_decode_tps_per_instance": service.target_decode_tps_per_instance,
        "slo": {"ttft_s": service.slo.ttft_s, "tbt_s": service.slo.tbt_s},
        "hardware": {"model": c.prefill.model.name,
                     "prefill": f"{c.prefill.tp}x{c.prefill.gpu.name}",
                     "decode": f"{c.decode.tp}x{c.decode.gpu.name}",
                     "startup_s": c.startup_s, "cross_switch_share": c.cross_switch_share,
                     "topology": None if cfg.topology is None else vars(cfg.topology)},
        "trace": str(args.trace), "diurnal": bool(args.diurnal),
        "diurnal_order": _order(args, cfg) if args.diurnal else None,
        "drift": None if cfg.drift is None else [vars(p) for p in cfg.drift.points],
        "workload": workload.summary(),
    }


def _policy_summaries(results: dict[str, RunResult]) -> dict[str, Any]:
    return {name: dict(res.summary) for name, res in results.items()}


def _policy_sections(results: dict[str, RunResult]) -> list[tuple[str, list[str]]]:
    base = "static-peak" if "static-peak" in results else None
    sections = [("Policies", report.policy_table(results, baseline=base) + [
        "", "GPU-hours include starting and draining instances. SLO attainment: share of requests "
        "with TTFT and mean TBT both within the SLO (unfinished requests count as misses).",
        "", "![load vs GPUs](load_vs_gpus.png)", "", "![utilisation](utilization.png)", "",
        "![latency](latency.png)"])]
    fixed = [n for n in ("static-peak",) if n in results]
    if fixed:
        sections.append(("Signal study at fixed capacity (" + fixed[0] + ")",
                         report.signal_table(report.signal_study(results[fixed[0]]))
                         + ["", "![signals](signals.png)"]))
    return sections


# ------------------------------------------------------------------ commands

def run_simulate(args: argparse.Namespace) -> int:
    names = _policy_names(args.policies)
    cfg, service, _, workload = _load(args)
    out = _outdir(args.out)
    duration = _duration(args, workload)
    progress = Progress(not args.no_progress)
    results = _run_policies(names, cfg=cfg, service=service, workload=workload, duration_s=duration,
                            progress=progress)
    files = report.plot_policies(out, results)
    doc: dict[str, Any] = {"meta": _meta(cfg, service, args, workload), "policies": _policy_summaries(results)}
    if "static-peak" in results:
        doc["signal_study"] = report.signal_study(results["static-peak"])
        files.append(report.plot_signals(out, results["static-peak"]))
    report.write_summary(out, doc)
    report.write_markdown(out, title=f"Simulation: {service.name}", meta=doc["meta"],
                          sections=_policy_sections(results))
    print(f"wrote {out / 'summary.json'}, {out / 'report.md'} and {', '.join(files)}")
    return 0


def run_curate(args: argparse.Namespace) -> int:
    names = _policy_names(args.policies)
    cfg, service, source, workload = _load(args)
    out = _outdir(args.out or f"curate-{service.name}")
    total = args.instances or cfg.pressure_instances
    if total < 2:
        raise UsageError("--instances must be at least 2")
    splits = curation.ratio_splits(total, low_prefill=cfg.pressure_low_prefill,
                                   high_prefill=cfg.pressure_high_prefill)
    progress = Progress(not args.no_progress)
    pressure = curation.pressure_test(cfg.cluster, source, service=service, splits=splits, ps=cfg.pressure,
                                      progress=lambda f: progress("pressure test", f))
    if not pressure["feasible"]:
        report.write_summary(out, {"meta": _meta(cfg, service, args, workload), "pressure_test": pressure,
                                   "recommended": None})
        report.write_markdown(out, title=f"Curation: {service.name}", meta=_meta(cfg, service, args, workload),
                              sections=[("Pressure test", report.ratio_table(pressure))])
        raise UsageError(f"no P/D split of {total} instances meets the SLO at any load (unloaded p90 TTFT "
                         f"{pressure['unloaded_ttft_p90_s']:.2f}s vs SLO {service.slo.ttft_s}s); relax the SLO "
                         f"or use faster prefill GPUs (details in {out / 'report.md'})")
    duration = _duration(args, workload)
    tuned, results, best = curation.curate(
        cfg.cluster, workload, service=service, pressure=pressure, candidates=names,
        settings=_settings(cfg, service, duration), slo_goal=cfg.slo_goal, baselines=cfg.baselines,
        placement_for=None if cfg.topology is None else (lambda svc: _placement(cfg, svc)),
        progress=progress)
    files = [report.plot_ratio_sweep(out, pressure, title=f"{service.name}: P/D sweep at {total} instances")]
    files += report.plot_policies(out, results)
    recommended = {"policy": best, "pd_ratio": pressure["pd_ratio"],
                   "target_decode_tps_per_instance": pressure["target_decode_tps_per_instance"],
                   "slo_goal": cfg.slo_goal,
                   "baselines": {"independent-tps": {
                       "prefill_target_tps_per_instance": pressure["prefill_target_tps_per_instance"],
                       "decode_target_tps_per_instance": pressure["target_decode_tps_per_instance"]}}}
    doc = {"meta": _meta(cfg, tuned, args, workload), "pressure_test": pressure,
           "recommended": recommended, "policies": _policy_summaries(results)}
    if "static-peak" in results:
        doc["signal_study"] = report.signal_study(results["static-peak"])
        files.append(report.plot_signals(out, results["static-peak"]))
    report.write_summary(out, doc)
    sections = [("Pressure test", report.ratio_table(pressure) + [
        "", f"Recommended ratio **{pressure['pd_ratio']}**, τ = **{pressure['target_decode_tps_per_instance']:g}** "
        f"decode tok/s per decode instance ({pressure['margin']:.0%} of the best split's).",
        "", "![ratio sweep](ratio_sweep.png)"]),
        ("Recommendation (Algorithm 1)", [
            f"Best policy: **{best}** (fewest GPU-hours among policies with SLO attainment ≥ "
            f"{cfg.slo_goal:.0%}; otherwise the highest attainment).",
            "", "```yaml", f"- name: {service.name}", f"  pd_ratio: \"{pressure['pd_ratio']}\"",
            f"  target_decode_tps_per_instance: {pressure['target_decode_tps_per_instance']:g}",
            "# simulation.baselines (configured from the same pressure test):",
            "baselines:", "  independent-tps:",
            f"    prefill_target_tps_per_instance: {pressure['prefill_target_tps_per_instance']:g}",
            f"    decode_target_tps_per_instance: {pressure['target_decode_tps_per_instance']:g}", "```"]),
        *_policy_sections(results)]
    report.write_markdown(out, title=f"Curation: {service.name}", meta=doc["meta"], sections=sections)
    print(f"recommended: policy {best}, pd_ratio {pressure['pd_ratio']}, "
          f"target_decode_tps_per_instance {pressure['target_decode_tps_per_instance']:g}, "
          f"independent-tps prefill_target_tps_per_instance {pressure['prefill_target_tps_per_instance']:g}")
    print(f"wrote {out / 'summary.json'}, {out / 'report.md'} and {', '.join(files)}")
    return 0


def _outdir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create: {exc.strerror or exc}") from exc
    return out

