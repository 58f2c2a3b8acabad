"""CPU and memory of a whole ``heteroscale demo`` run, read from /proc (Linux).

Runs the demo as a child process (default flags unless given after ``--``), and once
a second walks its process tree in /proc: CPU seconds (utime + stime of every live
process, plus what exited children left in the parent's cutime/cstime) and resident
memory (sum of RSS). Records the result with the demo's own report embedded (a new file
under benchmarks/results/runs/; ``--replace`` for the committed ``demo.json``; see
``record.py``), and prints a one-line summary.

    .venv/bin/python benchmarks/demo_footprint.py [--replace | --out FILE] [-- DEMO FLAGS...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def _tree(root: int) -> list[int]:
    kids = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _cpu_rss(pid: int) -> tuple[float, float, float]:
    """(own CPU s, reaped children's CPU s, RSS bytes) of one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0.0, 0.0, 0.0
    f = stat[stat.rindex(")") + 2:].split()
    own = (int(f[11]) + int(f[12])) / TICKS
    reaped = (int(f[13]) + int(f[14])) / TICKS
    return own, reaped, int(statm[1]) * PAGE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    record.add_output_arguments(parser, "demo")
    parser.add_argument("demo_args", nargs="*", help="flags for heteroscale demo (after --)")
    args = parser.parse_args()
    report = Path(tempfile.mkdtemp(prefix="demo-footprint-")) / "report.json"
    cmd = [sys.executable, "-m", "heteroscale", "demo", "--listen", "127.0.0.1:0", "--report", str(report),
           *args.demo_args]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples = []
    peak_rss = peak_procs = 0
    cpu_seen: dict[int, float] = {}
    while proc.poll() is None:
        pids = _tree(proc.pid)
        rss = 0.0
        for pid in pids:
            own, _, r = _cpu_rss(pid)
            cpu_seen[pid] = max(cpu_seen.get(pid, 0.0), own)
            rss += r
        cpu_now = sum(cpu_seen.values())
        samples.append({"t_s": round(time.monotonic() - started, 1), "processes": len(pids),
                        "rss_mb": round(rss / 2**20, 1), "cpu_s": round(cpu_now, 2)})
        peak_rss, peak_procs = max(peak_rss, rss), max(peak_procs, len(pids))
        time.sleep(1.0)
    output = proc.stdout.read() if proc.stdout else ""
    wall = time.monotonic() - started
    cpu_total = sum(cpu_seen.values())
    # Each process's CPU is its last sampled value: what a child used after the last
    # one-second sample before it exited is missed, so this is a slight lower bound.
    demo = json.loads(report.read_text()) if report.is_file() else None
    result = {
        "command": " ".join(["heteroscale", "demo", *args.demo_args]) or "heteroscale demo",
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "cpu_s_total": round(cpu_total, 1),
        "mean_cores": round(cpu_total / wall, 3),
        "peak_rss_mb": round(peak_rss / 2**20, 1),
        "peak_processes": peak_procs,
        "machine_cores": os.cpu_count(),
        "host": record.machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "demo_report": {k: v for k, v in (demo or {}).items() if k != "timeline"},
        "samples": samples,
        "output_tail": output.splitlines()[-30:],
    }
    out = record.write(record.output_path(args, "demo"), result)
    print(f"demo footprint: {result['wall_s']}s wall, {result['cpu_s_total']} CPU-s "
          f"({result['mean_cores']} cores on average), peak RSS {result['peak_rss_mb']} MB over "
          f"{peak_procs} processes; exit {proc.returncode}; written to {out}")
    # A demo that failed is a failure to measure, not a missed target.
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
