"""The advisory backend: observes pool sizes from the sidecars that answer; never writes.

Use it to run HeteroScale beside an existing deployment and watch what it would do
(status page, ``/metrics``) before letting it act. The "current" size of a role is
the number of its sidecars that answered this tick with the engine up (so a dead
instance is not counted); "ready" is the same set minus instances the sidecar says
are stale. Nothing is ever pending. ``apply`` is never called by the reconciler
(``writes`` is False); if called anyway it changes nothing and says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from heteroscale.coordinator.core.types import ApplyResult, Decision, PoolCounts, PoolStatus

if TYPE_CHECKING:
    from heteroscale.coordinator.collect import Collector
    from heteroscale.coordinator.core.settings import Config, ServiceConfig


class StaticActuator:
    name = "static"
    writes = False

    def __init__(self, config: "Config", *, collector: "Collector | None" = None, **_: Any) -> None:
        self._config = config
        self._collector = collector

    def attach(self, collector: "Collector") -> None:
        """Read the collector's latest results (the reconciler calls this when it owns one)."""
        self._collector = collector

    async def observe(self, service: "ServiceConfig") -> PoolStatus:
        counts = {"prefill": 0, "decode": 0}
        ready = {"prefill": 0, "decode": 0}
        latest = self._collector.latest.get(service.name) if self._collector else None
        for item in latest.fetched if latest else ():
            report = item.report
            if report is None or report.service != service.name or not report.engine_up:
                continue
            role = item.role or report.role
            if role not in counts:
                continue
            counts[role] += 1
            if not report.stale:
                ready[role] += 1
        return PoolStatus(current=PoolCounts(**counts), ready=PoolCounts(**ready))

    async def apply(self, service: "ServiceConfig", decision: Decision) -> ApplyResult:
        return ApplyResult(applied=decision.current, note="static backend is advisory: nothing written")

    async def close(self) -> None:
        return None
