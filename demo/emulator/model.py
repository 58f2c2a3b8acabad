"""The emulated engine's scheduler and model clock: prefill passes and decode steps (asyncio).

``EmulatedEngine`` runs one instance's two lanes as background tasks, timed by the
simulator's roofline model (``heteroscale.simulator.perfmodel``) divided by the speed-up;
the clock is injected. It owns no socket: the server (``server``) feeds it requests and
renders its ``VllmMetrics``. Each lane keeps a model clock that resumes where its last
pass or tick ended, so a late wake-up on a busy host delays when tokens are delivered
but not the modelled throughput (``lane_start``). Limits, on purpose: prefill and decode lanes of one instance
do not compete for the GPU; no preemption (admission is bounded by KV capacity instead);
no prefix cache.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from heteroscale.demo.emulator.defaults import vllm_max_num_batched_tokens
from heteroscale.demo.emulator.links import DegradedLink
from heteroscale.demo.emulator.page import LATENCY_BUCKETS, VllmMetrics
from heteroscale.errors import ConfigError
from heteroscale.simulator import perfmodel

ROLES = ("prefill", "decode")

# Board power (W) for the modelled power reading; idle share of board power.
BOARD_POWER_W = {"H20": 400.0, "L20": 275.0, "H100": 700.0, "H200": 700.0, "A100": 400.0, "L40S": 350.0}
IDLE_POWER_SHARE = 0.18


@dataclass(frozen=True)
class EmulatorSettings:
    """One emulated engine instance.

    role: ``prefill`` or ``decode`` (both serve plain requests; the role picks the
        P/D behaviour and what ``/emulator/gpu`` models).
    gpu, model, tp: the perfmodel's GPU type, model config (``8b``/``32b``/``70b``) and
        tensor parallelism; the model must fit.
    served_model_name: the ``model_name`` label and the OpenAI model id.
    speedup: modelled seconds per wall second (>1 runs faster than a real GPU).
    startup_delay_s: modelled time to load weights before the port opens.
    max_num_seqs: decode batch cap (vLLM ``--max-num-seqs``).
    max_num_batched_tokens: prompt tokens per prefill pass (vLLM's budget); ``None``: vLLM's
        API-server default for the GPU (8192 on ≥ 70 GiB GPUs but A100, else 2048; ``defaults``).
    tick_s: shortest wall time one decode task wake-up covers; larger is cheaper
        on CPU and coarser in token timing.
    stream_interval_s: least wall time between two SSE chunks of one request.
    kv_bytes_scale, kv_bytes_cap: real bytes sent per request = min(cap, scale ×
        modelled KV bytes) (at least 1 byte) — loopback stays light.
    kv_bandwidth_gbps: modelled P->D link speed used to time the transfer (the receiving
        instance paces each transfer to it, ``links``).
    kv_location: this instance's switch ``(s2, s1)`` in the pretend cluster, or ``None``;
        sent with every KV push so the receiver can tell which link it crossed.
    degraded_links: slow links of the pretend cluster (``links.DegradedLink``): a transfer
        crossing one takes ``factor`` times its modelled time.
    kv_wait_timeout_s: how long (wall) a decode request waits for its KV.
    catch_up_s: wall seconds of lateness a lane's model clock makes up after this process
        woke late (a busy host); see ``lane_start``.
    latency_buckets: ``vllm`` (vLLM's default TTFT/ITL buckets) or ``fine`` (vLLM's plus
        bounds every 2.5 ms from 20 to 100 ms and every 0.25 s up to 10 s; see ``page``).

    Latency histograms are recorded in modelled seconds (wall × ``speedup``), so the
    page reads the same at any speed-up; token counters stay per wall second.
    """

    role: str
    gpu: str
    model: str
    port: int
    host: str = "127.0.0.1"
    served_model_name: str = ""
    tp: int = 1
    speedup: float = 1.0
    startup_delay_s: float = 0.0
    kv_port: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int = 32768
    tick_s: float = 0.05
    stream_interval_s: float = 0.1
    kv_bytes_scale: float = 1.0 / 1024
    kv_bytes_cap: int = 1 << 20
    kv_bandwidth_gbps: float = 200.0
    kv_wait_timeout_s: float = 10.0
    latency_buckets: str = "vllm"
    catch_up_s: float = 0.5
    kv_location: tuple[str, str] | None = None
    degraded_links: tuple[DegradedLink, ...] = ()

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source="emulator")
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", self.model)
        if self.max_num_batched_tokens is None:
            object.__setattr__(self, "max_num_batched_tokens",
                               vllm_max_num_batched_tokens(perfmodel.gpu(self.gpu)))

    def problems(self) -> list[str]:
        out = []
        if self.role not in ROLES:
            out.append(f"--role must be one of {', '.join(ROLES)}, got {self.role!r}")
        try:
            spec = perfmodel.InstanceSpec(perfmodel.model(self.model), perfmodel.gpu(self.gpu), self.tp)
            del spec
        except (KeyError, ValueError) as exc:
            out.append(str(exc).strip("'\""))
        if not 0 <= self.port <= 65535 or not 0 <= self.kv_port <= 65535:
            out.append("ports must be in 0..65535")
        if not (self.speedup > 0 and math.isfinite(self.speedup)):
            out.append(f"--speedup must be a positive number, got {self.speedup}")
        for name in ("startup_delay_s", "kv_bytes_scale"):
            if getattr(self, name) < 0:
                out.append(f"{name} must not be negative")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_bytes_cap"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{name} must be at least 1")
        for name in ("tick_s", "stream_interval_s", "kv_bandwidth_gbps", "kv_wait_timeout_s"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be positive")
        if self.catch_up_s < 0:
            out.append("catch_up_s must not be negative")
        if self.latency_buckets not in LATENCY_BUCKETS:
            out.append(f"--latency-buckets must be one of {', '.join(LATENCY_BUCKETS)}, got {self.latency_buckets!r}")
        return out


def lane_start(*, now_s: float, free_at_s: float | None, ready_at_s: float, catch_up_s: float) -> float:
    """Where the next pass (prefill) or tick (decode) starts on the lane's model clock (pure).

    The model resumes where it stopped (``free_at_s``), or when the work became ready
    (``ready_at_s``) if that was later — not when this process got round to it: on a busy
    host a coroutine wakes late, and without this every late wake-up would slow the
    modelled GPU. At most ``catch_up_s`` is made up (a process stalled longer loses the
    rest), and a start is never in the future.
    Worked example: a pass ended at 10.00 s on the model clock, the next request had
    arrived at 9.90 s, the loop woke at 10.03 s: the pass starts at 10.00 s.
    """
    start = ready_at_s if free_at_s is None else max(free_at_s, ready_at_s)
    return min(now_s, max(start, now_s - catch_up_s))


class BusyWindow:
    """Busy intervals (wall seconds) over the last ``window_s``: the modelled GPU's duty cycle."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._spans: deque[tuple[float, float, float]] = deque()   # start, end, weight

    def add(self, start_s: float, end_s: float, weight: float = 1.0) -> None:
        if end_s > start_s:
            self._spans.append((start_s, end_s, weight))

    def fractions(self, now_s: float) -> tuple[float, float]:
        """(busy share of the window, weight averaged over busy time)."""
        begin = now_s - self.window_s
        while self._spans and self._spans[0][1] <= begin:
            self._spans.popleft()
        busy = weighted = 0.0
        for start, end, weight in self._spans:
            span = max(0.0, min(end, now_s) - max(start, begin))
            busy += span
            weighted += span * weight
        share = min(1.0, busy / self.window_s)
        return share, (weighted / busy if busy > 0 else 0.0)


@dataclass
class Request:
    """One request's progress inside the engine. Times are wall (monotonic) seconds."""

    id: str
    prompt_tokens: int
    max_tokens: int
    arrival_s: float
    remote_decode: bool = False                # prefill side of a P/D request
    transfer_id: str | None = None             # decode side: KV to wait for
    generated: int = 0
    scheduled_s: float | None = None
    prefill_done_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None
    finish_reason: str | None = None
    prefill_done: asyncio.Event = field(default_factory=asyncio.Event)
    updated: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def remaining(self) -> int:
        return self.max_tokens - self.generated


class EmulatedEngine:
    """The scheduler and model clock of one instance. Owns its two background tasks."""

    def __init__(self, settings: EmulatorSettings, *, metrics: VllmMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.spec = perfmodel.InstanceSpec(perfmodel.model(settings.model),
                                           perfmodel.gpu(settings.gpu), settings.tp)
        self.kv_capacity_tokens = self.spec.kv_capacity_tokens
        self.prefill_queue: deque[Request] = deque()
        self.decode_waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilling: list[Request] = []
        self.kv_fetching = 0
        self._prefill_wake = asyncio.Event()
        self._decode_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.prefill_busy = BusyWindow()
        self.decode_busy = BusyWindow()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._prefill_loop(), name="emulator-prefill"),
                       asyncio.create_task(self._decode_loop(), name="emulator-decode")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # -- requests ----------------------------------------------------------
    def submit_prefill(self, req: Request) -> None:
        self.prefill_queue.append(req)
        self._prefill_wake.set()
        self._refresh_gauges()

    def submit_decode(self, req: Request) -> None:
        self.decode_waiting.append(req)
        self._decode_wake.set()
        self._refresh_gauges()

    def abort(self, req: Request) -> None:
        """The client went away: drop the request wherever it is."""
        if req.finished_s is not None:
            return
        for queue in (self.prefill_queue, self.decode_waiting):
            if req in queue:
                queue.remove(req)
        if req in self.running:
            self.running.remove(req)
        self._finish(req, "abort", self.clock())

    def fail(self, req: Request) -> None:
        self._finish(req, "error", self.clock())

    # -- prefill lane ------------------------------------------------------
    async def _prefill_loop(self) -> None:
        s = self.settings
        free_at: float | None = None          # model clock: when the lane finished its last pass
        while True:
            if not self.prefill_queue:
                self._prefill_wake.clear()
                await self._prefill_wake.wait()
                continue
            batch = self._take_prefill_batch()
            new_tokens = sum(r.prompt_tokens for r in batch)
            pairs = sum(perfmodel.attention_pairs(r.prompt_tokens) for r in batch)
            pass_s = perfmodel.prefill_batch_time_s(self.spec.model, self.spec.gpu, s.tp,
                                                    new_tokens=new_tokens, attention_pairs=pairs)
            start = lane_start(now_s=self.clock(), free_at_s=free_at, ready_at_s=batch[0].arrival_s,
                               catch_up_s=s.catch_up_s)
            end = start + pass_s / s.speedup
            for r in batch:
                r.scheduled_s = start
            self.prefilling = batch
            self._refresh_gauges()
            try:
                await asyncio.sleep(max(0.0, end - self.clock()))
            finally:
                self.prefilling = []
            free_at = end
            self.prefill_busy.add(start, end)
            self.metrics.iteration_tokens.observe(new_tokens)
            self.metrics.prompt_tokens.inc(new_tokens)
            self.metrics.prompt_local_compute.inc(new_tokens)
            self.metrics.prefix_queries.inc(new_tokens)
            for r in batch:
                if r.finished_s is not None:      # aborted while in the pass
                    continue
                r.prefill_done_s = end
                self.metrics.request_kv_computed.observe(r.prompt_tokens)
                r.prefill_done.set()
            self._refresh_gauges()

    def _take_prefill_batch(self) -> list[Request]:
        budget = self.settings.max_num_batched_tokens
        batch = [self.prefill_queue.popleft()]
        used = batch[0].prompt_tokens
        while self.prefill_queue and used + self.prefill_queue[0].prompt_tokens <= budget:
            req = self.prefill_queue.popleft()
            used += req.prompt_tokens
            batch.append(req)
        return batch

    # -- decode lane -------------------------------------------------------
    async def _decode_loop(self) -> None:
        s = self.settings
        modelled_to: float | None = None      # model clock: the batch has been stepped up to here
        while True:
            self._admit()
            if not self.running:
                modelled_to = None            # idle: nothing to catch up on
                self._decode_wake.clear()
                await self._decode_wake.wait()
                continue
            now = self.clock()
            start = lane_start(now_s=now, free_at_s=modelled_to, ready_at_s=modelled_to or now,
                               catch_up_s=s.catch_up_s)
            # Step up to one tick past now: a late wake-up is made up with more steps.
            budget_sim = (now + s.tick_s - start) * s.speedup
            used_sim, compute_weighted, progress = self._advance(budget_sim)
            end = start + used_sim / s.speedup
            await asyncio.sleep(max(0.0, end - self.clock()))
            modelled_to = end
            self.decode_busy.add(start, end, compute_weighted / used_sim if used_sim else 0.0)
            self._publish(progress, start=start, used_sim=used_sim)

    def _admit(self) -> None:
        """Move waiting requests into the batch while seats and KV room last (no preemption)."""
        in_use = sum(r.context_tokens for r in self.running)
        while self.decode_waiting and len(self.running) < self.settings.max_num_seqs:
            req = self.decode_waiting[0]
            need = req.prompt_tokens + req.max_tokens
            if self.running and in_use + need > self.kv_capacity_tokens:
                break
            self.decode_waiting.popleft()
            req.scheduled_s = req.scheduled_s or self.clock()
            in_use += req.context_tokens
            self.running.append(req)
        self._refresh_gauges()

    def _advance(self, budget_sim: float) -> tuple[float, float, list[tuple[Request, int, float]]]:
        """Model as many decode steps as fit in ``budget_sim`` (at least one).

        Returns (modelled seconds used, compute share × seconds, per-request
        (request, tokens made, modelled offset of its last token)). The batch is
        constant between request completions, so steps are taken in segments.
        """
        s = self.settings
        active = {id(r): r for r in self.running}
        made: dict[int, int] = {}
        last_at: dict[int, float] = {}
        used = weighted = 0.0
        while active and used < budget_sim:
            batch = list(active.values())
            context = sum(r.context_tokens + made.get(id(r), 0) for r in batch)
            step = perfmodel.decode_step_time_s(self.spec.model, self.spec.gpu, s.tp, len(batch), context)
            share = perfmodel.decode_compute_share(self.spec.model, self.spec.gpu, s.tp, len(batch), context)
            left = min(r.remaining - made.get(id(r), 0) for r in batch)
            steps = min(left, int((budget_sim - used) / step))
            if steps <= 0:
                if used > 0:        # the rest of the budget is less than a step: next tick
                    break
                steps = 1           # a tick always makes progress, even when a step is long
            used += steps * step
            weighted += steps * step * share
            self._observe_steps(steps, step / s.speedup, len(batch))
            for r in batch:
                made[id(r)] = made.get(id(r), 0) + steps
                last_at[id(r)] = used
                if r.remaining - made[id(r)] <= 0:
                    del active[id(r)]
        progress = [(r, made[id(r)], last_at[id(r)]) for r in self.running if id(r) in made]
        return used, weighted, progress

    def _observe_steps(self, steps: int, step_wall_s: float, batch: int) -> None:
        m = self.metrics
        for _ in range(steps):
            m.iteration_tokens.observe(batch)
        for _ in range(steps * batch):
            m.itl.observe(step_wall_s)

    def _publish(self, progress: list[tuple[Request, int, float]], *, start: float, used_sim: float) -> None:
        """Reveal a tick's tokens to the waiting streams and finish completed requests."""
        speed = self.settings.speedup
        total = 0
        for req, tokens, last_offset_sim in progress:
            if req.finished_s is not None:        # aborted during the tick
                continue
            at = start + last_offset_sim / speed
            if req.first_token_s is None:
                # a request admitted during a catch-up tick cannot have a token before it came
                req.first_token_s = max(start + (last_offset_sim / tokens) / speed,
                                        req.scheduled_s or req.arrival_s)
                self.metrics.ttft.observe(req.first_token_s - req.arrival_s)
            at = max(at, req.first_token_s)
            req.generated += tokens
            req.last_token_s = at
            total += tokens
            if req.remaining <= 0:
                self.running.remove(req)
                self._finish(req, "length", at)
            req.updated.set()
        self.metrics.generation_tokens.inc(total)
        self._refresh_gauges()

    def _finish(self, req: Request, reason: str, at: float) -> None:
        m = self.metrics
        req.finish_reason = reason
        req.finished_s = at
        m.success[reason].inc()
        if reason in ("length", "stop"):
            m.e2e.observe(at - req.arrival_s)
            m.request_prompt_tokens.observe(req.prompt_tokens)
            m.request_generation_tokens.observe(req.generated)
            m.request_max_generation_tokens.observe(req.max_tokens)
            m.request_max_tokens.observe(req.max_tokens)
            m.request_n.observe(1)
            scheduled = req.scheduled_s or req.arrival_s
            m.queue_time.observe(max(0.0, scheduled - req.arrival_s))
            m.inference_time.observe(max(0.0, at - scheduled))
            first = req.first_token_s or at
            m.prefill_time.observe(max(0.0, first - scheduled))
            m.decode_time.observe(max(0.0, at - first))
            if req.generated > 1:
                m.tpot.observe((at - first) / (req.generated - 1))
        req.updated.set()
        req.done.set()
        req.prefill_done.set()

    def _refresh_gauges(self) -> None:
        m = self.metrics
        queued = len(self.prefill_queue) + len(self.decode_waiting)
        m.running.set(len(self.running) + len(self.prefilling))
        m.waiting.set(queued + self.kv_fetching)
        m.waiting_capacity.set(queued)
        m.waiting_deferred.set(self.kv_fetching)
        m.kv_fetch_in_progress.set(self.kv_fetching)
        m.kv_fetch_waiting.set(0)
        used = sum(r.context_tokens for r in self.running)
        m.kv_usage.set(min(1.0, used / self.kv_capacity_tokens))

    # -- modelled GPU ------------------------------------------------------
    def gpu_readings(self) -> list[dict[str, Any]]:
        """What NVML would say of this instance's GPUs, from the perf model."""
        s = self.settings
        now = self.clock()
        busy_p, _ = self.prefill_busy.fractions(now)
        busy_d, compute_share = self.decode_busy.fractions(now)
        if s.role == "prefill":
            util = perfmodel.gpu_utilization("prefill", busy_fraction=busy_p)
            sm = perfmodel.sm_activity("prefill", busy_fraction=busy_p)
        else:
            util = perfmodel.gpu_utilization("decode", busy_fraction=busy_d)
            sm = perfmodel.sm_activity("decode", busy_fraction=busy_d, compute_share=compute_share)
        g = self.spec.gpu
        memory = g.mem_gb * 1e9 * perfmodel.DEFAULT_EFFICIENCY.memory_fraction
        board = BOARD_POWER_W.get(g.name, 400.0)
        power = board * (IDLE_POWER_SHARE + (1 - IDLE_POWER_SHARE) * util)
        return [{"gpu": str(i), "utilization_ratio": round(util, 4), "sm_activity_ratio": round(sm, 4),
                 "memory_used_bytes": memory, "power_watts": round(power, 1)} for i in range(s.tp)]

    def kv_bytes_for(self, tokens: int) -> tuple[int, int]:
        """(modelled KV bytes, real bytes to send) for ``tokens`` prompt tokens."""
        s = self.settings
        modelled = tokens * perfmodel.kv_bytes_per_token(self.spec.model)
        return modelled, max(1, min(s.kv_bytes_cap, int(modelled * s.kv_bytes_scale)))
