"""P/D ratio drift: is the configured prefill:decode ratio still the one the traffic needs? (pure)

The ratio comes from a pressure test of one workload; the request mix then moves (chat
hours, long-prompt RAG hours, long-answer agent hours) and so does the prefix-cache hit
rate. What a prefill instance must carry per decode token is

    k = uncached prefill tokens/s ÷ decode tokens/s

(uncached: a prefix-cache hit costs prefill nothing, so a falling hit rate raises k). The
ratio the traffic needs is the configured one scaled by how far ``k`` has moved from its
reference ``k_ref`` (the value at curation: ``ratio_drift.reference_prefill_per_decode``,
or learnt as the mean over the first ``window_s`` of data):

    needed = configured × k̄ / k_ref        (k̄: k averaged over ``window_s``)

Prefill pressure refines it: sustained prefill queueing with TTFT over its SLO while TBT
is comfortably inside it means prefill is short whatever ``k`` says, and the reverse.

``pd_ratio_mode``:

* ``fixed``  — nothing is measured.
* ``advise`` — when ``needed`` is off the ratio in use by more than ``threshold`` for a
  whole ``window_s``, the policy recommends it (decision inputs, status page, the metric
  ``heteroscale_pd_ratio_recommended``, a Kubernetes Event); the ratio in use stays.
* ``adapt``  — the ratio in use moves toward ``needed`` by at most ``step`` per move, at
  least ``dwell_s`` apart, within ``[min_ratio, max_ratio]``; hysteresis: it starts moving
  past ``threshold`` and stops within half of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

from heteroscale.coordinator.core.settings import RatioDrift


@dataclass(frozen=True)
class DriftState:
    ratio: Fraction | None = None            # the ratio in use (None: the configured one)
    k_mean: float | None = None              # k averaged over the window (exponentially)
    k_seen_s: float | None = None            # when k was last measured
    k_weight: float = 0.0                    # how much of a window the mean has seen (0..1)
    ref_sum: float = 0.0                     # learning k_ref: sum and count over the first window
    ref_count: int = 0
    ref_started_s: float | None = None
    k_ref: float | None = None
    pressure: float = 0.0                    # prefill (+) or decode (−) latency pressure, averaged
    off_since_s: float | None = None         # since when ``needed`` has been off by > threshold
    moved_s: float | None = None             # the last adapt move
    needed: Fraction | None = None           # the ratio the traffic needs, as last estimated
    advice: Fraction | None = None           # what is recommended (advise and adapt)


def ratio_in_use(state: DriftState, configured: tuple[int, int]) -> Fraction:
    return state.ratio if state.ratio is not None else Fraction(configured[0], configured[1])


def observe_drift(state: DriftState, *, settings: RatioDrift, mode: str, configured: tuple[int, int],
                  now_s: float, prefill_tps: float | None, decode_tps: float | None,
                  ttft_ratio: float | None, tbt_ratio: float | None,
                  prefill_waiting: float | None) -> DriftState:
    """One tick: update the averages, the estimate of the needed ratio, the advice, and
    (``adapt``) the ratio in use."""
    if mode == "fixed":
        return state if state == DriftState() else DriftState()
    state = _measure(state, settings=settings, now_s=now_s, prefill_tps=prefill_tps, decode_tps=decode_tps,
                     ttft_ratio=ttft_ratio, tbt_ratio=tbt_ratio, prefill_waiting=prefill_waiting)
    if state.k_ref is None or state.k_mean is None or state.k_weight < 1.0 - math.exp(-1.0):
        return state
    base = Fraction(configured[0], configured[1])
    pressure = 1.0 + max(-0.25, min(0.25, state.pressure))
    raw = float(base) * (state.k_mean / state.k_ref) * pressure
    needed = Fraction(min(settings.max_ratio, max(settings.min_ratio, raw))).limit_denominator(64)
    in_use = ratio_in_use(state, configured)
    off = abs(float(needed) / float(in_use) - 1.0)
    state = replace(state, needed=needed)
    if off > settings.threshold:
        since = state.off_since_s if state.off_since_s is not None else now_s
        state = replace(state, off_since_s=since)
        if now_s - since >= settings.window_s or state.advice is not None:
            state = replace(state, advice=needed)
    elif off < settings.threshold / 2:
        state = replace(state, off_since_s=None, advice=None)
    if mode == "adapt" and state.advice is not None and (
            state.moved_s is None or now_s - state.moved_s >= settings.dwell_s):
        ratio = _step_towards(in_use, state.advice, step=settings.step)
        ratio = Fraction(min(settings.max_ratio, max(settings.min_ratio, float(ratio)))).limit_denominator(64)
        if ratio != in_use:
            state = replace(state, ratio=ratio, moved_s=now_s)
    return state


def _measure(state: DriftState, *, settings: RatioDrift, now_s: float, prefill_tps: float | None,
             decode_tps: float | None, ttft_ratio: float | None, tbt_ratio: float | None,
             prefill_waiting: float | None) -> DriftState:
    if prefill_tps is None or decode_tps is None or decode_tps <= 0 or prefill_tps < 0:
        return state
    k = prefill_tps / decode_tps
    dt = 0.0 if state.k_seen_s is None else max(0.0, now_s - state.k_seen_s)
    alpha = 1.0 if state.k_mean is None else 1.0 - math.exp(-dt / settings.window_s)
    k_mean = k if state.k_mean is None else state.k_mean + alpha * (k - state.k_mean)
    weight = min(1.0, state.k_weight + (1.0 - state.k_weight) * alpha) if state.k_mean is not None else 0.0
    # Latency pressure: +1 when prefill is the tighter side (queueing, TTFT over, TBT well
    # inside), −1 when decode is; averaged over the window like k.
    signal = 0.0
    if ttft_ratio is not None and tbt_ratio is not None:
        if ttft_ratio > 1.0 and tbt_ratio < 0.8 and (prefill_waiting or 0) > 0:
            signal = 1.0
        elif tbt_ratio > 1.0 and ttft_ratio < 0.8:
            signal = -1.0
    pressure = state.pressure + alpha * (signal - state.pressure)
    state = replace(state, k_mean=k_mean, k_seen_s=now_s, k_weight=weight, pressure=pressure)
    if settings.reference_prefill_per_decode is not None:
        return replace(state, k_ref=settings.reference_prefill_per_decode)
    if state.k_ref is not None:
        return state
    started = state.ref_started_s if state.ref_started_s is not None else now_s
    total, count = state.ref_sum + k, state.ref_count + 1
    if now_s - started >= settings.window_s:
        return replace(state, ref_sum=total, ref_count=count, ref_started_s=started, k_ref=total / count)
    return replace(state, ref_sum=total, ref_count=count, ref_started_s=started)


def _step_towards(current: Fraction, target: Fraction, *, step: float) -> Fraction:
    """At most ``step`` (relative) from ``current`` towards ``target``."""
    ratio = float(target) / float(current)
    bounded = min(1.0 + step, max(1.0 / (1.0 + step), ratio))
    return Fraction(float(current) * bounded).limit_denominator(64)
