"""The P/D ratio drift detector (pure): reference, advice with hysteresis, bounded adapt
steps, and the policy never moving the pools apart while an adapted ratio is in use."""

from __future__ import annotations

from fractions import Fraction

import pytest

from heteroscale.coordinator.core.drift import DriftState, observe_drift, ratio_in_use
from heteroscale.coordinator.core.settings import RatioDrift

SETTINGS = RatioDrift(window_s=600, threshold=0.2, step=0.15, dwell_s=300, min_ratio=0.25, max_ratio=8.0)


def run(state: DriftState, *, mode: str, k: float, seconds: float, start: float, settings: RatioDrift = SETTINGS,
        ttft: float | None = None, tbt: float | None = None, waiting: float | None = None) -> tuple[DriftState, float]:
    """``seconds`` of ticks every 5 s at ``k`` uncached prefill tokens per decode token."""
    t = start
    while t < start + seconds:
        state = observe_drift(state, settings=settings, mode=mode, configured=(9, 7), now_s=t,
                              prefill_tps=k * 10_000, decode_tps=10_000.0, ttft_ratio=ttft, tbt_ratio=tbt,
                              prefill_waiting=waiting)
        t += 5.0
    return state, t


def test_fixed_measures_nothing():
    state, _ = run(DriftState(), mode="fixed", k=5.0, seconds=3600, start=0)
    assert state == DriftState()


def test_the_reference_is_learnt_over_the_first_window_and_steady_traffic_gives_no_advice():
    state, t = run(DriftState(), mode="advise", k=4.0, seconds=1800, start=0)
    assert state.k_ref == pytest.approx(4.0) and state.advice is None
    assert state.needed == Fraction(9, 7)


def test_a_mix_shift_is_advised_after_a_whole_window_and_dropped_with_hysteresis():
    state, t = run(DriftState(), mode="advise", k=4.0, seconds=1200, start=0)
    # RAG hours: twice the uncached prompt tokens per decode token -> needs ~2 x 9:7.
    state, t = run(state, mode="advise", k=8.0, seconds=600, start=t)
    assert state.advice is None                       # the mean is moving, the window not yet over
    state, t = run(state, mode="advise", k=8.0, seconds=1800, start=t)
    assert state.advice is not None and float(state.advice) == pytest.approx(18 / 7, rel=0.05)
    assert ratio_in_use(state, (9, 7)) == Fraction(9, 7)          # advise never changes the ratio
    state, t = run(state, mode="advise", k=4.0, seconds=3600, start=t)
    assert state.advice is None


def test_adapt_moves_in_bounded_steps_at_least_dwell_apart_within_limits():
    limits = RatioDrift(window_s=600, threshold=0.2, step=0.15, dwell_s=300, min_ratio=0.25, max_ratio=2.0)
    state, t = run(DriftState(), mode="adapt", k=4.0, seconds=1200, start=0, settings=limits)
    seen = [ratio_in_use(state, (9, 7))]
    moves = []
    while t < 20_000:
        state, t = run(state, mode="adapt", k=12.0, seconds=60, start=t, settings=limits)
        r = ratio_in_use(state, (9, 7))
        if r != seen[-1]:
            moves.append((t, float(r) / float(seen[-1])))
            seen.append(r)
    assert moves and all(1.0 < m <= 1.15 + 1e-6 for _, m in moves)           # bounded steps, one way
    assert all(b - a >= 300 for (a, _), (b, _) in zip(moves, moves[1:]))     # dwell
    # Capped at max_ratio (2.0); it stops once within half the threshold of what is needed.
    assert 2.0 / 1.1 <= float(seen[-1]) <= 2.0


def test_prefill_pressure_nudges_the_needed_ratio_up():
    state, t = run(DriftState(), mode="advise", k=4.0, seconds=1200, start=0)
    state, t = run(state, mode="advise", k=4.0, seconds=3600, start=t, ttft=1.4, tbt=0.5, waiting=12)
    assert float(state.needed) > 9 / 7 * 1.2
