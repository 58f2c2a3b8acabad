"""Engine emulator: one real HTTP process that looks like a vLLM 0.32 server (I/O).

``heteroscale emulate-engine --role prefill|decode --gpu TYPE --model NAME --port P``
runs an asyncio aiohttp server with

* ``POST /v1/completions`` — OpenAI-compatible completions, streaming (SSE) or not;
* ``GET /metrics`` — vLLM 0.32's Prometheus page: the same names, the labels
  ``model_name``/``engine`` and the default histogram buckets of ENGINES.md §1,
  written by ``prometheus_client`` itself from a private registry, so the format
  (``_total``, ``_created``, ``le`` formatting) is the real one;
* ``GET /health``, ``GET /v1/models``;
* ``GET /emulator/gpu`` — the *modelled* GPU readings (utilisation, SM activity,
  memory, power) as JSON. The sidecar reads it only when started with
  ``--gpu-source emulator``; it is named so nobody mistakes it for NVML;
* ``GET /emulator/info`` — role, GPU, model, speed-up and the KV port.

Timing comes from ``heteroscale.simulator.perfmodel`` (the simulator's roofline model), so the
demo and the simulator agree. Modelled durations are divided by ``--speedup``.

Prefill/decode disaggregation works like vLLM's P/D proxy flow: the router sends
the prompt to a prefill instance with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true, "remote_host", "remote_port"}``;
after its prefill pass the prefill instance *pushes* the request's KV bytes over a
real TCP connection to the decode instance's KV port (scaled down and capped so
loopback is not flooded, but real bytes that KV-transfer measurement can see) and
answers with ``kv_transfer_params={"do_remote_prefill": true, "transfer_id"}``; the
router then sends the request to the decode instance, which waits for those bytes
and joins its continuous batch. Both sides count the bytes in the NIXL connector
histograms (``vllm:nixl_bytes_transferred``, ``vllm:nixl_xfer_time_seconds``).

Scheduling: one prefill task per instance runs batched passes; one decode task
steps the continuous batch. Neither busy-loops: each sleeps the modelled time of
the work it just did and waits on an event when idle. The decode task advances in
ticks of at least ``--tick`` wall seconds, covering as many modelled steps as fit
(the batch only changes at request boundaries, which it honours), and streams the
tokens of a tick together, as vLLM's ``--stream-interval`` does; so a few dozen
instances fit on two cores.

Limits, on purpose: prefill and decode lanes of one instance do not compete for
the GPU (a plain, non-P/D request prefills and decodes on the same instance
without interference); no preemption (admission is bounded by KV capacity
instead); no prefix cache (the public traces carry no prefix hashes).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from heteroscale.errors import UsageError
from heteroscale.simulator import perfmodel

log = logging.getLogger("heteroscale.emulator")

ROLES = ("prefill", "decode")
CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"

# vLLM 0.32 default histogram buckets (vllm/v1/metrics/buckets.py; ENGINES.md §1.2).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_N_BUCKETS = (1, 2, 5, 10, 20)
# NIXL connector (kv_connector/v1/nixl/stats.py, ENGINES.md §2.3).
NIXL_XFER_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
NIXL_POST_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
NIXL_BYTES_BUCKETS = tuple(float(2 ** k) for k in range(11, 34, 2))
NIXL_DESCRIPTOR_BUCKETS = (10, 20, 30, 50, 75, 100, 200, 400, 1000, 2000, 4000, 10000, 20000, 50000)

# Board power (W) for the modelled power reading; idle share of board power.
BOARD_POWER_W = {"H20": 400.0, "L20": 275.0, "H100": 700.0, "H200": 700.0, "A100": 400.0, "L40S": 350.0}
IDLE_POWER_SHARE = 0.18


def request_token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to ``max_model_len`` (32768 -> 1, 2, 5, ..., 20000)."""
    out: list[float] = []
    for exponent in itertools.count():
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_model_len:
                return tuple(out)
            out.append(float(value))
    return tuple(out)  # pragma: no cover - itertools.count never ends


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
    max_num_batched_tokens: prompt tokens per prefill pass (vLLM's budget).
    tick_s: shortest wall time one decode task wake-up covers; larger is cheaper
        on CPU and coarser in token timing.
    stream_interval_s: least wall time between two SSE chunks of one request.
    kv_bytes_scale, kv_bytes_cap: real bytes sent per request = min(cap, scale ×
        modelled KV bytes) (at least 1 byte) — loopback stays light.
    kv_bandwidth_gbps: modelled P->D link speed used to time the transfer.
    kv_wait_timeout_s: how long (wall) a decode request waits for its KV.
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
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32768
    tick_s: float = 0.05
    stream_interval_s: float = 0.1
    kv_bytes_scale: float = 1.0 / 1024
    kv_bytes_cap: int = 1 << 20
    kv_bandwidth_gbps: float = 200.0
    kv_wait_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise UsageError("; ".join(problems))
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", self.model)

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
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1")
        for name in ("tick_s", "stream_interval_s", "kv_bandwidth_gbps", "kv_wait_timeout_s"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be positive")
        return out


class VllmMetrics:
    """vLLM 0.32's metric families in a private registry, bound to one engine's labels."""

    def __init__(self, registry: CollectorRegistry, *, model_name: str, engine: str = "0",
                 max_model_len: int = 32768, cache_info: dict[str, str] | None = None) -> None:
        labels = ["model_name", "engine"]
        lv = (model_name, engine)
        r = registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels + list(extra), registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*lv)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.").labels(*lv)
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.").labels(*lv)
        waiting_reason = gauge("vllm:num_requests_waiting_by_reason",
                               "Number of requests waiting to be processed, by reason.", ("reason",))
        self.waiting_capacity = waiting_reason.labels(*lv, "capacity")
        self.waiting_deferred = waiting_reason.labels(*lv, "deferred")
        fetch = gauge("vllm:num_requests_kv_fetch_by_stage",
                      "Number of waiting requests by asynchronous KV fetch stage.", ("stage",))
        self.kv_fetch_waiting = fetch.labels(*lv, "waiting_to_start")
        self.kv_fetch_in_progress = fetch.labels(*lv, "in_progress")
        fetch.labels(*lv, "completed_waiting").set(0)
        sleep_state = gauge("vllm:engine_sleep_state", "Engine sleep state.", ("sleep_state",))
        sleep_state.labels(*lv, "awake").set(1)
        sleep_state.labels(*lv, "weights_offloaded").set(0)
        sleep_state.labels(*lv, "discard_all").set(0)
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.").labels(*lv)
        info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                     sorted((cache_info or {}).keys()) + ["engine"], registry=r)
        info.labels(**{**(cache_info or {}), "engine": engine}).set(1)

        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.").labels(*lv)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels(*lv)
        by_source = counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", ("source",))
        self.prompt_local_compute = by_source.labels(*lv, "local_compute")
        self.prompt_local_cache_hit = by_source.labels(*lv, "local_cache_hit")
        self.prompt_external_kv = by_source.labels(*lv, "external_kv_transfer")
        self.prompt_cached = counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens.").labels(*lv)
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.").labels(*lv)
        success = counter("vllm:request_success", "Count of successfully processed requests.", ("finished_reason",))
        self.success = {reason: success.labels(*lv, reason)
                        for reason in ("stop", "length", "abort", "error", "repetition")}
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.").labels(*lv)
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.").labels(*lv)
        self.external_prefix_queries = counter("vllm:external_prefix_cache_queries", "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.").labels(*lv)
        self.external_prefix_hits = counter("vllm:external_prefix_cache_hits", "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.").labels(*lv)
        rejections = Counter("vllm:admission_rejections", "Requests rejected by admission control.",
                             ["model_name", "reason"], registry=r)
        rejections.labels(model_name, "max_num_queued_reqs")
        rejections.labels(model_name, "max_num_queued_tokens")

        token_buckets = request_token_buckets(max_model_len)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = hist("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill_time = hist("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKEN_BUCKETS)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self.request_generation_tokens = hist("vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets)
        self.request_max_generation_tokens = hist("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.", token_buckets)
        self.request_max_tokens = hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets)
        self.request_kv_computed = hist("vllm:request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during prefill (excluding cached tokens).", token_buckets)
        self.request_n = hist("vllm:request_params_n", "Histogram of the n request parameter.", REQUEST_N_BUCKETS)

        self.nixl_xfer_time = hist("vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.", NIXL_XFER_TIME_BUCKETS)
        self.nixl_post_time = hist("vllm:nixl_post_time_seconds", "Histogram of transfer post time for NIXL KV Cache transfers.", NIXL_POST_TIME_BUCKETS)
        self.nixl_bytes = hist("vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers.", NIXL_BYTES_BUCKETS)
        self.nixl_descriptors = hist("vllm:nixl_num_descriptors", "Histogram of number of descriptors per NIXL KV Cache transfers.", NIXL_DESCRIPTOR_BUCKETS)
        self.nixl_failed = counter("vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache transfers.").labels(*lv)
        self.nixl_failed_notifications = counter("vllm:nixl_num_failed_notifications", "Number of failed NIXL KV Cache notifications.").labels(*lv)
        self.nixl_expired = counter("vllm:nixl_num_kv_expired_reqs", "Number of requests that had their KV expire.").labels(*lv)
        self.nixl_notifications_after_expiry = counter("vllm:nixl_num_notifications_after_expiry", "Number of notifications received after KV expiry.").labels(*lv)


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
            start = self.clock()
            for r in batch:
                r.scheduled_s = start
            self.prefilling = batch
            self._refresh_gauges()
            try:
                await asyncio.sleep(pass_s / s.speedup)
            finally:
                self.prefilling = []
            end = self.clock()
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
        while True:
            self._admit()
            if not self.running:
                self._decode_wake.clear()
                await self._decode_wake.wait()
                continue
            start = self.clock()
            budget_sim = s.tick_s * s.speedup
            used_sim, compute_weighted, progress = self._advance(budget_sim)
            await asyncio.sleep(used_sim / s.speedup)
            end = self.clock()
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
                req.first_token_s = start + (last_offset_sim / tokens) / speed
                self.metrics.ttft.observe(req.first_token_s - req.arrival_s)
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


class KvInbox:
    """Decode side of the KV push: a TCP server that stores arrived transfers by id."""

    HEADER_LIMIT = 4096
    KEEP_S = 60.0

    def __init__(self, metrics: VllmMetrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self._arrived: dict[str, tuple[int, float]] = {}
        self._waiters: dict[str, asyncio.Future[int]] = {}
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = self.clock()
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            header = json.loads(line[: self.HEADER_LIMIT] or b"{}")
            size = int(header["bytes"])
            transfer_id = str(header["transfer_id"])
            tokens = int(header["tokens"])
            remaining = size
            while remaining > 0:
                chunk = await asyncio.wait_for(reader.read(min(remaining, 1 << 16)), 10.0)
                if not chunk:
                    raise ConnectionError("peer closed mid-transfer")
                remaining -= len(chunk)
            writer.write(b"OK\n")
            await writer.drain()
        except (ValueError, KeyError, TypeError, ConnectionError, asyncio.TimeoutError, OSError) as exc:
            log.warning("KV receive failed: %s", exc)
            self.metrics.nixl_failed.inc()
            return
        finally:
            writer.close()
        m = self.metrics
        m.nixl_bytes.observe(size)
        m.nixl_xfer_time.observe(self.clock() - started)
        m.nixl_post_time.observe(0.0)
        m.nixl_descriptors.observe(max(1, tokens // 16))
        self._deliver(transfer_id, tokens)

    def _deliver(self, transfer_id: str, tokens: int) -> None:
        waiter = self._waiters.pop(transfer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(tokens)
            return
        self._expire()
        self._arrived[transfer_id] = (tokens, self.clock())

    def _expire(self) -> None:
        cutoff = self.clock() - self.KEEP_S
        stale = [k for k, (_, at) in self._arrived.items() if at < cutoff]
        for key in stale:
            del self._arrived[key]
            self.metrics.nixl_expired.inc()

    async def wait(self, transfer_id: str, timeout_s: float) -> int:
        """Tokens of the transfer once it has arrived; ``TimeoutError`` if it does not."""
        if transfer_id in self._arrived:
            return self._arrived.pop(transfer_id)[0]
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[transfer_id] = future
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiters.pop(transfer_id, None)


async def push_kv(*, host: str, port: int, transfer_id: str, tokens: int, size_bytes: int,
                  timeout_s: float = 10.0) -> None:
    """Prefill side: send ``size_bytes`` real bytes to a decode instance's KV inbox."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        header = json.dumps({"transfer_id": transfer_id, "tokens": tokens, "bytes": size_bytes})
        writer.write(header.encode() + b"\n")
        block = b"\0" * min(size_bytes, 1 << 16)
        sent = 0
        while sent < size_bytes:
            part = block[: size_bytes - sent]
            writer.write(part)
            sent += len(part)
            await asyncio.wait_for(writer.drain(), timeout_s)
        reply = await asyncio.wait_for(reader.readline(), timeout_s)
        if reply.strip() != b"OK":
            raise ConnectionError(f"KV inbox answered {reply!r}")
    finally:
        writer.close()


class BadRequest(Exception):
    """A request the OpenAI API would answer with 400."""


def parse_completion(body: Any, *, served_model_name: str, max_model_len: int) -> dict[str, Any]:
    """Validate an OpenAI completions body; returns prompt_tokens, max_tokens, stream, kv params."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model_id = body.get("model", served_model_name)
    if model_id != served_model_name:
        raise LookupError(f"The model `{model_id}` does not exist.")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt_tokens = max(1, len(prompt.split()))
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt_tokens = len(prompt)
    else:
        raise BadRequest("prompt must be a non-empty string or a non-empty list of token ids")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens must be a positive integer")
    if prompt_tokens + max_tokens > max_model_len:
        raise BadRequest(f"This model's maximum context length is {max_model_len} tokens. However, you "
                         f"requested {prompt_tokens + max_tokens} tokens.")
    kv = body.get("kv_transfer_params") or {}
    if not isinstance(kv, dict):
        raise BadRequest("kv_transfer_params must be an object")
    stream_options = body.get("stream_options") or {}
    return {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
            "stream": bool(body.get("stream", False)), "kv": kv,
            "include_usage": bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))}


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class EmulatorServer:
    """The HTTP face of one ``EmulatedEngine`` (and its KV inbox on decode)."""

    def __init__(self, settings: EmulatorSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = CollectorRegistry()
        cache_info = {"block_size": "16", "cache_dtype": "auto", "enable_prefix_caching": "False",
                      "gpu_memory_utilization": str(perfmodel.DEFAULT_EFFICIENCY.memory_fraction)}
        self.metrics = VllmMetrics(self.registry, model_name=settings.served_model_name,
                                   max_model_len=settings.max_model_len, cache_info=cache_info)
        self.engine = EmulatedEngine(settings, metrics=self.metrics, clock=clock)
        self.inbox = KvInbox(self.metrics, clock=clock)
        self.kv_port = 0
        self._ids = itertools.count()
        self.started_at = time.time()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/health", self.health)
        app.router.add_get("/emulator/gpu", self.gpu)
        app.router.add_get("/emulator/info", self.info)
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, app: web.Application):  # noqa: ANN202 - aiohttp cleanup_ctx
        self.kv_port = await self.inbox.start(self.settings.host, self.settings.kv_port)
        self.engine.start()
        yield
        await self.engine.stop()
        await self.inbox.close()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        name = self.settings.served_model_name
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": int(self.started_at), "owned_by": "vllm",
             "root": name, "max_model_len": self.settings.max_model_len}]})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def gpu(self, request: web.Request) -> web.Response:
        return web.json_response({"gpus": self.engine.gpu_readings(), "source": "emulator",
                                  "gpu_type": self.settings.gpu})

    async def info(self, request: web.Request) -> web.Response:
        s = self.settings
        return web.json_response({"role": s.role, "gpu": s.gpu, "model": s.model, "tp": s.tp,
                                  "served_model_name": s.served_model_name, "speedup": s.speedup,
                                  "kv_port": self.kv_port, "kv_capacity_tokens": self.engine.kv_capacity_tokens})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON", "BadRequestError")
        try:
            params = parse_completion(body, served_model_name=s.served_model_name, max_model_len=s.max_model_len)
        except BadRequest as exc:
            return _error(400, str(exc), "BadRequestError")
        except LookupError as exc:
            return _error(404, str(exc), "NotFoundError")
        req = Request(id=f"cmpl-{uuid.uuid4().hex[:16]}", prompt_tokens=params["prompt_tokens"],
                      max_tokens=params["max_tokens"], arrival_s=self.clock())
        kv = params["kv"]
        try:
            if kv.get("do_remote_decode"):
                return await self._prefill_for_remote(req, kv)
            if kv.get("do_remote_prefill"):
                if not await self._receive_kv(req, kv):
                    return _error(503, "KV transfer did not arrive in time", "ServiceUnavailableError")
            else:
                self.engine.submit_prefill(req)
                await req.prefill_done.wait()
            if req.finish_reason is None:
                self.engine.submit_decode(req)
            if params["stream"]:
                return await self._stream(request, req, include_usage=params["include_usage"])
            await req.done.wait()
            return web.json_response(self._completion_doc(req, text=" tok" * req.generated))
        except asyncio.CancelledError:
            self.engine.abort(req)
            raise

    async def _prefill_for_remote(self, req: Request, kv: dict[str, Any]) -> web.Response:
        host, port = kv.get("remote_host"), kv.get("remote_port")
        if not isinstance(host, str) or not isinstance(port, int):
            return _error(400, "do_remote_decode needs remote_host (string) and remote_port (integer)",
                          "BadRequestError")
        req.remote_decode = True
        req.max_tokens = 1
        self.engine.submit_prefill(req)
        await req.prefill_done.wait()
        transfer_id = f"{req.id}-{next(self._ids)}"
        modelled, size = self.engine.kv_bytes_for(req.prompt_tokens)
        link_s = modelled * 8.0 / (self.settings.kv_bandwidth_gbps * 1e9) / self.settings.speedup
        started = self.clock()
        try:
            await asyncio.sleep(link_s)
            await push_kv(host=host, port=port, transfer_id=transfer_id, tokens=req.prompt_tokens,
                          size_bytes=size, timeout_s=self.settings.kv_wait_timeout_s)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            self.metrics.nixl_failed.inc()
            self.engine.fail(req)
            return _error(503, f"KV transfer to {host}:{port} failed: {exc}", "ServiceUnavailableError")
        m = self.metrics
        m.nixl_bytes.observe(size)
        m.nixl_xfer_time.observe(self.clock() - started)
        m.nixl_post_time.observe(0.0)
        m.nixl_descriptors.observe(max(1, req.prompt_tokens // 16))
        # The prefill instance emits the first token itself, as vLLM's does with max_tokens=1.
        now = self.clock()
        req.generated = 1
        req.first_token_s = now
        m.ttft.observe(now - req.arrival_s)
        m.generation_tokens.inc(1)
        self.engine._finish(req, "length", now)
        doc = self._completion_doc(req, text=" tok")
        doc["kv_transfer_params"] = {"do_remote_prefill": True, "do_remote_decode": False,
                                     "transfer_id": transfer_id, "remote_engine_id": f"{self.settings.host}:{self.settings.port}"}
        return web.json_response(doc)

    async def _receive_kv(self, req: Request, kv: dict[str, Any]) -> bool:
        transfer_id = kv.get("transfer_id")
        if not isinstance(transfer_id, str):
            self.engine.fail(req)
            return False
        self.engine.kv_fetching += 1
        self.engine._refresh_gauges()
        try:
            await self.inbox.wait(transfer_id, self.settings.kv_wait_timeout_s)
        except asyncio.TimeoutError:
            self.engine.fail(req)
            return False
        finally:
            self.engine.kv_fetching -= 1
        m = self.metrics
        m.prompt_tokens.inc(req.prompt_tokens)
        m.prompt_external_kv.inc(req.prompt_tokens)
        m.prompt_cached.inc(req.prompt_tokens)
        m.external_prefix_queries.inc(req.prompt_tokens)
        m.external_prefix_hits.inc(req.prompt_tokens)
        req.prefill_done_s = self.clock()
        return True

    async def _stream(self, request: web.Request, req: Request, *, include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        sent = 0
        last_emit = 0.0
        while True:
            await req.updated.wait()
            req.updated.clear()
            wait_s = last_emit + self.settings.stream_interval_s - self.clock()
            if req.finished_s is None and wait_s > 0:
                try:
                    async with asyncio.timeout(wait_s):
                        await req.done.wait()
                except TimeoutError:
                    pass
            new = req.generated - sent
            if new > 0:
                await response.write(self._chunk(req, " tok" * new, None))
                sent = req.generated
                last_emit = self.clock()
            if req.finished_s is not None:
                break
        await response.write(self._chunk(req, "", req.finish_reason))
        if include_usage:
            usage = self._completion_doc(req, text="")
            usage["choices"] = []
            await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _chunk(self, req: Request, text: str, finish_reason: str | None) -> bytes:
        doc = {"id": req.id, "object": "text_completion", "created": int(time.time()),
               "model": self.settings.served_model_name,
               "choices": [{"index": 0, "text": text, "logprobs": None,
                            "finish_reason": finish_reason, "stop_reason": None}]}
        return b"data: " + json.dumps(doc).encode() + b"\n\n"

    def _completion_doc(self, req: Request, *, text: str) -> dict[str, Any]:
        return {"id": req.id, "object": "text_completion", "created": int(time.time()),
                "model": self.settings.served_model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": req.finish_reason, "stop_reason": None}],
                "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.generated,
                          "total_tokens": req.prompt_tokens + req.generated}}


# -- command line ---------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--gpu", required=True, help="GPU type from the perf model catalog (H20, L20, H100, H200, A100, L40S)")
    parser.add_argument("--model", required=True, help="model config: 8b, 32b or 70b")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name", default="", help="model_name label and OpenAI model id (default: --model)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallelism (GPUs per instance)")
    parser.add_argument("--speedup", type=float, default=1.0, help="modelled seconds per wall second")
    parser.add_argument("--startup-delay", type=float, default=0.0, dest="startup_delay_s",
                        help="modelled seconds to load weights before the port opens")
    parser.add_argument("--kv-port", type=int, default=0, help="TCP port for incoming KV pushes (0: any free port)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--tick", type=float, default=0.05, dest="tick_s", help="least wall seconds per decode wake-up")
    parser.add_argument("--stream-interval", type=float, default=0.1, dest="stream_interval_s",
                        help="least wall seconds between two SSE chunks of one request")
    parser.add_argument("--kv-bytes-scale", type=float, default=1.0 / 1024)
    parser.add_argument("--kv-bytes-cap", type=int, default=1 << 20)
    parser.add_argument("--log-level", default="WARNING")


def settings_from_args(args: argparse.Namespace) -> EmulatorSettings:
    return EmulatorSettings(
        role=args.role, gpu=args.gpu, model=args.model, port=args.port, host=args.host,
        served_model_name=args.served_model_name, tp=args.tp, speedup=args.speedup,
        startup_delay_s=args.startup_delay_s, kv_port=args.kv_port, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, tick_s=args.tick_s,
        stream_interval_s=args.stream_interval_s, kv_bytes_scale=args.kv_bytes_scale,
        kv_bytes_cap=args.kv_bytes_cap)


async def serve(settings: EmulatorSettings, *, stop: asyncio.Event | None = None,
                on_ready: Callable[[EmulatorServer], None] | None = None) -> None:
    """Load (sleep the modelled start-up), open the ports, serve until ``stop`` is set."""
    stop = stop or asyncio.Event()
    try:
        async with asyncio.timeout(settings.startup_delay_s / settings.speedup):
            await stop.wait()
            return
    except TimeoutError:
        pass
    server = EmulatorServer(settings)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        await site.start()
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s emulator %(levelname)s %(message)s")
    settings = settings_from_args(args)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(server: EmulatorServer) -> None:
            print(f"emulator {settings.role} {settings.gpu} {settings.model} ready on "
                  f"http://{settings.host}:{settings.port} (kv port {server.kv_port})", flush=True)

        await serve(settings, stop=stop, on_ready=ready)

    try:
        asyncio.run(main())
    except OSError as exc:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    return 0
