"""Actuators: one per backend, chosen by name (``coordinator.backend``).

``make_actuator`` imports the chosen backend lazily, so the kubernetes client is
only loaded when the kubernetes backend is used, and a backend that is not built in
this version says so in one line instead of a traceback:

- ``kubernetes`` → ``heteroscale.coordinator.actuators.cluster:KubernetesBackend`` (per service:
  ``actuators.kubernetes:KubernetesActuator`` scales named workloads in place,
  ``actuators.groups:DeploymentGroupActuator`` runs services with a role ``template``
  as Deployment Groups; one API client and one leader fence for both)
- ``local``      → ``heteroscale.coordinator.actuators.local:LocalActuator``
- ``static``     → ``heteroscale.coordinator.actuators.static:StaticActuator`` (advisory:
  counts what the sidecars report, never writes)

Extra keyword arguments go to the backend's constructor unchanged (a Kubernetes
client, the demo's process manager, the collector for ``static``...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from heteroscale.errors import UsageError

if TYPE_CHECKING:
    from heteroscale.coordinator.core.settings import Config
    from heteroscale.coordinator.core.types import Actuator

BACKENDS: dict[str, tuple[str, str]] = {
    "kubernetes": ("heteroscale.coordinator.actuators.cluster", "KubernetesBackend"),
    "local": ("heteroscale.coordinator.actuators.local", "LocalActuator"),
    "static": ("heteroscale.coordinator.actuators.static", "StaticActuator"),
}


def actuator_class(backend: str) -> type:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise UsageError(f"backend {backend!r} is not built in this version") from exc
        raise
    try:
        return getattr(module, class_name)
    except AttributeError as exc:
        raise UsageError(f"backend {backend!r} is not built in this version") from exc


def make_actuator(config: "Config", *, backend: str | None = None, **kwargs: Any) -> "Actuator":
    """Build the actuator for ``backend`` (default: the config's)."""
    cls = actuator_class(backend or config.coordinator.backend)
    return cls(config, **kwargs)
