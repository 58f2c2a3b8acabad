"""The demo's load: a trace's request sizes, arriving on a compressed diurnal rate profile.

Sizes (prompt and output tokens) are read by the simulator's native trace readers
(Azure, Mooncake, BurstGPT) and each request's size is drawn at random from them, as
the simulator's diurnal day does: the whole trace's size distribution is what the
demo's sizing plans for, whereas the first few hundred rows of a trace in order can
differ from it by a quarter (the Azure conversation trace's first 860 answers average
255 tokens against 211 over the trace). Arrival times do not come from the trace: a
one-hour trace replayed as is would hardly change rate, so the arrivals follow a day's
profile (the simulator's ``DEFAULT_PROFILE``, a dialogue service shaped like the paper's
Fig. 2) compressed into the demo's duration and started at the night-time trough, so
load rises, holds and falls within one run. Arrivals are a non-homogeneous Poisson
process drawn by thinning; arrivals and sizes come from one injected ``random.Random``
seeded by ``--seed`` — reproducible for a seed.

The day is compressed unevenly (``DayClock``). A day squeezed into three minutes rises
from trough to peak in well under a minute, while what a fleet needs to follow a rise
does not compress with it: the decode tokens/s a request adds arrive over its whole
answer (seconds), the sidecar's rate window and the policy's smoothing add seconds, and
new engines take seconds to start and join traffic — about 20 s from a change in load to
capacity in traffic on the default demo. Wherever the load is above what the smallest
fleet carries, the clock therefore slows down so that the offered load grows by at most
``max_growth_per_s`` (1.5% a second: ×1.35 over 20 s, about the head-room between the
policy's scale-out point and saturation); everywhere else, and on the way down, it runs
faster, so the whole day still fits in the run.

The default trace is the Azure conversation trace in ``../shared/traces/``; where that
folder is absent a small sample shipped with the package is used
(``demo/azure_conv_sample.csv``: the first 3,000 rows of the same trace,
CC-BY-4.0, Splitwise ISCA'24).

``LoadGenerator.run`` sends each request as its own task through the router and
keeps the results; it caps requests in flight so an overloaded demo sheds load
(counted as failures) instead of exhausting the machine.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from heteroscale.simulator.traces import DEFAULT_PROFILE, load_trace

from heteroscale.demo.router import RequestResult

PACKAGE_SAMPLE = Path(__file__).resolve().parent / "azure_conv_sample.csv"
SHARED_TRACE = Path("traces") / "AzureLLMInferenceTrace_conv.csv"
# The day starts at hour 20: the trough, so the run opens quiet, peaks, and winds down.
DEMO_START_HOUR = 20


def default_trace_path(repo_root: Path | None = None) -> Path:
    """``../shared/traces/AzureLLMInferenceTrace_conv.csv`` beside the checkout, else the sample."""
    root = repo_root or Path(__file__).resolve().parents[1]
    candidate = root.parent / "shared" / SHARED_TRACE
    return candidate if candidate.is_file() else PACKAGE_SAMPLE


@dataclass(frozen=True)
class RequestSize:
    prompt_tokens: int
    output_tokens: int


MAX_PROMPT_TOKENS = 8000
MAX_OUTPUT_TOKENS = 1000


def read_sizes(path: Path, *, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
               max_output_tokens: int = MAX_OUTPUT_TOKENS) -> list[RequestSize]:
    """The trace's (prompt, output) sizes in order, clipped to what the demo engines take."""
    workload = load_trace(path)
    return [RequestSize(int(min(max(1, p), max_prompt_tokens)), int(min(max(1, o), max_output_tokens)))
            for p, o in zip(workload.prompt_tokens.tolist(), workload.output_tokens.tolist())]


MAX_GROWTH_PER_S = 0.015
GIVE_WAY_SHARE = 0.8


def profile_at(fraction: float, profile: Sequence[float] = DEFAULT_PROFILE,
               start_hour: int = DEMO_START_HOUR) -> float:
    """Relative rate (peak = 1) at ``fraction`` (0..1) of the day, evenly compressed."""
    return _rate_at_hours(start_hour + 24.0 * min(max(fraction, 0.0), 1.0), profile)


def _rate_at_hours(hours: float, profile: Sequence[float]) -> float:
    peak = max(profile)
    hours %= len(profile)
    low = int(math.floor(hours)) % len(profile)
    high = (low + 1) % len(profile)
    weight = hours - math.floor(hours)
    return (profile[low] * (1 - weight) + profile[high] * weight) / peak


class DayClock:
    """The demo's compressed day: wall seconds → hour of the day → relative rate (pure).

    The day (24 h from ``start_hour``) is cut into ``steps`` slices. A slice gets the wall
    time of an even compression, ``base`` seconds per hour, unless its load rises above
    ``floor`` (relative rate, peak = 1: what the smallest fleet carries) faster than
    ``max_growth_per_s``; then it gets the time that growth needs,
    ``ln(max(p1, floor) / max(p0, floor)) / max_growth_per_s``. ``base`` is chosen (by
    bisection) so the slices add up to ``duration_s``. If the rises alone would need more
    than ``GIVE_WAY_SHARE`` of the run, the cap gives way and the day is compressed evenly.

    Worked example: 180 s, floor 0.29, cap 1.5%/s. Evenly the rise from 0.29 to the first
    peak (hours 22.3 → 3) takes 35 s; capped, ``ln(1 / 0.29) / 0.015`` = 83 s, and the rest
    of the day shares the other 97 s.
    """

    def __init__(self, *, duration_s: float, floor: float = 0.0, max_growth_per_s: float | None = None,
                 profile: Sequence[float] = DEFAULT_PROFILE, start_hour: float = DEMO_START_HOUR,
                 steps: int = 24 * 60) -> None:
        if duration_s <= 0:
            raise ValueError("duration_s must be positive")
        self.duration_s = duration_s
        self.profile = tuple(profile)
        self.start_hour = start_hour
        dh = 24.0 / steps
        rates = [_rate_at_hours(start_hour + i * dh, self.profile) for i in range(steps + 1)]
        need = [0.0] * steps
        if max_growth_per_s:
            for i in range(steps):
                grow = math.log(max(rates[i + 1], floor, 1e-9) / max(rates[i], floor, 1e-9))
                need[i] = max(0.0, grow) / max_growth_per_s
        if sum(need) >= GIVE_WAY_SHARE * duration_s:
            widths = [duration_s / steps] * steps         # too short a run for the cap: even
        else:
            lo, hi = 0.0, duration_s / 24.0
            for _ in range(60):
                mid = (lo + hi) / 2
                if sum(max(mid * dh, n) for n in need) > duration_s:
                    hi = mid
                else:
                    lo = mid
            widths = [max(lo * dh, n) for n in need]
            widths[-1] += duration_s - sum(widths)        # the bisection's last crumb
        self._wall = [0.0]
        for w in widths:
            self._wall.append(self._wall[-1] + w)
        self._hours = [start_hour + i * dh for i in range(steps + 1)]
        self.capped_s = sum(w for w, n in zip(widths, need) if n > 0 and w <= n + 1e-9)

    def hour_at(self, wall_s: float) -> float:
        """Hour of the day (may exceed 24: it counts from ``start_hour``) at ``wall_s``."""
        t = min(max(wall_s, 0.0), self.duration_s)
        i = min(bisect.bisect_right(self._wall, t), len(self._wall) - 1)
        lo_t, hi_t = self._wall[i - 1], self._wall[i]
        frac = 0.0 if hi_t <= lo_t else (t - lo_t) / (hi_t - lo_t)
        return self._hours[i - 1] + frac * (self._hours[i] - self._hours[i - 1])

    def rate_at(self, wall_s: float) -> float:
        """Relative rate (peak = 1) at ``wall_s`` seconds into the run."""
        return _rate_at_hours(self.hour_at(wall_s), self.profile)


def arrival_times(*, duration_s: float, peak_rps: float, rng: random.Random,
                  profile: Sequence[float] = DEFAULT_PROFILE, day: DayClock | None = None) -> list[float]:
    """Non-homogeneous Poisson arrivals (Lewis–Shedler thinning) over ``duration_s``;
    the rate follows ``day`` (default: the day evenly compressed)."""
    if duration_s <= 0 or peak_rps <= 0:
        return []
    rate = day.rate_at if day is not None else (lambda t: profile_at(t / duration_s, profile))
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak_rps)
        if t >= duration_s:
            return out
        if rng.random() <= rate(t):
            out.append(t)


@dataclass
class LoadStats:
    """Results so far, kept for the report and the status page."""

    results: list[RequestResult] = field(default_factory=list)
    shed: int = 0
    sent: int = 0

    def add(self, result: RequestResult) -> None:
        self.results.append(result)


Send = Callable[[int, int], Awaitable[RequestResult]]


class LoadGenerator:
    def __init__(self, *, sizes: Sequence[RequestSize], send: Send, duration_s: float,
                 peak_rps: float, seed: int = 1, max_in_flight: int = 400, day: DayClock | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not sizes:
            raise ValueError("the trace has no requests")
        self.sizes = sizes
        self.send = send
        self.duration_s = duration_s
        self.peak_rps = peak_rps
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.stats = LoadStats()
        rng = random.Random(seed)
        self.day = day or DayClock(duration_s=duration_s)
        self.arrivals = arrival_times(duration_s=duration_s, peak_rps=peak_rps, rng=rng, day=self.day)
        self.picks = [sizes[rng.randrange(len(sizes))] for _ in self.arrivals]
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_at: float | None = None
        self.sending_done = False          # every arrival has been sent (or shed)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def rate_now(self) -> float:
        """Offered request rate (req/s) at this moment of the run."""
        if self.started_at is None:
            return 0.0
        return self.peak_rps * self.day.rate_at(self.clock() - self.started_at)

    async def run(self) -> LoadStats:
        """Send every arrival on time; wait for those in flight; return the stats."""
        self.started_at = self.clock()
        try:
            for index, (at, size) in enumerate(zip(self.arrivals, self.picks)):
                delay = self.started_at + at - self.clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(self._tasks) >= self.max_in_flight:
                    self.stats.shed += 1
                    continue
                self.stats.sent += 1
                task = asyncio.create_task(self._one(size), name=f"demo-request-{index}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self.sending_done = True
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            await self.cancel()
        return self.stats

    async def _one(self, size: RequestSize) -> None:
        result = await self.send(size.prompt_tokens, size.output_tokens)
        self.stats.add(result)

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
