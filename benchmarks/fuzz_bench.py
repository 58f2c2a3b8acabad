"""The long fuzz run of the sidecar's inputs and outputs; writes benchmarks/results/fuzz.json.

    .venv/bin/python benchmarks/fuzz_bench.py [--pages 10000] [--reports 10000] [--seed 1] [--out FILE]

Streams and checks: tests/sidecar_fuzz.py (the default suite runs a short stream of the
same generator). Targets: >= 10,000 fuzzed engine pages and >= 10,000 fuzzed report
bodies with 0 crashes (an exception of an undocumented type), 0 non-finite values out
(report JSON, /metrics rates and quantiles, accepted reports) and 0 sidecar reports that
the coordinator's parser refuses. Counts are what the run saw; nothing here is timed
against a target, so a busy machine only makes it slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import sidecar_fuzz  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "fuzz.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=10_000)
    parser.add_argument("--reports", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.time()
    result = sidecar_fuzz.run(pages_n=args.pages, reports_n=args.reports, seed=args.seed,
                              progress=lambda what, n: print(f"{what}: {n}", file=sys.stderr, flush=True))
    doc = {
        "command": " ".join(["benchmarks/fuzz_bench.py"] + sys.argv[1:]),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "seed": args.seed,
        "targets": {"pages": ">= 10000", "reports": ">= 10000", "crashes": 0, "non_finite_out": 0,
                    "own_reports_rejected": 0},
        "result": result.summary(),
        "ok": result.ok and result.pages >= 10_000 and result.reports >= 10_000,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["result"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
