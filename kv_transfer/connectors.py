"""KV-transfer connector metrics, parsed from Prometheus pages (pure).

Four pages carry KV-transfer numbers (ENGINES.md §2.3, §3.3, §5.3, §5.4):

* the **vLLM engine page** with the NIXL connector: ``vllm:nixl_bytes_transferred``
  (histogram; its ``_sum`` is cumulative bytes, ``_count`` transfers),
  ``vllm:nixl_xfer_time_seconds`` (histogram of per-transfer time),
  ``vllm:nixl_num_failed_transfers_total``;
* the **SGLang engine page** in P/D mode: ``sglang:kv_transfer_total_mb``,
  ``sglang:kv_transfer_latency_ms`` and ``sglang:kv_transfer_speed_gb_s`` -
  gauges of the last log interval in older builds, per-transfer histograms in
  newer ones (0.5.23: ``observability/metrics_collector.py``; both handled) -
  ``sglang:kv_transfer_bootstrap_ms`` and ``sglang:kv_transfer_alloc_ms``
  (histograms), ``sglang:num_transfer_failed_reqs_total``,
  ``sglang:num_bootstrap_failed_reqs_total``, ``sglang:num_prefill_retries_total``
  and the transfer queue gauges;
* **NIXL's own telemetry exporter** (``agent_tx_bytes_total``,
  ``agent_rx_bytes_total``, ``agent_xfer_time_total`` in µs, the
  ``agent_xfer_time_us`` histogram, ``agent_errors_total{status}``);
* **Mooncake TENT metrics** (``tent_write_bytes_total{transport}``,
  ``tent_read_bytes_total``, ``..._requests_total``, ``..._failures_total``,
  ``tent_write_latency_us`` / ``tent_read_latency_us`` histograms).

Each becomes a ``ConnectorReading``: cumulative bytes per direction, transfer
count, busy time, failures, a latency histogram in seconds, plus the gauges an
engine offers instead. A value the page does not carry is ``None`` (or an absent
key), never 0. Units are normalised here once: bytes, seconds. SGLang's MB and
GB are read as 2**20 and 2**30 bytes (SGLang 0.5.23 divides bytes by 1024 twice for
MB and MB by 1024 for GB, ``req_time_stats.py``) - stated in docs/kv-transfer.md.

SGLang writes the same scheduler value once per TP rank (with
``--enable-metrics-for-all-schedulers``); summing them would count a transfer
N times. Series that differ only in ``tp_rank``, ``pp_rank`` or ``moe_ep_rank``
(the rank labels of one batch state) are therefore de-duplicated
(largest value) before the DP ranks are summed. With priority scheduling its
queue gauges carry the total under ``priority=""`` next to one series per
priority; only the totals are read.

Only the lines of wanted families are read (``heteroscale.promtext``, the
project's own sample-line parser): garbage elsewhere on a big engine page is not
this module's business; garbage inside a wanted family raises
``ScrapeError("parse")``, a wanted line over 16 KiB ``ScrapeError("too_large")``.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from heteroscale import promtext
from heteroscale.kv_transfer.stats import HistogramSample, merge_histograms
from heteroscale.errors import ScrapeError

VLLM_NIXL = "vllm_nixl"
SGLANG = "sglang"
NIXL_TELEMETRY = "nixl_telemetry"
MOONCAKE_TENT = "mooncake_tent"
CONNECTORS = (VLLM_NIXL, SGLANG, NIXL_TELEMETRY, MOONCAKE_TENT)

SEND = "send"
RECEIVE = "receive"
DIRECTIONS = (SEND, RECEIVE)

MIB = float(2 ** 20)
GIB = float(2 ** 30)

# Line-name prefixes worth parsing; everything else on a page is skipped unread.
_ENGINE_PREFIXES = ("vllm:nixl_", "vllm:num_requests_waiting", "sglang:kv_transfer_",
                    "sglang:num_transfer_failed_reqs", "sglang:num_bootstrap_failed_reqs",
                    "sglang:num_prefill_retries",
                    "sglang:num_prefill_inflight_queue_reqs", "sglang:num_decode_transfer_queue_reqs",
                    "sglang:num_queue_reqs")
_TELEMETRY_PREFIXES = ("agent_tx_bytes", "agent_rx_bytes", "agent_xfer_time", "agent_errors",
                       "tent_read_", "tent_write_")
_DEDUP_LABELS = frozenset({"tp_rank", "pp_rank", "moe_ep_rank"})   # copies of one batch state (engine_adapters.sglang)


@dataclass(frozen=True)
class ConnectorReading:
    """One connector's cumulative KV-transfer numbers at one scrape."""

    connector: str
    bytes_total: Mapping[str, float] = field(default_factory=dict)   # direction -> bytes
    transfers_total: float | None = None
    busy_seconds_total: float | None = None    # sum of per-transfer durations
    failures_total: float | None = None
    latency: HistogramSample | None = None     # per-transfer latency, seconds
    speed_bytes_per_s: float | None = None     # engine's own speed gauge (SGLang, older builds)
    latency_s: float | None = None             # engine's own latency gauge (SGLang, older builds)
    speed: HistogramSample | None = None       # per-transfer speed, bytes/s (SGLang histogram)
    bootstrap: HistogramSample | None = None   # per-request bootstrap time, seconds (SGLang)
    alloc_wait: HistogramSample | None = None  # per-request wait for KV allocation, seconds (SGLang)
    retries_total: float | None = None         # prefill retries (SGLang)


@dataclass(frozen=True)
class EngineKv:
    """What an engine page says about KV transfer and about its own load."""

    connectors: tuple[ConnectorReading, ...] = ()
    requests_waiting: float | None = None      # engine queue; > 0 means the engine is saturated
    transfer_queue_reqs: float | None = None   # requests waiting on a KV transfer (SGLang)


# -- page -> samples ----------------------------------------------------------------

Samples = Mapping[str, list[tuple[Mapping[str, str], float]]]


@functools.lru_cache(maxsize=8)
def _lines_re(prefixes: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """(first line, later lines) patterns for the sample lines whose name starts with a prefix."""
    names = "|".join(re.escape(p) for p in prefixes)
    line = rf"(?:{names})[^\n]*"
    return re.compile(line), re.compile(rf"\n({line})")


def _samples(text: str, prefixes: Sequence[str]) -> Samples:
    """Sample-name index of the lines whose name starts with one of ``prefixes`` (``promtext``)."""
    if not isinstance(text, str) or not text or text.isspace():
        raise ScrapeError("empty", "the page is empty")
    if not text.endswith("\n"):
        raise ScrapeError("parse", "page does not end with a newline (truncated)")
    first, later = _lines_re(tuple(prefixes))
    lines = promtext.find_lines(later, text)
    m = first.match(text)
    if m is not None:
        lines.insert(0, m.group())
    index: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for line in lines:
        try:
            sample = promtext.parse_line(line)
        except promtext.LineTooLong as exc:
            raise ScrapeError("too_large", str(exc)) from exc
        except ValueError as exc:
            raise ScrapeError("parse", f"bad sample line {line[:120]!r}: {exc}"[:300]) from exc
        if math.isfinite(sample.value):
            index.setdefault(sample.name, []).append((sample.labels, sample.value))
    return index


def _dedup(series: Iterable[tuple[Mapping[str, str], float]]) -> list[tuple[Mapping[str, str], float]]:
    """Series identical except for a TP rank collapse to one (largest value); where a
    ``priority=""`` total is present, the per-priority breakdown next to it is dropped."""
    series = list(series)
    totals = [item for item in series if item[0].get("priority") == ""]
    best: dict[tuple, tuple[Mapping[str, str], float]] = {}
    for labels, value in totals or series:
        key = tuple(sorted((k, v) for k, v in labels.items() if k not in _DEDUP_LABELS))
        if key not in best or value > best[key][1]:
            best[key] = (labels, value)
    return list(best.values())


def _total(index: Samples, *names: str, dedup: bool = False) -> float | None:
    """Sum of the first present sample name's series; ``None`` when none is present."""
    for name in names:
        found = index.get(name)
        if found:
            series = _dedup(found) if dedup else found
            return float(sum(v for _, v in series if v >= 0))
    return None


def _mean(index: Samples, name: str, *, dedup: bool = False) -> float | None:
    found = index.get(name)
    if not found:
        return None
    series = _dedup(found) if dedup else found
    return float(sum(v for _, v in series)) / len(series)


def _histogram(index: Samples, family: str, *, scale: float = 1.0, dedup: bool = False) -> HistogramSample | None:
    """All series of a histogram family merged; bounds and sum multiplied by ``scale``."""
    buckets = index.get(family + "_bucket")
    if not buckets:
        return None
    by_series: dict[tuple, dict[float, float]] = {}
    for labels, value in buckets:
        try:
            bound = float(labels.get("le", ""))
        except ValueError as exc:
            raise ScrapeError("parse", f"{family}: bad bucket bound {labels.get('le')!r}") from exc
        if math.isnan(bound):
            raise ScrapeError("parse", f"{family}: NaN bucket bound")
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        by_series.setdefault(key, {})[bound] = value
    sums = {tuple(sorted(labels.items())): value for labels, value in index.get(family + "_sum", ())}
    if dedup:
        keep = {}
        for key, buckets_of in by_series.items():
            dkey = tuple(kv for kv in key if kv[0] not in _DEDUP_LABELS)
            if dkey not in keep or max(buckets_of.values()) > max(keep[dkey][1].values()):
                keep[dkey] = (key, buckets_of)
        by_series = {key: b for key, b in keep.values()}
    series = []
    for key, by_bound in by_series.items():
        bounds = tuple(sorted(by_bound))
        if not bounds or bounds[-1] != math.inf:
            raise ScrapeError("parse", f"{family}: histogram without a +Inf bucket")
        cumulative = tuple(by_bound[b] for b in bounds)
        if any(c2 < c1 for c1, c2 in zip(cumulative, cumulative[1:])) or cumulative[0] < 0:
            raise ScrapeError("parse", f"{family}: bucket counts are not cumulative")
        series.append(HistogramSample(bounds=tuple(b * scale for b in bounds), cumulative=cumulative,
                                      sum=sums.get(key, 0.0) * scale))
    merged = merge_histograms(series)
    if merged is None:
        raise ScrapeError("parse", f"{family}: series with different bucket layouts")
    return merged


# -- engine pages -------------------------------------------------------------------

def parse_engine_page(text: str, *, direction: str) -> EngineKv:
    """KV-transfer readings on a vLLM or SGLang engine page.

    ``direction`` (``send`` on prefill, ``receive`` on decode) is where the
    engine's bytes are attributed: engine connector metrics do not say which
    way the bytes went, the pod's role does.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}")
    index = _samples(text, _ENGINE_PREFIXES)
    connectors = [r for r in (_vllm_nixl(index, direction), _sglang(index, direction)) if r is not None]
    waiting = _total(index, "vllm:num_requests_waiting")
    if waiting is None:
        waiting = _total(index, "sglang:num_queue_reqs", dedup=True)
    queues = [q for q in (_total(index, "sglang:num_prefill_inflight_queue_reqs", dedup=True),
                          _total(index, "sglang:num_decode_transfer_queue_reqs", dedup=True)) if q is not None]
    return EngineKv(connectors=tuple(connectors), requests_waiting=waiting,
                    transfer_queue_reqs=sum(queues) if queues else None)


def _vllm_nixl(index: Samples, direction: str) -> ConnectorReading | None:
    bytes_hist = _histogram(index, "vllm:nixl_bytes_transferred")
    count = _total(index, "vllm:nixl_bytes_transferred_count")
    byte_sum = _total(index, "vllm:nixl_bytes_transferred_sum")
    latency = _histogram(index, "vllm:nixl_xfer_time_seconds")
    busy = _total(index, "vllm:nixl_xfer_time_seconds_sum")
    failures = _total(index, "vllm:nixl_num_failed_transfers_total", "vllm:nixl_num_failed_transfers")
    if bytes_hist is None and byte_sum is None and latency is None and failures is None:
        return None
    if count is None and bytes_hist is not None:
        count = bytes_hist.count
    return ConnectorReading(
        connector=VLLM_NIXL,
        bytes_total={direction: byte_sum} if byte_sum is not None else {},
        transfers_total=count, busy_seconds_total=busy, failures_total=failures, latency=latency)


def _sglang(index: Samples, direction: str) -> ConnectorReading | None:
    # Newer SGLang: per-request histograms; older: gauges of the last log interval.
    size = _histogram(index, "sglang:kv_transfer_total_mb", scale=MIB, dedup=True)
    latency = _histogram(index, "sglang:kv_transfer_latency_ms", scale=1e-3, dedup=True)
    speed_gauge = _mean(index, "sglang:kv_transfer_speed_gb_s", dedup=True)
    latency_gauge = _mean(index, "sglang:kv_transfer_latency_ms", dedup=True)
    failures = [f for f in (_total(index, "sglang:num_transfer_failed_reqs_total", dedup=True),
                            _total(index, "sglang:num_bootstrap_failed_reqs_total", dedup=True)) if f is not None]
    speed = _histogram(index, "sglang:kv_transfer_speed_gb_s", scale=GIB, dedup=True)
    bootstrap = _histogram(index, "sglang:kv_transfer_bootstrap_ms", scale=1e-3, dedup=True)
    alloc_wait = _histogram(index, "sglang:kv_transfer_alloc_ms", scale=1e-3, dedup=True)
    retries = _total(index, "sglang:num_prefill_retries_total", dedup=True)
    if (size is None and latency is None and speed_gauge is None and latency_gauge is None and not failures
            and speed is None and bootstrap is None):
        return None
    return ConnectorReading(
        connector=SGLANG,
        bytes_total={direction: size.sum} if size is not None else {},
        transfers_total=size.count if size is not None else (latency.count if latency is not None else None),
        busy_seconds_total=latency.sum if latency is not None else None,
        failures_total=sum(failures) if failures else None,
        latency=latency,
        speed_bytes_per_s=speed_gauge * GIB if speed_gauge is not None else None,
        latency_s=latency_gauge / 1e3 if latency_gauge is not None else None,
        speed=speed, bootstrap=bootstrap, alloc_wait=alloc_wait, retries_total=retries)


# -- transfer-library exporters -------------------------------------------------------

def parse_connector_page(text: str) -> ConnectorReading:
    """A NIXL telemetry or Mooncake TENT page (whichever it is).

    Raises ``ScrapeError("wrong_engine")`` for a valid page that is neither.
    """
    index = _samples(text, _TELEMETRY_PREFIXES)
    for reading in (_nixl_telemetry(index), _mooncake_tent(index)):
        if reading is not None:
            return reading
    raise ScrapeError("wrong_engine", "neither NIXL telemetry (agent_*) nor Mooncake TENT (tent_*) metrics")


def _nixl_telemetry(index: Samples) -> ConnectorReading | None:
    sent = _total(index, "agent_tx_bytes_total", "agent_tx_bytes")
    received = _total(index, "agent_rx_bytes_total", "agent_rx_bytes")
    busy_us = _total(index, "agent_xfer_time_total")
    latency = _histogram(index, "agent_xfer_time_us", scale=1e-6)
    errors = _total(index, "agent_errors_total", "agent_errors")
    if sent is None and received is None and busy_us is None and latency is None:
        return None
    by_direction = {d: v for d, v in ((SEND, sent), (RECEIVE, received)) if v is not None}
    return ConnectorReading(
        connector=NIXL_TELEMETRY, bytes_total=by_direction,
        transfers_total=latency.count if latency is not None else None,
        busy_seconds_total=busy_us / 1e6 if busy_us is not None else None,
        failures_total=errors, latency=latency)


def _mooncake_tent(index: Samples) -> ConnectorReading | None:
    written = _total(index, "tent_write_bytes_total")
    read = _total(index, "tent_read_bytes_total")
    requests = [r for r in (_total(index, "tent_write_requests_total"),
                            _total(index, "tent_read_requests_total")) if r is not None]
    failures = [f for f in (_total(index, "tent_write_failures_total"),
                            _total(index, "tent_read_failures_total")) if f is not None]
    histograms = [h for h in (_histogram(index, "tent_write_latency_us", scale=1e-6),
                              _histogram(index, "tent_read_latency_us", scale=1e-6)) if h is not None]
    latency = merge_histograms(histograms) if histograms else None
    if written is None and read is None and not requests and latency is None:
        return None
    # A TENT write puts local data into the peer (P writes into D); a read pulls it in.
    by_direction = {d: v for d, v in ((SEND, written), (RECEIVE, read)) if v is not None}
    return ConnectorReading(
        connector=MOONCAKE_TENT, bytes_total=by_direction,
        transfers_total=sum(requests) if requests else None,
        busy_seconds_total=latency.sum if latency is not None else None,
        failures_total=sum(failures) if failures else None, latency=latency)
