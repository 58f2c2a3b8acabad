"""Actuators: one per backend (``coordinator.backend``), built by ``make_actuator``.

- ``kubernetes`` → ``actuators.cluster.KubernetesBackend`` (per service:
  ``actuators.kubernetes.KubernetesActuator`` scales named workloads in place,
  ``actuators.groups.DeploymentGroupActuator`` runs services with a role ``template``
  as Deployment Groups; one fenced API client for both)
- ``local``      → ``actuators.local.LocalActuator`` (the demo's processes)
- ``static``     → ``actuators.static.StaticActuator`` (advisory: never writes)

Each backend's module is imported only when that backend is built, so the kubernetes
client is loaded only for the kubernetes backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from heteroscale.coordinator.core.settings import BACKENDS, Config
from heteroscale.errors import UsageError

if TYPE_CHECKING:
    from heteroscale.coordinator.actuators.local import LocalSettings, SimulatedCluster
    from heteroscale.coordinator.actuators.static import Latest
    from heteroscale.coordinator.kube import Kube
    from heteroscale.coordinator.seams import Actuator


def make_actuator(config: Config, *, backend: str | None = None, kube: "Kube | None" = None, dry_run: bool = False,
                  latest: "Latest | None" = None, cluster: "SimulatedCluster | None" = None,
                  local: "LocalSettings | None" = None) -> "Actuator":
    """The actuator for ``backend`` (default: the config's). What each needs:

    ``kubernetes``: ``kube``, the API client fenced by the election (``Kube.fenced``);
    ``static``: ``latest``, the collector's newest collection per service;
    ``local``: optionally the simulated ``cluster`` and ``local`` process settings.
    """
    backend = backend or config.coordinator.backend
    if backend == "kubernetes":
        if kube is None:
            raise UsageError("the kubernetes backend needs an API client")
        from heteroscale.coordinator.actuators.cluster import KubernetesBackend
        return KubernetesBackend(config, api=kube, dry_run=dry_run)
    if backend == "static":
        if latest is None:
            raise UsageError("the static backend needs the collector's latest results")
        from heteroscale.coordinator.actuators.static import StaticActuator
        return StaticActuator(latest=latest)
    if backend == "local":
        from heteroscale.coordinator.actuators.local import LocalActuator, LocalSettings
        return LocalActuator(cluster=cluster, settings=local or LocalSettings())
    raise UsageError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
