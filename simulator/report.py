"""Simulator reports: ``summary.json``, ``report.md`` and PNG plots (matplotlib, Agg).

Owns presentation only; every number comes from ``RunResult``s and pressure-test
dicts computed elsewhere. Also computes the signal study (which of the paper's
eight signals track load at fixed capacity) from per-minute series.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from heteroscale.simulator.model.runner import RunResult

SIGNALS = (
    ("prefill_uncached_tps", "prefill tokens/s (uncached)"),
    ("decode_tps", "decode tokens/s"),
    ("prefill_gpu_util", "prefill GPU utilisation"),
    ("decode_gpu_util", "decode GPU utilisation"),
    ("prefill_sm", "prefill SM activity"),
    ("decode_sm", "decode SM activity"),
    ("ttft_p90_s", "TTFT p90"),
    ("tbt_p90_s", "TBT p90"),
)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def signal_study(result: RunResult) -> list[dict[str, Any]]:
    """Per signal: Pearson r with offered load (arrivals/min), and the trough/peak ratio
    (5th/95th percentile) — the paper's "signal-to-noise" and "swing" criteria."""
    s = result.series
    load = s["arrival_rps"]
    rows = []
    for key, label in SIGNALS:
        v = s[key]
        ok = ~np.isnan(v) & ~np.isnan(load)
        if ok.sum() < 3 or np.std(v[ok]) == 0 or np.std(load[ok]) == 0:
            r = 0.0
        else:
            r = float(np.corrcoef(v[ok], load[ok])[0, 1])
        hi = float(np.nanpercentile(v, 95)) if ok.any() else 0.0
        lo = float(np.nanpercentile(v, 5)) if ok.any() else 0.0
        trough = lo / hi if hi > 0 else 0.0
        verdict = ("tracks load" if r >= 0.9 and trough < 0.5
                   else "flat (misleading)" if trough >= 0.6 else "non-linear / noisy")
        rows.append({"signal": key, "label": label, "pearson_r_with_load": round(r, 3),
                     "trough_to_peak": round(trough, 3), "verdict": verdict})
    return rows


def write_summary(out: Path, doc: Mapping[str, Any]) -> Path:
    path = out / "summary.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_json_default) + "\n")
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)


def plot_policies(out: Path, results: Mapping[str, RunResult]) -> list[str]:
    """load_vs_gpus.png, utilization.png, latency.png; returns the file names."""
    plt = _plt()
    names = list(results)
    files = []
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.2 * len(names) + 0.6), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        s = results[name].series
        load = s["decode_tps"] / max(1e-9, float(np.nanmax(s["decode_tps"])))
        gpus = s["gpus"] / max(1e-9, float(np.nanmax(s["gpus"])))
        ax.plot(s["t_h"], load, color="tab:blue", lw=1, label="decode tok/s (norm.)")
        ax.step(s["t_h"], gpus, color="tab:red", lw=1.2, where="mid", label="GPUs (norm.)")
        ax.set_ylim(0, 1.1)
        ax.set_ylabel(name, fontsize=8)
        ax.text(0.01, 0.05, f"mean GPUs {float(np.mean(s['gpus'])):.1f}", transform=ax.transAxes, fontsize=8)
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("hours")
    fig.suptitle("Load vs GPUs per policy")
    fig.tight_layout()
    fig.savefig(out / "load_vs_gpus.png", dpi=90)
    plt.close(fig)
    files.append("load_vs_gpus.png")

    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for name in names:
        s = results[name].series
        axes[0].plot(s["t_h"], s["prefill_gpu_util"], lw=1, label=name)
        axes[1].plot(s["t_h"], s["decode_gpu_util"], lw=1, label=name)
    axes[0].set_ylabel("prefill GPU util")
    axes[1].set_ylabel("decode GPU util")
    axes[1].set_xlabel("hours")
    axes[0].legend(fontsize=7, ncol=3)
    for ax in axes:
        ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(out / "utilization.png", dpi=90)
    plt.close(fig)
    files.append("utilization.png")

    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for name in names:
        s = results[name].series
        axes[0].plot(s["t_h"], s["ttft_p90_s"], lw=1, label=name)
        axes[1].plot(s["t_h"], s["tbt_p90_s"] * 1000, lw=1, label=name)
    axes[0].set_ylabel("TTFT p90 (s)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("TBT p90 (ms)")
    axes[1].set_xlabel("hours")
    axes[0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=90)
    plt.close(fig)
    files.append("latency.png")
    return files


def plot_signals(out: Path, result: RunResult) -> str:
    plt = _plt()
    s = result.series
    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
    load = s["arrival_rps"] / max(1e-9, float(np.nanmax(s["arrival_rps"])))
    groups = [("throughput (norm.)", ("prefill_uncached_tps", "decode_tps"), True),
              ("GPU utilisation", ("prefill_gpu_util", "decode_gpu_util"), False),
              ("SM activity", ("prefill_sm", "decode_sm"), False),
              ("latency p90 (norm.)", ("ttft_p90_s", "tbt_p90_s"), True)]
    for ax, (title, keys, normalise) in zip(axes, groups):
        ax.plot(s["t_h"], load, color="0.7", lw=2, label="offered load (norm.)")
        for key in keys:
            v = s[key]
            if normalise:
                v = v / max(1e-12, float(np.nanmax(v)))
            ax.plot(s["t_h"], v, lw=1, label=key)
        ax.set_ylabel(title, fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("hours")
    fig.suptitle(f"Eight signals at fixed capacity ({result.policy})")
    fig.tight_layout()
    fig.savefig(out / "signals.png", dpi=90)
    plt.close(fig)
    return "signals.png"


def plot_ratio_sweep(out: Path, pressure: Mapping[str, Any], title: str = "") -> str:
    plt = _plt()
    pts = pressure["points"]
    labels = [p["ratio"] for p in pts]
    x = np.arange(len(pts))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax2 = ax.twinx()
    w = 0.2
    ax2.bar(x - 1.5 * w, [100 * p["prefill_gpu_util"] for p in pts], w, color="#9ecae1", label="P GPU util")
    ax2.bar(x - 0.5 * w, [100 * p["decode_gpu_util"] for p in pts], w, color="#fdae6b", label="D GPU util")
    ax2.bar(x + 0.5 * w, [100 * p["prefill_sm_activity"] for p in pts], w, color="#3182bd", label="P SM")
    ax2.bar(x + 1.5 * w, [100 * p["decode_sm_activity"] for p in pts], w, color="#e6550d", label="D SM")
    ax2.set_ylim(0, 200)
    ax2.set_ylabel("%")
    ax.plot(x, [p["prefill_tps"] / 1000 for p in pts], "o-", color="tab:blue", label="prefill k tok/s")
    ax.plot(x, [p["decode_tps"] / 100 for p in pts], "s-", color="tab:red", label="decode 100 tok/s")
    ax.set_xticks(x, labels)
    ax.set_ylabel("throughput within SLO")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7, ncol=2)
    ax.set_title(title or f"P/D ratio sweep (best {pressure['best']})")
    fig.tight_layout()
    name = "ratio_sweep.png"
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def policy_table(results: Mapping[str, RunResult], *, baseline: str | None = None) -> list[str]:
    lines = ["| policy | GPU-hours | vs baseline | util P | util D | SM P | SM D | SLO att. | "
             "TTFT p90 s | TBT p90 ms | actions | reversals |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = results[baseline].summary["gpu_hours"] if baseline in results else None
    for name, res in results.items():
        s = res.summary
        delta = f"{100 * (s['gpu_hours'] / base - 1):+.1f}%" if base else "—"
        tbt = s["tbt_p90_s"]
        lines.append(
            f"| {name} | {s['gpu_hours']:.1f} | {delta} | {s['mean_gpu_utilization']['prefill']:.1%} | "
            f"{s['mean_gpu_utilization']['decode']:.1%} | {s['mean_sm_activity']['prefill']:.1%} | "
            f"{s['mean_sm_activity']['decode']:.1%} | {s['slo_attainment']:.2%} | "
            f"{_fmt(s['ttft_p90_s'])} | {_fmt(None if tbt is None else tbt * 1000)} | "
            f"{s['scaling_actions']} | {s['direction_reversals']} |")
    return lines


def signal_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| signal | Pearson r with load | trough/peak (p5/p95) | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['pearson_r_with_load']:.3f} | {r['trough_to_peak']:.2f} | {r['verdict']} |"
              for r in rows]
    return lines


def ratio_table(pressure: Mapping[str, Any]) -> list[str]:
    lines = ["| split | max rps within SLO | prefill tok/s | decode tok/s | P util | D util | P SM | D SM | "
             "limited by |", "|---|---|---|---|---|---|---|---|---|"]
    for p in pressure["points"]:
        mark = " **(best)**" if p["ratio"] == pressure["best"] else ""
        lines.append(f"| {p['ratio']}{mark} | {p['max_rps_within_slo']:.2f} | {p['prefill_tps'] / 1000:.1f}k | "
                     f"{p['decode_tps'] / 1000:.2f}k | {p['prefill_gpu_util']:.0%} | {p['decode_gpu_util']:.0%} | "
                     f"{p['prefill_sm_activity']:.0%} | {p['decode_sm_activity']:.0%} | {p['limited_by']} |")
    return lines


def write_markdown(out: Path, *, title: str, meta: Mapping[str, Any], sections: list[tuple[str, list[str]]]) -> Path:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    for heading, body in sections:
        lines += ["", f"## {heading}", "", *body]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"
