"""The discrete-event/fluid model of one P/D-disaggregated service (pure).

Owns what happens to requests between arrival and last token, and what the
sidecars of the service would measure. It is built for speed (a 24-hour day of
~2 million requests in well under a minute on one core), so it mixes two
exact-enough techniques instead of simulating every token:

* **Prefill** is event-exact: each instance is a FIFO server; a request is routed
  to the ready instance that frees up first and occupies it for
  ``perfmodel.prefill_time_s`` of its *uncached* tokens. Queueing behind busy
  instances is what makes TTFT fall off a cliff near saturation. (Batched/chunked
  passes are approximated by per-request service times: for prompts of hundreds of
  tokens and more a pass is compute-bound, so batching changes little.)
* **KV transfer** adds ``prompt × kv_bytes_per_token / bandwidth`` before decode can
  start; the bandwidth is the same-switch link, or ``cross_switch_ratio`` of it when
  the prefill and decode instance sit under different switches.
* **Decode** is fluid in ``tick_s`` steps per instance (continuous batching): each
  tick every running sequence advances by ``tick_s / step_time`` tokens, where the
  step time comes from the batch size and the KV it holds. A per-instance
  *virtual step counter* lets each request's finishing step be computed at
  admission (a heap), so the cost is O(log n) per request, not per token. KV
  capacity limits admission (``kv_watermark``); when the growing KV overflows, the
  most recently admitted sequence is preempted back to the queue (swap semantics:
  progress kept).
* **Instances** start after ``startup_s``; removed ones stop taking traffic and
  leave once drained (their GPUs count until then).

Measurements are accumulated per whole second (tokens, busy time, KV-active
time, compute share, instance counts) plus per-request TTFT and mean TBT, so any
window can be read back as the sidecars would report it.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from heteroscale.errors import ConfigError
from heteroscale.simulator import perfmodel as pm
from heteroscale.simulator.traces import Workload


@dataclass(frozen=True)
class ClusterSpec:
    """The simulated hardware and engine behaviour of one service.

    prefill / decode: the instance type of each role (model, GPU, TP).
    startup_s: seconds from scale-out to an instance taking traffic (pod start, weights load).
    kv_link_gbps: KV-transfer bandwidth between a P and a D instance under one switch.
    cross_switch_ratio: share of that bandwidth left across switches (paper: ~0.8).
    cross_switch_share: share of P→D transfers that cross switches (0 with topology-aware
        Deployment Groups; e.g. 0.5 for topology-blind placement).
    decode_max_batch: most sequences a decode instance runs at once (vLLM max_num_seqs).
    kv_watermark: share of KV capacity admission may fill (the rest absorbs growth).
    tick_s: fluid decode step; smaller is more exact and slower.
    """

    prefill: pm.InstanceSpec
    decode: pm.InstanceSpec
    startup_s: float = 120.0
    kv_link_gbps: float = 400.0
    cross_switch_ratio: float = 0.8
    cross_switch_share: float = 0.0
    decode_max_batch: int = 256
    kv_watermark: float = 0.95
    tick_s: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if self.startup_s < 0:
            problems.append("startup_s must be >= 0")
        if self.kv_link_gbps <= 0:
            problems.append("kv_link_gbps must be > 0")
        if not 0 < self.cross_switch_ratio <= 1:
            problems.append("cross_switch_ratio must be in (0, 1]")
        if not 0 <= self.cross_switch_share <= 1:
            problems.append("cross_switch_share must be in [0, 1]")
        if self.decode_max_batch < 1:
            problems.append("decode_max_batch must be >= 1")
        if not 0 < self.kv_watermark <= 1:
            problems.append("kv_watermark must be in (0, 1]")
        if not 0 < self.tick_s <= 5:
            problems.append("tick_s must be in (0, 5]")
        if problems:
            raise ConfigError(problems, source="ClusterSpec")


@dataclass
class _Prefill:
    created_s: float
    ready_s: float
    free_s: float = 0.0
    accepting: bool = True
    stopped_s: float | None = None       # when it stopped taking traffic
    removed_s: float | None = None       # when its GPUs were released


@dataclass
class _Decode:
    created_s: float
    ready_s: float
    accepting: bool = True
    stopped_s: float | None = None
    removed_s: float | None = None
    steps: float = 0.0               # virtual step counter G
    sum_ctx0: float = 0.0            # Σ context at admission of running sequences
    sum_g0: float = 0.0              # Σ G at admission
    late_steps: float = 0.0          # steps this tick that mid-tick arrivals did not run
    running: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # rid -> (g0, ctx0, finish_step)
    heap: list[tuple[float, int]] = field(default_factory=list)
    waiting: deque[tuple[int, float, float]] = field(default_factory=deque)  # (rid, ctx0, remaining steps)

    @property
    def n(self) -> int:
        return len(self.running)

    def context(self) -> float:
        return self.sum_ctx0 + len(self.running) * self.steps - self.sum_g0

    def load(self) -> int:
        return len(self.running) + len(self.waiting)


class SeriesRecorder:
    """Per-second sums of what the sidecars measure (instance counts are derived from
    the instances' own start/stop times, see ``Cluster.instance_seconds``)."""

    NAMES = ("prefill_tokens", "prefill_uncached_tokens", "decode_tokens", "prefill_busy_s",
             "decode_active_s", "decode_compute_s", "kv_bytes", "preemptions", "arrivals")

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        for name in self.NAMES:
            setattr(self, name, np.zeros(seconds, dtype=np.float64))

    def add_interval(self, arr: np.ndarray, start_s: float, end_s: float, weight: float = 1.0) -> None:
        """Spread ``weight`` per second over [start_s, end_s) into per-second bins."""
        t = start_s
        last = self.seconds - 1
        while t < end_s:
            sec = int(t)
            nxt = min(end_s, sec + 1.0)
            arr[sec if sec < last else last] += (nxt - t) * weight
            t = nxt


class Cluster:
    """One service's prefill and decode pools, advanced in time by ``advance_to``.

    Requests are fed through ``submit`` in arrival order (the runner does it as time
    passes). ``set_counts`` is how a policy's decision lands. Pure: time is passed in.
    """

    def __init__(self, spec: ClusterSpec, workload: Workload, *, horizon_s: float,
                 initial_prefill: int, initial_decode: int, seed: int = 0) -> None:
        self.spec = spec
        self.rng = random.Random(seed)
        self.now_s = 0.0
        self.rec = SeriesRecorder(int(math.ceil(horizon_s)) + 1)
        n = len(workload)
        self.ttft_s = np.full(n, np.nan)
        self.tbt_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.first_token_s = np.full(n, np.nan)
        # Python lists: scalar access in the hot loops is several times faster than numpy's.
        self._arrival = workload.arrival_s.tolist()
        self._prompt = workload.prompt_tokens.tolist()
        self._cached = workload.cached_tokens.tolist()
        self._steps = np.maximum(1, workload.output_tokens - 1).tolist()   # decode emits all but the first
        p = spec.prefill
        self._prefill_s = pm.prefill_times_s(p.model, p.gpu, p.tp, workload.prompt_tokens,
                                             workload.cached_tokens, eff=p.eff).tolist()
        self._kvb = pm.kv_bytes_per_token(spec.decode.model)
        self._kv_s_per_token = self._kvb * 8.0 / (spec.kv_link_gbps * 1e9)
        self._dco = pm.decode_coefficients(spec.decode.model, spec.decode.gpu, spec.decode.tp,
                                           eff=spec.decode.eff)
        self._cap = spec.decode.kv_capacity_tokens
        self.prefill: list[_Prefill] = [_Prefill(0.0, 0.0) for _ in range(initial_prefill)]
        self.decode: list[_Decode] = [_Decode(0.0, 0.0) for _ in range(initial_decode)]
        self.retired: list[_Prefill | _Decode] = []
        self._taking: list[_Prefill] = list(self.prefill)
        self.kv_inbox: list[tuple[float, int]] = []     # (kv arrival at decode, rid)
        self.unplaced: deque[int] = deque()              # reached decode with no instance to take it
        self.preemptions = 0
        self.cross_share = spec.cross_switch_share      # placement may update it as DGs change
        self.cross_transfers = 0
        self.completed: list[int] = []                   # rids in completion order
        self._tick_start = 0.0

    # ------------------------------------------------------------------ counts

    def counts(self) -> tuple[int, int]:
        """Instances asked for (accepting, ready or starting) per role."""
        return (sum(1 for p in self.prefill if p.accepting),
                sum(1 for d in self.decode if d.accepting))

    def ready_counts(self, now_s: float) -> tuple[int, int]:
        return (sum(1 for p in self.prefill if p.accepting and p.ready_s <= now_s),
                sum(1 for d in self.decode if d.accepting and d.ready_s <= now_s))

    def set_counts(self, prefill: int, decode: int, *, now_s: float) -> None:
        """Start or retire instances so that ``counts() == (prefill, decode)``."""
        self._resize(self.prefill, prefill, now_s, _Prefill)
        self._resize(self.decode, decode, now_s, _Decode)
        self._taking = [p for p in self.prefill if p.accepting]

    def _resize(self, pool: list, want: int, now_s: float, kind: type) -> None:
        live = [x for x in pool if x.accepting]
        for _ in range(want - len(live)):
            pool.append(kind(now_s, now_s + self.spec.startup_s))
        extra = len(live) - want
        if extra <= 0:
            return
        # Cancel starting instances first (newest first), then the least loaded ready ones.
        starting = sorted((x for x in live if x.ready_s > now_s), key=lambda x: -x.created_s)
        ready = [x for x in live if x.ready_s <= now_s]
        ready.sort(key=(lambda x: x.free_s) if kind is _Prefill else (lambda x: x.load()))
        for inst in (starting + ready)[:extra]:
            inst.accepting = False
            inst.stopped_s = now_s
            if isinstance(inst, _Decode):
                self.unplaced.extend(rid for rid, _, _ in inst.waiting)
                inst.waiting.clear()

    def instance_seconds(self, role: str, *, lo_s: float, hi_s: float, ready_only: bool = False) -> float:
        """Instance-seconds of ``role`` held in [lo_s, hi_s) (or ready for traffic)."""
        total = 0.0
        kind = _Prefill if role == "prefill" else _Decode
        live = self.prefill if kind is _Prefill else self.decode
        for inst in [*live, *reversed(self.retired)]:
            if inst.removed_s is not None and inst.removed_s <= lo_s:
                break                          # retired is in removal order: the rest are older
            if not isinstance(inst, kind):
                continue
            if ready_only:
                a = inst.ready_s
                b = inst.stopped_s if inst.stopped_s is not None else math.inf
            else:
                a = inst.created_s
                b = inst.removed_s if inst.removed_s is not None else math.inf
            b = min(b, inst.removed_s if inst.removed_s is not None else math.inf)
            overlap = min(b, hi_s) - max(a, lo_s)
            if overlap > 0:
                total += overlap
        return total

    def instance_series(self, role: str, seconds: int, *, ready_only: bool = False) -> np.ndarray:
        """Instances held (or ready) per whole second, 0..seconds-1 (time-averaged)."""
        diff = np.zeros(seconds + 2)
        kind = _Prefill if role == "prefill" else _Decode
        for inst in [*self.retired, *self.prefill, *self.decode]:
            if not isinstance(inst, kind):
                continue
            a = inst.ready_s if ready_only else inst.created_s
            end = inst.removed_s if inst.removed_s is not None else float(seconds)
            if ready_only and inst.stopped_s is not None:
                end = min(end, inst.stopped_s)
            a, end = min(max(a, 0.0), seconds), min(max(end, 0.0), seconds)
            if end <= a:
                continue
            # Fractional edges: spread into the boundary seconds exactly.
            ia, ib = int(a), int(end)
            if ia == ib:
                diff[ia] += end - a
                diff[ia + 1] -= end - a
                continue
            diff[ia] += ia + 1 - a
            diff[ia + 1] += 1 - (ia + 1 - a)
            diff[ib] -= 1 - (end - ib)
            diff[ib + 1] -= end - ib
        return np.cumsum(diff)[:seconds]

    # ------------------------------------------------------------------ prefill

    def submit(self, rid: int) -> None:
        """Route request ``rid`` (arriving at its arrival time) to a prefill instance."""
        arrive = self._arrival[rid]
        pool = self._taking or self.prefill
        best = pool[0]
        best_t = best.free_s if best.free_s > best.ready_s else best.ready_s
        for p in pool:
            t = p.free_s if p.free_s > p.ready_s else p.ready_s
            if t < best_t:
                best, best_t = p, t
        prompt = self._prompt[rid]
        cached = self._cached[rid]
        start = best_t if best_t > arrive else arrive
        end = start + self._prefill_s[rid]
        best.free_s = end
        rec = self.rec
        last = rec.seconds - 1
        if end - start < 1.0 and int(end) == int(start):
            rec.prefill_busy_s[min(int(start), last)] += end - start
        else:
            rec.add_interval(rec.prefill_busy_s, start, end)
        sec = min(int(end), last)
        rec.prefill_tokens[sec] += prompt
        rec.prefill_uncached_tokens[sec] += prompt - cached
        rec.kv_bytes[sec] += prompt * self._kvb
        rec.arrivals[min(int(arrive), last)] += 1.0
        kv_s = prompt * self._kv_s_per_token
        share = self.cross_share
        if share > 0 and self.rng.random() < share:
            kv_s /= self.spec.cross_switch_ratio
            self.cross_transfers += 1
        first = end + kv_s
        self.first_token_s[rid] = first
        self.ttft_s[rid] = first - arrive
        heapq.heappush(self.kv_inbox, (first, rid))

    # ------------------------------------------------------------------ decode

    def advance_to(self, t_s: float) -> None:
        """Run decode ticks up to ``t_s`` (prefill is already event-exact)."""
        tick = self.spec.tick_s
        while self.now_s + tick <= t_s + 1e-9:
            self._tick(self.now_s, tick)
            self.now_s += tick

    def _tick(self, t: float, dt: float) -> None:
        end = t + dt
        ready = [d for d in self.decode if d.accepting and d.ready_s <= t]
        inbox = self.kv_inbox
        while self.unplaced and ready:
            self._place(self.unplaced.popleft(), ready)
        while inbox and inbox[0][0] < end:
            _, rid = heapq.heappop(inbox)
            if ready:
                self._place(rid, ready)
            else:
                self.unplaced.append(rid)
        self._tick_start = t
        for d in self.decode:
            self._run(d, t, dt)
        self._retire(end)

    def _place(self, rid: int, ready: list[_Decode]) -> None:
        k = len(ready)
        if k == 1:
            d = ready[0]
        else:   # power of two choices: near-JSQ balance at O(1) cost
            rnd = self.rng.random
            a, b = ready[int(rnd() * k)], ready[int(rnd() * k)]
            d = a if a.load() <= b.load() else b
        d.waiting.append((rid, float(self._prompt[rid]), float(self._steps[rid])))

    def _admit(self, d: _Decode) -> None:
        if not d.waiting:
            return
        limit = self._cap * self.spec.kv_watermark
        ctx = d.context()
        max_batch = self.spec.decode_max_batch
        co = self._dco
        first = self.first_token_s
        while d.waiting and len(d.running) < max_batch:
            rid, ctx0, remaining = d.waiting[0]
            if ctx + ctx0 > limit and d.running:
                break
            d.waiting.popleft()
            # A sequence whose KV lands mid-tick starts that far into the tick: offset
            # its start by the steps the batch runs before it arrives.
            late_s = first[rid] - self._tick_start
            g0 = d.steps
            if late_s > 0:
                n = len(d.running) + 1
                mem = co.weights_s + co.kv_token_s * (ctx + ctx0)
                comp = co.seq_compute_s * n
                offset = late_s / ((mem if mem > comp else comp) + co.overhead_s)
                g0 += offset
                d.late_steps += offset
            finish = g0 + remaining
            d.running[rid] = (g0, ctx0, finish)
            d.sum_ctx0 += ctx0
            d.sum_g0 += g0
            heapq.heappush(d.heap, (finish, rid))
            ctx += ctx0

    def _run(self, d: _Decode, t: float, dt: float) -> None:
        self._admit(d)
        n = len(d.running)
        if n == 0:
            return
        ctx = d.sum_ctx0 + n * d.steps - d.sum_g0
        co = self._dco
        mem = co.weights_s + co.kv_token_s * ctx
        comp = co.seq_compute_s * n
        step_s = (mem if mem > comp else comp) + co.overhead_s
        g0 = d.steps
        g1 = g0 + dt / step_s
        # Sequences admitted mid-tick (start step > g0) emit only from their start.
        tokens = n * (g1 - g0) - d.late_steps
        d.late_steps = 0.0
        heap = d.heap
        running = d.running
        while heap and heap[0][0] <= g1:
            finish, rid = heapq.heappop(heap)
            entry = running.get(rid)
            if entry is None or entry[2] != finish:
                continue                       # stale: preempted and re-admitted since
            del running[rid]
            d.sum_ctx0 -= entry[1]
            d.sum_g0 -= entry[0]
            tokens -= g1 - finish
            done = t + (finish - g0) * step_s
            self.done_s[rid] = done
            self.tbt_s[rid] = (done - self.first_token_s[rid]) / self._steps[rid]
            self.completed.append(rid)
        d.steps = g1
        rec = self.rec
        sec = int(t)
        if sec >= rec.seconds:
            sec = rec.seconds - 1
        rec.decode_tokens[sec] += tokens
        rec.decode_active_s[sec] += dt
        rec.decode_compute_s[sec] += dt * comp / step_s
        if d.sum_ctx0 + len(running) * g1 - d.sum_g0 > self._cap:
            self._preempt_overflow(d)

    def _preempt_overflow(self, d: _Decode) -> None:
        while d.n > 1 and d.context() > self._cap:
            rid, (g0, ctx0, finish) = d.running.popitem()      # the latest admitted
            d.sum_ctx0 -= ctx0
            d.sum_g0 -= g0
            progressed = d.steps - g0
            d.waiting.appendleft((rid, ctx0 + progressed, finish - d.steps))
            self.preemptions += 1
            self.rec.preemptions[min(int(self.now_s), self.rec.seconds - 1)] += 1

    def _retire(self, now_s: float) -> None:
        """Release stopped instances once drained (at once if they never became ready)."""
        if all(p.accepting for p in self.prefill) and all(d.accepting for d in self.decode):
            return
        keep_p = []
        for p in self.prefill:
            if not p.accepting and (p.free_s <= now_s or p.ready_s > now_s):
                p.removed_s = now_s
                self.retired.append(p)
            else:
                keep_p.append(p)
        self.prefill = keep_p
        keep_d = []
        for d in self.decode:
            if not d.accepting and (not d.running or d.ready_s > now_s):
                d.removed_s = now_s
                self.retired.append(d)
            else:
                keep_d.append(d)
        self.decode = keep_d

    # ------------------------------------------------------------------ totals

    def gpu_seconds(self, end_s: float) -> tuple[float, float]:
        """GPU-seconds held per role (starting and draining instances included)."""
        p_s = d_s = 0.0
        for inst in [*self.retired, *self.prefill, *self.decode]:
            until = inst.removed_s if inst.removed_s is not None else end_s
            held = max(0.0, min(until, end_s) - inst.created_s)
            if isinstance(inst, _Prefill):
                p_s += held * self.spec.prefill.tp
            else:
                d_s += held * self.spec.decode.tp
        return p_s, d_s
