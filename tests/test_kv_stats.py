"""heteroscale.kv_transfer.stats: counter deltas with wrap/reset, windowed rates, histogram deltas (worked examples + invariants)."""

from __future__ import annotations

import math

from hypothesis import given, strategies as st

from heteroscale.kv_transfer.stats import (HistogramSample, HistogramWindow, RateWindow, counter_delta, histogram_delta,
                               median, merge_histograms)

TOP64 = 2 ** 64


def test_plain_delta():
    assert counter_delta(100, 350) == 250


def test_wrap_at_2_64_is_exact_with_integers():
    # 2**64 - 1000 -> 500: the counter passed the top; 1000 + 500 = 1500 words moved.
    assert counter_delta(TOP64 - 1000, 500) == 1500


def test_wrap_of_a_32_bit_counter():
    # 2**32 - 10 -> 20 with 32-bit counters: 10 + 20 = 30.
    assert counter_delta(2 ** 32 - 10, 20, bits=32) == 30


def test_reset_is_unknown_not_negative():
    # 5e6 -> 1000 cannot be a wrap (that would be ~2**64 words): a reset.
    assert counter_delta(5_000_000, 1000) is None


def test_wrap_that_is_not_plausible_is_a_reset():
    # Near the top, but the wrapped delta (1500) exceeds what the link could carry (1000).
    assert counter_delta(TOP64 - 1000, 500, max_delta=1000) is None


def test_jump_faster_than_the_link_is_unknown():
    assert counter_delta(0, 10_000, max_delta=5_000) is None
    assert counter_delta(0, 5_000, max_delta=5_000) == 5_000


def test_garbage_reads_are_unknown():
    assert counter_delta(float("nan"), 1) is None
    assert counter_delta(1, float("inf")) is None
    assert counter_delta(-1, 5) is None


def test_rate_over_the_window():
    w = RateWindow(window_s=10)
    # 0 s: 0, 5 s: 500, 10 s: 1500 -> 1500 units over 10 s = 150/s.
    for t, v in ((0, 0), (5, 500), (10, 1500)):
        w.add(t, v)
    r = w.rate(10)
    assert r is not None and r.per_second == 150 and r.span_s == 10 and r.resets == 0


def test_rate_leaves_a_reset_interval_out_of_numerator_and_denominator():
    w = RateWindow(window_s=60)
    # 0..10 s: +1000; 10..20 s: reset (5000 -> 200); 20..30 s: +400. Known: 1400 over 20 s = 70/s.
    for t, v in ((0, 4000), (10, 5000), (20, 200), (30, 600)):
        w.add(t, v)
    r = w.rate(30)
    assert r is not None
    assert r.per_second == 70 and r.span_s == 20 and r.resets == 1


def test_rate_across_a_64_bit_wrap():
    w = RateWindow(window_s=10, max_rate_per_s=1e9)
    w.add(0, TOP64 - 4000)
    w.add(2, 6000)          # 4000 + 6000 = 10000 words in 2 s = 5000/s
    assert w.rate(2).per_second == 5000


def test_no_rate_from_one_sample_or_stale_samples():
    w = RateWindow(window_s=10)
    assert w.rate(0) is None
    w.add(0, 10)
    assert w.rate(0) is None                 # one read: absent, not 0
    w.add(5, 20)
    assert w.rate(5).per_second == 2
    assert w.rate(16) is None                # newest read is older than the window: stale


def test_only_a_reset_gives_no_rate():
    w = RateWindow(window_s=10)
    w.add(0, 100)
    w.add(1, 5)
    assert w.rate(1) is None


def test_window_slides():
    w = RateWindow(window_s=10)
    for t in range(0, 31):
        # 10/s for the first 20 s, then 100/s
        w.add(t, 10 * min(t, 20) + 100 * max(0, t - 20))
    assert w.rate(30).per_second == 100


def test_out_of_order_reads_are_ignored():
    w = RateWindow(window_s=10)
    w.add(5, 50)
    w.add(3, 0)
    w.add(6, 60)
    assert w.rate(6).per_second == 10


@given(st.lists(st.tuples(st.floats(0.01, 10), st.integers(0, 2 ** 64 - 1)), min_size=2, max_size=30))
def test_rate_is_never_negative_or_infinite(steps):
    w = RateWindow(window_s=1e6)
    t = 0.0
    for dt, value in steps:
        t += dt
        w.add(t, value)
    r = w.rate(t)
    assert r is None or (r.per_second >= 0 and math.isfinite(r.per_second))


def _h(counts, total):
    return HistogramSample(bounds=(0.01, 0.1, 1.0, math.inf), cumulative=tuple(counts), sum=total)


def test_histogram_delta_mean_and_quantile():
    before = _h((10, 20, 20, 20), 1.0)
    after = _h((10, 60, 110, 110), 46.0)
    d = histogram_delta(before, after)
    # 90 new observations, sum 45 -> mean 0.5 s.
    assert d.count == 90 and d.mean == 0.5
    # per-bucket cumulative deltas: (0, 40, 90, 90). p50: rank 45 lies in (0.1, 1.0]
    # with 40 below: 0.1 + 0.9 * (45 - 40) / 50 = 0.19.
    assert math.isclose(d.quantile(0.5), 0.19)
    # p10: rank 9 in (0.01, 0.1] with 0 below: 0.01 + 0.09 * 9 / 40.
    assert math.isclose(d.quantile(0.1), 0.01 + 0.09 * 9 / 40)


def test_histogram_quantile_in_the_inf_bucket_is_the_top_finite_bound():
    d = histogram_delta(_h((0, 0, 0, 0), 0), _h((0, 0, 1, 10), 50))
    assert d.quantile(0.9) == 1.0


def test_histogram_reset_and_layout_change_give_nothing():
    assert histogram_delta(_h((5, 5, 5, 5), 5), _h((1, 1, 1, 1), 1)) is None
    other = HistogramSample(bounds=(1.0, math.inf), cumulative=(1, 1), sum=1)
    assert histogram_delta(_h((0, 0, 0, 0), 0), other) is None


def test_histogram_window_restarts_after_a_reset():
    w = HistogramWindow(window_s=60)
    w.add(0, _h((0, 0, 0, 0), 0))
    w.add(10, _h((0, 10, 10, 10), 0.5))
    assert w.delta(10).count == 10
    w.add(20, _h((0, 1, 1, 1), 0.05))       # engine restarted
    assert w.delta(20) is None              # one read since the reset
    w.add(30, _h((0, 4, 4, 4), 0.2))
    assert w.delta(30).count == 3
    assert w.delta(100) is None             # stale


def test_merge_histograms():
    merged = merge_histograms([_h((1, 2, 3, 4), 1.0), _h((0, 1, 1, 2), 2.0)])
    assert merged.cumulative == (1, 3, 4, 6) and merged.sum == 3.0
    assert merge_histograms([]) is None


def test_median():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 2, 3]) == 2.5
    assert median([]) is None
    assert median([float("nan"), 5]) == 5
