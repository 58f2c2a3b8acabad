"""Windowed rates from counter snapshots, and the sidecar's signals over a window (pure).

A ``SignalWindow`` keeps the ``(t_s, EngineSnapshot)`` samples of the last
``window_s`` seconds (``t_s`` from the caller's monotonic clock; this module
never reads a clock) and turns them into per-second rates and latency
quantiles.

Rate of one counter over the window = (sum of increases between consecutive
samples) / (sum of the time those increases cover). Only "good" pairs count:

* both samples have the series (a missing series is skipped over: the next
  present value is paired with the previous present one);
* time moved forward;
* the counter did not go down - a decrease means the engine restarted (or an
  engine left a data-parallel set), so the pair is a segment boundary: it adds
  neither tokens nor time. Prometheus instead assumes the counter restarted
  from zero and adds the new value, which spikes when a "reset" is really one
  engine of several vanishing; we prefer to lose one interval;
* the set of summed engines/ranks is the same on both sides (an engine
  appearing would otherwise look like a burst of tokens), and so is the
  family the token counters came from (``EngineSnapshot.token_source``).

So a rate is never negative and never larger than the largest per-pair rate
actually observed. No good pair -> ``None`` (unknown), never 0; a sum that
overflows the float range -> ``None`` too, never ``inf``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Sequence

from heteroscale.engine_adapters import quantiles as q
from heteroscale.engine_adapters.snapshot import (
    GENERATION_TOKENS, KV_CACHE_USAGE, PREEMPTIONS, PROMPT_CACHED_TOKENS, PROMPT_TOKENS, PROMPT_UNCACHED_TOKENS,
    REQUESTS_DEFERRED, REQUESTS_RUNNING, REQUESTS_WAITING, TBT, TTFT, EngineSnapshot,
)
from heteroscale.report import QUANTILE_FIELDS, EngineSignals, clean_signals

DEFAULT_WINDOW_S = 5.0


def counter_rate(points: Sequence[tuple[float, float | None]],
                 *, comparable: Sequence[bool] | None = None) -> float | None:
    """Reset-safe rate of a counter from ``(t_s, value | None)`` points in time order.

    ``comparable[i]`` (optional) says whether point ``i`` may be differenced
    with point ``i - 1`` (e.g. same set of engines). A point is paired with
    the previous *present* point, and only if every step between them is
    comparable.
    Worked example: (0, 100), (1, 150), (2, 10) [restart], (3, 40)
      pairs: 0->1: +50 over 1 s; 1->2: decrease = boundary, skipped; 2->3: +30 over 1 s
      rate = (50 + 30) / (1 + 1) = 40 /s.
    """
    increase = 0.0
    covered_s = 0.0
    prev: tuple[float, float] | None = None
    broken = False
    for i, (t, v) in enumerate(points):
        if i > 0 and comparable is not None and not comparable[i]:
            broken = True
        if v is None:
            continue
        if prev is not None and not broken:
            dt, dv = t - prev[0], v - prev[1]
            if dt > 0 and dv >= 0:
                increase += dv
                covered_s += dt
        prev, broken = (t, v), False
    if covered_s <= 0:
        return None
    rate = increase / covered_s
    return rate if math.isfinite(rate) else None     # counters near the float limit: unknown, not inf


@dataclass(frozen=True, kw_only=True)
class WindowStats(EngineSignals):
    """Signals over one window (the report's ``EngineSignals``) and how much data they stand on.

    Every number is finite and inside the report's bounds, or ``None``
    (``heteroscale.report.clean_signals``): counters near the float limit that sum or
    difference to infinity give "unknown", never ``inf``.
    """

    span_s: float = 0.0          # newest - oldest sample time in the window
    samples: int = 0
    dropped: tuple[str, ...] = ()   # signal fields that came out non-finite or out of bounds

    def quantiles(self, histogram: str) -> dict[float, float | None]:
        """``{0.5: p50, 0.9: p90, 0.99: p99}`` of ``ttft`` or ``tbt``."""
        return {q: getattr(self, name) for q, name in QUANTILE_FIELDS[histogram].items()}


class SignalWindow:
    """The last ``window_s`` seconds of engine snapshots (mutable, no I/O, no clock)."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._samples: deque[tuple[float, EngineSnapshot]] = deque()

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def newest_t_s(self) -> float | None:
        return self._samples[-1][0] if self._samples else None

    def add(self, t_s: float, snapshot: EngineSnapshot) -> None:
        """Add a sample; a sample not after the newest one is ignored (clock went back)."""
        if self._samples and t_s <= self._samples[-1][0]:
            return
        self._samples.append((t_s, snapshot))
        self.prune(t_s)

    def prune(self, now_s: float) -> None:
        """Forget samples older than the window ending at ``now_s``."""
        start = now_s - self.window_s
        while self._samples and self._samples[0][0] < start:
            self._samples.popleft()

    def stats(self, now_s: float) -> WindowStats:
        self.prune(now_s)
        samples = list(self._samples)
        if not samples:
            return WindowStats()
        # comparable[i]: sample i may be differenced with sample i - 1 (same engines); counters
        # also need the same token source (SGLang per-batch vs per-finished-request counters).
        comparable = [True] + [a.ranks == b.ranks for (_, a), (_, b) in zip(samples, samples[1:])]
        counters_comparable = [ok and (i == 0 or samples[i - 1][1].token_source == samples[i][1].token_source)
                               for i, ok in enumerate(comparable)]

        def rate(key: str) -> float | None:
            return counter_rate([(t, s.counters.get(key)) for t, s in samples], comparable=counters_comparable)

        prompt = rate(PROMPT_TOKENS)
        uncached = rate(PROMPT_UNCACHED_TOKENS)
        if uncached is None:
            cached = rate(PROMPT_CACHED_TOKENS)
            if prompt is not None and cached is not None:
                uncached = max(0.0, prompt - cached)
        newest = samples[-1][1]
        quantiles = {}
        for name, key in (("ttft", TTFT), ("tbt", TBT)):
            values = q.quantiles(_window_histogram(samples, key, comparable), tuple(QUANTILE_FIELDS[name]))
            quantiles.update({QUANTILE_FIELDS[name][qq]: v for qq, v in values.items()})
        stats = WindowStats(
            decode_tps=rate(GENERATION_TOKENS),
            prefill_tps=prompt,
            prefill_uncached_tps=uncached,
            requests_running=newest.gauges.get(REQUESTS_RUNNING),
            requests_waiting=newest.gauges.get(REQUESTS_WAITING),
            requests_deferred=newest.gauges.get(REQUESTS_DEFERRED),
            requests_by_kv_stage=dict(newest.kv_stages),
            kv_cache_usage_ratio=newest.gauges.get(KV_CACHE_USAGE),
            preemptions_per_s=rate(PREEMPTIONS),
            **quantiles,
            span_s=samples[-1][0] - samples[0][0],
            samples=len(samples),
        )
        clean, dropped = clean_signals(stats)
        return replace(clean, dropped=dropped) if dropped else clean


def _window_histogram(samples: Sequence[tuple[float, EngineSnapshot]], key: str,
                      comparable: Sequence[bool]):
    pairs: list[tuple] = []
    prev = None
    broken = False
    for i, (_, snap) in enumerate(samples):
        if i > 0 and not comparable[i]:
            broken = True
        h = snap.histograms.get(key)
        if h is None:
            continue
        if prev is not None and not broken:
            pairs.append((prev, h))
        prev, broken = h, False
    return q.window_delta(pairs)

