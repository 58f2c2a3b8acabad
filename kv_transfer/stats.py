"""KV-transfer throughput arithmetic (pure): counter deltas, windowed rates, histogram deltas.

Every KV-transfer source ends up as cumulative numbers sampled at times the
caller chooses: bytes moved (engine connector counters, RDMA port counters),
transfer counts and durations, failures. This module turns those into rates
over a sliding window without ever inventing a value:

* ``counter_delta`` handles a counter that wrapped at 2**bits (RDMA port
  counters are 64-bit; old HCAs expose 32-bit ones) and one that was reset
  (driver reload, engine restart). A wrap is accepted only when the wrapped
  delta is plausible (at most ``max_delta``); anything else that goes backwards
  is a reset, and the interval is *unknown* (``None``), never negative and
  never a guess.
* ``RateWindow`` keeps ``(t, value)`` samples for ``window_s`` seconds and
  answers bytes/s over the known intervals only: an interval with a reset is
  left out of both the numerator and the denominator. With less than one
  known interval it answers ``None`` (absent), never 0.
* ``HistogramWindow`` does the same for a cumulative histogram (bucket counts
  and sum): the windowed mean and a bucket-interpolated quantile of the
  observations made inside the window.

No clock is read here: time is always an argument (``now_s``, monotonic
seconds), so the sidecar, the tests and replays share the same code.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

COUNTER_BITS = 64


def counter_delta(previous: float, current: float, *, bits: int = COUNTER_BITS,
                  max_delta: float | None = None) -> float | None:
    """Increase of a cumulative counter between two reads, or ``None`` if unknown.

    Pass integer reads (sysfs counters) to keep the arithmetic exact near
    ``2**64``, where a float cannot tell 2**64 - 1000 from 2**64.

    ``current >= previous``: the plain difference (``None`` if above ``max_delta``:
    a counter cannot move faster than the link; such a jump is a re-enumerated
    device, not traffic). ``current < previous``: a wrap at ``2**bits`` when
    ``2**bits - previous + current`` is plausible, else a reset (``None``).
    """
    if not (_finite(previous) and _finite(current)) or previous < 0 or current < 0:
        return None
    if current >= previous:
        delta = current - previous
        if max_delta is not None and delta > max_delta:
            return None
        return delta
    modulus = 2 ** bits                          # an int: exact arithmetic for integer reads
    if previous >= modulus or current >= modulus:
        return None                              # not a counter of that width: treat as reset
    wrapped = modulus - previous + current
    # Without a plausibility bound a wrap is indistinguishable from a reset; only a
    # counter close to the top that came back small is read as a wrap.
    limit = max_delta if max_delta is not None else modulus / 4
    return wrapped if wrapped <= limit else None


@dataclass(frozen=True)
class Rate:
    """A windowed rate: ``per_second`` over ``span_s`` seconds of known intervals."""

    per_second: float
    span_s: float
    total: float                                 # sum of the known deltas in the window
    resets: int                                  # intervals left out (reset or implausible)


class RateWindow:
    """Cumulative samples over a sliding window; rate over the known intervals.

    ``max_rate_per_s`` bounds a plausible delta (e.g. the link rate in bytes/s):
    it separates a wrap from a reset and drops impossible jumps.
    """

    def __init__(self, *, window_s: float, bits: int = COUNTER_BITS,
                 max_rate_per_s: float | None = None) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        self.window_s = float(window_s)
        self.bits = bits
        self.max_rate_per_s = max_rate_per_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now_s: float, value: float) -> None:
        """Record a cumulative reading taken at ``now_s``; out-of-order reads are ignored."""
        if not _finite(now_s) or not _finite(value):
            return
        if self._samples and now_s <= self._samples[-1][0]:
            return
        self._samples.append((float(now_s), value))   # ints stay ints: exact wrap arithmetic
        self._trim(now_s)

    def clear(self) -> None:
        self._samples.clear()

    def _trim(self, now_s: float) -> None:
        # Keep one sample at or before the window start so the window is fully covered.
        start = now_s - self.window_s
        while len(self._samples) >= 2 and self._samples[1][0] <= start:
            self._samples.popleft()

    def rate(self, now_s: float) -> Rate | None:
        """bytes (or units)/s over the window ending at ``now_s``; ``None`` when unknown."""
        self._trim(now_s)
        samples = [s for s in self._samples if s[0] <= now_s]
        if samples and now_s - samples[-1][0] > self.window_s:
            return None                          # the newest read is older than the window: stale
        total = 0.0
        span = 0.0
        resets = 0
        for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
            dt = t1 - t0
            max_delta = None if self.max_rate_per_s is None else self.max_rate_per_s * dt
            delta = counter_delta(v0, v1, bits=self.bits, max_delta=max_delta)
            if delta is None:
                resets += 1
                continue
            total += float(delta)
            span += dt
        if span <= 0:
            return None
        return Rate(per_second=total / span, span_s=span, total=total, resets=resets)


@dataclass(frozen=True)
class HistogramSample:
    """A cumulative histogram read: ``cumulative[i]`` observations were ``<= bounds[i]``."""

    bounds: tuple[float, ...]                    # ascending, last is +inf
    cumulative: tuple[float, ...]
    sum: float

    @property
    def count(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0


@dataclass(frozen=True)
class HistogramDelta:
    """Observations made between two histogram reads."""

    count: float
    sum: float
    bounds: tuple[float, ...]
    per_bucket_cumulative: tuple[float, ...]

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Bucket-interpolated quantile of the delta (``None`` without observations).

        Linear inside the bucket that holds rank ``q * count``; a rank in the
        ``+Inf`` bucket answers the highest finite bound (a lower bound, stated
        in the docs), the Prometheus ``histogram_quantile`` convention.
        """
        if self.count <= 0 or not 0 <= q <= 1:
            return None
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for bound, cumulative in zip(self.bounds, self.per_bucket_cumulative):
            if cumulative >= rank and cumulative > lower_count:
                if math.isinf(bound):
                    return lower_bound
                share = (rank - lower_count) / (cumulative - lower_count)
                return lower_bound + (bound - lower_bound) * share
            if not math.isinf(bound):
                lower_bound, lower_count = bound, cumulative
        return lower_bound


def histogram_delta(previous: HistogramSample, current: HistogramSample) -> HistogramDelta | None:
    """What happened between two reads; ``None`` across a reset or a bucket-layout change."""
    if previous.bounds != current.bounds:
        return None
    diffs = tuple(c - p for p, c in zip(previous.cumulative, current.cumulative))
    if any(d < 0 for d in diffs) or current.sum < previous.sum - 1e-9 * max(1.0, abs(previous.sum)):
        return None
    return HistogramDelta(count=diffs[-1] if diffs else 0.0, sum=max(0.0, current.sum - previous.sum),
                          bounds=current.bounds, per_bucket_cumulative=diffs)


class HistogramWindow:
    """Histogram reads over a sliding window; the delta between the oldest and newest usable reads."""

    def __init__(self, *, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be positive")
        self.window_s = float(window_s)
        self._samples: deque[tuple[float, HistogramSample]] = deque()

    def add(self, now_s: float, sample: HistogramSample) -> None:
        if self._samples and now_s <= self._samples[-1][0]:
            return
        if self._samples and histogram_delta(self._samples[-1][1], sample) is None:
            self._samples.clear()                # reset: nothing before it can be compared
        self._samples.append((float(now_s), sample))
        start = now_s - self.window_s
        while len(self._samples) >= 2 and self._samples[1][0] <= start:
            self._samples.popleft()

    def delta(self, now_s: float) -> HistogramDelta | None:
        if len(self._samples) < 2 or now_s - self._samples[-1][0] > self.window_s:
            return None
        return histogram_delta(self._samples[0][1], self._samples[-1][1])


def merge_histograms(samples: Sequence[HistogramSample]) -> HistogramSample | None:
    """Sum of several series (engines, ranks) with the same bucket layout; ``None`` if they differ."""
    if not samples:
        return None
    bounds = samples[0].bounds
    if any(s.bounds != bounds for s in samples):
        return None
    cumulative = tuple(sum(s.cumulative[i] for s in samples) for i in range(len(bounds)))
    return HistogramSample(bounds=bounds, cumulative=cumulative, sum=sum(s.sum for s in samples))


def median(values: Sequence[float]) -> float | None:
    """The median of finite values; ``None`` for none."""
    clean = sorted(v for v in values if _finite(v))
    if not clean:
        return None
    mid = len(clean) // 2
    return clean[mid] if len(clean) % 2 else (clean[mid - 1] + clean[mid]) / 2


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
