"""The reconcile loop: observe, collect, aggregate, decide, (if leader) act (the shell).

Every ``interval_s`` the reconciler runs one tick for all services concurrently. Per
service: collect the sidecar reports, ask the actuator what exists, aggregate, run the
pure policy, and — only if this process is the leader (re-checked through the fence
``election.still_leader()`` right before the write), not in dry-run, and the actuator
writes — apply the decision. It makes no decision of its own: everything it acts on
comes from ``policy.decide``.

It never crashes on a backend's bad day: an ``ApiError``, a timeout or any other
exception from the actuator or discovery is logged, counted
(``heteroscale_coordinator_errors_total{service,op}``) and the service is skipped
for this tick; other services go on. An ``observe`` call is bounded by
``coordinator.observe_timeout_s`` so a hung API cannot stall the loop (``apply`` is not
cut short: the actuator's own calls are bounded, and interrupting a two-pool write
half-way is what its compensation exists to avoid). When the current counts cannot be
observed no decision is made at all (never act on stale or missing data).

State kept for the status page: per service the last observation and decision, the
recent decisions (a ring buffer, newest first; a decision identical to the newest
one — same reason, same from and to — is not repeated), and a per-tick history of the
last ``history_s`` for charts. The demo builds a ``Reconciler`` in-process with its
own actuator and lease, exactly as ``main`` does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from heteroscale.coordinator.core.aggregate import aggregate
from heteroscale.coordinator.core.bandwidth import BandwidthMap, ServiceBandwidth, build_bandwidth_map
from heteroscale.coordinator.core.policy import PolicyState, decide
from heteroscale.coordinator.core.types import ApplyResult, Decision, Observation, PoolCounts, PoolStatus

if TYPE_CHECKING:
    from heteroscale.coordinator.collect import Collector
    from heteroscale.coordinator.core.settings import Config, ServiceConfig
    from heteroscale.coordinator.core.types import Actuator, LeaderElection

log = logging.getLogger("heteroscale.coordinator")


class AlwaysLeader:
    """Stand-in election for a single coordinator (or before leader.py exists)."""

    def __init__(self, identity: str = "standalone") -> None:
        self.identity = identity

    @property
    def is_leader(self) -> bool:
        return True

    async def still_leader(self) -> bool:
        return True

    async def run(self) -> None:
        await asyncio.Event().wait()


@dataclass
class ServiceRuntime:
    """Everything the reconciler remembers about one service."""

    config: "ServiceConfig"
    decisions_kept: int
    state: PolicyState = field(default_factory=PolicyState)
    status: PoolStatus | None = None
    observation: Observation | None = None
    last: Decision | None = None
    last_apply: ApplyResult | None = None
    shortfall: PoolCounts | None = None         # what the latest write could not place
    bandwidth: ServiceBandwidth | None = None   # KV-transfer map from this tick's reports
    last_error: str | None = None
    last_tick_s: float | None = None
    decisions: deque = field(default_factory=deque)
    history: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.decisions = deque(maxlen=self.decisions_kept)

    def record(self, decision: Decision) -> None:
        # A repeat of the newest entry (same reason, same from and to) adds nothing:
        # holds repeat every tick, and so does a decision an advisory backend never applies.
        newest = self.decisions[0] if self.decisions else None
        if (newest is None or newest.reason != decision.reason or newest.current != decision.current
                or newest.desired != decision.desired):
            self.decisions.appendleft(decision)


class Reconciler:
    def __init__(self, *, config: "Config", actuator: "Actuator", collector: "Collector",
                 election: "LeaderElection | None" = None, dry_run: bool | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.actuator = actuator
        self.collector = collector
        self.election = election or AlwaysLeader()
        self.dry_run = config.coordinator.dry_run if dry_run is None else dry_run
        self.clock = clock
        self.services = {s.name: ServiceRuntime(config=s, decisions_kept=config.coordinator.decisions_kept)
                         for s in config.services}
        self.decisions_total: Counter[tuple[str, str, str]] = Counter()   # (service, direction, reason)
        self.errors_total: Counter[tuple[str, str]] = Counter()           # (service, op)
        self.ticks = 0
        self.last_tick_duration_s: float | None = None
        self.started_at = clock()
        attach = getattr(actuator, "attach", None)
        if callable(attach):
            attach(collector)

    @property
    def identity(self) -> str:
        return self.election.identity

    @property
    def is_leader(self) -> bool:
        return bool(self.election.is_leader)

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
        rt.bandwidth = self._bandwidth(service.name, collection.fetched, now_s=now_s)
        observation = aggregate(service, collection.fetched, pools=status, now_s=now_s)
        decision, new_state = decide(service=service, observation=observation, state=rt.state, now_s=now_s)
        rt.status, rt.observation, rt.last, rt.last_tick_s = status, observation, decision, now_s
        moved = decision.desired != decision.current
        applied: ApplyResult | None = None
        if moved and self._may_write():
            applied, new_state = await self._apply(rt, decision, new_state)
        elif moved:
            # Not written (standby, dry run, advisory backend): the pools did not move,
            # so no cooldown starts; the decision is shown as what would be done.
            new_state = _unmoved(new_state, rt.state)
        rt.state = new_state
        rt.last_apply = applied
        rt.record(decision)
        self.decisions_total[(service.name, decision.direction, decision.reason)] += 1
        self._remember(rt, decision, observation, now_s)
        return decision

    def _bandwidth(self, name: str, fetched: Any, *, now_s: float) -> ServiceBandwidth | None:
        """The service's prefill x decode bandwidth map, if its prefill sidecars probe.
        Switches come from the node topology where the actuator has it (Deployment
        Groups); elsewhere pairs are of locality ``unknown``."""
        reports = [f.report for f in fetched if f.report is not None]
        if not any(r.role == "prefill" and r.kv_transfer for r in reports):
            return None
        bmap = build_bandwidth_map(reports, switches=getattr(self.actuator, "switches", None) or {},
                                   groups=getattr(self.actuator, "pod_groups", None) or {}, now_s=now_s)
        return bmap.service(name)

    def bandwidth_map(self) -> BandwidthMap:
        """Every service's latest bandwidth map, as one (for ``/metrics``)."""
        services = tuple(rt.bandwidth for rt in self.services.values() if rt.bandwidth is not None)
        return BandwidthMap(services=services, generated_at=self.clock())

    def _may_write(self) -> bool:
        return not self.dry_run and self.actuator.writes and self.election.is_leader

    async def _apply(self, rt: ServiceRuntime, decision: Decision,
                     new_state: PolicyState) -> tuple[ApplyResult | None, PolicyState]:
        """Write through the fence; on failure keep the old cooldown stamps (nothing moved)."""
        name = rt.config.name
        unmoved = _unmoved(new_state, rt.state)
        try:
            if not await self.election.still_leader():
                log.warning("%s: lost the lease before writing %s; not writing", name, decision.reason)
                self.errors_total[(name, "fenced")] += 1
                return None, unmoved
            result = await self.actuator.apply(rt.config, decision)
        except Exception as exc:
            self._failed(rt, "apply", exc)
            return None, unmoved
        rt.last_error = None
        rt.shortfall = result.shortfall
        log.info("%s: %s %sP%sD -> %sP%sD (%s)", name, decision.reason, decision.current.prefill,
                 decision.current.decode, result.applied.prefill, result.applied.decode, decision.detail)
        return result, new_state

    def _failed(self, rt: ServiceRuntime, op: str, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        text = f"{op}: {type(exc).__name__}: {exc}"
        log.warning("%s: %s", rt.config.name, text)
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

    # ------------------------------------------------------------ status

    def status(self, *, history: bool = True) -> dict[str, Any]:
        """The ``/api/v1/status`` document (ARCHITECTURE §3.3)."""
        return {
            "leader": self.is_leader,
            "identity": self.identity,
            "backend": getattr(self.actuator, "name", "?"),
            "dry_run": self.dry_run,
            "writes": bool(self.actuator.writes) and not self.dry_run,
            "interval_s": self.config.coordinator.interval_s,
            "ticks": self.ticks,
            "last_tick_duration_s": self.last_tick_duration_s,
            "now": self.clock(),
            "services": [self._service_status(rt, history=history) for rt in self.services.values()],
        }

    def _service_status(self, rt: ServiceRuntime, *, history: bool) -> dict[str, Any]:
        svc = rt.config
        current = rt.last.current if rt.last else (rt.status.current if rt.status else None)
        desired = rt.last.desired if rt.last else None
        obs = rt.observation
        doc: dict[str, Any] = {
            "name": svc.name,
            "namespace": svc.namespace,
            "prefill": _pool(current, desired, rt.status, "prefill"),
            "decode": _pool(current, desired, rt.status, "decode"),
            "decode_tps": obs.decode_tps if obs else None,
            "smoothed_decode_tps": rt.last.inputs.get("smoothed_decode_tps") if rt.last else None,
            "target_decode_tps_per_instance": svc.target_decode_tps_per_instance,
            "capacity_tps": (current.decode * svc.target_decode_tps_per_instance) if current else None,
            "pd_ratio": svc.pd_ratio_text,
            "bounds": {"min_decode": svc.min_decode, "max_decode": svc.max_decode},
            "slo": {"ttft_s": svc.slo.ttft_s, "tbt_s": svc.slo.tbt_s},
            "latency": {"tbt_p90_s": obs.tbt_p90_s if obs else None,
                        "ttft_p90_s": obs.ttft_p90_s if obs else None,
                        "tbt_p90_max_s": obs.tbt_p90_max_s if obs else None,
                        "ttft_p90_max_s": obs.ttft_p90_max_s if obs else None},
            "reports": {"fresh_decode": obs.fresh_decode if obs else 0,
                        "expected_decode": obs.expected_decode if obs else 0,
                        "fresh_prefill": obs.fresh_prefill if obs else 0,
                        "expected_prefill": obs.expected_prefill if obs else 0,
                        "warming_decode": obs.warming_decode if obs else 0,
                        "excluded": dict(obs.excluded) if obs else {}},
            "last_decision": _decision(rt.last) if rt.last else None,
            "decisions": [_decision(d) for d in rt.decisions],
            "last_apply": ({"applied": rt.last_apply.applied.as_dict(), "note": rt.last_apply.note,
                            "shortfall": rt.last_apply.shortfall.as_dict()} if rt.last_apply else None),
            "last_error": rt.last_error,
            "manual_override": bool(rt.status.manual_override) if rt.status else False,
            "groups": [dict(g) for g in rt.status.groups] if rt.status else [],
            "placement_shortfall": rt.shortfall.as_dict() if rt.shortfall is not None else None,
            "kv_bandwidth": rt.bandwidth.to_dict() if rt.bandwidth is not None else None,
        }
        if history:
            doc["history"] = list(rt.history)
        return doc


def _unmoved(new_state: PolicyState, old_state: PolicyState) -> PolicyState:
    """The new state, but with the cooldown stamps of a tick in which nothing moved."""
    return replace(new_state, last_scale_out_s=old_state.last_scale_out_s,
                   last_scale_in_s=old_state.last_scale_in_s)


def _pool(current: Any, desired: Any, status: PoolStatus | None, role: str) -> dict[str, Any]:
    return {
        "current": getattr(current, role) if current else None,
        "desired": getattr(desired, role) if desired else None,
        "ready": getattr(status.ready, role) if status else None,
        "pending": getattr(status.pending, role) if status else None,
    }


def _decision(d: Decision) -> dict[str, Any]:
    out = d.as_dict()
    out["inputs"] = {k: v for k, v in out["inputs"].items() if v is None or isinstance(v, (int, float, str, list))}
    return out
