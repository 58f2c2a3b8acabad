"""Rates and windowed quantiles: worked examples with the arithmetic, and invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heteroscale.engine_adapters import quantiles as Q
from heteroscale.engine_adapters import snapshot as S
from heteroscale.engine_adapters.rates import SignalWindow, counter_rate
from heteroscale.engine_adapters.snapshot import EngineSnapshot, Histogram

INF = math.inf


def snap(gen=None, *, prompt=None, cached=None, uncached=None, ttft=None, ranks=("0",), running=None):
    counters = {k: v for k, v in {S.GENERATION_TOKENS: gen, S.PROMPT_TOKENS: prompt,
                                  S.PROMPT_CACHED_TOKENS: cached, S.PROMPT_UNCACHED_TOKENS: uncached}.items()
                if v is not None}
    return EngineSnapshot("vllm", counters=counters,
                          gauges={} if running is None else {S.REQUESTS_RUNNING: running},
                          histograms={} if ttft is None else {S.TTFT: ttft}, ranks=frozenset(ranks))


# -- counter_rate ---------------------------------------------------------------------

def test_steady_rate():
    # 100 tokens per second for 4 s: (400 - 0) / 4
    assert counter_rate([(t, 100.0 * t) for t in range(5)]) == 100.0


def test_reset_starts_a_new_segment():
    # 0->1: +50 in 1 s; 1->2: 150 -> 10 is a restart, skipped; 2->3: +30 in 1 s
    # rate = (50 + 30) / (1 + 1) = 40
    assert counter_rate([(0, 100.0), (1, 150.0), (2, 10.0), (3, 40.0)]) == 40.0


def test_irregular_scrape_times():
    # +30 over 0.5 s, then +90 over 2.5 s -> 120 / 3 = 40
    assert counter_rate([(10.0, 0.0), (10.5, 30.0), (13.0, 120.0)]) == pytest.approx(40.0)


def test_missing_points_are_skipped_over():
    # (0, 0), (1, None), (2, 200): the present points pair up: 200 / 2 = 100
    assert counter_rate([(0, 0.0), (1, None), (2, 200.0)]) == 100.0


def test_no_pair_means_unknown_not_zero():
    assert counter_rate([]) is None
    assert counter_rate([(0, 5.0)]) is None
    assert counter_rate([(0, None), (1, None)]) is None
    assert counter_rate([(0, 100.0), (1, 3.0)]) is None          # only a reset
    assert counter_rate([(0, 7.0), (1, 7.0)]) == 0.0             # measured zero is zero


def test_incomparable_step_breaks_pairing_even_across_a_gap():
    # point 2 is incomparable with point 1 (engine set changed); point 1 is missing,
    # so point 2 would pair with point 0 - it must not.
    pts = [(0, 0.0), (1, None), (2, 1000.0), (3, 1100.0)]
    assert counter_rate(pts, comparable=[True, True, False, True]) == 100.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 5.0), st.one_of(st.none(), st.floats(0, 1e9))), min_size=0,
                max_size=30))
def test_rate_never_negative_and_never_above_best_pair(steps):
    t, points = 0.0, []
    for dt, v in steps:
        t += dt
        points.append((t, v))
    rate = counter_rate(points)
    present = [(t, v) for t, v in points if v is not None]
    pair_rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(present, present[1:]) if b[1] >= a[1]]
    if rate is None:
        assert not pair_rates
    else:
        assert 0.0 <= rate <= max(pair_rates) * (1 + 1e-9) + 1e-9


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.floats(1, 1000), st.floats(0, 999_999))
def test_restart_never_spikes(before, after, tps, restart_value):
    # an engine at a steady `tps` restarts; whatever value it comes back with,
    # (a real restart comes back below the old total), the windowed rate stays at
    # `tps` (up to float error)
    pts = [(float(i), 1e6 + tps * i) for i in range(before)]
    pts += [(float(before + j), restart_value + tps * j) for j in range(after)]
    rate = counter_rate(pts)
    if rate is not None:
        assert rate == pytest.approx(tps, rel=1e-6)


# -- quantiles -------------------------------------------------------------------------

def test_quantile_worked_example():
    # buckets (<=0.1: 10, <=0.5: 30, +Inf: 40) -> per bucket 10, 20, 10
    h = Histogram((0.1, 0.5, INF), (10.0, 30.0, 40.0))
    # p50: rank 20 -> bucket (0.1, 0.5], 10 below, 20 inside: 0.1 + 0.4 * (20 - 10) / 20 = 0.3
    assert Q.quantile(0.5, h) == pytest.approx(0.3)
    # p10: rank 4 -> first bucket [0, 0.1]: 0 + 0.1 * 4 / 10 = 0.04
    assert Q.quantile(0.1, h) == pytest.approx(0.04)
    # p90: rank 36 -> +Inf bucket -> highest finite bound 0.5 (Prometheus' answer)
    assert Q.quantile(0.9, h) == 0.5
    assert Q.quantile(0.5, Histogram((0.1, INF), (0.0, 0.0))) is None


def test_window_quantiles_use_deltas_not_lifetime():
    # lifetime: 1000 fast observations (<=0.1); in the window 100 slow ones (0.5..1]
    b = (0.1, 0.5, 1.0, INF)
    w = SignalWindow(window_s=5)
    w.add(0.0, snap(ttft=Histogram(b, (1000.0, 1000.0, 1000.0, 1000.0))))
    w.add(1.0, snap(ttft=Histogram(b, (1000.0, 1000.0, 1100.0, 1100.0))))
    st_ = w.stats(1.0)
    # delta = (0, 0, 100, 100): p50 rank 50 in (0.5, 1]: 0.5 + 0.5 * 50/100 = 0.75
    assert st_.ttft_p50_s == pytest.approx(0.75)
    # a lifetime quantile would have said 0.1 * 550/1000 = 0.055
    assert Q.quantile(0.5, Histogram(b, (1000.0, 1000.0, 1100.0, 1100.0))) == pytest.approx(0.055)


def test_histogram_reset_is_skipped():
    b = (0.1, 1.0, INF)
    w = SignalWindow(window_s=10)
    w.add(0.0, snap(ttft=Histogram(b, (0.0, 50.0, 50.0))))
    w.add(1.0, snap(ttft=Histogram(b, (0.0, 60.0, 60.0))))     # +10 in (0.1, 1]
    w.add(2.0, snap(ttft=Histogram(b, (3.0, 3.0, 3.0))))       # restart: skipped
    w.add(3.0, snap(ttft=Histogram(b, (5.0, 5.0, 5.0))))       # +2 in [0, 0.1]
    delta_count = 10 + 2
    st_ = w.stats(3.0)
    # 12 observations: 2 in [0, 0.1], 10 in (0.1, 1]; p50 rank 6: 0.1 + 0.9 * (6 - 2) / 10 = 0.46
    assert st_.ttft_p50_s == pytest.approx(0.46) and delta_count == 12


def test_no_observations_in_window_is_none():
    b = (0.1, INF)
    w = SignalWindow(window_s=10)
    w.add(0.0, snap(ttft=Histogram(b, (5.0, 5.0))))
    w.add(1.0, snap(ttft=Histogram(b, (5.0, 5.0))))
    assert w.stats(1.0).quantiles("ttft") == {0.5: None, 0.9: None, 0.99: None}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=2, max_size=8), st.floats(0, 1))
def test_quantile_within_bounds_and_monotone(counts, qv):
    bounds = tuple(0.01 * 2 ** i for i in range(len(counts) - 1)) + (INF,)
    cum, c = [], 0.0
    for n in counts:
        c += n
        cum.append(c)
    h = Histogram(bounds, tuple(cum))
    value = Q.quantile(qv, h)
    if c == 0:
        assert value is None
        return
    assert value is not None and 0.0 <= value <= bounds[-2]     # never past the highest finite bound
    hi = Q.quantile(min(1.0, qv + 0.1), h)
    assert hi is not None and hi >= value - 1e-12


# -- SignalWindow ----------------------------------------------------------------------

def test_window_decode_and_uncached_rates():
    w = SignalWindow(window_s=4)
    for t in range(6):
        # 250 tok/s generated; prompt 1000/s of which 600/s cached -> 400/s uncached
        w.add(float(t), snap(250.0 * t, prompt=1000.0 * t, cached=600.0 * t, running=7))
    st_ = w.stats(5.0)
    assert st_.decode_tps == 250.0 and st_.prefill_tps == 1000.0
    assert st_.prefill_uncached_tps == 400.0
    assert st_.requests_running == 7
    assert st_.samples == 5 and st_.span_s == 4.0       # samples at t = 1..5 (t = 0 is outside 5 - 4)


def test_window_prefers_direct_uncached_counter():
    w = SignalWindow(window_s=10)
    w.add(0.0, snap(0, prompt=0, cached=0, uncached=0))
    w.add(2.0, snap(0, prompt=1000, cached=900, uncached=300))
    assert w.stats(2.0).prefill_uncached_tps == 150.0      # 300 / 2, not (1000 - 900) / 2


def test_engine_set_change_is_a_boundary():
    # engine 1 joins at t=2 with 1e6 tokens of its own: no spike
    w = SignalWindow(window_s=10)
    w.add(0.0, snap(0.0))
    w.add(1.0, snap(100.0))
    w.add(2.0, snap(100.0 + 1e6 + 100.0, ranks=("0", "1")))
    w.add(3.0, snap(100.0 + 1e6 + 300.0, ranks=("0", "1")))
    assert w.stats(3.0).decode_tps == pytest.approx((100 + 200) / 2)


def test_window_forgets_old_samples_and_goes_unknown():
    w = SignalWindow(window_s=3)
    w.add(0.0, snap(0.0))
    w.add(1.0, snap(100.0))
    assert w.stats(1.0).decode_tps == 100.0
    assert w.stats(10.0).decode_tps is None and len(w) == 0   # scrapes stopped: no data, no number


def test_clock_going_back_is_ignored():
    w = SignalWindow(window_s=10)
    w.add(5.0, snap(500.0))
    w.add(4.0, snap(0.0))
    assert len(w) == 1


def test_window_must_be_positive():
    with pytest.raises(ValueError):
        SignalWindow(window_s=0)
