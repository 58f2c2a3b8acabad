"""Workloads for the simulator: native trace readers and synthetic diurnal days (pure).

Owns turning a file into a ``Workload`` — arrays of arrival time, prompt tokens,
cached (prefix-reused) prompt tokens and output tokens, sorted by arrival — and
building day-long workloads from a trace's size distribution. It reads files but
never the clock; randomness comes from a seed.

Formats read natively (``load_trace(path, fmt="auto")``):

* **Azure LLM inference traces 2023** (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``;
  timestamps are datetimes with 7-digit fractional seconds, trimmed to microseconds).
* **Mooncake** (JSONL, one object per line: ``timestamp`` in ms, ``input_length``,
  ``output_length``, ``hash_ids`` — one id per 512-token block). Prefix reuse is
  derived from ``hash_ids``: a request's leading blocks already seen by an
  LRU prefix cache of ``prefix_cache_blocks`` blocks count as cached tokens.
* **BurstGPT** (CSV ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``;
  ``Timestamp`` in seconds). Rows with 0 response tokens are failed requests and are skipped.

Bad input raises ``TraceError`` (a ``UsageError``) naming the file and line.

``diurnal_day(source, peak_rps=..., profile=..., seed=..., order=...)`` draws
arrivals from a non-homogeneous Poisson process whose rate follows a 24-hour
profile, linearly interpolated between hourly points, and gives them the source's
(prompt, output, cached) triples. ``DEFAULT_PROFILE`` is shaped like the paper's
Fig. 2 dialogue service (peaks near hours 3 and 8, trough 0.08 near 21). Which
source request an arrival gets is ``order``:

* ``keep`` (the default): the source's timeline is stretched over the day — an
  arrival at fraction f of the day takes a request recorded near fraction f of the
  trace (drawn from a window of 1/96 of the trace around it) — so a trace whose mix
  changes over its span (long prompts late, a cache that warms up) changes the
  same way over the day;
* ``shuffle``: every arrival draws from the whole trace, so the mix is the same
  all day (prefill load a fixed multiple of decode load). Pressure tests use this.

``apply_drift(workload, drift, start_hour=...)`` then shifts the mix by hour of day:
``Drift`` points ``(hour, prompt_scale, output_scale, cache_share)`` are
interpolated linearly (wrapping at 24 h) and scale each request's prompt and
output tokens; ``cache_share`` (if given) sets the share of prompt tokens served
from the prefix cache.
"""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from heteroscale.errors import UsageError

MOONCAKE_BLOCK_TOKENS = 512

# Relative request rate at each hour 0..23 (the 24th point wraps to hour 0).
DEFAULT_PROFILE: tuple[float, ...] = (
    0.70, 0.85, 0.95, 1.00, 0.82, 0.78, 0.90, 0.97, 1.00, 0.92, 0.82, 0.72,
    0.62, 0.52, 0.43, 0.35, 0.27, 0.20, 0.14, 0.11, 0.09, 0.08, 0.22, 0.48,
)


class TraceError(UsageError):
    """A trace file that cannot be read: one line naming the file and the problem."""


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival. Arrays share one length; times start near 0.

    ``cached_tokens`` ≤ ``prompt_tokens - 1`` (at least one token is always computed).
    ``block_hashes``: per request, its prompt's block hashes (Mooncake ``hash_ids``) when the
    trace has them — the simulator's per-instance prefix caches use them — else ``None``.
    """

    name: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    cached_tokens: np.ndarray
    block_hashes: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if any(len(a) != n for a in (self.prompt_tokens, self.output_tokens, self.cached_tokens)):
            raise ValueError("Workload arrays must have the same length")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def window(self, start_s: float, end_s: float) -> "Workload":
        """Requests arriving in [start_s, end_s), re-based to start at 0."""
        lo, hi = np.searchsorted(self.arrival_s, [start_s, end_s])
        return Workload(self.name, self.arrival_s[lo:hi] - start_s, self.prompt_tokens[lo:hi],
                        self.output_tokens[lo:hi], self.cached_tokens[lo:hi],
                        None if self.block_hashes is None else self.block_hashes[lo:hi])

    def summary(self) -> dict[str, float]:
        if not len(self):
            return {"requests": 0}
        return {"requests": len(self), "duration_s": round(self.duration_s, 1),
                "mean_rps": round(len(self) / max(self.duration_s, 1e-9), 3),
                "mean_prompt_tokens": round(float(self.prompt_tokens.mean()), 1),
                "mean_output_tokens": round(float(self.output_tokens.mean()), 1),
                "cached_share": round(float(self.cached_tokens.sum() / max(1, self.prompt_tokens.sum())), 4)}


def make_workload(name: str, arrival_s: Sequence[float], prompt_tokens: Sequence[int],
                  output_tokens: Sequence[int],
                  cached_tokens: Sequence[int] | None = None,
                  block_hashes: Sequence[Sequence[int]] | None = None) -> Workload:
    """Build a ``Workload`` from plain sequences: sorts by arrival, re-bases to 0, clamps sizes."""
    arr = np.asarray(arrival_s, dtype=np.float64)
    prompt = np.maximum(1, np.asarray(prompt_tokens, dtype=np.int64))
    out = np.maximum(1, np.asarray(output_tokens, dtype=np.int64))
    cached = (np.zeros_like(prompt) if cached_tokens is None
              else np.asarray(cached_tokens, dtype=np.int64))
    cached = np.clip(cached, 0, prompt - 1)
    order = np.argsort(arr, kind="stable")
    arr = arr[order]
    if len(arr):
        arr = arr - arr[0]
    blocks = None if block_hashes is None else tuple(tuple(block_hashes[i]) for i in order)
    return Workload(name, arr, prompt[order], out[order], cached[order], blocks)


def detect_format(path: Path) -> str:
    """``azure``, ``mooncake`` or ``burstgpt`` from the first line of the file."""
    try:
        with path.open("r", encoding="utf-8") as fh:
            first = fh.readline().strip()
    except OSError as exc:
        raise TraceError(f"trace {path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"trace {path}: not a text file") from exc
    if first.startswith("{"):
        return "mooncake"
    header = [h.strip().lower() for h in first.split(",")]
    if header[:3] == ["timestamp", "contexttokens", "generatedtokens"]:
        return "azure"
    if "request tokens" in header and "response tokens" in header:
        return "burstgpt"
    raise TraceError(f"trace {path}: unknown format (first line {first[:60]!r}); "
                     "expected Azure CSV, Mooncake JSONL or BurstGPT CSV")


def load_trace(path: str | Path, *, fmt: str = "auto",
               prefix_cache_blocks: int = 200_000) -> Workload:
    """Read a trace file in its native format (see module docstring)."""
    p = Path(path)
    if p.is_dir():
        raise TraceError(f"trace {p} is a directory: give a trace file (Azure CSV, Mooncake JSONL, BurstGPT CSV)")
    if not p.is_file():
        raise TraceError(f"trace {p}: no such file")
    kind = detect_format(p) if fmt == "auto" else fmt
    readers = {"azure": _read_azure, "burstgpt": _read_burstgpt}
    if kind == "mooncake":
        wl = _read_mooncake(p, prefix_cache_blocks)
    elif kind in readers:
        wl = readers[kind](p)
    else:
        raise TraceError(f"trace {p}: unknown format {fmt!r}; use azure, mooncake or burstgpt")
    if not len(wl):
        raise TraceError(f"trace {p}: no requests")
    return wl


def parse_azure_timestamp(text: str) -> float:
    """``2023-11-16 18:15:46.6805900`` → unix-like seconds (naive, only differences matter)."""
    stamp = text.strip()[:26]
    return datetime.fromisoformat(stamp).timestamp()


def _read_azure(path: Path) -> Workload:
    times: list[float] = []
    prompt: list[int] = []
    out: list[int] = []
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                times.append(parse_azure_timestamp(row[0]))
                prompt.append(int(row[1]))
                out.append(int(row[2]))
            except (ValueError, IndexError) as exc:
                raise TraceError(f"trace {path} line {lineno}: bad Azure row {row!r}") from exc
    return make_workload(path.stem, times, prompt, out)


def _read_burstgpt(path: Path) -> Workload:
    times: list[float] = []
    prompt: list[int] = []
    out: list[int] = []
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader)]
        try:
            i_t, i_req, i_resp = (header.index(k) for k in
                                  ("timestamp", "request tokens", "response tokens"))
        except ValueError as exc:
            raise TraceError(f"trace {path}: BurstGPT header lacks {exc}") from exc
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                t, req, resp = float(row[i_t]), int(float(row[i_req])), int(float(row[i_resp]))
            except (ValueError, IndexError) as exc:
                raise TraceError(f"trace {path} line {lineno}: bad BurstGPT row {row!r}") from exc
            if resp <= 0:
                continue                      # a failed request: nothing was served
            times.append(t)
            prompt.append(req)
            out.append(resp)
    return make_workload(path.stem, times, prompt, out)


def _read_mooncake(path: Path, cache_blocks: int) -> Workload:
    times: list[float] = []
    prompt: list[int] = []
    out: list[int] = []
    cached: list[int] = []
    blocks: list[list[int]] = []
    cache: OrderedDict[int, None] = OrderedDict()
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                t = float(rec["timestamp"]) / 1000.0
                n_in, n_out = int(rec["input_length"]), int(rec["output_length"])
                hashes = [int(h) for h in rec.get("hash_ids", [])]
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"trace {path} line {lineno}: bad Mooncake record ({exc})") from exc
            times.append(t)
            prompt.append(n_in)
            out.append(n_out)
            blocks.append(hashes)
            cached.append(min(_prefix_hit_blocks(cache, hashes, cache_blocks)
                              * MOONCAKE_BLOCK_TOKENS, max(0, n_in - 1)))
    return make_workload(path.stem, times, prompt, out, cached, blocks)


def _prefix_hit_blocks(cache: OrderedDict[int, None], hashes: list[int], capacity: int) -> int:
    """Leading blocks already cached (LRU), then record all of this request's blocks."""
    hits = 0
    for h in hashes:
        if h not in cache:
            break
        hits += 1
    for h in hashes:
        cache[h] = None
        cache.move_to_end(h)
    while len(cache) > capacity:
        cache.popitem(last=False)
    return hits


ORDERS = ("keep", "shuffle")
KEEP_ORDER_WINDOWS = 96          # ``keep`` draws from 1/96 of the trace around the mapped time


def diurnal_day(source: Workload, *, peak_rps: float, duration_h: float = 24.0,
                profile: Sequence[float] = DEFAULT_PROFILE, start_hour: float = 0.0,
                seed: int = 0, bin_s: float = 10.0, order: str = "keep") -> Workload:
    """A synthetic day: ``source``'s request sizes, arrival rate ``peak_rps × profile(t)``.

    The profile holds relative rates at whole hours (wrapping after the last); the
    rate is interpolated linearly and arrivals are Poisson within ``bin_s`` bins.
    ``order`` (``keep`` | ``shuffle``) is how arrivals get sizes (module docstring).
    """
    if order not in ORDERS:
        raise UsageError(f"diurnal day: order must be one of {', '.join(ORDERS)}, got {order!r}")
    if not len(source):
        raise TraceError("diurnal day: the source trace has no requests")
    if peak_rps <= 0 or duration_h <= 0:
        raise UsageError("diurnal day: peak_rps and duration_h must be positive")
    prof = np.asarray(profile, dtype=np.float64)
    if len(prof) < 2 or prof.min() < 0 or prof.max() <= 0:
        raise UsageError("diurnal day: profile needs >= 2 non-negative points, one positive")
    prof = prof / prof.max()
    rng = np.random.default_rng(seed)
    edges = np.arange(0.0, duration_h * 3600.0, bin_s)
    hours = (start_hour + (edges + bin_s / 2) / 3600.0) % len(prof)
    rate = peak_rps * np.interp(hours, np.arange(len(prof) + 1), np.append(prof, prof[0]))
    counts = rng.poisson(rate * bin_s)
    n = int(counts.sum())
    arrivals = np.repeat(edges, counts) + rng.random(n) * bin_s
    arrivals.sort()
    if order == "shuffle" or len(source) < 2 or source.duration_s <= 0:
        pick = rng.integers(0, len(source), n)
    else:
        span = source.duration_s
        at = arrivals / (duration_h * 3600.0) * span + (rng.random(n) - 0.5) * span / KEEP_ORDER_WINDOWS
        pick = np.clip(np.searchsorted(source.arrival_s, np.clip(at, 0.0, span)), 0, len(source) - 1)
    blocks = None if source.block_hashes is None else tuple(source.block_hashes[i] for i in pick)
    return Workload(f"{source.name}-diurnal", arrivals, source.prompt_tokens[pick],
                    source.output_tokens[pick], source.cached_tokens[pick], blocks)


def rate_profile(workload: Workload, *, bin_s: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """(bin start seconds, requests/s per bin) — for plots and tests."""
    if not len(workload):
        return np.zeros(0), np.zeros(0)
    nbins = int(workload.duration_s // bin_s) + 1
    counts = np.bincount((workload.arrival_s // bin_s).astype(np.int64), minlength=nbins)
    return np.arange(nbins) * bin_s, counts / bin_s


def synthetic_sizes(*, prompt_mean: int, output_mean: int, spread_ratio: float = 0.25,
                    count: int = 10_000, seed: int = 0, name: str = "synthetic") -> Workload:
    """A size source: prompt/output lengths uniform within ±``spread_ratio`` of their means
    (arrivals 1 s apart; use it as the source of ``poisson`` or ``diurnal_day``)."""
    if prompt_mean < 1 or output_mean < 1 or not 0 <= spread_ratio < 1:
        raise UsageError("synthetic sizes: means must be >= 1 and spread in [0, 1)")
    rng = np.random.default_rng(seed)

    def draw(mean: int) -> np.ndarray:
        return np.maximum(1, np.rint(mean * (1 + spread_ratio * (2 * rng.random(count) - 1)))).astype(np.int64)

    return make_workload(name, np.arange(count, dtype=np.float64), draw(prompt_mean), draw(output_mean))


def poisson(source: Workload, *, rate_rps: float, duration_s: float, seed: int = 0) -> Workload:
    """Constant-rate Poisson arrivals with ``source``'s request sizes (for pressure tests)."""
    return diurnal_day(source, peak_rps=rate_rps, duration_h=duration_s / 3600.0,
                       profile=(1.0, 1.0), seed=seed, bin_s=min(10.0, duration_s), order="shuffle")


@dataclass(frozen=True)
class DriftPoint:
    """The request mix at one hour of the day.

    hour: hour of day, 0 ≤ hour < 24.
    prompt_scale / output_scale: factor on each request's prompt / output tokens (> 0).
    cache_share: share of prompt tokens served from the prefix cache (0..1), or
        ``None`` to keep each request's own cached share.
    """

    hour: float
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    cache_share: float | None = None


@dataclass(frozen=True)
class Drift:
    """Hourly mix points, interpolated linearly by hour of day and wrapping at 24 h."""

    points: tuple[DriftPoint, ...]

    def at(self, hours: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(prompt_scale, output_scale, cache_share or None) at each hour of day."""
        pts = sorted(self.points, key=lambda p: p.hour)
        h = np.asarray(hours, dtype=np.float64) % 24.0
        xs = np.array([p.hour for p in pts] + [pts[0].hour + 24.0])

        def interp(vals: list[float]) -> np.ndarray:
            v = np.array(vals + [vals[0]])
            # Hours before the first point wrap around to the previous day's last point.
            return np.interp(np.where(h < xs[0], h + 24.0, h), xs, v)

        share = (None if pts[0].cache_share is None
                 else interp([float(p.cache_share or 0.0) for p in pts]))
        return (interp([p.prompt_scale for p in pts]), interp([p.output_scale for p in pts]), share)


def parse_drift(raw: object, problems: list[str], *, where: str = "simulation.drift") -> Drift | None:
    """``simulation.drift``: a list of {hour, prompt_scale, output_scale, cache_share} mappings.
    Problems are appended (one line each); returns None when absent or invalid."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: must be a non-empty list of {{hour, prompt_scale, output_scale, cache_share}}")
        return None
    before = len(problems)
    points: list[DriftPoint] = []
    for i, node in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(node, dict):
            problems.append(f"{w}: must be a mapping")
            continue
        problems.extend(f"{w}.{k}: unknown key" for k in sorted(set(node) - set(_DRIFT_KEYS)))
        vals: dict[str, float | None] = {}
        for key, (default, ok, text) in _DRIFT_KEYS.items():
            v = node.get(key, default)
            if v is None and key == "cache_share":
                vals[key] = None
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(float(v)):
                problems.append(f"{w}.{key}: " + ("is required" if v is None else f"must be {text}, got {v!r}"))
            else:
                vals[key] = float(v)
        if len(vals) == len(_DRIFT_KEYS):
            points.append(DriftPoint(**vals))  # type: ignore[arg-type]
    if len(problems) > before:
        return None
    if len({p.hour for p in points}) != len(points):
        problems.append(f"{where}: two points at the same hour")
    elif len({p.cache_share is None for p in points}) > 1:
        problems.append(f"{where}: give cache_share in every point or in none")
    else:
        return Drift(tuple(points))
    return None


_DRIFT_KEYS: dict[str, tuple[float | None, Callable[[float], bool], str]] = {
    "hour": (None, lambda v: 0.0 <= v < 24.0, "a number in [0, 24)"),
    "prompt_scale": (1.0, lambda v: v > 0.0, "a number > 0"),
    "output_scale": (1.0, lambda v: v > 0.0, "a number > 0"),
    "cache_share": (None, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
}


def apply_drift(workload: Workload, drift: Drift, *, start_hour: float = 0.0) -> Workload:
    """``workload`` with each request's sizes shifted by the drift at its arrival hour
    (``start_hour`` is the hour of day at time 0)."""
    if not len(workload):
        return workload
    p_scale, o_scale, share = drift.at(start_hour + workload.arrival_s / 3600.0)
    prompt = np.maximum(1, np.rint(workload.prompt_tokens * p_scale)).astype(np.int64)
    out = np.maximum(1, np.rint(workload.output_tokens * o_scale)).astype(np.int64)
    if share is None:
        cached = np.rint(workload.cached_tokens * p_scale).astype(np.int64)
    else:
        cached = np.rint(prompt * share).astype(np.int64)
    cached = np.clip(cached, 0, prompt - 1)
    return Workload(f"{workload.name}-drift", workload.arrival_s, prompt, out, cached)


def mix_share_by_hour(workload: Workload) -> dict[str, np.ndarray]:
    """Per hour of the workload: mean prompt and output tokens, the prompt/output token
    ratio and the cached share (for tests and reports; NaN where an hour is empty)."""
    if not len(workload):
        return {k: np.zeros(0) for k in ("prompt_mean", "output_mean", "prompt_per_output", "cached_share")}
    idx = (workload.arrival_s // 3600.0).astype(np.int64)
    nb = int(idx.max()) + 1
    cnt = np.bincount(idx, minlength=nb).astype(np.float64)
    p = np.bincount(idx, weights=workload.prompt_tokens.astype(np.float64), minlength=nb)
    o = np.bincount(idx, weights=workload.output_tokens.astype(np.float64), minlength=nb)
    c = np.bincount(idx, weights=workload.cached_tokens.astype(np.float64), minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"prompt_mean": p / cnt, "output_mean": o / cnt, "prompt_per_output": p / o,
                "cached_share": c / p}
