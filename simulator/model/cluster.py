"""The discrete-event/fluid model of one P/D-disaggregated service (pure).

Owns what happens to requests between arrival and last token, and what the
sidecars of the service would measure. It is built for speed (a 24-hour day of
~2 million requests in under a minute on one core), so it mixes two
exact-enough techniques instead of simulating every token, in ``tick_s`` steps:

* **Routing** (``router``): an arriving request goes to a ready prefill instance —
  ``least-loaded`` (the one whose queue frees first), ``round-robin``, or
  ``cache-aware`` (where it would finish first: queue wait + prefill of what that
  instance's cache lacks). Each prefill
  instance keeps its own prefix cache (``simulator/model/prefix.py``).
* **Prefill** is event-exact per instance: a FIFO queue whose passes take
  ``perfmodel.prefill_time_s`` of the *uncached* tokens. The request's KV stays on
  the prefill instance until decode takes it: each instance has a bounded KV
  buffer (its memory after weights × ``prefill_kv_buffer_ratio``) and a pass that
  does not fit waits for transfers to free room (vLLM's NIXL producer keeps the
  blocks until the consumer has read them; SGLang's prefill inflight queue).
* **Decode admission** (SGLang's pre-allocation queue, vLLM's scheduler on the
  consumer): a finished prefill joins a decode instance's queue; it is admitted when
  the instance has a batch slot (``decode_max_batch``) and KV room
  (``kv_watermark`` of capacity). Only then does its KV move
  (``simulator/model/links.py``: the prefill and decode NICs and the cross-switch
  uplink are shared, FIFO) and only when it lands does the client see the first token —
  so a decode shortage shows in TTFT, and a full prefill buffer stalls prefill.
* **Decode** is fluid (continuous batching): each tick every running sequence
  advances by ``tick_s / step_time`` tokens, with the step time from the batch size
  and the KV it holds. A per-instance *virtual step counter* gives each sequence its
  finishing step at admission (a heap): O(log n) per request, not per token. When the
  growing KV overflows capacity the newest sequence is preempted back to the front
  of the queue (``preemption``: ``recompute`` — vLLM V1 frees its blocks and the
  decode instance recomputes prompt + output on re-admission, stalling its batch for
  that prefill; ``swap`` — the KV goes to host memory and comes back over PCIe).
* **Instances** (``simulator/model/fleet`` logic below): a new one needs ``tp`` free
  GPUs of its type (``gpu_capacity``); if none are free it stays pending (a Pending
  pod) until some are released. Once placed it is ready after its role's start-up
  time ± ``startup_jitter_s``. Removed ones stop taking traffic and leave once
  drained (their GPUs count until then).

Measurements are accumulated per whole second for the summary (tokens, busy time,
KV-active time, compute share) and per instance as cumulative counters plus recent
latency samples, which ``simulator/model/sidecars.py`` turns into sidecar reports.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from heteroscale.errors import ConfigError
from heteroscale.simulator import perfmodel as pm
from heteroscale.simulator.model.links import KvLinks
from heteroscale.simulator.model.prefix import PrefixCache
from heteroscale.simulator.traces import Workload

ROUTERS = ("least-loaded", "round-robin", "cache-aware")
PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class ClusterSpec:
    """The simulated hardware and engine behaviour of one service.

    prefill / decode: the instance type of each role (model, GPU, TP).
    startup_s: seconds from placement to an instance taking traffic (pod start, weights load);
        ``prefill_startup_s`` / ``decode_startup_s`` override it per role.
    startup_jitter_s: each start-up is drawn uniformly within ± this many seconds (seeded).
    gpu_capacity: GPUs of each type the service may hold ({"H20": 64, ...}); a type not
        named is unlimited. An instance that cannot get ``tp`` GPUs stays pending.
    kv_link_gbps: KV-transfer bandwidth of one instance's NIC (Gbit/s); the transfers
        leaving a prefill instance, and those arriving at a decode instance, share it (FIFO).
    cross_switch_ratio: share of that bandwidth left across switches (paper: ~0.8).
    cross_switch_share: share of P→D transfers that cross switches (0 with topology-aware
        Deployment Groups; e.g. 0.5 for topology-blind placement).
    kv_uplink_gbps: capacity of the inter-switch uplink every cross-switch transfer shares
        (Gbit/s); ``None`` = as many NICs as a 8-node switch has (8 × ``kv_link_gbps``).
    kv_switches: switches the prefill instances are spread over (round robin), for
        ``degraded_links``.
    degraded_links: {switch index: bandwidth share left} for the NICs under that switch.
    decode_max_batch: most sequences a decode instance runs at once (vLLM max_num_seqs).
    kv_watermark: share of KV capacity admission may fill (the rest absorbs growth).
    prefill_kv_buffer_ratio: share of a prefill instance's KV memory that may hold
        prefilled requests waiting for decode to take their KV.
    preemption: ``recompute`` or ``swap`` (see module docstring).
    swap_gbps: host↔GPU bandwidth for swapped KV (Gbit/s).
    router: ``least-loaded``, ``round-robin`` or ``cache-aware`` (see module docstring).
    prefix_cache_ratio: share of a prefill instance's KV memory kept as its prefix cache
        (0 turns per-instance caches off and uses the trace's cached tokens as given).
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
    prefill_startup_s: float | None = None
    decode_startup_s: float | None = None
    startup_jitter_s: float = 15.0
    gpu_capacity: Mapping[str, int] = field(default_factory=dict)
    kv_uplink_gbps: float | None = None
    kv_switches: int = 1
    degraded_links: Mapping[int, float] = field(default_factory=dict)
    prefill_kv_buffer_ratio: float = 1.0
    preemption: str = "recompute"
    swap_gbps: float = 200.0
    router: str = "least-loaded"
    prefix_cache_ratio: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        for name in ("startup_s", "prefill_startup_s", "decode_startup_s", "startup_jitter_s"):
            v = getattr(self, name)
            if v is not None and v < 0:
                problems.append(f"{name} must be >= 0")
        if self.kv_link_gbps <= 0:
            problems.append("kv_link_gbps must be > 0")
        if self.kv_uplink_gbps is not None and self.kv_uplink_gbps <= 0:
            problems.append("kv_uplink_gbps must be > 0")
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
        if not 0 < self.prefill_kv_buffer_ratio <= 1:
            problems.append("prefill_kv_buffer_ratio must be in (0, 1]")
        if not 0 <= self.prefix_cache_ratio < 1:
            problems.append("prefix_cache_ratio must be in [0, 1)")
        if self.preemption not in PREEMPTION_MODES:
            problems.append(f"preemption must be one of {', '.join(PREEMPTION_MODES)}")
        if self.swap_gbps <= 0:
            problems.append("swap_gbps must be > 0")
        if self.router not in ROUTERS:
            problems.append(f"router must be one of {', '.join(ROUTERS)}")
        if self.kv_switches < 1:
            problems.append("kv_switches must be >= 1")
        for k, v in dict(self.degraded_links).items():
            if not (isinstance(k, int) and 0 <= k < self.kv_switches):
                problems.append(f"degraded_links: switch {k!r} is not in [0, kv_switches)")
            if not 0 < v <= 1:
                problems.append(f"degraded_links[{k}]: bandwidth share must be in (0, 1]")
        for k, v in dict(self.gpu_capacity).items():
            if not isinstance(v, int) or v < 0:
                problems.append(f"gpu_capacity[{k}]: must be an integer >= 0")
        if problems:
            raise ConfigError(problems, source="ClusterSpec")

    def role_startup_s(self, role: str) -> float:
        own = self.prefill_startup_s if role == "prefill" else self.decode_startup_s
        return self.startup_s if own is None else own


class _Instance:
    """Life cycle common to both roles. ``placed_s`` is None while pending (no GPUs)."""

    role = ""

    def __init__(self, created_s: float, placed_s: float | None, ready_s: float, index: int) -> None:
        self.created_s = created_s
        self.placed_s = placed_s
        self.ready_s = ready_s
        self.index = index                  # serial number (pod name, link switch)
        self.accepting = True
        self.stopped_s: float | None = None  # when it stopped taking traffic
        self.removed_s: float | None = None  # when its GPUs were released (or it was cancelled)
        self.warm_at_start = False            # one of the initial instances, serving before t = 0
        # Where placement put it (``simulator/placement.py``; None without a topology):
        self.node: str | None = None          # node name (the sidecar's ``node``)
        self.group: str | None = None         # Deployment Group; decode for its prefills is chosen in it
        self.switch: int | None = None        # S1 switch index (``degraded_links`` key)
        self.c_kv_bytes = 0.0                 # KV bytes moved through its NIC (either direction)
        self.c_kv_wire_s = 0.0                # time those transfers spent on the wire


class _Prefill(_Instance):
    role = "prefill"

    def __init__(self, created_s: float, placed_s: float | None, ready_s: float, index: int,
                 *, buffer_tokens: float, cache: PrefixCache | None) -> None:
        super().__init__(created_s, placed_s, ready_s, index)
        self.free_s = 0.0                   # end of the pass in progress
        self.proj_s = 0.0                   # when its queue would be done (routing estimate)
        self.queue: deque[int] = deque()
        self.queued_s = 0.0                 # service time queued
        self.held_tokens = 0.0              # KV held for requests decode has not taken yet
        self.buffer_tokens = buffer_tokens
        self.stalls = 0
        self.cache = cache
        self.link_free_s = 0.0              # its NIC's FIFO
        # Cumulative counters (what the engine's Prometheus counters would say).
        self.c_tokens = 0.0
        self.c_uncached = 0.0
        self.c_busy_s = 0.0
        self.lat_t: deque[float] = deque()   # first-token times of its requests
        self.lat_v: deque[float] = deque()   # and their TTFTs

    def drained(self, now_s: float) -> bool:
        return not self.queue and self.free_s <= now_s and self.held_tokens <= 0


class _Decode(_Instance):
    role = "decode"

    def __init__(self, created_s: float, placed_s: float | None, ready_s: float, index: int) -> None:
        super().__init__(created_s, placed_s, ready_s, index)
        self.steps = 0.0                    # virtual step counter G
        self.sum_ctx0 = 0.0                 # Σ context at admission of running sequences
        self.sum_g0 = 0.0                   # Σ G at admission
        self.late_steps = 0.0               # steps this tick that mid-tick arrivals did not run
        self.stall_s = 0.0                  # batch time owed to recompute / swap-in
        self.running: dict[int, tuple[float, float, float]] = {}   # rid -> (g0, ctx0, finish_step)
        self.heap: list[tuple[float, int]] = []
        # (rid, ctx0, remaining steps, how it resumes: 0 new, 1 recompute, 2 swap)
        self.waiting: deque[tuple[int, float, float, int]] = deque()
        self.landing: list[tuple[float, int, float, float, int]] = []   # (KV lands at, rid, ctx0, remaining, how)
        self.reserved = 0.0                 # KV tokens allocated to landing transfers
        self.link_free_s = 0.0              # its NIC's FIFO (incoming KV)
        self.c_tokens = 0.0
        self.c_active_s = 0.0
        self.c_compute_s = 0.0
        self.c_preemptions = 0.0
        self.lat_t: deque[float] = deque()   # completion times of its requests
        self.lat_v: deque[float] = deque()   # and their mean TBTs

    @property
    def n(self) -> int:
        return len(self.running)

    def context(self) -> float:
        return self.sum_ctx0 + len(self.running) * self.steps - self.sum_g0

    def load(self) -> int:
        return len(self.running) + len(self.waiting) + len(self.landing)


class SeriesRecorder:
    """Per-second sums of what the sidecars measure (instance counts are derived from
    the instances' own start/stop times, see ``Cluster.instance_seconds``)."""

    NAMES = ("prefill_tokens", "prefill_uncached_tokens", "decode_tokens", "prefill_busy_s",
             "decode_active_s", "decode_compute_s", "kv_bytes", "preemptions", "arrivals")

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        # Python lists while the run goes (scalar += on a list is several times faster than
        # on a numpy array); ``finish`` turns them into arrays for the summary and plots.
        for name in self.NAMES:
            setattr(self, name, [0.0] * seconds)

    def finish(self) -> None:
        for name in self.NAMES:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))

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
    passes; they are routed when the tick that holds their arrival runs).
    ``set_counts`` is how a policy's decision lands. Pure: time is passed in.
    """

    def __init__(self, spec: ClusterSpec, workload: Workload, *, horizon_s: float,
                 initial_prefill: int, initial_decode: int, seed: int = 0) -> None:
        self.spec = spec
        self.rng = random.Random(seed)
        self._start_rng = random.Random(seed * 7919 + 1)
        self.now_s = 0.0
        self.rec = SeriesRecorder(int(math.ceil(horizon_s)) + 1)
        n = len(workload)
        secs = workload.arrival_s[workload.arrival_s < horizon_s - 1.0].astype(np.int64)
        self.rec.arrivals = np.bincount(np.minimum(secs, self.rec.seconds - 1),
                                        minlength=self.rec.seconds)[:self.rec.seconds].astype(float).tolist()
        self.ttft_s = np.full(n, np.nan)
        self.tbt_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.first_token_s = np.full(n, np.nan)
        # Python lists: scalar access in the hot loops is several times faster than numpy's.
        self.arrival_s = workload.arrival_s
        self._arrival = workload.arrival_s.tolist()
        self._prompt = workload.prompt_tokens.tolist()
        self._steps = np.maximum(1, workload.output_tokens - 1).tolist()   # decode emits all but the first
        p = spec.prefill
        self._pco = (p.model, p.gpu, p.tp, p.eff)
        self._uncached_s = pm.prefill_times_s(p.model, p.gpu, p.tp, workload.prompt_tokens,
                                              np.zeros_like(workload.prompt_tokens), eff=p.eff).tolist()
        self._blocks = workload.block_hashes
        self._trace_cached = workload.cached_tokens.tolist()
        # Per-instance prefix caches need the prompt's block hashes (Mooncake); without them
        # the trace's cached tokens are taken as given (today's shared-cache share).
        self._per_instance_cache = spec.prefix_cache_ratio > 0 and self._blocks is not None
        self._p_cap = spec.prefill.kv_capacity_tokens
        self._kvb = pm.kv_bytes_per_token(spec.decode.model)
        self._dco = pm.decode_coefficients(spec.decode.model, spec.decode.gpu, spec.decode.tp,
                                           eff=spec.decode.eff)
        d = spec.decode
        self._recompute_s_per_token = (2.0 * d.model.params
                                       / (d.tp * pm.tp_efficiency(d.gpu, d.tp, eff=d.eff)
                                          * d.gpu.bf16_tflops * 1e12 * d.eff.prefill_mfu))
        self._swap_s_per_token = self._kvb * 8.0 / (spec.swap_gbps * 1e9)
        self._cap = spec.decode.kv_capacity_tokens
        self.links = KvLinks(spec, kv_bytes_per_token=self._kvb, rng=self.rng)
        self._serial = 0
        self._next_ready_s = 0.0
        self._gpus_free = {k: int(v) for k, v in dict(spec.gpu_capacity).items()}
        self.prefill: list[_Prefill] = []
        self.decode: list[_Decode] = []
        self.pending: deque[_Instance] = deque()        # asked for, waiting for GPUs
        self.retired: list[_Instance] = []
        for _ in range(initial_prefill):
            self.prefill.append(self._new("prefill", 0.0, initial=True))
        for _ in range(initial_decode):
            self.decode.append(self._new("decode", 0.0, initial=True))
        self._ready_p: list[_Prefill] = []
        self._ready_d: list[_Decode] = []
        self._ready_d_by_group: dict[str, list[_Decode]] | None = None   # placed instances only
        self._rr = 0
        self._submitted = 0                             # requests [0, _submitted) handed over
        self._routed = 0                                # requests [0, _routed) routed to prefill
        self._p_busy: dict[_Prefill, None] = {}         # instances with a queue (insertion order: deterministic)
        self._prefilled: list[tuple[float, int, _Prefill]] = []   # (prefill end, rid, instance)
        self._owner: list[_Prefill | None] = [None] * n
        self._pfin = [0.0] * n                           # prefill end per request
        self._cached = [0] * n
        self.unplaced: deque[tuple[int, float, float, int]] = deque()   # reached decode with no instance
        self.preemptions = 0
        self.prefill_stalls = 0
        self.completed: list[int] = []                   # rids in completion order
        # Every first token and completion as it happens (time, value), for fleet-wide
        # windows; the reader trims what it no longer needs.
        self.ttft_log_t: list[float] = []
        self.ttft_log_v: list[float] = []
        self.tbt_log_t: list[float] = []
        self.tbt_log_v: list[float] = []
        self._tick_start = 0.0
        self._refresh_ready(0.0)

    # ------------------------------------------------------------------ instances

    @property
    def cross_share(self) -> float:
        return self.links.cross_share

    @cross_share.setter
    def cross_share(self, value: float) -> None:      # placement updates it as DGs change
        self.links.cross_share = value

    @property
    def cross_transfers(self) -> int:
        return self.links.cross_transfers

    def _role_spec(self, role: str) -> pm.InstanceSpec:
        return self.spec.prefill if role == "prefill" else self.spec.decode

    def _new(self, role: str, now_s: float, *, initial: bool = False) -> _Instance:
        self._serial += 1
        if role == "prefill":
            cache = None
            room = float(self._p_cap)
            if self._per_instance_cache:
                cache = PrefixCache(int(self._p_cap * self.spec.prefix_cache_ratio))
                room *= 1.0 - self.spec.prefix_cache_ratio
            inst: _Instance = _Prefill(now_s, None, math.inf, self._serial, cache=cache,
                                       buffer_tokens=room * self.spec.prefill_kv_buffer_ratio)
        else:
            inst = _Decode(now_s, None, math.inf, self._serial)
        if not self._take_gpus(inst, now_s, initial=initial):
            self.pending.append(inst)
        return inst

    def _take_gpus(self, inst: _Instance, now_s: float, *, initial: bool = False) -> bool:
        rs = self._role_spec(inst.role)
        free = self._gpus_free.get(rs.gpu.name)
        if free is not None:
            if free < rs.tp:
                return False
            self._gpus_free[rs.gpu.name] = free - rs.tp
        inst.placed_s = now_s
        if initial:                       # up long before the run began (no warm-up)
            inst.ready_s = now_s
            inst.warm_at_start = True
        else:
            jitter = self.spec.startup_jitter_s
            start = self.spec.role_startup_s(inst.role)
            if jitter > 0:
                start = max(0.0, start + jitter * (2.0 * self._start_rng.random() - 1.0))
            inst.ready_s = now_s + start
        if isinstance(inst, _Prefill):
            inst.free_s = inst.proj_s = inst.link_free_s = inst.ready_s
        self._next_ready_s = min(self._next_ready_s, inst.ready_s)
        return True

    def _release_gpus(self, inst: _Instance, now_s: float) -> None:
        if inst.placed_s is None:
            return
        rs = self._role_spec(inst.role)
        if rs.gpu.name in self._gpus_free:
            self._gpus_free[rs.gpu.name] += rs.tp
            for inst in list(self.pending):            # a Pending pod schedules when GPUs free up
                if not inst.accepting or self._role_spec(inst.role).gpu.name != rs.gpu.name:
                    continue
                if not self._take_gpus(inst, now_s):
                    break
                self.pending.remove(inst)

    def counts(self) -> tuple[int, int]:
        """Instances asked for (accepting: ready, starting or pending) per role."""
        return (sum(1 for p in self.prefill if p.accepting),
                sum(1 for d in self.decode if d.accepting))

    def ready_counts(self, now_s: float) -> tuple[int, int]:
        return (sum(1 for p in self.prefill if p.accepting and p.ready_s <= now_s),
                sum(1 for d in self.decode if d.accepting and d.ready_s <= now_s))

    def unplaced_counts(self) -> tuple[int, int]:
        """Instances still waiting for GPUs (Pending pods) per role."""
        return (sum(1 for x in self.pending if x.accepting and x.role == "prefill"),
                sum(1 for x in self.pending if x.accepting and x.role == "decode"))

    def set_counts(self, prefill: int, decode: int, *, now_s: float) -> None:
        """Start or retire instances so that ``counts() == (prefill, decode)``."""
        self._resize(self.prefill, prefill, now_s, "prefill")
        self._resize(self.decode, decode, now_s, "decode")
        self._refresh_ready(now_s)

    def _resize(self, pool: list, want: int, now_s: float, role: str) -> None:
        live = [x for x in pool if x.accepting]
        for _ in range(want - len(live)):
            pool.append(self._new(role, now_s))
        extra = len(live) - want
        if extra <= 0:
            return
        for inst in self.stop_order(live, now_s)[:extra]:
            self._stop(inst, now_s)

    @staticmethod
    def stop_order(live: list, now_s: float) -> list:
        """Which instances a scale-in stops first: pending, then starting ones (newest first),
        then the least loaded ready ones."""
        starting = sorted((x for x in live if x.ready_s > now_s), key=lambda x: (x.placed_s is not None, -x.created_s))
        ready = [x for x in live if x.ready_s <= now_s]
        ready.sort(key=lambda x: x.proj_s if x.role == "prefill" else x.load())
        return starting + ready

    def _stop(self, inst: _Instance, now_s: float) -> None:
        inst.accepting = False
        inst.stopped_s = now_s
        if isinstance(inst, _Decode):
            self.unplaced.extend(inst.waiting)
            inst.waiting.clear()

    def add_placed(self, role: str, *, node: str, group: str, switch: int, now_s: float) -> _Instance:
        """Start one instance of ``role`` where placement put it (``simulator/placement.py``)."""
        inst = self._new(role, now_s)
        inst.node, inst.group, inst.switch = node, group, switch
        (self.prefill if role == "prefill" else self.decode).append(inst)
        return inst

    def stop(self, instances: list[_Instance], *, now_s: float) -> None:
        """Stop these instances taking traffic (they drain, then release their GPUs)."""
        for inst in instances:
            if inst.accepting:
                self._stop(inst, now_s)

    def refresh(self, now_s: float) -> None:
        """Re-read which instances are ready (after ``add_placed`` / ``stop`` / relabelling)."""
        self._refresh_ready(now_s)

    def _refresh_ready(self, now_s: float) -> None:
        self._ready_p = [p for p in self.prefill if p.accepting and p.ready_s <= now_s]
        self._ready_d = [d for d in self.decode if d.accepting and d.ready_s <= now_s]
        by_group: dict[str, list[_Decode]] | None = None
        for d in self._ready_d:
            if d.group is not None:
                by_group = {} if by_group is None else by_group
                by_group.setdefault(d.group, []).append(d)
        self._ready_d_by_group = by_group
        later = [x.ready_s for x in (*self.prefill, *self.decode) if x.accepting and x.ready_s > now_s]
        self._next_ready_s = min(later) if later else math.inf

    def instance_seconds(self, role: str, *, lo_s: float, hi_s: float, ready_only: bool = False) -> float:
        """Instance-seconds of ``role`` holding GPUs in [lo_s, hi_s) (or ready for traffic)."""
        total = 0.0
        live = self.prefill if role == "prefill" else self.decode
        for inst in [*live, *reversed(self.retired)]:
            if inst.removed_s is not None and inst.removed_s <= lo_s:
                break                          # retired is in removal order: the rest are older
            if inst.role != role or inst.placed_s is None:
                continue
            if ready_only:
                a = inst.ready_s
                b = inst.stopped_s if inst.stopped_s is not None else math.inf
            else:
                a = inst.placed_s
                b = inst.removed_s if inst.removed_s is not None else math.inf
            b = min(b, inst.removed_s if inst.removed_s is not None else math.inf)
            overlap = min(b, hi_s) - max(a, lo_s)
            if overlap > 0:
                total += overlap
        return total

    def instance_series(self, role: str, seconds: int, *, ready_only: bool = False) -> np.ndarray:
        """Instances held (or ready) per whole second, 0..seconds-1 (time-averaged)."""
        diff = np.zeros(seconds + 2)
        for inst in [*self.retired, *self.prefill, *self.decode]:
            if inst.role != role or inst.placed_s is None:
                continue
            a = inst.ready_s if ready_only else inst.placed_s
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
        """Hand request ``rid`` over (in arrival order); it is routed when the tick holding
        its arrival runs (while no prefill instance is ready, it waits)."""
        self.submit_through(rid + 1)

    def submit_through(self, count: int) -> None:
        """Hand over requests ``[0, count)`` at once (the runner's form of ``submit``)."""
        if count > self._submitted:
            self._submitted = count

    def _route(self, rid: int, arrive: float) -> None:
        pool = self._ready_p
        k = len(pool)
        router = self.spec.router
        if router == "round-robin":
            self._rr = (self._rr + 1) % k
            best = pool[self._rr]
        elif router == "cache-aware" and self._per_instance_cache:
            # The instance where it would finish first: queue wait plus the prefill of what
            # that instance's cache does not hold (a long prefix match is worth a short wait,
            # not an unbounded one — SGLang's router also falls back to the shortest queue
            # when load is imbalanced).
            blocks = self._blocks[rid]
            prompt = self._prompt[rid]
            m, g, tp, eff = self._pco
            best, best_t = pool[0], math.inf
            for p in pool:
                hit = p.cache.peek(blocks)
                start = p.proj_s if p.proj_s > arrive else arrive
                fin = start + (self._uncached_s[rid] if hit <= 0 else pm.prefill_time_s(
                    m, g, tp, prompt, cached_tokens=min(hit, prompt - 1), eff=eff))
                if fin < best_t:
                    best, best_t = p, fin
        else:
            best = pool[0]
            best_t = best.proj_s
            for p in pool:
                if p.proj_s < best_t:
                    best, best_t = p, p.proj_s
        prompt = self._prompt[rid]
        if best.cache is not None:
            cached = min(best.cache.lookup(self._blocks[rid]), prompt - 1)
        else:
            cached = self._trace_cached[rid]
        self._cached[rid] = cached
        dur = self._uncached_s[rid] if cached <= 0 else pm.prefill_time_s(
            self._pco[0], self._pco[1], self._pco[2], prompt, cached_tokens=cached, eff=self._pco[3])
        best.queue.append(rid)
        best.queued_s += dur
        start = best.proj_s if best.proj_s > arrive else arrive
        best.proj_s = start + dur
        self._owner[rid] = best
        self._p_busy[best] = None

    def _run_prefill(self, p: _Prefill, end: float) -> None:
        q = p.queue
        arrival = self._arrival
        prompt_l = self._prompt
        rec = self.rec
        last = rec.seconds - 1
        while q:
            rid = q[0]
            a = arrival[rid]
            start = p.free_s if p.free_s > a else a
            if start >= end:
                return
            prompt = prompt_l[rid]
            if p.held_tokens + prompt > p.buffer_tokens and p.held_tokens > 0:
                # Its KV has nowhere to go until decode takes earlier requests': stall.
                p.free_s = end
                p.stalls += 1
                self.prefill_stalls += 1
                backlog = end + p.queued_s
                if backlog > p.proj_s:
                    p.proj_s = backlog
                return
            q.popleft()
            cached = self._cached[rid]
            dur = self._uncached_s[rid] if cached <= 0 else pm.prefill_time_s(
                self._pco[0], self._pco[1], self._pco[2], prompt, cached_tokens=cached, eff=self._pco[3])
            p.queued_s -= dur
            fin = start + dur
            p.free_s = fin
            self._pfin[rid] = fin
            p.held_tokens += prompt
            p.c_tokens += prompt
            p.c_uncached += prompt - cached
            p.c_busy_s += dur
            if dur < 1.0 and int(fin) == int(start):
                rec.prefill_busy_s[min(int(start), last)] += dur
            else:
                rec.add_interval(rec.prefill_busy_s, start, fin)
            sec = min(int(fin), last)
            rec.prefill_tokens[sec] += prompt
            rec.prefill_uncached_tokens[sec] += prompt - cached
            rec.kv_bytes[sec] += prompt * self._kvb
            heapq.heappush(self._prefilled, (fin, rid, p))
        p.queued_s = 0.0

    # ------------------------------------------------------------------ ticks

    def advance_to(self, t_s: float) -> None:
        """Run ticks up to ``t_s``."""
        tick = self.spec.tick_s
        while self.now_s + tick <= t_s + 1e-9:
            self._tick(self.now_s, tick)
            self.now_s += tick

    def _tick(self, t: float, dt: float) -> None:
        end = t + dt
        if self._next_ready_s < end:
            self._refresh_ready(end)
        # 1. Route arrivals (to ready prefill instances; while none is ready they wait).
        if self._ready_p:
            arrival = self._arrival
            i, lim = self._routed, self._submitted
            route = self._route
            while i < lim and arrival[i] < end:
                route(i, arrival[i])
                i += 1
            self._routed = i
        # 2. Prefill passes that start in this tick.
        if self._p_busy:
            for p in list(self._p_busy):
                self._run_prefill(p, end)
                if not p.queue:
                    del self._p_busy[p]
        # 3. Finished prefills join a decode instance's admission queue (with Deployment
        #    Groups, one of the prefill's own group when it has a ready one: the router
        #    pairs P and D inside a DG).
        ready = self._ready_d
        by_group = self._ready_d_by_group
        if ready:
            while self.unplaced:
                self._place(self.unplaced.popleft(), ready)
        pref = self._prefilled
        if pref and pref[0][0] < end:
            steps = self._steps
            prompt = self._prompt
            k = len(ready)
            rnd = self.rng.random
            heappop = heapq.heappop
            while pref and pref[0][0] < end:
                _, rid, owner = heappop(pref)
                entry = (rid, float(prompt[rid]), float(steps[rid]), 0)
                pool, k = ready, len(ready)
                if by_group is not None and owner.group is not None:
                    own = by_group.get(owner.group)
                    if own:
                        pool, k = own, len(own)
                if k > 1:        # power of two choices: near-JSQ balance at O(1) cost
                    a, b = pool[int(rnd() * k)], pool[int(rnd() * k)]
                    d = a if (len(a.running) + len(a.waiting) + len(a.landing)
                              <= len(b.running) + len(b.waiting) + len(b.landing)) else b
                    d.waiting.append(entry)
                elif k == 1:
                    pool[0].waiting.append(entry)
                else:
                    self.unplaced.append(entry)
        # 4. Decode: land transfers, admit, run.
        self._tick_start = t
        for d in self.decode:
            self._run(d, t, dt)
        self._retire(end)

    def _place(self, entry: tuple[int, float, float, int], ready: list[_Decode]) -> None:
        by_group = self._ready_d_by_group
        if by_group is not None:
            owner = self._owner[entry[0]]
            own = by_group.get(owner.group) if owner is not None and owner.group is not None else None
            if own:
                ready = own
        k = len(ready)
        if k == 1:
            d = ready[0]
        else:   # power of two choices: near-JSQ balance at O(1) cost
            rnd = self.rng.random
            a, b = ready[int(rnd() * k)], ready[int(rnd() * k)]
            d = a if (len(a.running) + len(a.waiting) + len(a.landing)
                      <= len(b.running) + len(b.waiting) + len(b.landing)) else b
        d.waiting.append(entry)

    def _start_running(self, d: _Decode, rid: int, ctx0: float, remaining: float, land_s: float) -> None:
        """The sequence's KV is on ``d`` at ``land_s`` (within this tick): it joins the batch."""
        late_s = land_s - self._tick_start
        g0 = d.steps
        if late_s > 0:
            co = self._dco
            n = len(d.running) + 1
            mem = co.weights_s + co.kv_token_s * (d.sum_ctx0 + (n - 1) * d.steps - d.sum_g0 + ctx0)
            comp = co.seq_compute_s * n
            offset = late_s / ((mem if mem > comp else comp) + co.overhead_s)
            g0 += offset
            d.late_steps += offset
        finish = g0 + remaining
        d.running[rid] = (g0, ctx0, finish)
        d.sum_ctx0 += ctx0
        d.sum_g0 += g0
        heapq.heappush(d.heap, (finish, rid))

    def _first_token(self, rid: int, land_s: float) -> None:
        self.first_token_s[rid] = land_s
        ttft = land_s - self._arrival[rid]
        self.ttft_s[rid] = ttft
        self.ttft_log_t.append(land_s)
        self.ttft_log_v.append(ttft)
        owner = self._owner[rid]
        if owner is not None:
            owner.held_tokens -= self._prompt[rid]
            owner.lat_t.append(land_s)
            owner.lat_v.append(ttft)
            if owner.held_tokens < 0.5:
                owner.held_tokens = 0.0

    def _admit(self, d: _Decode, t: float, end: float) -> None:
        landing = d.landing
        while landing and landing[0][0] < end:
            land_s, rid, ctx0, remaining, how = heapq.heappop(landing)
            d.reserved -= ctx0
            self._start_running(d, rid, ctx0, remaining, land_s)
            if how == 0:
                self._first_token(rid, land_s)
        if not d.waiting:
            return
        limit = self._cap * self.spec.kv_watermark
        used = d.context() + d.reserved
        max_batch = self.spec.decode_max_batch
        owners = self._owner
        pfin = self._pfin
        while d.waiting and len(d.running) + len(landing) < max_batch:
            rid, ctx0, remaining, how = d.waiting[0]
            if used + ctx0 > limit and (d.running or landing):
                break
            d.waiting.popleft()
            used += ctx0
            if how == 0:
                ready_s = pfin[rid] if pfin[rid] > t else t
                land_s = self.links.transfer(owners[rid], d, self._prompt[rid], ready_s)
            elif how == 1:   # recompute prompt + output so far on the decode instance
                cost = ctx0 * self._recompute_s_per_token
                d.stall_s += cost
                land_s = t + cost
            else:            # swap the KV back in over PCIe
                cost = ctx0 * self._swap_s_per_token
                d.stall_s += cost
                land_s = t + cost
            if land_s < end:
                self._start_running(d, rid, ctx0, remaining, land_s)
                if how == 0:
                    self._first_token(rid, land_s)
            else:
                heapq.heappush(landing, (land_s, rid, ctx0, remaining, how))
                d.reserved += ctx0

    def _run(self, d: _Decode, t: float, dt: float) -> None:
        if d.waiting or d.landing:
            self._admit(d, t, t + dt)
        n = len(d.running)
        if n == 0:
            return
        run_dt = dt
        if d.stall_s > 0:               # the batch waits while a preempted sequence is rebuilt
            lost = d.stall_s if d.stall_s < dt else dt
            d.stall_s -= lost
            run_dt = dt - lost
        ctx = d.sum_ctx0 + n * d.steps - d.sum_g0
        co = self._dco
        mem = co.weights_s + co.kv_token_s * ctx
        comp = co.seq_compute_s * n
        step_s = (mem if mem > comp else comp) + co.overhead_s
        g0 = d.steps
        g1 = g0 + run_dt / step_s
        # Sequences admitted mid-tick (start step > g0) emit only from their start.
        tokens = n * (g1 - g0) - d.late_steps
        if tokens < 0:
            tokens = 0.0
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
            done = t + (dt - run_dt) + (finish - g0) * step_s
            self.done_s[rid] = done
            tbt = (done - self.first_token_s[rid]) / self._steps[rid]
            self.tbt_s[rid] = tbt
            d.lat_t.append(done)
            d.lat_v.append(tbt)
            self.tbt_log_t.append(done)
            self.tbt_log_v.append(tbt)
            self.completed.append(rid)
        d.steps = g1
        rec = self.rec
        sec = int(t)
        if sec >= rec.seconds:
            sec = rec.seconds - 1
        rec.decode_tokens[sec] += tokens
        rec.decode_active_s[sec] += dt
        compute_s = run_dt * comp / step_s
        rec.decode_compute_s[sec] += compute_s
        d.c_tokens += tokens
        d.c_active_s += dt
        d.c_compute_s += compute_s
        if d.sum_ctx0 + len(running) * g1 - d.sum_g0 + d.reserved > self._cap:
            self._preempt_overflow(d)

    def _preempt_overflow(self, d: _Decode) -> None:
        how = 1 if self.spec.preemption == "recompute" else 2
        while d.n > 1 and d.context() + d.reserved > self._cap:
            rid, (g0, ctx0, finish) = d.running.popitem()      # the latest admitted
            d.sum_ctx0 -= ctx0
            d.sum_g0 -= g0
            progressed = max(0.0, d.steps - g0)
            d.waiting.appendleft((rid, ctx0 + progressed, finish - max(d.steps, g0), how))
            self.preemptions += 1
            d.c_preemptions += 1
            self.rec.preemptions[min(int(self.now_s), self.rec.seconds - 1)] += 1

    def _retire(self, now_s: float) -> None:
        """Release stopped instances once drained (at once if they never became ready)."""
        if all(p.accepting for p in self.prefill) and all(d.accepting for d in self.decode):
            return
        changed = False
        keep_p = []
        for p in self.prefill:
            if not p.accepting and (p.ready_s > now_s or p.drained(now_s)):
                self._remove(p, now_s)
                changed = True
            else:
                keep_p.append(p)
        self.prefill = keep_p
        keep_d = []
        for d in self.decode:
            if not d.accepting and (d.ready_s > now_s or (not d.running and not d.landing)):
                self._remove(d, now_s)
                changed = True
            else:
                keep_d.append(d)
        self.decode = keep_d
        if changed:
            self._refresh_ready(now_s)

    def _remove(self, inst: _Instance, now_s: float) -> None:
        inst.removed_s = now_s
        if isinstance(inst, _Decode) and inst.waiting:
            self.unplaced.extend(inst.waiting)
            inst.waiting.clear()
        self.retired.append(inst)
        if inst.placed_s is None:
            self.pending.remove(inst)
        else:
            self._release_gpus(inst, now_s)

    # ------------------------------------------------------------------ totals

    def gpu_seconds(self, end_s: float) -> tuple[float, float]:
        """GPU-seconds held per role (starting and draining instances included; pending
        instances hold no GPU)."""
        p_s = d_s = 0.0
        for inst in [*self.retired, *self.prefill, *self.decode]:
            if inst.placed_s is None:
                continue
            until = inst.removed_s if inst.removed_s is not None else end_s
            held = max(0.0, min(until, end_s) - inst.placed_s)
            if inst.role == "prefill":
                p_s += held * self.spec.prefill.tp
            else:
                d_s += held * self.spec.decode.tp
        return p_s, d_s
