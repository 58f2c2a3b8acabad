"""Benchmark (issue #17): a day with one switch's KV links degraded, heteroscale aware vs blind.

The simulator with KV links that have capacity, placement through the coordinator's
planner on a topology of 4 S1 switches (each: one 8-GPU L40S node for prefill, one
8-GPU H20 node for decode; ``affinity: s1``, so each Deployment Group is one switch),
and the NICs under one switch degraded to 25% (4x slower). A 4-hour diurnal day
(relative rate 0.15 -> 0.5 -> 1.0 -> 0.5 -> back, peak 50 req/s, 2000-token prompts,
250-token outputs), the same workload and seed for every run. Policies side by side:

* ``aware``: ``heteroscale`` — placement steered by the bandwidth map the coordinator
  builds from the simulated sidecars' KV transfer speeds (``core.bandwidth``), and the
  policy's KV-transfer bottleneck hold (``hold_kv_transfer``) on;
* ``blind``: ``heteroscale-blind`` — the same policy without the KV-arrival signal (the
  hold cannot fire) and placement without the map;
* ``placement_only``: the map steers placement, the hold is off (attributes the
  difference to one of the two mechanisms).

Two scenarios: the degraded switch is the one a *later* Deployment Group would use
(``later_switch``: switch 1), or the one the *first* group starts in (``first_switch``:
switch 0; the map needs two measured groups to call one slow).

    nice -n 10 .venv/bin/python benchmarks/kv_degraded_bench.py [--hours 4] [--seed 1]
        [--scenarios later_switch,first_switch] [--replace | --out FILE]

Records via ``benchmarks/record.py`` (committed: benchmarks/results/kv_degraded.json).
It has no timing target; it records what each run measured (GPU-hours, TTFT p90, SLO
attainment, direction reversals, share of transfers over degraded links, where the
instances ran) and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import record

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from heteroscale.coordinator.core.types import PoolCounts  # noqa: E402
from heteroscale.simulator import policies, traces  # noqa: E402
from heteroscale.simulator.config import load_sim_config  # noqa: E402
from heteroscale.simulator.model.runner import RunSettings, simulate  # noqa: E402
from heteroscale.simulator.placement import Placement, demand_for  # noqa: E402

CONFIG = """
coordinator: {interval_s: 15}
services:
  - name: chat
    pd_ratio: "2:1"
    affinity: s1
    target_decode_tps_per_instance: 1500
    max_decode: 32
    slo: {ttft_s: 1.0, tbt_s: 0.04}
    prefill: {}
    decode: {}
simulation:
  model: 8b
  prefill: {gpu: L40S, tp: 1}
  decode: {gpu: H20, tp: 1}
  startup_s: 120
  kv_link_gbps: 100
  kv_switches: 4
  degraded_links: {DEGRADED: 0.25}
  topology: {s2: 1, s1_per_s2: 4, nodes_per_s1: 2, gpus_per_node: 8, mix: s1}
  window_s: 30
  seed: SEED
"""

PROFILE = (0.15, 0.5, 1.0, 0.5)
VARIANTS = (("aware", "heteroscale", True), ("blind", "heteroscale-blind", False),
            ("placement_only", "heteroscale-blind", True))
SCENARIOS = (("later_switch", 1), ("first_switch", 0))
KEYS = ("gpu_hours", "ttft_p90_s", "tbt_p90_s", "slo_attainment", "direction_reversals", "scaling_actions",
        "degraded_transfer_share", "kv_transfer_wait_s", "prefill_stalls", "completed", "requests")


def run(degraded: int, *, hours: float, peak_rps: float, seed: int = 1) -> dict:
    cfg = load_sim_config(CONFIG.replace("DEGRADED", str(degraded)).replace("SEED", str(seed)))
    service = cfg.coordinator.services[0]
    source = traces.synthetic_sizes(prompt_mean=2000, output_mean=250, spread_ratio=0.25, seed=seed)
    day = traces.diurnal_day(source, peak_rps=peak_rps, duration_h=hours, profile=PROFILE, seed=seed)
    out = {"degraded_switch": degraded, "requests": len(day), "runs": {}}
    for label, policy, aware_placement in VARIANTS:
        ctl = policies.build(policy, service=service, workload=day)
        placement = Placement(cfg.topology, demand_for(service, cfg.cluster), bandwidth_aware=aware_placement)
        cpu0 = time.process_time()
        res = simulate(day, cfg.cluster, ctl, initial=PoolCounts(2, 1), placement=placement, service=service,
                       settings=RunSettings(interval_s=cfg.interval_s, window_s=cfg.window_s,
                                            duration_s=hours * 3600.0, seed=cfg.seed,
                                            slo_ttft_s=service.slo.ttft_s, slo_tbt_s=service.slo.tbt_s))
        row = {k: res.summary.get(k) for k in KEYS}
        row["cpu_s"] = round(time.process_time() - cpu0, 1)
        row["placement"] = res.summary["placement"]
        row["decision_reasons"] = res.summary.get("decision_reasons", {})
        out["runs"][label] = row
        print(f"{label:>15} (degraded switch {degraded}): " + ", ".join(f"{k} {row[k]}" for k in KEYS[:8]),
              file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--peak-rps", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=1, help="workload and simulation seed")
    parser.add_argument("--scenarios", default=",".join(name for name, _ in SCENARIOS),
                        help="comma-separated, from: " + ", ".join(name for name, _ in SCENARIOS))
    record.add_output_arguments(parser, "kv_degraded")
    args = parser.parse_args()
    doc = {"benchmark": "simulator: a diurnal day with one switch's KV links at 25%, heteroscale aware vs blind",
           "command": "python benchmarks/kv_degraded_bench.py " + " ".join(sys.argv[1:]),
           "hours": args.hours, "peak_rps": args.peak_rps, "profile": list(PROFILE), "seed": args.seed,
           "scenarios": {name: run(switch, hours=args.hours, peak_rps=args.peak_rps, seed=args.seed)
                         for name, switch in SCENARIOS if name in args.scenarios.split(",")}}
    doc["host"] = record.machine()
    doc["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = record.write(record.output_path(args, "kv_degraded"), doc)
    print(json.dumps(doc, indent=2))
    return record.verdict({}, out)


if __name__ == "__main__":
    raise SystemExit(main())
