"""The ``kubernetes`` backend: one actuator per service kind, one fenced API client.

A service whose role blocks name a ``deployment``/``statefulset`` is scaled in place
(``actuators.kubernetes.KubernetesActuator``); a service whose role blocks give a
``template`` runs as Deployment Groups with topology-aware placement
(``actuators.groups.DeploymentGroupActuator``). ``KubernetesBackend`` holds both,
built over the same ``Kube`` client (fenced by the leader election), and sends each
call to the one that owns the service (``ServiceConfig.uses_groups``). It decides
nothing.

The DG actuator is only built when some service uses it, so a config of plain
workloads behaves exactly as before (same API calls, same RBAC needs).
"""

from __future__ import annotations

import logging
from typing import Mapping

from heteroscale.coordinator.actuators.groups import DeploymentGroupActuator, GroupSettings
from heteroscale.coordinator.actuators.kubernetes import COMPONENT, KubernetesActuator
from heteroscale.coordinator.core.settings import Config, ServiceConfig
from heteroscale.coordinator.core.types import ApplyResult, Decision, PoolStatus
from heteroscale.coordinator.kube import EVENTS, Clock, Kube, event_body
from heteroscale.errors import ApiError, NotLeaderError

log = logging.getLogger(__name__)


class KubernetesBackend:
    """``seams.Actuator`` (and ``PodLister``, ``TopologySource``, ``EventRecorder``) dispatching
    per service."""

    name = "kubernetes"

    def __init__(self, config: Config, *, api: Kube, dry_run: bool = False, clock: Clock | None = None) -> None:
        """``api``: the client, fenced by the election (``Kube.fenced``); the caller owns it."""
        self.dry_run = dry_run
        self.writes = not dry_run
        self.api = api
        self.scale = KubernetesActuator(api=api, dry_run=dry_run, clock=clock)
        self.groups = DeploymentGroupActuator(
            api=api, dry_run=dry_run, clock=clock,
            settings=GroupSettings.from_config(config.coordinator.placement)) \
            if any(s.uses_groups for s in config.services) else None

    def _for(self, service: ServiceConfig) -> KubernetesActuator | DeploymentGroupActuator:
        if service.uses_groups:
            if self.groups is None:
                raise KeyError(f"service {service.name!r} uses Deployment Groups but was not in the config "
                               "this backend was built for")
            return self.groups
        return self.scale

    async def observe(self, service: ServiceConfig) -> PoolStatus:
        return await self._for(service).observe(service)

    async def apply(self, service: ServiceConfig, decision: Decision) -> ApplyResult:
        return await self._for(service).apply(service, decision)

    async def list_pods(self, service: ServiceConfig, role: str) -> list[tuple[str, str]]:
        return await self._for(service).list_pods(service, role)

    @property
    def switches(self) -> Mapping[str, tuple[str, str]]:
        """node name -> (s2, s1) as the DG actuator last saw the nodes (empty without DGs)."""
        return self.groups.switches if self.groups is not None else {}

    @property
    def pod_groups(self) -> Mapping[str, str]:
        return self.groups.pod_groups if self.groups is not None else {}

    async def record_event(self, service: ServiceConfig, *, reason: str, message: str, warning: bool = False) -> None:
        """An Event on the service's decode workload (or its Deployment Groups' template)."""
        workload = service.decode.workload or service.decode.group_template
        if workload is None or self.dry_run:
            return
        kind, name = workload
        body = event_body(api_version="apps/v1", kind=kind, name=name, namespace=service.namespace, reason=reason,
                          message=message, warning=warning, now_s=self.scale.clock.time(), component=COMPONENT,
                          instance=self.scale.identity)
        try:
            await self.api.create(EVENTS, body, namespace=service.namespace)
        except (ApiError, NotLeaderError) as exc:
            log.warning("%s: could not record event %s: %s", service.name, reason, exc)

    async def close(self) -> None:
        return None          # the client belongs to the caller
