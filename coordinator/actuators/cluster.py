"""The ``kubernetes`` backend: one actuator per service kind, one API client, one fence.

A service whose role blocks name a ``deployment``/``statefulset`` is scaled in place
(``actuators.kubernetes.KubernetesActuator``); a service whose role blocks give a
``template`` runs as Deployment Groups with topology-aware placement
(``actuators.groups.DeploymentGroupActuator``). ``KubernetesBackend`` holds both,
built over the same ``Kube`` client and the same leader fence, and sends each call to
the one that owns the service (``ServiceConfig.uses_groups``). It decides nothing.

The DG actuator is only built when some service uses it, so a config of plain
workloads behaves exactly as before (same API calls, same RBAC needs).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from heteroscale.coordinator.actuators.groups import DeploymentGroupActuator
from heteroscale.coordinator.actuators.kubernetes import KubernetesActuator
from heteroscale.coordinator.kube import Clock, Kube, kube_from_config
from heteroscale.coordinator.core.types import ApplyResult, Decision, PoolStatus


def uses_groups(service: Any) -> bool:
    return bool(getattr(service, "uses_groups", False))


class KubernetesBackend:
    """``types.Actuator`` dispatching per service to the scale or the DG actuator."""

    name = "kubernetes"

    def __init__(self, config: Any = None, *, api: Kube | None = None, dry_run: bool | None = None,
                 fence: Callable[[], Awaitable[bool]] | None = None, clock: Clock | None = None,
                 **extra: Any) -> None:
        coordinator = getattr(config, "coordinator", None)
        self.dry_run = bool(dry_run if dry_run is not None else getattr(coordinator, "dry_run", False))
        self.writes = not self.dry_run
        self._owns_api = api is None
        self.api = api if api is not None else kube_from_config()
        shared = dict(api=self.api, dry_run=self.dry_run, fence=fence, clock=clock, **extra)
        self.scale = KubernetesActuator(config, **shared)
        services = getattr(config, "services", ())
        self.groups: DeploymentGroupActuator | None = (
            DeploymentGroupActuator(config, **shared) if any(uses_groups(s) for s in services) else None)

    def _for(self, service: Any) -> Any:
        if uses_groups(service):
            if self.groups is None:   # a service not in the config this backend was built for
                self.groups = DeploymentGroupActuator(None, api=self.api, dry_run=self.dry_run,
                                                      fence=self.scale.fence, clock=self.scale.clock)
            return self.groups
        return self.scale

    async def observe(self, service: Any) -> PoolStatus:
        return await self._for(service).observe(service)

    async def apply(self, service: Any, decision: Decision) -> ApplyResult:
        return await self._for(service).apply(service, decision)

    async def list_pods(self, service: Any, role: str) -> list[tuple[str, str]]:
        return await self._for(service).list_pods(service, role)

    @property
    def switches(self) -> dict[str, tuple[str, str]]:
        """node name -> (s2, s1) as the DG actuator last saw the nodes (empty without DGs)."""
        return self.groups.switches if self.groups is not None else {}

    @property
    def pod_groups(self) -> dict[str, str]:
        return self.groups.pod_groups if self.groups is not None else {}

    async def close(self) -> None:
        if self._owns_api:
            await self.api.close()
