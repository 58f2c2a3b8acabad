"""Sidecar reports → one ``Observation`` per service (pure).

The collector hands over what each target answered (a parsed ``SidecarReport``, or
the reason it could not get one); this module decides which reports to trust and
sums them. Everything it drops is counted by reason in ``Observation.excluded`` so
the status page and ``/metrics`` can say why data is missing.

A report is dropped when: it could not be fetched or parsed; it names another
service or role; the engine is down; the sidecar marks it stale; or it is older
than ``policy.report_max_age_s`` (judged against ``now_s``, so a sidecar that
stopped updating cannot keep a service at an old load — the llm-d "ratchet").

Completeness: every expected decode instance (a ready instance, or a report target,
outside warm-up) that sent nothing usable is ``missing_decode``. The policy scales in
only on a complete view; with some missing it may scale out on an estimate.

Warm-up (PEERS §5.3): an instance younger than ``policy.warmup_s`` (``started_at``)
is still serving real traffic, so its decode tokens/s is part of the LOAD (dropping
it would make load vanish whenever pods are added, and the policy would scale in
again). It is left out of everything that estimates CAPACITY or health: it is not
expected to report (``expected_decode``), it does not count as a fresh report, and
its cold-start latencies do not feed the safety net.

Latency: ``tbt_p90_s`` is the decode-tokens/s-weighted mean of the decode instances'
p90 TBT (what the fleet's tokens experience); ``ttft_p90_s`` the prefill-tokens/s
weighted mean over every instance that reports TTFT. One hot instance is a routing
problem and should not add 10% to the whole fleet, so the worst single instance is
reported (``*_max_s``) but not acted on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from heteroscale.coordinator.core.types import Fetched, Observation, PoolStatus
from heteroscale.report import SidecarReport

if TYPE_CHECKING:
    from heteroscale.coordinator.core.settings import ServiceConfig


@dataclass(frozen=True)
class _Usable:
    report: SidecarReport
    warming: bool


def classify(service: "ServiceConfig", item: Fetched, *, now_s: float) -> tuple[_Usable | None, str | None]:
    """(usable report, None) or (None, reason it was excluded)."""
    if item.report is None:
        return None, item.error or "unreachable"
    report = item.report
    if report.service != service.name:
        return None, "wrong_service"
    if item.role is not None and report.role != item.role:
        return None, "wrong_role"
    if not report.engine_up:
        return None, "engine_down"
    if report.stale:
        return None, "stale"
    if now_s - report.observed_at > service.policy.report_max_age_s:
        return None, "too_old"
    warming = report.started_at is not None and now_s - report.started_at < service.policy.warmup_s
    rate = report.decode_tps if report.role == "decode" else report.prefill_tps
    if rate is None and not warming:
        return None, "no_rate"
    return _Usable(report, warming), None


def aggregate(service: "ServiceConfig", fetched: Iterable[Fetched], *, pools: PoolStatus,
              now_s: float) -> Observation:
    """Sum the trustworthy reports of one service into an ``Observation``."""
    excluded: Counter[str] = Counter()
    targets = Counter[str]()
    usable: list[_Usable] = []
    for item in fetched:
        role = item.role or (item.report.role if item.report else None)
        if role:
            targets[role] += 1
        ok, why = classify(service, item, now_s=now_s)
        if ok is None:
            excluded[why or "unknown"] += 1
        else:
            usable.append(ok)
    decode = [u for u in usable if u.report.role == "decode"]
    prefill = [u for u in usable if u.report.role == "prefill"]
    warming_decode = sum(1 for u in decode if u.warming)
    warming_prefill = sum(1 for u in prefill if u.warming)
    warm = [u.report for u in usable if not u.warming]
    if warming_decode + warming_prefill:
        excluded["warming"] += warming_decode + warming_prefill
    decode_rates = [u.report.decode_tps for u in decode if u.report.decode_tps is not None]
    prefill_rates = [u.report.prefill_tps for u in prefill if u.report.prefill_tps is not None]
    uncached = [u.report.prefill_uncached_tps for u in prefill if u.report.prefill_uncached_tps is not None]
    tbt = [(r.tbt_p90_s, r.decode_tps or 0.0) for r in warm if r.role == "decode" and r.tbt_p90_s is not None]
    ttft = [(r.ttft_p90_s, (r.prefill_tps if r.role == "prefill" else r.decode_tps) or 0.0)
            for r in warm if r.ttft_p90_s is not None]
    fresh_decode = len(decode) - warming_decode
    expected_decode = max(0, max(targets["decode"], pools.ready.decode) - warming_decode)
    return Observation(
        pools=pools,
        decode_tps=sum(decode_rates) if decode_rates else None,
        fresh_decode=fresh_decode,
        expected_decode=expected_decode,
        reporting_decode=len(decode_rates),
        missing_decode=max(0, expected_decode - fresh_decode),
        fresh_prefill=len(prefill) - warming_prefill,
        expected_prefill=max(0, max(targets["prefill"], pools.ready.prefill) - warming_prefill),
        warming_decode=warming_decode,
        tbt_p90_s=weighted_mean(tbt),
        ttft_p90_s=weighted_mean(ttft),
        tbt_p90_max_s=max((v for v, _ in tbt), default=None),
        ttft_p90_max_s=max((v for v, _ in ttft), default=None),
        prefill_tps=sum(prefill_rates) if prefill_rates else None,
        prefill_uncached_tps=sum(uncached) if uncached else None,
        decode_running=_sum(r.requests_running for r in (u.report for u in decode)),
        decode_waiting=_sum(r.requests_waiting for r in (u.report for u in decode)),
        decode_kv_waiting=_sum(_kv_waiting(u.report) for u in decode),
        decode_preemptions_per_s=_sum(r.preemptions_per_s for r in (u.report for u in decode)),
        decode_kv_usage_max=max((u.report.kv_cache_usage_ratio for u in decode
                                 if u.report.kv_cache_usage_ratio is not None), default=None),
        prefill_waiting=_sum(r.requests_waiting for r in (u.report for u in prefill)),
        prefill_gpu_utilization=_mean(g.utilization_ratio for u in prefill for g in u.report.gpus),
        excluded=dict(excluded),
    )


def weighted_mean(pairs: list[tuple[float, float]]) -> float | None:
    """Mean of values weighted by throughput; a plain mean when every weight is zero."""
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    if total <= 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * w for v, w in pairs) / total


def _sum(values: Iterable[float | None]) -> float | None:
    """Sum of the measured values; ``None`` when none was measured (never 0 for unknown)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


# Engine queue stages (``requests_by_kv_stage``) of decode requests waiting for KV to ARRIVE
# (SGLang's decode transfer queue); its pre-allocation queue waits for decode's own KV
# memory, which is decode capacity, not transfer.
KV_ARRIVAL_STAGES = ("decode_transfer", "decode_host_receive")


def _kv_waiting(report: SidecarReport) -> float | None:
    """Decode requests waiting on KV arrival: vLLM's deferred count (on a P/D decode pod,
    the requests whose KV fetch has not finished), else SGLang's transfer stages."""
    if report.requests_deferred is not None:
        return report.requests_deferred
    stages = [v for k, v in report.requests_by_kv_stage.items() if k in KV_ARRIVAL_STAGES]
    return sum(stages) if stages else None
