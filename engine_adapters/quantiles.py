"""Windowed latency quantiles from cumulative histogram deltas (pure).

Engines export latency as lifetime cumulative histograms; a lifetime quantile
barely moves after hours of traffic. The sidecar instead differences the
histograms of consecutive scrapes inside the rate window, adds those deltas up
(observations made *during* the window) and interpolates quantiles the way
Prometheus ``histogram_quantile`` does: linearly inside the bucket that holds
the target rank, with 0 as the lower edge of the first bucket (latencies are
non-negative), and the highest finite bound when the rank falls in ``+Inf``.

Resets: a pair of snapshots where any bucket went down (engine restart), the
bucket layout changed, or the set of summed engines changed contributes
nothing - it is a segment boundary, never a negative or inflated delta.
``None`` means "no observations in the window" (not zero latency).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from heteroscale.engine_adapters.snapshot import Histogram

QUANTILES = (0.5, 0.9, 0.99)


def histogram_delta(older: Histogram, newer: Histogram) -> Histogram | None:
    """Observations between two snapshots of one histogram; ``None`` on a reset."""
    if older.bounds != newer.bounds:
        return None
    deltas = tuple(n - o for o, n in zip(older.cumulative, newer.cumulative))
    if any(d < 0 for d in deltas):
        return None
    # Differences of cumulative counts are cumulative again only if no bucket
    # "lost" observations to a lower one, which a live histogram cannot do.
    if any(d2 < d1 for d1, d2 in zip(deltas, deltas[1:])):
        return None
    return Histogram(newer.bounds, deltas, max(0.0, newer.sum - older.sum))


def window_delta(pairs: Iterable[tuple[Histogram | None, Histogram | None]]) -> Histogram | None:
    """Sum of the per-pair deltas of consecutive snapshots; resets and gaps skipped."""
    total: Histogram | None = None
    for older, newer in pairs:
        if older is None or newer is None:
            continue
        delta = histogram_delta(older, newer)
        if delta is None:
            continue
        try:
            total = delta if total is None else total.merge(delta)
        except ValueError:      # counts near the float limit overflow when added: no answer
            return None
    return total


def quantile(q: float, histogram: Histogram | None) -> float | None:
    """Prometheus-style ``histogram_quantile(q, ...)``; ``None`` without observations."""
    if histogram is None or not 0.0 <= q <= 1.0:
        return None
    count = histogram.count
    if count <= 0:
        return None
    rank = q * count
    bounds, cumulative = histogram.bounds, histogram.cumulative
    for i, (upper, cum) in enumerate(zip(bounds, cumulative)):
        if cum >= rank and cum > 0:
            break
    if upper == math.inf:
        # Rank lies in the overflow bucket: the best known answer is the highest
        # finite bound (Prometheus does the same); no finite bound -> unknown.
        return bounds[-2] if len(bounds) > 1 else None
    lower = bounds[i - 1] if i > 0 else 0.0
    below = cumulative[i - 1] if i > 0 else 0.0
    if i == 0 and upper <= 0:
        return upper
    in_bucket = cum - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


def quantiles(histogram: Histogram | None, qs: Sequence[float] = QUANTILES) -> dict[float, float | None]:
    return {q: quantile(q, histogram) for q in qs}
