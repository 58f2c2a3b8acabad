"""The demo report's timeline plot: load, instances per role, latency against the SLOs (matplotlib, Agg).

``plot_timeline(report, path)`` draws the ``timeline`` of a ``heteroscale demo --report``
document (one sample a second) in four panels sharing the time axis:

1. offered and completed requests/s;
2. instances per role (prefill, decode; the coordinator's desired counts dashed) and the
   GPUs held, draining instances included (right axis); scaling decisions as ticks;
3. TTFT p90 against its SLO: what clients saw over the last 5 s, and what the
   coordinator read from the engines' histograms;
4. TBT p90 against its SLO, the same two sources.

Latencies are modelled seconds (the report's ``latency_unit``); time is wall seconds
since the demo started. Presentation only: every number comes from the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

PREFILL, DECODE, GPUS, LOAD, DONE, SLO = "#d9822b", "#2b6fd9", "#6b7385", "#7a4fd6", "#1a9c5b", "#8a93a6"


def _plt():  # noqa: ANN202 - the pyplot module
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(timeline: list[Mapping[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    return [float("nan") if s.get(key) is None else float(s[key]) * scale for s in timeline]


def plot_timeline(report: Mapping[str, Any], path: Path) -> Path:
    """Write the timeline plot of ``report`` to ``path`` (PNG); returns ``path``."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    timeline = list(report.get("timeline") or [])
    t = [float(s["at_s"]) for s in timeline]
    slo = report.get("slo") or {}
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True,
                             gridspec_kw={"height_ratios": [1, 1.2, 1, 1]})
    ax = axes[0]
    ax.plot(t, _series(timeline, "offered_rps"), color=LOAD, lw=1.4, label="offered")
    ax.plot(t, _series(timeline, "completed_rps"), color=DONE, lw=1.0, label="completed (last 5 s)")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[1]
    ax.step(t, _series(timeline, "prefill"), where="post", color=PREFILL, lw=1.6, label="prefill instances")
    ax.step(t, _series(timeline, "decode"), where="post", color=DECODE, lw=1.6, label="decode instances")
    ax.step(t, _series(timeline, "desired_prefill"), where="post", color=PREFILL, lw=0.9, ls="--",
            label="desired (coordinator)")
    ax.step(t, _series(timeline, "desired_decode"), where="post", color=DECODE, lw=0.9, ls="--")
    for d in report.get("decisions") or []:
        if d.get("direction") in ("out", "in"):
            ax.axvline(float(d["at"]), color="#1d2330" if d["direction"] == "out" else "#b8bfcc", lw=0.6,
                       ymax=0.06)
    ax.set_ylabel("instances")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    right = ax.twinx()
    right.step(t, _series(timeline, "gpus"), where="post", color=GPUS, lw=1.0, ls=":",
               label="GPUs held (incl. draining)")
    right.set_ylabel("GPUs", color=GPUS)
    right.set_ylim(bottom=0)
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)

    for ax, key, unit, scale, name in ((axes[2], "ttft", "s", 1.0, "TTFT"), (axes[3], "tbt", "ms", 1000.0, "TBT")):
        ax.plot(t, _series(timeline, f"{key}_p90_s", scale), color=PREFILL if key == "ttft" else DECODE, lw=1.2,
                label=f"{name} p90, clients")
        ax.plot(t, _series(timeline, f"engine_{key}_p90_s", scale), color="#1d2330", lw=0.9, alpha=0.7,
                label=f"{name} p90, engine histograms (coordinator)")
        if slo.get(f"{key}_s") is not None:
            ax.axhline(float(slo[f"{key}_s"]) * scale, color=SLO, ls="--", lw=1.0, label="SLO")
        ax.set_ylabel(f"{name} p90 ({unit})")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds since the demo started (latencies in modelled seconds)")
    attainment = report.get("slo_attainment")
    title = (f"heteroscale demo: {report.get('requests', 0)} requests, SLO attainment "
             f"{'n/a' if attainment is None else f'{100 * attainment:.1f}%'}, ratio {report.get('pd_ratio', '?')}, "
             f"speed-up {report.get('speedup', 1):g}")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
