"""Benchmark: one simulated 24-hour day of ~2 million requests for one service.

Target: ≤ 60 s on one core, ≤ 1 GB memory. Builds a diurnal day from the Azure
conversation trace's request sizes (peak 40 req/s, the default 24-hour profile → ~2.0 M
requests), runs the ``heteroscale`` policy through the full simulator (the coordinator's
own ``decide`` every 15 s), and records the result (``benchmarks/record.py``: a new file
under benchmarks/results/runs/, or the committed ``simulator.json`` with ``--replace``).

    .venv/bin/python benchmarks/simulator_bench.py [--peak-rps 40] [--policy heteroscale] [--replace]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import record

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from heteroscale.simulator import policies, traces  # noqa: E402
from heteroscale.simulator.config import load_sim_config  # noqa: E402
from heteroscale.simulator.model.runner import RunSettings, simulate  # noqa: E402

CONFIG = """
coordinator: {interval_s: 15}
services:
  - name: dialogue
    pd_ratio: "3:2"
    target_decode_tps_per_instance: 2000
    slo: {ttft_s: 1.0, tbt_s: 0.04}
    prefill: {gpus_per_instance: 1}
    decode: {gpus_per_instance: 1}
simulation:
  model: 8b
  prefill: {gpu: L40S, tp: 1, startup_s: 90}
  decode: {gpu: H20, tp: 1, startup_s: 120}
  # Every issue #13 mechanism on: P/D coupling, links (a fifth of the transfers cross
  # switches, one switch degraded), GPU capacity, start-up jitter, report loss. (Per-instance
  # prefix caches need Mooncake hash_ids; the Azure trace has none.)
  startup_jitter_s: 15
  gpu_capacity: {L40S: 64, H20: 48}
  cross_switch_share: 0.2
  kv_switches: 2
  degraded_links: {1: 0.5}
  report_loss: 0.01
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-rps", type=float, default=40.0)
    parser.add_argument("--policy", default="heteroscale")
    parser.add_argument("--trace", default=str(REPO.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"))
    record.add_output_arguments(parser, "simulator")
    args = parser.parse_args()
    cfg = load_sim_config(CONFIG)
    service = cfg.coordinator.services[0]
    source = traces.load_trace(args.trace)
    cpu0 = time.process_time()
    day = traces.diurnal_day(source, peak_rps=args.peak_rps, duration_h=24.0, seed=0)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    ctl = policies.build(args.policy, service=service, workload=day)
    result = simulate(day, cfg.cluster, ctl,
                      settings=RunSettings(interval_s=cfg.interval_s, window_s=cfg.window_s,
                                           duration_s=86400.0, slo_ttft_s=1.0, slo_tbt_s=0.04,
                                           report_loss=cfg.report_loss),
                      initial=policies.counts_for_tps(service, 2000.0, 1.0))
    cpu2, wall2 = time.process_time(), time.perf_counter()
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    doc = {
        "benchmark": "simulator: 24-hour diurnal day, one service",
        "command": "python benchmarks/simulator_bench.py " + " ".join(sys.argv[1:]),
        "requests": len(day),
        "policy": args.policy,
        "simulated_s": 86400.0,
        "workload_build_cpu_s": round(cpu1 - cpu0, 2),
        "simulate_cpu_s": round(cpu2 - cpu1, 2),
        "simulate_wall_s": round(wall2 - wall1, 2),
        "speedup_vs_real_time": round(86400.0 / max(1e-9, wall2 - wall1), 0),
        "max_rss_mb": round(maxrss_mb, 1),
        "targets": {"simulate_wall_s_max": 60.0, "max_rss_mb_max": 1024.0},
        "met": (wall2 - wall1) <= 60.0 and maxrss_mb <= 1024.0,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "result_summary": {k: result.summary.get(k) for k in (
            "gpu_hours", "slo_attainment", "ttft_p90_s", "tbt_p90_s", "scaling_actions", "preemptions",
            "prefill_stalls", "kv_transfer_wait_s", "cross_switch_transfer_share", "reports_lost")},
    }
    doc["host"] = record.machine()
    doc["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = record.write(record.output_path(args, "simulator"), doc)
    print(json.dumps(doc, indent=2))
    return record.verdict({"simulate <= 60 s and RSS <= 1 GB": doc["met"]}, out)


if __name__ == "__main__":
    raise SystemExit(main())
