"""The advisory backend: the configured sidecars are the pools; never writes.

Use it to run HeteroScale beside an existing deployment and watch what it would do
(status page, ``/metrics``) before letting it act. A role's pool is the sidecar URLs
its config lists (``sidecars:``): that is what "current" means here, whether or not
each one answered this tick. A sidecar that is silent, stale or reports its engine
down is missing data (aggregation excludes it with its reason, and missing data never
scales in), not a smaller pool. With the Prometheus source and no URLs, the pool is
every instance the query returned, the ones it reports as vanished (seen within
``lookback_s``) included. "ready" counts the instances that answered this tick with
the engine up and fresh data. Nothing is ever pending.
"""

from __future__ import annotations

from typing import Callable

from heteroscale.coordinator.core.settings import ServiceConfig
from heteroscale.coordinator.core.types import ApplyResult, Decision, PoolCounts, PoolStatus
from heteroscale.coordinator.seams import Collection

Latest = Callable[[str], "Collection | None"]


class StaticActuator:
    """``seams.Actuator`` that observes and never writes (``writes`` is False)."""

    name = "static"
    writes = False

    def __init__(self, *, latest: Latest) -> None:
        """``latest(service)``: the collector's newest ``Collection`` for a service."""
        self._latest = latest

    async def observe(self, service: ServiceConfig) -> PoolStatus:
        collection = self._latest(service.name)
        fetched = collection.fetched if collection else ()
        counts: dict[str, int] = {}
        ready: dict[str, int] = {}
        for role in ("prefill", "decode"):
            configured = set(service.role(role).sidecars)
            mine = [f for f in fetched if (f.role or (f.report.role if f.report else None)) == role
                    and (not configured or f.url in configured)]
            counts[role] = len(configured) if configured else len(mine)
            ready[role] = min(counts[role], sum(
                1 for f in mine if f.report is not None and f.report.service == service.name
                and f.report.engine_up and not f.report.stale))
        return PoolStatus(current=PoolCounts(**counts), ready=PoolCounts(**ready))

    async def apply(self, service: ServiceConfig, decision: Decision) -> ApplyResult:
        return ApplyResult(applied=decision.current, note="static backend is advisory: nothing written")

    async def close(self) -> None:
        return None
