"""Where a benchmark's result goes, and how it reports a target (shared by ``benchmarks/*.py``).

A benchmark records; it never fails because of a timing. The committed results in
``benchmarks/results/<name>.json`` are the figures docs/benchmarks.md quotes, so a run
does not overwrite them unless asked:

* by default a run writes a new file, ``benchmarks/results/runs/<name>-<UTC time>.json``
  (that folder is not committed);
* ``--replace`` writes the committed ``benchmarks/results/<name>.json``;
* ``--out PATH`` writes exactly there.

Targets are written into the result (``met``: name → true/false) and printed with the
machine's load average; a missed target exits 0 like a met one, since a busy machine
misses targets a quiet one meets. A benchmark exits non-zero only when it could not
measure (the thing under test failed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = RESULTS / "runs"


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help=f"write the result here (default: a new file benchmarks/results/runs/{name}-TIME.json)")
    where.add_argument("--replace", action="store_true",
                       help=f"replace the committed result benchmarks/results/{name}.json")


def output_path(args: argparse.Namespace, name: str, *, now_s: float | None = None) -> Path:
    if args.out is not None:
        return Path(args.out)
    if args.replace:
        return RESULTS / f"{name}.json"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now_s is None else now_s))
    return RUNS / f"{name}-{stamp}.json"


def machine() -> dict[str, Any]:
    """What a timing depends on: the interpreter, the cores, how busy they were."""
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def write(path: Path, doc: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def verdict(met: Mapping[str, bool], path: Path) -> int:
    """Print each target's outcome and where the result went; always 0 (see the module docstring)."""
    load = round(os.getloadavg()[0], 2)
    for name, ok in met.items():
        print(f"target {name}: {'met' if ok else f'missed (load average {load}; recorded, not failed)'}")
    try:
        shown = path.resolve().relative_to(REPO)
    except ValueError:
        shown = path
    print(f"result: {shown}")
    return 0
