"""The Prometheus metric source: sidecar signals by PromQL instead of ``/v1/report`` pulls.

For fleets where a central Prometheus already scrapes every sidecar, one coordinator
should not pull thousands of sidecars as well. ``PromCollector`` has the ``Collector``
interface the reconciler uses (``collect(service) -> Collection``, ``latest``,
``errors_total``, ``close()``) and produces the same ``Fetched`` items, so aggregation,
staleness, warm-up and the policy run unchanged.

Queries: once per tick (the snapshot is shared by every service's ``collect`` call of
that tick), one instant query per signal for ALL services, each of the form
``max by (service, role, namespace, pod, instance[, extra]) (METRIC{SELECTOR})`` —
``max`` folds duplicate series (two jobs scraping one sidecar) into one, and the
number of queries does not grow with the number of services or pods. Series are
grouped into instances by (service, role, namespace, pod if non-empty else instance).

Freshness: ``timestamp(heteroscale_engine_up)`` is the time Prometheus last scraped
the instance; it becomes the report's ``observed_at``, so ``policy.report_max_age_s``
judges it like any report (a series Prometheus keeps returning for its 5-minute
lookback after its target vanished is ``too_old``, never counted). When a scrape fails
Prometheus marks the series stale and they vanish at once; instances seen within
``lookback_s`` (``present_over_time``) but not now become ``Fetched`` items with error
``vanished`` and no role, so they are counted as excluded but do not inflate the
expected count after an intentional scale-in. The sidecar's own ``heteroscale_report_stale``
becomes ``stale``; ``heteroscale_engine_started_at_seconds`` (when exported) becomes
``started_at`` for warm-up.

Failures: a query that times out, cannot connect, answers non-200, non-JSON or not a
``success`` vector fails the whole snapshot (never act on part of the fleet's data):
every service gets an empty ``Collection`` with ``errors={"prometheus_<reason>": 1}``,
counted in ``errors_total``, and the policy holds (``hold_missing_data``).

The parsing half (``parse_vector``, ``build_snapshot``) is pure and tested against
answers captured from a real Prometheus (tests/data/prometheus/).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import aiohttp

from heteroscale.coordinator.core.types import Fetched
from heteroscale.coordinator.seams import Collection
from heteroscale.report import GpuReading, SidecarReport

if TYPE_CHECKING:
    from heteroscale.coordinator.core.settings import MetricsSourceConfig, ServiceConfig

log = logging.getLogger("heteroscale.coordinator.promql")

GROUP = ("service", "role", "namespace", "pod", "instance")


@dataclass(frozen=True)
class Signal:
    """One instant query: ``key`` names it in the snapshot, ``extra`` is the label kept
    besides the instance labels (quantile, gpu, direction)."""

    key: str
    metric: str
    extra: str | None = None
    matchers: str = ""
    wrap: str = "{sel}"          # how the selector is used before aggregation


SIGNALS: tuple[Signal, ...] = (
    Signal("engine_up", "heteroscale_engine_up"),
    Signal("observed_at", "heteroscale_engine_up", wrap="timestamp({sel})"),
    Signal("seen", "heteroscale_engine_up", wrap="present_over_time({sel}[{lookback}])"),
    Signal("stale", "heteroscale_report_stale"),
    Signal("window_s", "heteroscale_rate_window_seconds"),
    Signal("started_at", "heteroscale_engine_started_at_seconds"),
    Signal("decode_tps", "heteroscale_decode_tokens_per_second"),
    Signal("prefill_tps", "heteroscale_prefill_tokens_per_second"),
    Signal("prefill_uncached_tps", "heteroscale_prefill_uncached_tokens_per_second"),
    Signal("requests_running", "heteroscale_requests_running"),
    Signal("requests_waiting", "heteroscale_requests_waiting"),
    Signal("kv_cache_usage_ratio", "heteroscale_kv_cache_usage_ratio"),
    # p90 only: the policy reads p90; at 10,000 instances p50 and p99 would add 40,000 series a tick.
    Signal("ttft", "heteroscale_ttft_seconds", extra="quantile", matchers='quantile="0.9"'),
    Signal("tbt", "heteroscale_tbt_seconds", extra="quantile", matchers='quantile="0.9"'),
    Signal("gpu_utilization_ratio", "heteroscale_gpu_utilization_ratio", extra="gpu"),
    Signal("gpu_sm_activity_ratio", "heteroscale_gpu_sm_activity_ratio", extra="gpu"),
    Signal("gpu_memory_used_bytes", "heteroscale_gpu_memory_used_bytes", extra="gpu"),
    Signal("gpu_power_watts", "heteroscale_gpu_power_watts", extra="gpu"),
    # Bytes actually moved (engine connector metrics or RDMA counters); the probe's series
    # is achievable capacity, not traffic.
    Signal("kv_transfer", "heteroscale_kv_transfer_bytes_per_second", extra="direction",
           matchers='source!="probe"'),
)


def build_query(signal: Signal, *, selector: str = "", lookback_s: float = 300.0) -> str:
    """The PromQL of one signal, for all services at once."""
    matchers = ",".join(m for m in (signal.matchers, selector.strip().rstrip(",")) if m)
    sel = f"{signal.metric}{{{matchers}}}" if matchers else signal.metric
    inner = signal.wrap.format(sel=sel, lookback=f"{int(math.ceil(lookback_s))}s")
    labels = GROUP + ((signal.extra,) if signal.extra else ())
    return f"max by ({', '.join(labels)}) ({inner})"


# ---------------------------------------------------------------- parsing (pure)

class PromResponseError(ValueError):
    """An API answer that is not a successful instant vector."""


class Sample(NamedTuple):
    labels: Mapping[str, str]
    value: float | None          # None for NaN / ±Inf (never passed on as a number)
    at: float                    # evaluation time of the instant query


def parse_vector(doc: Any) -> list[Sample]:
    """``/api/v1/query`` JSON → samples; ``PromResponseError`` for anything else.

    Written for 10,000s of entries a tick: the label objects are used as decoded
    (not copied), label values that are not strings are rejected later by use."""
    if not isinstance(doc, Mapping):
        raise PromResponseError("answer is not a JSON object")
    if doc.get("status") != "success":
        raise PromResponseError(f"status {doc.get('status')!r}: {doc.get('errorType')}: {doc.get('error')}")
    data = doc.get("data")
    if not isinstance(data, Mapping) or data.get("resultType") != "vector":
        got = data.get("resultType") if isinstance(data, Mapping) else type(data).__name__
        raise PromResponseError(f"expected a vector result, got {got!r}")
    result = data.get("result")
    if not isinstance(result, list):
        raise PromResponseError("data.result is not a list")
    out: list[Sample] = []
    append, isfinite = out.append, math.isfinite
    for item in result:
        if type(item) is not dict:
            raise PromResponseError("a result entry is not an object")
        metric, pair = item.get("metric"), item.get("value")
        if type(metric) is not dict:
            raise PromResponseError("a result entry has no label object")
        if type(pair) is not list or len(pair) != 2 or type(pair[1]) is not str:
            raise PromResponseError("a result entry has no [time, \"value\"] pair")
        at = pair[0]
        if type(at) is not float and type(at) is not int:
            raise PromResponseError("a sample time is not a number")
        try:
            value = float(pair[1])
        except ValueError as exc:
            raise PromResponseError(f"a sample value is not a number: {pair[1]!r}") from exc
        append(Sample(metric, value if isfinite(value) else None, at))
    return out


InstanceKey = tuple[str, str, str, str]     # (service, role, namespace, pod-or-instance)


def instance_key(labels: Mapping[str, Any]) -> InstanceKey | None:
    """Who a series belongs to; None when it lacks service/role or any instance identity
    (or a label value is not a string)."""
    service, role = labels.get("service", ""), labels.get("role", "")
    who = labels.get("pod") or labels.get("instance") or ""
    namespace = labels.get("namespace", "")
    if (not service or not role or not who or type(service) is not str or type(role) is not str
            or type(who) is not str or type(namespace) is not str):
        return None
    return (service, role, namespace, who)


@dataclass(frozen=True)
class Snapshot:
    """What one round of queries said, per service: ``Fetched`` items, plus label-less series."""

    by_service: Mapping[str, tuple[tuple[str, Fetched], ...]] = field(default_factory=dict)   # (namespace, item)
    unattributed: int = 0        # series without service/role/instance labels (ignored)
    series: int = 0


def build_snapshot(results: Mapping[str, Sequence[Sample]]) -> Snapshot:
    """Samples of every signal → one ``SidecarReport`` per live instance (pure).

    An instance is live when ``engine_up`` has a sample now; one seen within the
    lookback but not now becomes ``Fetched(error="vanished", role=None)``.
    """
    per: dict[InstanceKey, dict[str, Any]] = {}
    unattributed = 0
    series = 0
    for key, samples in results.items():
        for sample in samples:
            series += 1
            ident = instance_key(sample.labels)
            if ident is None:
                unattributed += 1
                continue
            slot = per.setdefault(ident, {})
            if key in ("ttft", "tbt", "kv_transfer") or key.startswith("gpu_"):
                label = {"ttft": "quantile", "tbt": "quantile", "kv_transfer": "direction"}.get(key, "gpu")
                slot.setdefault(key, {})[sample.labels.get(label, "")] = sample.value
            else:
                slot[key] = sample.value
    out: dict[str, list[tuple[str, Fetched]]] = {}
    for ident in sorted(per):
        fetched = _fetched(ident, per[ident])
        if fetched is not None:
            out.setdefault(ident[0], []).append((ident[2], fetched))
    return Snapshot(by_service={k: tuple(v) for k, v in out.items()}, unattributed=unattributed, series=series)


def _url(ident: InstanceKey) -> str:
    service, role, namespace, who = ident
    return f"promql://{namespace + '/' if namespace else ''}{who}?service={service}&role={role}"


def _fetched(ident: InstanceKey, slot: Mapping[str, Any]) -> Fetched | None:
    service, role, namespace, who = ident
    if "engine_up" not in slot:
        if "seen" in slot:
            return Fetched(url=_url(ident), role=None, error="vanished")
        return None                   # only optional signals: not an instance we know
    observed_at = slot.get("observed_at")
    if observed_at is None:
        return Fetched(url=_url(ident), role=role, error="no_timestamp")
    if role not in ("prefill", "decode"):
        return Fetched(url=_url(ident), role=None, error="invalid_report")
    ttft, tbt = slot.get("ttft", {}), slot.get("tbt", {})
    gpus = sorted(set().union(*(slot.get(k, {}) for k in
                                ("gpu_utilization_ratio", "gpu_sm_activity_ratio",
                                 "gpu_memory_used_bytes", "gpu_power_watts"))))
    kv = {d: v for d, v in slot.get("kv_transfer", {}).items() if v is not None}
    report = SidecarReport(
        service=service, role=role, pod=who, engine="prometheus",
        engine_up=slot.get("engine_up") == 1.0,
        stale=slot.get("stale") == 1.0,
        observed_at=observed_at,
        window_s=slot.get("window_s") or 0.0,
        started_at=slot.get("started_at"),
        decode_tps=_rate(slot.get("decode_tps")),
        prefill_tps=_rate(slot.get("prefill_tps")),
        prefill_uncached_tps=_rate(slot.get("prefill_uncached_tps")),
        requests_running=slot.get("requests_running"),
        requests_waiting=slot.get("requests_waiting"),
        kv_cache_usage_ratio=slot.get("kv_cache_usage_ratio"),
        ttft_p50_s=ttft.get("0.5"), ttft_p90_s=ttft.get("0.9"), ttft_p99_s=ttft.get("0.99"),
        tbt_p50_s=tbt.get("0.5"), tbt_p90_s=tbt.get("0.9"), tbt_p99_s=tbt.get("0.99"),
        gpu_mode="prometheus" if gpus else "none",
        gpus=tuple(GpuReading(gpu=g,
                              utilization_ratio=slot.get("gpu_utilization_ratio", {}).get(g),
                              sm_activity_ratio=slot.get("gpu_sm_activity_ratio", {}).get(g),
                              memory_used_bytes=slot.get("gpu_memory_used_bytes", {}).get(g),
                              power_watts=slot.get("gpu_power_watts", {}).get(g)) for g in gpus),
        kv_transfer={"bytes_per_second": kv} if kv else {},
    )
    return Fetched(url=_url(ident), role=role, report=report)


def _rate(value: float | None) -> float | None:
    """A negative rate is not a rate (the report contract forbids it): treat as unmeasured."""
    return None if value is None or value < 0 else value


# ---------------------------------------------------------------- the collector (I/O)

class PromQueryError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class PromCollector:
    """Per-tick PromQL snapshot shared by all services; same interface as ``Collector``."""

    def __init__(self, *, url: str, timeout_s: float = 2.0, selector: str = "", lookback_s: float = 300.0,
                 reuse_s: float = 1.0, concurrency: int = 8, session: aiohttp.ClientSession | None = None,
                 max_body_bytes: int = 256 << 20, clock: Callable[[], float] = time.monotonic) -> None:
        self._url = url.rstrip("/") + "/api/v1/query"
        self._timeout_s = timeout_s
        self._queries = {s.key: build_query(s, selector=selector, lookback_s=lookback_s) for s in SIGNALS}
        self._reuse_s = reuse_s
        self._limit = asyncio.Semaphore(concurrency)
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._inflight: asyncio.Task | None = None
        self._last: tuple[float, Snapshot | PromQueryError] | None = None
        self._failing: str | None = None
        self._closed = False
        self._max_body_bytes = max_body_bytes     # one answer; 10,000 instances take about 2 MB a signal
        self.latest: dict[str, Collection] = {}
        self.errors_total: Counter[tuple[str, str]] = Counter()
        self.queries_total = 0
        self.snapshots_total = 0
        self.last_query_duration_s: float | None = None

    @classmethod
    def from_config(cls, config: "MetricsSourceConfig", *, interval_s: float) -> "PromCollector":
        return cls(url=config.url or "", timeout_s=config.timeout_s, selector=config.selector or "",
                   lookback_s=config.lookback_s, reuse_s=interval_s / 2)

    @property
    def queries(self) -> Mapping[str, str]:
        return dict(self._queries)

    async def close(self) -> None:
        self._closed = True
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()

    async def collect(self, service: "ServiceConfig") -> Collection:
        snap = await self._snapshot()
        if isinstance(snap, PromQueryError):
            reason = f"prometheus_{snap.reason}"
            self.errors_total[(service.name, reason)] += 1
            result = Collection(service=service.name, fetched=(), errors={reason: 1},
                                discovery_error=f"prometheus: {snap}")
        else:
            fetched = tuple(_namespaced(service, ns, f) for ns, f in snap.by_service.get(service.name, ()))
            errors = Counter(f.error for f in fetched if f.error)
            for reason, count in errors.items():
                self.errors_total[(service.name, reason)] += count
            result = Collection(service=service.name, fetched=fetched, errors=dict(errors))
        self.latest[service.name] = result
        return result

    async def _snapshot(self) -> Snapshot | PromQueryError:
        """This tick's snapshot: the one being taken, one taken within ``reuse_s``, or a new one.

        The task is owned by the collector, not by whichever service asked first: a
        cancelled caller does not cancel it for the others (shield), and ``close()``
        cancels it if it is still running."""
        task = self._inflight
        if task is None:
            if self._last is not None and self._clock() - self._last[0] < self._reuse_s:
                return self._last[1]
            task = self._inflight = asyncio.create_task(self._take(), name="promql-snapshot")
            task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _take(self) -> Snapshot | PromQueryError:
        started = self._clock()
        tasks = [asyncio.create_task(self._query(q), name=f"promql-{key}") for key, q in self._queries.items()]
        try:
            async with asyncio.timeout(self._timeout_s):
                answers = await asyncio.gather(*tasks)
            snap: Snapshot | PromQueryError = build_snapshot(dict(zip(self._queries, answers)))
        except PromQueryError as exc:
            snap = exc
        except (asyncio.TimeoutError, TimeoutError):
            snap = PromQueryError("timeout", f"queries took over {self._timeout_s:g}s")
        finally:
            # One failed query fails the tick: stop the others instead of leaving them running.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._log_change(snap)
        self.snapshots_total += 1
        self.last_query_duration_s = self._clock() - started
        self._last = (self._clock(), snap)
        return snap

    def _log_change(self, snap: Snapshot | PromQueryError) -> None:
        # Log on change only: a Prometheus that is down for an hour must not write 720 lines.
        failing = str(snap) if isinstance(snap, PromQueryError) else None
        if failing and failing != self._failing:
            log.warning("prometheus queries failed (holding every service): %s", failing)
        elif failing is None and self._failing:
            log.info("prometheus queries answer again")
        self._failing = failing

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._closed:
            raise PromQueryError("connect", "the collector is closed")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
            self._own_session = True
        return self._session

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        out = bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):
            out += chunk
            if len(out) > self._max_body_bytes:
                raise PromQueryError("bad_response", f"answer over {self._max_body_bytes} bytes")
        return bytes(out)

    async def _query(self, expr: str) -> list[Sample]:
        async with self._limit:
            self.queries_total += 1
            try:
                async with self._session_or_new().post(self._url, data={"query": expr}) as resp:
                    status, body = resp.status, await self._read_capped(resp)
            except (asyncio.TimeoutError, TimeoutError):
                raise                       # TimeoutError is an OSError: keep it apart from "connect"
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                raise PromQueryError("connect", f"{type(exc).__name__}: {exc}") from None
        try:
            doc = json.loads(body)
        except ValueError:
            if status != 200:
                raise PromQueryError("http_status", f"HTTP {status} for {expr}") from None
            raise PromQueryError("invalid_json", f"not JSON for {expr}") from None
        try:
            samples = parse_vector(doc)
        except PromResponseError as exc:
            reason = "http_status" if status != 200 else "bad_response"
            raise PromQueryError(reason, f"HTTP {status}: {exc} (query {expr})") from None
        if status != 200:
            raise PromQueryError("http_status", f"HTTP {status} for {expr}")
        return samples


def _namespaced(service: "ServiceConfig", namespace: str, item: Fetched) -> Fetched:
    """A series whose ``namespace`` label names another namespace is not this service's
    (no ``namespace`` label, as with a plain static scrape config: not checked)."""
    if namespace and namespace != service.namespace:
        return Fetched(url=item.url, role=None, error="wrong_namespace")
    return item
