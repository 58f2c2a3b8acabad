"""The sidecar's ``/metrics`` families (ARCHITECTURE §3.2), built at scrape time from cached state.

``SidecarCollector`` follows prometheus_client's custom-collector pattern: it
holds no metric objects, only a ``view`` callable returning the agent's latest
``MetricsView``, and builds fresh families on every ``collect()``. It is
registered on a registry the caller passes in (never the global one).

Every family carries the constant labels ``service`` and ``role``. A value the
sidecar does not have (engine never scraped, series missing, no GPU) is left
out of its family rather than written as 0: an absent series and a measured
zero mean different things to an autoscaler.

Exported:
  §3.2  heteroscale_engine_up, heteroscale_decode_tokens_per_second,
        heteroscale_prefill_tokens_per_second, heteroscale_prefill_uncached_tokens_per_second,
        heteroscale_requests_running, heteroscale_requests_waiting, heteroscale_kv_cache_usage_ratio,
        heteroscale_ttft_seconds{quantile}, heteroscale_tbt_seconds{quantile},
        heteroscale_gpu_{utilization_ratio,sm_activity_ratio,memory_used_bytes,power_watts}{gpu},
        heteroscale_kv_transfer_bytes_per_second{direction,source} (one series per source that
        measured: engine connector metrics, rdma NIC counters, probe; ``source`` added to the
        §3.2 label set as issue 5 asks), heteroscale_scrape_errors_total{reason},
        heteroscale_scrape_duration_seconds
  extra heteroscale_gpu_mode{mode} (1 for the active GPU source; mode="none" = no-GPU mode),
        heteroscale_report_stale, heteroscale_rate_window_seconds,
        heteroscale_engine_started_at_seconds (unix time the engine was first seen up, or
        restarted: the coordinator's warm-up rule reads it over PromQL),
        heteroscale_requests_deferred, heteroscale_requests_kv_stage{stage},
        heteroscale_preemptions_per_second, and whatever extensions collect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from heteroscale.engine_adapters.rates import WindowStats
from heteroscale.sidecar.extensions import KV_BYTES_PER_SECOND, KV_DIRECTION, KV_DIRECTIONS
from heteroscale.report import GpuReading

log = logging.getLogger("heteroscale.sidecar")

SCRAPE_ERROR_REASONS = ("connect", "timeout", "http_status", "parse", "too_large", "wrong_engine", "empty")


@dataclass(frozen=True)
class MetricsView:
    """What the collector needs, copied out of the agent at scrape time."""

    service: str
    role: str
    engine_up: bool = False
    stale: bool = True
    stats: WindowStats = field(default_factory=WindowStats)
    window_s: float = 0.0
    gpu_mode: str = "none"
    gpus: tuple[GpuReading, ...] = ()
    kv_sources: tuple[tuple[str, float], ...] = ()      # (source, bytes/s) that measured
    kv_direction: str = "send"
    started_at: float | None = None
    scrape_errors: Mapping[str, int] = field(default_factory=dict)
    scrape_duration_s: float | None = None
    extension_metrics: Callable[[], Iterable[Metric]] | None = None


class SidecarCollector:
    """Builds the sidecar's families from ``view()`` on every registry scrape."""

    def __init__(self, view: Callable[[], MetricsView]) -> None:
        self._view = view

    def describe(self) -> Iterable[Metric]:
        # Families are dynamic (extensions); registering must not call view() early.
        return ()

    def collect(self) -> Iterable[Metric]:
        v = self._view()
        const = {"service": v.service, "role": v.role}
        names, values = list(const), list(const.values())

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(name, doc, labels=names)
            if value is not None:
                fam.add_metric(values, value)
            return fam

        def labelled(name: str, doc: str, label: str, items: Iterable[tuple[str, float | None]]) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(name, doc, labels=names + [label])
            for key, value in items:
                if value is not None:
                    fam.add_metric(values + [key], value)
            return fam

        s = v.stats
        yield gauge("heteroscale_engine_up", "1 if the last engine scrape succeeded and parsed.",
                    1.0 if v.engine_up else 0.0)
        yield gauge("heteroscale_decode_tokens_per_second", "Generated tokens/s over the rate window.",
                    s.decode_tps)
        yield gauge("heteroscale_prefill_tokens_per_second", "Prompt tokens/s (all) over the rate window.",
                    s.prefill_tps)
        yield gauge("heteroscale_prefill_uncached_tokens_per_second",
                    "Prompt tokens/s computed here (missed every cache) over the rate window.",
                    s.prefill_uncached_tps)
        yield gauge("heteroscale_requests_running", "Requests in the engine's running batch.", s.requests_running)
        yield gauge("heteroscale_requests_waiting", "Requests queued in the engine.", s.requests_waiting)
        yield gauge("heteroscale_kv_cache_usage_ratio", "KV-cache usage, 0..1.", s.kv_cache_usage_ratio)
        yield gauge("heteroscale_requests_deferred",
                    "Waiting requests the engine deferred for a transient constraint (vLLM; on a P/D decode pod "
                    "mostly requests whose KV has not arrived).", s.requests_deferred)
        yield labelled("heteroscale_requests_kv_stage", "Requests per KV-transfer stage (vLLM KV fetch stages, "
                       "SGLang P/D queues).", "stage", sorted(s.requests_by_kv_stage.items()))
        yield gauge("heteroscale_preemptions_per_second",
                    "Requests preempted (vLLM) or retracted (SGLang) per second over the rate window.",
                    s.preemptions_per_s)
        yield labelled("heteroscale_ttft_seconds", "Time to first token, windowed quantiles from histogram deltas.",
                       "quantile", ((_q(q), val) for q, val in s.quantiles("ttft").items()))
        yield labelled("heteroscale_tbt_seconds", "Time between tokens, windowed quantiles from histogram deltas.",
                       "quantile", ((_q(q), val) for q, val in s.quantiles("tbt").items()))
        yield from self._gpu_families(v, names, values)
        kv = GaugeMetricFamily("heteroscale_kv_transfer_bytes_per_second",
                               "KV-cache transfer throughput (send on prefill, receive on decode) by source: "
                               "engine connector metrics, rdma NIC counters, or the active probe's achievable rate.",
                               labels=names + ["direction", "source"])
        for source, value in v.kv_sources:
            kv.add_metric(values + [v.kv_direction, source], value)
        yield kv
        yield gauge("heteroscale_engine_started_at_seconds",
                    "Unix time the engine was first seen up (or seen to restart): warm-up starts here.",
                    v.started_at)
        errors = CounterMetricFamily("heteroscale_scrape_errors", "Failed engine scrapes by reason.",
                                     labels=names + ["reason"])
        for reason in sorted(set(SCRAPE_ERROR_REASONS) | set(v.scrape_errors)):
            errors.add_metric(values + [reason], float(v.scrape_errors.get(reason, 0)))
        yield errors
        yield gauge("heteroscale_scrape_duration_seconds", "Duration of the last engine scrape.",
                    v.scrape_duration_s)
        yield labelled("heteroscale_gpu_mode", "1 for the active GPU source; mode=\"none\" is no-GPU mode.",
                       "mode", [(v.gpu_mode, 1.0)])
        yield gauge("heteroscale_report_stale", "1 when the newest good engine sample is too old to act on.",
                    1.0 if v.stale else 0.0)
        yield gauge("heteroscale_rate_window_seconds", "Span of the samples the rates were computed over.",
                    v.window_s)
        if v.extension_metrics is not None:
            yield from _safe(v.extension_metrics)

    @staticmethod
    def _gpu_families(v: MetricsView, names: list[str], values: list[str]) -> Iterable[Metric]:
        specs = (
            ("heteroscale_gpu_utilization_ratio", "Share of time a kernel was running (NVML), 0..1.",
             "utilization_ratio"),
            ("heteroscale_gpu_sm_activity_ratio", "SM activity (NVML GPM, Hopper+), 0..1.", "sm_activity_ratio"),
            ("heteroscale_gpu_memory_used_bytes", "GPU memory used.", "memory_used_bytes"),
            ("heteroscale_gpu_power_watts", "GPU power draw.", "power_watts"),
        )
        for name, doc, attr in specs:
            fam = GaugeMetricFamily(name, doc, labels=names + ["gpu"])
            for reading in v.gpus:
                value = getattr(reading, attr)
                if value is not None:
                    fam.add_metric(values + [reading.gpu], value)
            yield fam


def _q(q: float) -> str:
    return f"{q:g}"


def _safe(produce: Callable[[], Iterable[Metric]]) -> list[Metric]:
    # An extension bug must not take /metrics down with it.
    try:
        return list(produce())
    except Exception:
        log.exception("a sidecar extension failed to collect its metrics")
        return []


def view_kv(sample: Mapping[str, Any] | None, *,
            default_direction: str) -> tuple[tuple[tuple[str, float], ...], str]:
    """((source, bytes/s), ...) and the direction, from a ``kv_transfer`` extension sample.

    Per-source values come from ``sample["sources"][name]["bytes_per_second"]``; a sample
    with only a headline ``bytes_per_second`` counts under ``sample["source"]`` (default
    ``engine``). Anything that is not a finite, non-negative number is left out.
    """
    if not sample:
        return (), default_direction
    direction = sample.get(KV_DIRECTION, default_direction)
    if direction not in KV_DIRECTIONS:
        direction = default_direction
    out: list[tuple[str, float]] = []
    sources = sample.get("sources")
    if isinstance(sources, Mapping):
        for name in sorted(sources):
            entry = sources[name]
            value = _rate(entry.get(KV_BYTES_PER_SECOND)) if isinstance(entry, Mapping) else None
            if isinstance(name, str) and value is not None:
                out.append((name, value))
    if not out:
        value = _rate(sample.get(KV_BYTES_PER_SECOND))
        source = sample.get("source")
        if value is not None:
            out.append((source if isinstance(source, str) and source else "engine", value))
    return tuple(out), direction


def _rate(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        return None
    return float(value)
