#!/usr/bin/env python3
"""Regenerate every simulator figure quoted in docs/ and the README.

    .venv/bin/python scripts/regenerate_docs.py            # rerun all reproductions, then sync the docs
    .venv/bin/python scripts/regenerate_docs.py --only policy-azure-conv,placement
    .venv/bin/python scripts/regenerate_docs.py --sync     # no simulation: summaries -> figures.json -> docs
    .venv/bin/python scripts/regenerate_docs.py --list

Each reproduction is the exact ``heteroscale simulate|curate`` command printed in
docs/reproductions/README.md, run in-process; it rewrites its folder (summary.json,
report.md, PNGs). Then ``heteroscale.simulator.figures`` extracts the quoted numbers into
docs/reproductions/figures.json and re-renders every marked number and table in the docs.
tests/test_doc_figures.py checks docs against figures.json and figures.json against the
summaries (text and JSON only), so a stale doc fails the default test run.

The full set takes roughly 10–20 CPU-minutes (the 24-hour days dominate); the
benchmark figure (benchmarks/results/simulator.json) comes from
benchmarks/simulator_bench.py --replace, which this script does not run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACES = "../shared/traces"          # relative to the repository root, as the docs print it
CONV = f"{TRACES}/AzureLLMInferenceTrace_conv.csv"
CODE = f"{TRACES}/AzureLLMInferenceTrace_code.csv"
R = "docs/reproductions"
ALL = "heteroscale,hpa-gpu-util,independent-tps,latency-only,static-peak,periodic"

RUNS: dict[str, list[str]] = {
    "ratio-sweep-a": ["curate", "--config", f"{R}/service_a.yaml", "--trace", CONV, "--service", "service-a",
                      "--policies", "heteroscale,static-peak,hpa-gpu-util", "--out", f"{R}/ratio-sweep-a"],
    "ratio-sweep-b": ["curate", "--config", f"{R}/service_b.yaml", "--trace", CONV, "--service", "service-b",
                      "--policies", "heteroscale,static-peak,hpa-gpu-util", "--out", f"{R}/ratio-sweep-b"],
    "ratio-sweep-a-h100": ["curate", "--config", f"{R}/service_a_h100.yaml", "--trace", CONV, "--service",
                           "service-a", "--policies", "heteroscale,static-peak", "--out", f"{R}/ratio-sweep-a-h100"],
    "policy-day": ["curate", "--config", f"{R}/dialogue.yaml", "--trace", CONV, "--diurnal",
                   "--out", f"{R}/policy-day"],
    "policy-day-shuffle": ["simulate", "--config", f"{R}/dialogue.yaml", "--trace", CONV, "--diurnal",
                           "--diurnal-order", "shuffle", "--policies", "heteroscale,independent-tps,static-peak",
                           "--out", f"{R}/policy-day-shuffle"],
    "policy-azure-conv": ["simulate", "--config", f"{R}/dialogue.yaml", "--trace", CONV, "--policies", ALL,
                          "--out", f"{R}/policy-azure-conv"],
    "policy-azure-code": ["simulate", "--config", f"{R}/dialogue.yaml", "--trace", CODE, "--policies", ALL,
                          "--out", f"{R}/policy-azure-code"],
    "policy-azure-code-curated": ["curate", "--config", f"{R}/code.yaml", "--trace", CODE,
                                  "--out", f"{R}/policy-azure-code-curated"],
    "placement": ["simulate", "--config", f"{R}/dialogue-topology.yaml", "--trace", CONV, "--diurnal",
                  "--policies", "heteroscale", "--out", f"{R}/placement"],
    "placement-s2": ["simulate", "--config", f"{R}/dialogue-topology-s2.yaml", "--trace", CONV, "--diurnal",
                     "--policies", "heteroscale", "--out", f"{R}/placement-s2"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated reproductions (default: all)")
    parser.add_argument("--sync", action="store_true", help="run nothing: re-extract figures and re-render docs")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from heteroscale.cli import main as cli_main
    from heteroscale.simulator import figures

    names = list(RUNS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown reproduction {', '.join(unknown)}; known: {', '.join(RUNS)}")
    if args.list:
        for n in names:
            print(f"{n}: heteroscale " + " ".join(RUNS[n]))
        return 0
    if not args.sync:
        os.chdir(REPO)
        if not Path(CONV).is_file():
            parser.error(f"the Azure traces are not at {REPO / TRACES}")
        for n in names:
            started = time.process_time()
            print(f"== {n}: heteroscale {' '.join(RUNS[n])}", flush=True)
            sys.argv = ["heteroscale", *RUNS[n]]          # what summary.json records as the command
            rc = cli_main(RUNS[n] + (["--no-progress"] if args.no_progress else []))
            print(f"== {n}: exit {rc}, {time.process_time() - started:.0f} CPU-s", flush=True)
            if rc != 0 and n != "policy-azure-code-curated":
                return rc
    figs = figures.extract(REPO)
    changed = figures.sync(REPO, figs)
    print(f"wrote {figures.FIGURES}; re-rendered {', '.join(map(str, changed)) or 'nothing (docs already current)'}")
    left = figures.check(REPO)
    for line in left:
        print(line, file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
