"""The simulator's numbers quoted in docs/ and the README, tied to the runs that made them.

``scripts/regenerate_docs.py`` reruns every reproduction (docs/reproductions/README.md)
and then calls ``extract`` and ``sync``: ``extract`` reads the committed summaries
(``docs/reproductions/*/summary.json``, ``benchmarks/results/simulator.json``) into one
small ``docs/reproductions/figures.json``; ``sync`` rewrites every marked number in the
docs from it. ``check`` is what the test runs: it compares the docs' text with
``figures.json`` and ``figures.json`` with the summaries, simulating nothing — so a doc
cannot quote a number its committed run did not produce.

Two kinds of marks (invisible when the markdown is rendered):

* inline ``<!--fig:KEY:FMT-->TEXT<!--/fig-->``: ``KEY`` is a dotted path into
  figures.json (``policy-day.policies.heteroscale.gpu_hours``), ``FMT`` a Python
  format spec (``.1f``, ``.2%``, ``+.1%``, ``,d``); a leading ``-`` becomes ``−``.
* blocks ``<!--figs:NAME-->`` … ``<!--/figs:NAME-->``: a whole table rendered by
  ``BLOCKS[NAME]`` from figures.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

FIGURES = Path("docs/reproductions/figures.json")
DOCS = (Path("README.md"), Path("docs/simulator.md"), Path("docs/reproductions/README.md"),
        Path("docs/benchmarks.md"), Path("docs/control.md"))
RUNS = ("ratio-sweep-a", "ratio-sweep-b", "ratio-sweep-a-h100", "policy-day", "policy-day-shuffle", "policy-azure-conv",
        "policy-azure-code", "policy-azure-code-curated", "placement", "placement-s2")
BENCH = Path("benchmarks/results/simulator.json")
CONTROL = Path("benchmarks/results/control.json")

INLINE = re.compile(r"<!--fig:([\w.-]+)(?::([^>]*))?-->([^<`\n]*)<!--/fig-->")
BLOCK = re.compile(r"(<!--figs:([\w.-]+)-->\n)(.*?)(<!--/figs:\2-->)", re.S)


# ------------------------------------------------------------------ extraction

def _policy(s: Mapping[str, Any]) -> dict[str, Any]:
    return {"gpu_hours": s["gpu_hours"], "slo_attainment": s["slo_attainment"],
            "util_prefill": s["mean_gpu_utilization"]["prefill"], "util_decode": s["mean_gpu_utilization"]["decode"],
            "sm_prefill": s["mean_sm_activity"]["prefill"], "sm_decode": s["mean_sm_activity"]["decode"],
            "actions": s["scaling_actions"], "reversals": s["direction_reversals"],
            "requests": s["requests"], "ttft_s": s["ttft_s"],
            "cross_switch_share": s.get("cross_switch_transfer_share", 0.0),
            "oracle_sized": bool(s.get("oracle_sized", False)),
            "placement": s.get("placement"), "decision_reasons": s.get("decision_reasons")}


def extract_run(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The quoted subset of one ``summary.json``, with derived ratios."""
    out: dict[str, Any] = {"requests": doc["meta"]["workload"].get("requests"),
                           "pd_ratio": doc["meta"]["pd_ratio"],
                           "target_decode_tps_per_instance": doc["meta"]["target_decode_tps_per_instance"]}
    pols = {name: _policy(s) for name, s in doc.get("policies", {}).items()}
    base = pols.get("static-peak", {}).get("gpu_hours")
    for p in pols.values():
        p["vs_static_peak"] = round(p["gpu_hours"] / base - 1, 4) if base else None
        # GPU-hour-weighted mean utilisation over both pools needs the split by role:
    for name, s in doc.get("policies", {}).items():
        g = s.get("gpu_hours_by_role", {})
        tot = (g.get("prefill", 0.0) + g.get("decode", 0.0)) or 1.0
        pols[name]["util_weighted"] = round((g.get("prefill", 0.0) * s["mean_gpu_utilization"]["prefill"]
                                             + g.get("decode", 0.0) * s["mean_gpu_utilization"]["decode"]) / tot, 4)
    out["policies"] = pols
    pt = doc.get("pressure_test")
    if pt:
        out["pressure"] = {"best": pt["best"], "pd_ratio": pt["pd_ratio"],
                           "tau": pt["target_decode_tps_per_instance"],
                           "prefill_target": pt.get("prefill_target_tps_per_instance"),
                           "points": {p["ratio"]: {"prefill_tps": p["prefill_tps"], "decode_tps": p["decode_tps"],
                                                   "limited_by": p["limited_by"],
                                                   "prefill_gpu_util": p["prefill_gpu_util"],
                                                   "prefill_sm": p["prefill_sm_activity"],
                                                   "decode_gpu_util": p["decode_gpu_util"]}
                                      for p in pt["points"]}}
        # How far each end of the sweep falls below the peak (prefill tok/s; Fig. 4's "bell").
        peak = next(p["prefill_tps"] for p in pt["points"] if p["ratio"] == pt["best"])
        if peak:
            out["pressure"]["edge_drop"] = {"low": round(1 - pt["points"][0]["prefill_tps"] / peak, 4),
                                            "high": round(1 - pt["points"][-1]["prefill_tps"] / peak, 4)}
    if doc.get("recommended"):
        out["recommended"] = doc["recommended"]["policy"]
    if doc.get("signal_study"):
        out["signals"] = {r["signal"]: {"r": r["pearson_r_with_load"], "trough": r["trough_to_peak"]}
                          for r in doc["signal_study"]}
    return out


def extract(repo: Path) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    for run in RUNS:
        path = repo / "docs" / "reproductions" / run / "summary.json"
        if path.is_file():
            figs[run] = extract_run(json.loads(path.read_text()))
    if (repo / BENCH).is_file():
        b = json.loads((repo / BENCH).read_text())
        figs["simulator-bench"] = {k: b[k] for k in ("requests", "simulate_cpu_s", "simulate_wall_s",
                                                     "speedup_vs_real_time", "max_rss_mb")}
    if (repo / CONTROL).is_file():
        figs["control"] = {"days": json.loads((repo / CONTROL).read_text())["days"]}
    return figs


# ------------------------------------------------------------------ formatting

def lookup(figs: Mapping[str, Any], key: str) -> Any:
    """The figure at a dotted key. A decision reason a run never gave is counted, not
    missing: ``...decision_reasons.latency_severe`` is 0 when no tick gave it."""
    *path, last = key.split(".")
    node: Any = figs
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    if isinstance(node, Mapping) and last in node:
        return node[last]
    if isinstance(node, Mapping) and path and path[-1] == "decision_reasons":
        return 0
    raise KeyError(key)


def fmt(value: Any, spec: str | None) -> str:
    if value is None:
        return "—"
    text = format(value, spec or "")
    return text.replace("-", "−") if isinstance(value, (int, float)) else text


def _pct(x: float | None) -> str:
    return fmt(x, ".1%")


# ------------------------------------------------------------------ tables

def _ratio_sweep(figs: Mapping[str, Any]) -> list[str]:
    a, b = figs["ratio-sweep-a"]["pressure"], figs["ratio-sweep-b"]["pressure"]
    lines = ["| split | A: prefill / decode tok/s | A limited by | B: prefill / decode tok/s | B limited by |",
             "|---|---|---|---|---|"]
    short = {"prefill (TTFT)": "TTFT", "decode (TBT)": "TBT"}
    for split in a["points"]:
        cells = []
        for run in (a, b):
            p = run["points"].get(split)
            if p is None:
                cells += ["—", "—"]
                continue
            text = f"{p['prefill_tps'] / 1000:.1f}k / {p['decode_tps'] / 1000:.2f}k"
            cells += [f"**{text}**" if split == run["best"] else text, short.get(p["limited_by"], p["limited_by"])]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines.append("| paper peak | 9P7D: 197.0k / 26.7k | | 10P6D: 194.0k / 18.2k | |")
    return lines


SIGNAL_PAPER = {"prefill_uncached_tps": ("prefill tokens/s (uncached)", "tracks load, 0.08–1.0"),
                "decode_tps": ("decode tokens/s", "tracks load, 0.08–1.0"),
                "prefill_gpu_util": ("prefill GPU utilisation", "≈8%→84%, linear"),
                "decode_gpu_util": ("decode GPU utilisation", "≈86% all day, 79% at trough"),
                "prefill_sm": ("prefill SM activity", "≈5% at trough, linear"),
                "decode_sm": ("decode SM activity", "≈29–63%, smooth, lags"),
                "ttft_p90_s": ("TTFT p90", "noisy, low SNR"),
                "tbt_p90_s": ("TBT p90", "flat then cliff; falls only to ≈0.45–0.5")}


def _signals(figs: Mapping[str, Any]) -> list[str]:
    sig = figs["policy-day"]["signals"]
    lines = ["| signal | Pearson r with offered load | trough/peak (p5/p95) | paper (Fig. 2) |", "|---|---|---|---|"]
    for key, (label, paper) in SIGNAL_PAPER.items():
        lines.append(f"| {label} | {fmt(sig[key]['r'], '.3f')} | {fmt(sig[key]['trough'], '.2f')} | {paper} |")
    return lines


def _policies(run: str) -> Callable[[Mapping[str, Any]], list[str]]:
    def render(figs: Mapping[str, Any]) -> list[str]:
        pols = figs[run]["policies"]
        lines = ["| policy | GPU-hours | vs static-peak | util P | util D | SM P | SM D | SLO attainment | "
                 "actions | reversals |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, p in pols.items():
            label = name + (" (oracle-sized)" if p["oracle_sized"] else "")
            vs = "0" if name == "static-peak" else fmt(p["vs_static_peak"], "+.1%")
            lines.append(f"| {label} | {p['gpu_hours']:.1f} | {vs} | {_pct(p['util_prefill'])} | "
                         f"{_pct(p['util_decode'])} | {_pct(p['sm_prefill'])} | {_pct(p['sm_decode'])} | "
                         f"{fmt(p['slo_attainment'], '.2%')} | {p['actions']} | {p['reversals']} |")
        return lines
    return render


def _order_compare(figs: Mapping[str, Any]) -> list[str]:
    keep, shuffle = figs["policy-day"]["policies"], figs["policy-day-shuffle"]["policies"]
    lines = ["| policy | sizes kept in trace order (default): GPU-h / SLO / reversals | sizes shuffled: "
             "GPU-h / SLO / reversals |", "|---|---|---|"]
    for name in shuffle:
        cells = []
        for pols in (keep, shuffle):
            p = pols[name]
            cells.append(f"{p['gpu_hours']:.1f} / {fmt(p['slo_attainment'], '.2%')} / {p['reversals']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _paper_compare(figs: Mapping[str, Any]) -> list[str]:
    pols = figs["policy-day"]["policies"]
    h, s = pols["heteroscale"], pols["static-peak"]

    def move(key: str) -> str:
        return f"{_pct(s[key])} → {_pct(h[key])}"

    def pp(key: str) -> str:
        return fmt(100 * (h[key] - s[key]), "+.1f") + " pp"
    return ["| | paper | this model |", "|---|---|---|",
            f"| GPUs | −41.3% | {fmt(h['vs_static_peak'], '+.1%')} GPU-hours |",
            f"| prefill GPU utilisation | 46.8% → 76.2% | {move('util_prefill')} ({pp('util_prefill')}; paper +29.4 pp) |",
            f"| prefill SM activity | 36.6% → 62.5% | {move('sm_prefill')} ({pp('sm_prefill')}; paper +25.9 pp) |",
            f"| decode GPU utilisation | 86.0% → 82.2% | {move('util_decode')} |",
            f"| average GPU utilisation | +26.6 pp (fleet) | {move('util_weighted')} GPU-hour-weighted "
            f"({pp('util_weighted')}) |",
            f"| SLOs | held | {fmt(h['slo_attainment'], '.2%')} of requests within both SLOs "
            f"(static: {fmt(s['slo_attainment'], '.2%')}) |"]


def _azure_hours(figs: Mapping[str, Any]) -> list[str]:
    cols = ("heteroscale", "static-peak", "hpa-gpu-util", "independent-tps", "latency-only")
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for run, label in (("policy-azure-conv", "conversation hour, dialogue's r/τ"),
                       ("policy-azure-code", "code hour, dialogue's r/τ"),
                       ("policy-azure-code-curated", None)):
        f = figs[run]
        if label is None:
            label = (f"code hour, curated r = {f['pd_ratio']}, τ = {f['target_decode_tps_per_instance']:g} "
                     "(TTFT ≤ 2 s)")
        cells = [f"{f['policies'][c]['gpu_hours']:.1f} GPU-h, {fmt(f['policies'][c]['slo_attainment'], '.1%')} SLO"
                 for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _placement(figs: Mapping[str, Any]) -> list[str]:
    lines = ["| topology | cross-switch KV transfers | TTFT p50 / p90 / p99 | SLO attainment |", "|---|---|---|---|"]
    for run, label in (("placement", "both GPU types under each S1, DG within one S1"),
                       ("placement-s2", "one type per S1, DG across an S2")):
        p = figs[run]["policies"]["heteroscale"]
        t = p["ttft_s"]
        lines.append(f"| {label} | {fmt(p['cross_switch_share'], '.0%')} | {1000 * t['p50']:.1f} / "
                     f"{1000 * t['p90']:.1f} / {1000 * t['p99']:.1f} ms | {fmt(p['slo_attainment'], '.2%')} |")
    return lines


def control_lines(doc: Mapping[str, Any]) -> list[str]:
    """benchmarks/control_bench.py's result as markdown: one table per day."""
    lines: list[str] = []
    for key, day in doc["days"].items():
        c = day["curated"]
        lines += [f"### {key} ({day['tag']}): {day['title']}", "",
                  f"{day['sources']}; {day['requests']:,} requests over {day['duration_h']:g} h"
                  f"{' (quick)' if day['quick'] else ''}. Curated on {c['on']}: r = {c['pd_ratio']}, "
                  f"τ = {c['tau']:g} decode tok/s, independent-tps prefill target = "
                  f"{c['prefill_target_tps_per_instance']:g} tok/s per instance; static-peak and periodic "
                  f"sized from yesterday (peak {c['yesterday_peak_decode_tps']:g} decode tok/s).", ""]
        step = day.get("step_at_s") is not None
        head = ("| policy | GPU-h | ÷ static-peak | SLO att. | TTFT min ok | TBT min ok | reversals | per 2 h |"
                + (" first scale-out s | SLO restored s |" if step else ""))
        lines += [head, "|" + "---|" * head.count(" |")]
        for name, r in day["policies"].items():
            gh = f"{r['gpu_hours']:.2f}" if r["gpu_hours"] < 10 else f"{r['gpu_hours']:.1f}"
            row = (f"| {name} | {gh} | {fmt(r['vs_static_peak'], '.2f')} | "
                   f"{fmt(r['slo_attainment'], '.1%')} | {fmt(r['ttft_minutes_ok'], '.0%')} | "
                   f"{fmt(r['tbt_minutes_ok'], '.0%')} | {r['reversals']} | {r['reversals_per_2h']:g} |")
            if step:
                row += f" {fmt(r['first_scale_out_s'], 'g')} | {fmt(r['slo_restored_s'], 'g')} |"
            lines.append(row)
        lines.append("")
    return lines[:-1] if lines else lines


BLOCKS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "control": lambda figs: control_lines(figs["control"]),
    "ratio-sweep": _ratio_sweep, "signals": _signals, "policy-day": _policies("policy-day"),
    "paper-compare": _paper_compare, "order-compare": _order_compare, "azure-hours": _azure_hours, "placement": _placement,
}


# ------------------------------------------------------------------ sync and check

def render(text: str, figs: Mapping[str, Any]) -> str:
    """``text`` with every mark re-rendered from ``figs``."""
    def inline(m: re.Match[str]) -> str:
        return f"<!--fig:{m.group(1)}{':' + m.group(2) if m.group(2) is not None else ''}-->" \
               f"{fmt(lookup(figs, m.group(1)), m.group(2))}<!--/fig-->"

    def block(m: re.Match[str]) -> str:
        return m.group(1) + "\n".join(BLOCKS[m.group(2)](figs)) + "\n" + m.group(4)
    return BLOCK.sub(block, INLINE.sub(inline, text))


def problems_in(text: str, figs: Mapping[str, Any], *, where: str) -> list[str]:
    """One line per mark whose text differs from what ``figs`` renders."""
    out = []
    for m in INLINE.finditer(text):
        try:
            want = fmt(lookup(figs, m.group(1)), m.group(2))
        except KeyError:
            out.append(f"{where}: {m.group(1)} is not in {FIGURES}")
            continue
        if m.group(3) != want:
            out.append(f"{where}: {m.group(1)} reads {m.group(3)!r}, the committed run gave {want!r}")
    for m in BLOCK.finditer(text):
        if m.group(2) not in BLOCKS:
            out.append(f"{where}: unknown table {m.group(2)!r}")
            continue
        try:
            want = "\n".join(BLOCKS[m.group(2)](figs)) + "\n"
        except KeyError as exc:
            out.append(f"{where}: table {m.group(2)} needs {exc} from {FIGURES}")
            continue
        if m.group(3) != want:
            out.append(f"{where}: table {m.group(2)} differs from the committed runs")
    return out


def sync(repo: Path, figs: Mapping[str, Any]) -> list[Path]:
    """Write figures.json and re-render the marks in every doc; returns changed files."""
    changed = []
    (repo / FIGURES).write_text(json.dumps(figs, indent=1) + "\n")
    for doc in DOCS:
        path = repo / doc
        if not path.is_file():
            continue
        old = path.read_text()
        new = render(old, figs)
        if new != old:
            path.write_text(new)
            changed.append(doc)
    return changed


def check(repo: Path) -> list[str]:
    """Docs vs figures.json vs the committed summaries; one line per mismatch."""
    figs = json.loads((repo / FIGURES).read_text())
    problems = []
    fresh = extract(repo)
    for key in sorted(set(figs) | set(fresh)):
        if figs.get(key) != json.loads(json.dumps(fresh.get(key))):
            problems.append(f"{FIGURES}: {key} differs from its summary (rerun scripts/regenerate_docs.py --sync)")
    for doc in DOCS:
        path = repo / doc
        if path.is_file():
            problems += problems_in(path.read_text(), figs, where=str(doc))
    return problems
