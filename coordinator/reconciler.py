"""The reconcile loop: collect, observe, aggregate, decide, (if leader) act (the shell).

Every ``interval_s`` the reconciler runs one tick for all services concurrently. Per
service: collect the instances' signals, ask the actuator what exists, aggregate, run
the pure policy, and — only if this process is the leader, not in dry-run, and the
actuator writes — apply the decision through the actuator (whose writes the election
fences, attempt by attempt). It makes no decision of its own: everything it acts on
comes from ``policy.decide``, and what the policy remembers comes back through
``policy.settle`` (only a written move starts a cooldown).

It never stops on one service's bad day. Each service's tick is contained: a failure
in discovery, ``observe`` (bounded by ``observe_timeout_s``), aggregation, the policy
or ``apply`` is counted (``heteroscale_coordinator_errors_total{service,op}``), logged
when it changes, shown on the status page, and the service is skipped for the tick;
other services go on. When the current counts cannot be observed no decision is made
at all (never act on stale or missing data).

At the end of each tick the reconciler publishes a frozen ``Snapshot``; the status API
and ``/metrics`` render from it (as client_python collectors read cached state), so
the two always agree and a scrape never sees a half-updated tick.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from heteroscale.coordinator.core.aggregate import aggregate
from heteroscale.coordinator.core.bandwidth import ServiceBandwidth, build_bandwidth_map, transfer_summary
from heteroscale.coordinator.core.policy import PolicyState, decide, settle
from heteroscale.coordinator.core.settings import Config, ServiceConfig
from heteroscale.coordinator.core.types import ApplyResult, Decision, Fetched, Observation, PoolCounts, PoolStatus
from heteroscale.coordinator.seams import (Actuator, BandwidthAware, EventRecorder, LeaderElection, SignalCollector,
                                          TopologySource)
from heteroscale.coordinator.snapshot import ServiceSnapshot, Snapshot, render_status
from heteroscale.errors import NotLeaderError

log = logging.getLogger("heteroscale.coordinator")


class AlwaysLeader:
    """The election of a coordinator that is alone by construction (tests, the simulator's
    live twin): always the leader, writes never time out."""

    def __init__(self, identity: str = "standalone") -> None:
        self.identity = identity

    @property
    def is_leader(self) -> bool:
        return True

    async def still_leader(self) -> bool:
        return True

    async def permit(self, what: str) -> float:
        return math.inf

    async def run(self) -> None:
        await asyncio.Event().wait()


# ---------------------------------------------------------------- per-service memory

@dataclass
class ServiceRuntime:
    """What the reconciler remembers about one service (its own, mutable)."""

    config: ServiceConfig
    decisions_kept: int
    state: PolicyState = field(default_factory=PolicyState)
    status: PoolStatus | None = None
    observation: Observation | None = None
    last: Decision | None = None
    last_apply: ApplyResult | None = None
    shortfall: PoolCounts | None = None         # what the latest write could not place
    bandwidth: ServiceBandwidth | None = None   # KV-transfer map from this tick's reports
    kv_transfer: dict[str, Any] | None = None   # KV bytes moved, per instance, from this tick's reports
    last_error: str | None = None
    last_tick_s: float | None = None
    advised: str | None = None                  # the P/D ratio advice last told to operators
    bottleneck_told: bool = False               # a KV-transfer bottleneck was told to operators
    decisions: deque[Decision] = field(default_factory=deque)
    history: deque[dict[str, Any]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.decisions = deque(maxlen=self.decisions_kept)

    def record(self, decision: Decision) -> bool:
        """Keep ``decision`` unless it repeats the newest one (same reason, from and to):
        holds repeat every tick, and so does a decision an advisory backend never applies.
        True if it was new."""
        newest = self.decisions[0] if self.decisions else None
        if (newest is not None and newest.reason == decision.reason and newest.current == decision.current
                and newest.desired == decision.desired):
            return False
        self.decisions.appendleft(decision)
        return True

    def snapshot(self) -> ServiceSnapshot:
        return ServiceSnapshot(config=self.config, status=self.status, observation=self.observation,
                               last=self.last, decisions=tuple(self.decisions), history=tuple(self.history),
                               last_apply=self.last_apply, shortfall=self.shortfall, bandwidth=self.bandwidth,
                               last_error=self.last_error, tick_s=self.last_tick_s, kv_transfer=self.kv_transfer,
                               target=self.state.target,
                               drift=self.state.drift)


class Reconciler:
    def __init__(self, *, config: Config, actuator: Actuator, collector: SignalCollector,
                 election: LeaderElection | None = None, dry_run: bool | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.actuator = actuator
        self.collector = collector
        self.election: LeaderElection = election or AlwaysLeader()
        self.dry_run = config.coordinator.dry_run if dry_run is None else dry_run
        self.clock = clock
        self.services = {s.name: ServiceRuntime(config=s, decisions_kept=config.coordinator.decisions_kept)
                         for s in config.services}
        self.decisions_total: Counter[tuple[str, str, str]] = Counter()   # (service, direction, reason)
        self.errors_total: Counter[tuple[str, str]] = Counter()           # (service, op)
        self.ticks = 0
        self.last_tick_duration_s: float | None = None
        self.started_at = clock()
        self.snapshot = self._publish()

    @property
    def identity(self) -> str:
        return self.election.identity

    @property
    def is_leader(self) -> bool:
        return bool(self.election.is_leader)

    @property
    def writes(self) -> bool:
        return bool(self.actuator.writes) and not self.dry_run

    async def run(self, *, stop: asyncio.Event | None = None) -> None:
        """Tick every ``interval_s`` until cancelled or ``stop`` is set (interruptible wait)."""
        stop = stop or asyncio.Event()
        interval = self.config.coordinator.interval_s
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            await self.tick()
            wait = max(0.0, interval - (loop.time() - started))
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that races the timeout, and the loop would run on.
            try:
                async with asyncio.timeout(wait):
                    await stop.wait()
            except TimeoutError:
                pass

    async def tick(self) -> list[Decision]:
        """One pass over all services; returns the decisions made (skipped services omitted)."""
        started = time.perf_counter()
        results = await asyncio.gather(*(self._tick_service(rt) for rt in self.services.values()))
        self.ticks += 1
        self.last_tick_duration_s = time.perf_counter() - started
        self.snapshot = self._publish()
        return [d for d in results if d is not None]

    async def _tick_service(self, rt: ServiceRuntime) -> Decision | None:
        service = rt.config
        try:
            collection = await self.collector.collect(service)
            async with asyncio.timeout(self.config.coordinator.observe_timeout_s):
                status = await self.actuator.observe(service)
        except Exception as exc:   # the loop survives any backend failure, a hang included
            return self._failed(rt, "observe", exc)
        now_s = self.clock()
        try:
            rt.bandwidth = self._bandwidth(service.name, collection.fetched, now_s=now_s)
            rt.kv_transfer = transfer_summary(f.report for f in collection.fetched if f.report is not None)
            observation = aggregate(service, collection.fetched, pools=status, now_s=now_s)
            decision, state = decide(service=service, observation=observation, state=rt.state, now_s=now_s)
        except Exception as exc:   # a value the pure code did not expect: this service skips the tick
            return self._failed(rt, "decide", exc)
        rt.status, rt.observation, rt.last, rt.last_tick_s = status, observation, decision, now_s
        applied: ApplyResult | None = None
        if isinstance(self.actuator, BandwidthAware):
            self.actuator.use_bandwidth(service.name, rt.bandwidth)
        if decision.desired != decision.current and self._may_write():
            applied = await self._apply(rt, decision)
        rt.state = settle(state, decision=decision, applied=applied is not None)
        rt.last_apply = applied
        if rt.record(decision) and applied is None and decision.desired != decision.current:
            # Advisory, standby or failed: say what would have been done, once per change.
            log.info("%s: %s %sP%sD -> %sP%sD not written (%s): %s", service.name, decision.reason,
                     decision.current.prefill, decision.current.decode, decision.desired.prefill,
                     decision.desired.decode, self._why_not_written(), decision.detail)
        self.decisions_total[(service.name, decision.direction, decision.reason)] += 1
        self._remember(rt, decision, observation, now_s)
        await self._tell_ratio_advice(rt, decision)
        await self._tell_kv_bottleneck(rt, decision)
        return decision

    async def _tell_kv_bottleneck(self, rt: ServiceRuntime, decision: Decision) -> None:
        """A KV-transfer bottleneck (``hold_kv_transfer``'s evidence) becomes a Kubernetes
        Event naming the slowest measured pairs, once per episode, from the leader."""
        evidence = decision.inputs.get("kv_transfer_bottleneck")
        if not evidence:
            rt.bottleneck_told = False
            return
        if rt.bottleneck_told or not self._may_write() or not isinstance(self.actuator, EventRecorder):
            return
        rt.bottleneck_told = True
        slow = sorted((p for p in (rt.bandwidth.flagged if rt.bandwidth else ()) if p.bytes_per_second),
                      key=lambda p: p.bytes_per_second or 0.0)[:5]
        pairs = ", ".join(f"{p.prefill}->{p.decode} ({p.reason})" for p in slow) or "no pair measured slow"
        await self.actuator.record_event(rt.config, reason="KvTransferBottleneck", warning=True,
                                         message=f"{evidence}; slowest pairs: {pairs}")

    async def _tell_ratio_advice(self, rt: ServiceRuntime, decision: Decision) -> None:
        """A new P/D ratio recommendation (``pd_ratio_mode`` advise or adapt) becomes a
        Kubernetes Event, once per change, written by the leader only."""
        advice = decision.inputs.get("pd_ratio_advice")
        if advice == rt.advised:
            return
        rt.advised = advice
        if advice is None or not self._may_write() or not isinstance(self.actuator, EventRecorder):
            return
        service = rt.config
        in_use = decision.inputs.get("pd_ratio_in_use", service.pd_ratio_text)
        verb = "moving the ratio in use towards it" if service.pd_ratio_mode == "adapt" else \
            "set pd_ratio (or pd_ratio_mode: adapt) to follow it"
        await self.actuator.record_event(
            service, reason="PdRatioDrift", warning=True,
            message=f"the traffic needs about {advice} prefill:decode, the ratio in use is {in_use} "
                    f"(configured {service.pd_ratio_text}); {verb}")

    def _bandwidth(self, name: str, fetched: tuple[Fetched, ...], *, now_s: float) -> ServiceBandwidth | None:
        """The service's prefill x decode bandwidth map, if its prefill sidecars probe.
        Switches come from the node topology where the actuator has it (Deployment
        Groups); elsewhere pairs are of locality ``unknown``."""
        reports = [f.report for f in fetched if f.report is not None]
        if not any(r.role == "prefill" and r.kv_transfer for r in reports):
            return None
        topology = self.actuator if isinstance(self.actuator, TopologySource) else None
        bmap = build_bandwidth_map(reports, switches=dict(topology.switches) if topology else {},
                                   groups=dict(topology.pod_groups) if topology else {}, now_s=now_s)
        return bmap.service(name)

    def _may_write(self) -> bool:
        return self.writes and self.election.is_leader

    def _why_not_written(self) -> str:
        if self.dry_run:
            return "dry run"
        if not self.actuator.writes:
            return f"{self.actuator.name} backend is advisory"
        if not self.election.is_leader:
            return "not the leader"
        return "write failed"

    async def _apply(self, rt: ServiceRuntime, decision: Decision) -> ApplyResult | None:
        """Write through the actuator; ``None`` when nothing was written (the fence closed,
        or the backend failed): then no cooldown starts."""
        name = rt.config.name
        try:
            # The fence once here (a multi-write apply does not start on a lost lease),
            # and again by the actuator's fenced client before each of its write attempts.
            await self.election.permit(f"apply {decision.reason} to {name}")
            result = await self.actuator.apply(rt.config, decision)
        except NotLeaderError as exc:
            log.warning("%s: %s; not writing %s", name, exc, decision.reason)
            self.errors_total[(name, "fenced")] += 1
            return None
        except Exception as exc:
            self._failed(rt, "apply", exc)
            return None
        rt.last_error = None
        rt.shortfall = result.shortfall
        log.info("%s: %s %sP%sD -> %sP%sD (%s)", name, decision.reason, decision.current.prefill,
                 decision.current.decode, result.applied.prefill, result.applied.decode, decision.detail)
        return result

    def _failed(self, rt: ServiceRuntime, op: str, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        text = f"{op}: {type(exc).__name__}: {exc}"
        if text != rt.last_error:           # logged once per change, counted every time
            log.warning("%s: %s", rt.config.name, text, exc_info=op == "decide")
        rt.last_error = text
        self.errors_total[(rt.config.name, op)] += 1
        return None

    def _remember(self, rt: ServiceRuntime, decision: Decision, observation: Observation,
                  now_s: float) -> None:
        smoothed = decision.inputs.get("smoothed_decode_tps")
        rt.history.append({
            "at": now_s,
            "decode_tps": observation.decode_tps,
            "smoothed_decode_tps": smoothed,
            "capacity_tps": decision.current.decode * rt.config.target_decode_tps_per_instance,
            "prefill": decision.current.prefill, "decode": decision.current.decode,
            "desired_prefill": decision.desired.prefill, "desired_decode": decision.desired.decode,
            "tbt_p90_s": observation.tbt_p90_s, "ttft_p90_s": observation.ttft_p90_s,
            "reason": decision.reason,
        })
        horizon = now_s - self.config.coordinator.history_s
        while rt.history and rt.history[0]["at"] < horizon:
            rt.history.popleft()

    def _publish(self) -> Snapshot:
        return Snapshot(
            at=self.clock(), identity=self.identity, leader=self.is_leader, backend=self.actuator.name,
            dry_run=self.dry_run, writes=self.writes, interval_s=self.config.coordinator.interval_s,
            ticks=self.ticks, last_tick_duration_s=self.last_tick_duration_s,
            services=tuple(rt.snapshot() for rt in self.services.values()),
            decisions_total=dict(self.decisions_total), errors_total=dict(self.errors_total),
            collection_errors_total=dict(self.collector.errors_total))

    def status(self, *, history: bool = True) -> dict[str, Any]:
        """The ``/api/v1/status`` document of the latest published snapshot."""
        return render_status(self.snapshot, history=history)
