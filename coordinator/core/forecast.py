"""Predictive lead: the decode demand expected one start-up horizon from now (pure).

New instances take a start-up time to serve; a controller that reacts to the load it sees
is always that far behind a rising load. Two forecasts, the larger wins:

* the trend — a least-squares line through the load over ``trend_window_s``, extended by
  ``horizon_s`` (only a rising trend counts);
* yesterday — once a day of history is kept (5-minute means), yesterday's load at
  ``now + horizon`` scaled by how today compares with yesterday at ``now``.

Forecasts only ever add capacity: the policy uses them for scale-out and never for
scale-in. The history is bounded (one day and one hour of 5-minute buckets).
"""

from __future__ import annotations

from dataclasses import dataclass

from heteroscale.coordinator.core.settings import Forecast

BUCKET_S = 300.0
DAY_S = 86_400.0
KEEP_S = DAY_S + 3600.0


@dataclass(frozen=True)
class ForecastState:
    recent: tuple[tuple[float, float], ...] = ()    # (at, load) over the trend window
    buckets: tuple[tuple[float, float, int], ...] = ()   # (bucket start, sum, count) over a day


def remember_load(state: ForecastState, *, settings: Forecast, now_s: float, load_tps: float) -> ForecastState:
    recent = tuple(s for s in state.recent if now_s - s[0] <= settings.trend_window_s) + ((now_s, load_tps),)
    start = now_s - now_s % BUCKET_S
    buckets = [b for b in state.buckets if now_s - b[0] <= KEEP_S]
    if buckets and buckets[-1][0] == start:
        _, total, count = buckets[-1]
        buckets[-1] = (start, total + load_tps, count + 1)
    else:
        buckets.append((start, load_tps, 1))
    return ForecastState(recent=recent, buckets=tuple(buckets))


def forecast_tps(state: ForecastState, *, settings: Forecast, now_s: float) -> tuple[float | None, str]:
    """The load expected at ``now + horizon`` (``None`` if nothing to say), and how."""
    trend = _trend(state.recent, now_s=now_s, horizon_s=settings.horizon_s)
    daily = _yesterday(state.buckets, now_s=now_s, horizon_s=settings.horizon_s)
    best = max((f for f in (trend, daily) if f is not None), default=None)
    if best is None:
        return None, ""
    how = "trend" if best == trend else "yesterday's shape"
    return best, how


def _trend(samples: tuple[tuple[float, float], ...], *, now_s: float, horizon_s: float) -> float | None:
    if len(samples) < 4 or samples[-1][0] - samples[0][0] <= 0:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var <= 0:
        return None
    slope = sum((t - mean_t) * (y - mean_y) for t, y in samples) / var
    if slope <= 0:
        return None
    return mean_y + slope * (now_s + horizon_s - mean_t)


def _yesterday(buckets: tuple[tuple[float, float, int], ...], *, now_s: float, horizon_s: float) -> float | None:
    by_start = {start: total / count for start, total, count in buckets if count}

    def at(t: float) -> float | None:
        return by_start.get(t - t % BUCKET_S)

    then_now, then_ahead, today = at(now_s - DAY_S), at(now_s - DAY_S + horizon_s), at(now_s - BUCKET_S)
    if then_now is None or then_ahead is None or today is None or then_now <= 0:
        return None
    return then_ahead * today / then_now
