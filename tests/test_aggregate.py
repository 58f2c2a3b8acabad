"""Aggregation: which reports are trusted, how they are summed (worked examples)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heteroscale.coordinator.core.aggregate import aggregate, weighted_mean
from heteroscale.coordinator.core.types import Fetched
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.types import PoolCounts, PoolStatus
from heteroscale.report import SidecarReport

NOW = 10_000.0
SVC = load_config({"coordinator": {"backend": "static"}, "services": [{
    "name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 1000,
    "slo": {"tbt_s": 0.05, "ttft_s": 1.0},
    "prefill": {"sidecars": ["http://127.0.0.1:1/v1/report"]},
    "decode": {"sidecars": ["http://127.0.0.1:2/v1/report"]},
    "policy": {"report_max_age_s": 30, "warmup_s": 60}}]}).services[0]
POOLS = PoolStatus(current=PoolCounts(0, 0), ready=PoolCounts(0, 0))


def report(role: str = "decode", **over: Any) -> SidecarReport:
    doc = dict(service="chat", role=role, pod=over.pop("pod", f"{role}-0"), engine="vllm", engine_up=True,
               stale=False, observed_at=NOW - 2, window_s=30.0, started_at=NOW - 3600)
    doc.update(over)
    return SidecarReport(**doc)


def fetched(*reports: SidecarReport, errors: tuple[str, ...] = ()) -> list[Fetched]:
    out = [Fetched(url=f"http://x/{i}", role=r.role, report=r) for i, r in enumerate(reports)]
    out += [Fetched(url=f"http://y/{i}", role="decode", error=e) for i, e in enumerate(errors)]
    return out


def test_sums_fresh_decode_reports():
    # 1200 + 800 + 500 = 2500 tok/s from three healthy decode sidecars.
    o = aggregate(SVC, fetched(report(decode_tps=1200, pod="d0"), report(decode_tps=800, pod="d1"),
                               report(decode_tps=500, pod="d2")), pools=POOLS, now_s=NOW)
    assert o.decode_tps == 2500
    assert (o.fresh_decode, o.expected_decode) == (3, 3)
    assert o.excluded == {}


@pytest.mark.parametrize("bad,reason", [
    (dict(engine_up=False), "engine_down"),
    (dict(stale=True), "stale"),
    (dict(observed_at=NOW - 31), "too_old"),     # 31 s > report_max_age_s 30
    (dict(service="other"), "wrong_service"),
    (dict(decode_tps=None), "no_rate"),
])
def test_untrusted_reports_are_dropped_with_a_reason(bad, reason):
    o = aggregate(SVC, fetched(report(decode_tps=1000, pod="ok"), report(pod="bad", **{"decode_tps": 9999, **bad})),
                  pools=POOLS, now_s=NOW)
    assert o.decode_tps == 1000          # the bad one's 9999 never counts
    assert (o.fresh_decode, o.expected_decode) == (1, 2)
    assert o.excluded == {reason: 1}


def test_fetch_errors_count_against_freshness():
    o = aggregate(SVC, fetched(report(decode_tps=1000), errors=("timeout", "invalid_json", "connect")),
                  pools=POOLS, now_s=NOW)
    assert o.decode_tps == 1000
    assert (o.fresh_decode, o.expected_decode) == (1, 4)
    assert o.excluded == {"timeout": 1, "invalid_json": 1, "connect": 1}


def test_nothing_fresh_is_none_not_zero():
    o = aggregate(SVC, fetched(report(engine_up=False, decode_tps=0)), pools=POOLS, now_s=NOW)
    assert o.decode_tps is None and o.fresh_decode == 0 and o.expected_decode == 1


def test_wrong_role_at_a_decode_target():
    item = Fetched(url="http://x", role="decode", report=report("prefill", prefill_tps=5000))
    o = aggregate(SVC, [item], pools=POOLS, now_s=NOW)
    assert o.excluded == {"wrong_role": 1} and o.decode_tps is None


def test_warming_instances_are_load_but_not_capacity():
    # d-new started 10 s ago (< warmup 60 s): its 300 tok/s is real load (sum 1300), but it is
    # not expected to report (expected 1, fresh 1) and its cold latency (500 ms) is ignored.
    o = aggregate(SVC, fetched(report(decode_tps=1000, pod="d-old", tbt_p90_s=0.030),
                               report(decode_tps=300, pod="d-new", started_at=NOW - 10, tbt_p90_s=0.500)),
                  pools=POOLS, now_s=NOW)
    assert o.decode_tps == 1300
    assert (o.fresh_decode, o.expected_decode, o.warming_decode) == (1, 1, 1)
    assert o.tbt_p90_s == pytest.approx(0.030)
    assert o.excluded == {"warming": 1}


def test_expected_uses_the_actuators_ready_count_when_larger():
    # Discovery found 2 decode sidecars, the backend says 5 are ready: 3 are unaccounted for.
    pools = PoolStatus(current=PoolCounts(5, 5), ready=PoolCounts(5, 5))
    o = aggregate(SVC, fetched(report(decode_tps=1, pod="a"), report(decode_tps=1, pod="b")), pools=pools,
                  now_s=NOW)
    assert (o.fresh_decode, o.expected_decode) == (2, 5)
    assert o.pools is pools


def test_latency_is_throughput_weighted_and_worst_is_kept():
    # TBT: (0.020*3000 + 0.080*1000) / 4000 = 0.035; worst 0.080.
    # TTFT: prefill weighted by prefill tps: (0.5*9000 + 2.0*1000)/10000 = 0.65; worst 2.0.
    o = aggregate(SVC, fetched(
        report(decode_tps=3000, tbt_p90_s=0.020, pod="d0"), report(decode_tps=1000, tbt_p90_s=0.080, pod="d1"),
        report("prefill", prefill_tps=9000, ttft_p90_s=0.5, pod="p0"),
        report("prefill", prefill_tps=1000, ttft_p90_s=2.0, prefill_uncached_tps=400, pod="p1")),
        pools=POOLS, now_s=NOW)
    assert o.tbt_p90_s == pytest.approx(0.035)
    assert o.tbt_p90_max_s == pytest.approx(0.080)
    assert o.ttft_p90_s == pytest.approx(0.65)
    assert o.ttft_p90_max_s == pytest.approx(2.0)
    assert o.prefill_tps == 10000 and o.prefill_uncached_tps == 400
    assert (o.fresh_prefill, o.expected_prefill) == (2, 2)


def test_weighted_mean_edge_cases():
    assert weighted_mean([]) is None
    assert weighted_mean([(0.1, 0.0), (0.3, 0.0)]) == pytest.approx(0.2)   # no weights: plain mean


@settings(max_examples=200, deadline=None)
@given(rates=st.lists(st.floats(min_value=0, max_value=1e5), min_size=1, max_size=30),
       ages=st.lists(st.floats(min_value=0, max_value=100), min_size=30, max_size=30))
def test_sum_counts_exactly_the_fresh_reports(rates, ages):
    reports = [report(decode_tps=r, pod=f"d{i}", observed_at=NOW - ages[i]) for i, r in enumerate(rates)]
    o = aggregate(SVC, fetched(*reports), pools=POOLS, now_s=NOW)
    fresh = [r for i, r in enumerate(rates) if ages[i] <= 30]
    assert o.fresh_decode == len(fresh) and o.expected_decode == len(rates)
    if fresh:
        assert o.decode_tps == pytest.approx(sum(fresh))
    else:
        assert o.decode_tps is None
