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


def profile_at(fraction: float, profile: Sequence[float] = DEFAULT_PROFILE,
               start_hour: int = DEMO_START_HOUR) -> float:
    """Relative rate (peak = 1) at ``fraction`` (0..1) of the compressed day."""
    peak = max(profile)
    hours = (start_hour + 24.0 * min(max(fraction, 0.0), 1.0)) % len(profile)
    low = int(math.floor(hours)) % len(profile)
    high = (low + 1) % len(profile)
    weight = hours - math.floor(hours)
    return (profile[low] * (1 - weight) + profile[high] * weight) / peak


def arrival_times(*, duration_s: float, peak_rps: float, rng: random.Random,
                  profile: Sequence[float] = DEFAULT_PROFILE) -> list[float]:
    """Non-homogeneous Poisson arrivals (Lewis–Shedler thinning) over ``duration_s``."""
    if duration_s <= 0 or peak_rps <= 0:
        return []
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak_rps)
        if t >= duration_s:
            return out
        if rng.random() <= profile_at(t / duration_s, profile):
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
                 peak_rps: float, seed: int = 1, max_in_flight: int = 400,
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
        self.arrivals = arrival_times(duration_s=duration_s, peak_rps=peak_rps, rng=rng)
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
        return self.peak_rps * profile_at((self.clock() - self.started_at) / self.duration_s)

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
