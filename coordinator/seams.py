"""The coordinator's seams: typed protocols between the loop and the outside world.

The reconciler talks to four things, each through a small protocol:

``Actuator``          reads and writes one backend's pool sizes (Kubernetes, local
                      processes, the advisory ``static`` backend). Never decides.
``LeaderElection``    who may write: ``is_leader`` (the latest local view),
                      ``still_leader()`` (re-read, the fence) and ``permit(what)`` (the
                      fence plus the time a write may still take).
``SignalCollector``   per-instance signals for one service per tick (``/v1/report``
                      pulls, or PromQL).
``ReportSource``      which report URLs to pull for a service (config, pods, the local
                      actuator's own instances).

Optional abilities of an actuator are narrow capability protocols, checked with
``isinstance`` on ``runtime_checkable`` protocols (as NVIDIA Dynamo's planner does with
its connectors) rather than ``getattr`` probes:

``PodLister``         ``list_pods(service, role)``: (pod, IP) pairs for report discovery.
``TopologySource``    ``switches`` and ``pod_groups``: node → switches and pod → Deployment
                      Group, for the KV-transfer bandwidth map.
``EventRecorder``     ``record_event(service, reason, message)``: a Kubernetes Event (the
                      P/D ratio advice).
``BandwidthAware``    ``use_bandwidth(service, map)``: placement that prefers domains with
                      measured KV-transfer headroom (Deployment Groups, the demo).
``ReportSource``      an actuator that knows its own instances' report URLs (local).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from heteroscale.coordinator.core.bandwidth import ServiceBandwidth
    from heteroscale.coordinator.core.settings import ServiceConfig
    from heteroscale.coordinator.core.types import ApplyResult, Decision, Fetched, PoolStatus


@dataclass(frozen=True)
class ReportTarget:
    """One sidecar to pull: its report URL, the role expected there (``None``: trust the
    report) and the pod it belongs to, when known."""

    url: str
    role: str | None = None
    pod: str | None = None


@runtime_checkable
class ReportSource(Protocol):
    async def targets(self, service: "ServiceConfig") -> list[ReportTarget]:
        ...


@runtime_checkable
class PodLister(Protocol):
    async def list_pods(self, service: "ServiceConfig", role: str) -> Sequence[tuple[str, str]]:
        """``(pod name, pod IP)`` of the role's running instances that take traffic."""
        ...


@runtime_checkable
class TopologySource(Protocol):
    @property
    def switches(self) -> Mapping[str, tuple[str, str]]:
        """node name → (S2, S1) switch, as last observed."""
        ...

    @property
    def pod_groups(self) -> Mapping[str, str]:
        """pod name → Deployment Group, as last observed."""
        ...


@runtime_checkable
class BandwidthAware(Protocol):
    def use_bandwidth(self, service: str, bandwidth: "ServiceBandwidth | None") -> None:
        """The service's latest measured KV-transfer map, for the next placement."""
        ...


@runtime_checkable
class EventRecorder(Protocol):
    async def record_event(self, service: "ServiceConfig", *, reason: str, message: str,
                           warning: bool = False) -> None:
        """Tell the service's operators something (a Kubernetes Event on its decode workload).
        Best-effort: never raises for an API failure."""
        ...


class Actuator(Protocol):
    """Reads and writes one backend's pool sizes. Never decides anything.

    Errors are raised as ``heteroscale.errors.ApiError`` (transient: the reconciler
    keeps running) or ``NotLeaderError`` (the fence closed mid-write)."""

    name: str          # "kubernetes" | "local" | "static"
    writes: bool       # False for advisory backends and in dry-run mode

    async def observe(self, service: "ServiceConfig") -> "PoolStatus":
        ...

    async def apply(self, service: "ServiceConfig", decision: "Decision") -> "ApplyResult":
        ...

    async def close(self) -> None:
        ...


class WriteFence(Protocol):
    async def permit(self, what: str) -> float:
        """Seconds a write may still take (its deadline), or ``NotLeaderError``.
        Called before every write attempt, retries included."""
        ...


class LeaderElection(WriteFence, Protocol):
    """client-go style leader election (``coordinator.leader``)."""

    identity: str

    @property
    def is_leader(self) -> bool:
        ...

    async def still_leader(self) -> bool:
        ...

    async def run(self) -> None:
        """Acquire, renew, and release on cancellation; runs until cancelled."""
        ...


@dataclass(frozen=True)
class Collection:
    """One service's signals for one tick: what each instance answered, and the errors."""

    service: str
    fetched: tuple["Fetched", ...]
    errors: Mapping[str, int]
    discovery_error: str | None = None


class SignalCollector(Protocol):
    """Per-instance signals for a service each tick (``collect.Collector``, ``promql``)."""

    errors_total: Counter[tuple[str, str]]     # (service, reason) -> count
    latest: dict[str, Collection]              # service -> its newest collection

    async def collect(self, service: "ServiceConfig") -> Collection:
        ...

    async def close(self) -> None:
        ...
