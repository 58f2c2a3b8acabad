"""The local actuator: real engine-emulator + sidecar process pairs on this machine (I/O).

``LocalActuator`` implements the ``Actuator`` seam for the embedded mode (``heteroscale
demo``). An "instance" is two child processes on free loopback ports: an engine
emulator (``heteroscale emulate-engine``) and its real sidecar (``heteroscale sidecar
--gpu-source emulator``). It never decides anything: the reconciler's policy says how
many, and the same placement code as the Kubernetes actuator (``placement.plan``)
says where, on a *simulated* topology of nodes, GPU types and S1/S2 switches read
from a YAML file (``SimulatedCluster``).

Lifecycle of an instance::

    starting ──(engine /health and sidecar /readyz answer)──▶ ready ──(gate)──▶ in traffic
        │                                                       │
        └──────────────(scale-in picks it: leaves traffic)──────┴──▶ draining ──(in-flight done
                                                                      or drain timeout)──▶ stopped

* Start-up delay is modelled: the emulator opens its port only after
  ``startup_delay_s`` modelled seconds (divided by the speed-up), as a real engine does
  after loading weights; until then the instance is *pending*.
* **Ready-ratio gate**: a ready instance joins traffic only when the Deployment
  Group's in-traffic prefill:decode ratio stays within ``gate_tolerance`` of the
  service's ratio (or moves closer to it): ``core.gate.gate_admit``, the same rule as
  the Kubernetes DG actuator's.
* **Drain before stop**: an instance picked for removal leaves traffic at once; it is
  stopped only when the router reports no request of its in flight (``in_flight``
  hook), or after ``drain_timeout_s``.
* **No orphans**: every child runs in its own session (process group) and is asked,
  through ``PR_SET_PDEATHSIG``, to receive SIGTERM if this process dies; ``close()``
  terminates every group (SIGTERM, then SIGKILL after a grace period) on every exit
  path.

It is also the collector's ``ReportSource``: the sidecars of ready instances are the
report targets (starting ones are not expected to report yet); a ``TopologySource``
(``switches``, ``pod_groups``: the KV bandwidth map places and groups pairs with them);
and ``BandwidthAware``: the next placement prefers domains whose KV pairs measure well
(``core.bandwidth.placement_hints``). Each emulator learns its switch (``--kv-location``)
so the demo's modelled KV links can be degraded (``--degrade-link``). Every placement
cycle, with the placement code's reasons, is kept in ``placements`` (the last 100).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import aiohttp
import yaml

from heteroscale.net import free_ports
from heteroscale.coordinator.core.bandwidth import PlacementHints, ServiceBandwidth, placement_hints
from heteroscale.coordinator.core.gate import gate_admit
from heteroscale.coordinator.core.placement import (DeploymentGroup, LEVEL_OF_AFFINITY, PlacementPlan, RoleGroup,
                                                    demand_from_service, plan, with_bandwidth)
from heteroscale.coordinator.core.topology import (TIER_VALUE, ClusterView, TopologyKeys, build_view,
                                                   nodes_from_document)
from heteroscale.coordinator.seams import ReportTarget
from heteroscale.coordinator.core.types import ApplyResult, Decision, PoolCounts, PoolStatus
from heteroscale.errors import ConfigError

if TYPE_CHECKING:
    from heteroscale.coordinator.core.settings import ServiceConfig

log = logging.getLogger("heteroscale.local")

ROLES = ("prefill", "decode")
DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "demo" / "topology.yaml"
STATES = ("starting", "ready", "draining", "stopped", "failed")
PLACEMENTS_KEPT = 100


# ---------------------------------------------------------------- simulated topology

class SimulatedCluster:
    """Nodes of a pretend cluster, as Kubernetes Node objects, for the placement code.

    The YAML is either ``kubectl get nodes -o yaml`` output or the compact form::

        switches:
          - {s2: pod-a, s1: a-l20, gpu_type: NVIDIA-L20, nodes: 2, gpus_per_node: 4}
          - {s2: pod-a, s1: a-h20, gpu_type: NVIDIA-H20, nodes: 2, gpus_per_node: 4}
    """

    def __init__(self, nodes: Sequence[Mapping[str, Any]], *, keys: TopologyKeys | None = None) -> None:
        self.keys = keys or TopologyKeys()
        self.nodes = list(nodes)
        view = build_view(self.nodes, keys=self.keys)   # raises ValueError on garbage
        if not view.nodes:
            raise ValueError("the topology has no schedulable GPU node")

    @classmethod
    def from_yaml(cls, text: str, *, origin: str = "topology") -> "SimulatedCluster":
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {str(exc).splitlines()[0]}"], source=origin) from exc
        try:
            if isinstance(doc, Mapping) and "switches" in doc:
                return cls(compact_nodes(doc["switches"]))
            return cls(nodes_from_document(doc))
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError([str(exc)], source=origin) from exc

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "SimulatedCluster":
        p = Path(path)
        return cls.from_yaml(p.read_text(), origin=str(p))

    def view(self, used_gpus: Mapping[str, int]) -> ClusterView:
        return build_view(self.nodes, keys=self.keys, reserved=dict(used_gpus))

    def switches_of_nodes(self) -> dict[str, tuple[str, str]]:
        """node name -> (S2, S1) switch."""
        return {n.name: (n.s2, n.s1) for n in self.view({}).nodes}


def compact_nodes(switches: Any) -> list[dict[str, Any]]:
    """Expand the compact ``switches:`` list into Node objects."""
    if not isinstance(switches, list) or not switches:
        raise ValueError("switches must be a non-empty list")
    keys = TopologyKeys()
    nodes: list[dict[str, Any]] = []
    for i, sw in enumerate(switches):
        if not isinstance(sw, Mapping):
            raise ValueError(f"switches[{i}] must be a mapping")
        missing = [k for k in ("s2", "s1", "gpu_type") if not isinstance(sw.get(k), str) or not sw.get(k)]
        if missing:
            raise ValueError(f"switches[{i}] needs {', '.join(missing)}")
        count, gpus = sw.get("nodes", 1), sw.get("gpus_per_node", 8)
        if not (isinstance(count, int) and count >= 1 and isinstance(gpus, int) and gpus >= 1):
            raise ValueError(f"switches[{i}]: nodes and gpus_per_node must be integers >= 1")
        short = sw["gpu_type"].lower().replace("nvidia-", "")
        for n in range(count):
            nodes.append({
                "kind": "Node",
                "metadata": {"name": f"{sw['s1']}-{short}-{n}", "labels": {
                    keys.gpu_type_label: sw["gpu_type"], keys.s1_label: sw["s1"], keys.s2_label: sw["s2"]}},
                "status": {"allocatable": {keys.gpu_resource: str(gpus)},
                           "conditions": [{"type": "Ready", "status": "True"}]},
            })
    return nodes


def emulator_gpu(gpu_type: str) -> str:
    """``NVIDIA-H20`` (a node label value) → ``H20`` (the perf model's catalog name)."""
    name = gpu_type.upper()
    return name[len("NVIDIA-"):] if name.startswith("NVIDIA-") else name


# ---------------------------------------------------------------- processes

@dataclass(frozen=True)
class LocalSettings:
    """How the local actuator runs its instances.

    model: perf-model config the emulators run (``8b``/``32b``/``70b``).
    speedup: modelled seconds per wall second, passed to every emulator.
    startup_delay_s: modelled engine start-up (weights loading) before the port opens.
    sidecar_interval_s / sidecar_window_s: the sidecars' scrape interval and rate window.
    drain_timeout_s: wall seconds a draining instance may take to finish its requests.
    ready_timeout_s: wall seconds a starting instance may take before it is failed.
    stop_grace_s: wall seconds between SIGTERM and SIGKILL when stopping a process.
    gate_tolerance: ready-ratio gate band (see ``gate_admit``).
    poll_s: how often instance health is polled.
    log_dir: where each child's stdout/stderr go (``None``: discarded).
    emulator_args: extra flags for every emulator (e.g. ``("--tick", "0.1")``).
    """

    model: str = "8b"
    speedup: float = 1.0
    startup_delay_s: float = 8.0
    sidecar_interval_s: float = 1.0
    sidecar_window_s: float = 5.0
    drain_timeout_s: float = 30.0
    ready_timeout_s: float = 90.0
    stop_grace_s: float = 3.0
    gate_tolerance: float = 0.34
    poll_s: float = 0.5
    host: str = "127.0.0.1"
    python: str = sys.executable
    log_dir: Path | None = None
    emulator_args: tuple[str, ...] = ()


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:   # pragma: no cover - not glibc/Linux: no parent-death signal
        return None


# Resolved in the parent: the child, between fork and exec, only calls the function.
_LIBC = _load_libc()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM this child when its parent dies (Linux prctl)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Instance:
    """One engine+sidecar pair. Times are unix seconds (``time.time``)."""

    name: str
    service: str
    role: str
    group: str
    node: str
    gpu_type: str
    s1: str
    s2: str
    gpus: int
    engine_port: int
    kv_port: int
    sidecar_port: int
    created_s: float
    state: str = "starting"
    in_traffic: bool = False
    ready_s: float | None = None
    drain_started_s: float | None = None
    stopped_s: float | None = None
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"

    @property
    def sidecar_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar_port}"

    @property
    def live(self) -> bool:
        """Counted in the pools (spec): starting or ready, not draining."""
        return self.state in ("starting", "ready")

    @property
    def holds_gpus(self) -> bool:
        return self.state in ("starting", "ready", "draining")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "group": self.group, "node": self.node,
                "gpu_type": self.gpu_type, "s1": self.s1, "s2": self.s2, "state": self.state,
                "in_traffic": self.in_traffic, "engine_url": self.engine_url,
                "sidecar_url": self.sidecar_url, "created_s": self.created_s, "ready_s": self.ready_s}


InFlight = Callable[[str], int]


class LocalActuator:
    """Starts and stops emulator+sidecar pairs; placement decides where (see module docstring)."""

    name = "local"
    writes = True

    def __init__(self, *, cluster: SimulatedCluster | None = None, settings: LocalSettings = LocalSettings(),
                 in_flight: InFlight | None = None, clock: Callable[[], float] = time.time) -> None:
        self.cluster = cluster or SimulatedCluster.from_file(DEFAULT_TOPOLOGY)
        self.settings = settings
        self.in_flight = in_flight or (lambda name: 0)
        self.clock = clock
        self.instances: dict[str, Instance] = {}
        self.history: list[Instance] = []          # every instance ever started, for the report
        self._seq = itertools.count()
        self._group_seq = itertools.count(1)
        self._services: dict[str, "ServiceConfig"] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._lock = asyncio.Lock()
        self._bandwidth: dict[str, ServiceBandwidth | None] = {}
        self._tier_cache: dict[tuple[str, ...], str] | None = None
        self.placements: list[dict[str, Any]] = []     # the latest placement cycles, oldest first

    # ---------------------------------------------------------- Actuator seam

    async def observe(self, service: "ServiceConfig") -> PoolStatus:
        self._services[service.name] = service
        self._ensure_monitor()
        mine = [i for i in self.instances.values() if i.service == service.name]
        live = [i for i in mine if i.live]
        starting = [i for i in live if i.state == "starting"]
        return PoolStatus(
            current=_count(live),
            ready=_count(i for i in live if i.state == "ready"),
            pending=_count(starting),
            pending_since_s=min((i.created_s for i in starting), default=None),
            groups=tuple(self._group_docs(service.name)),
        )

    async def apply(self, service: "ServiceConfig", decision: Decision) -> ApplyResult:
        self._services[service.name] = service
        self._ensure_monitor()
        async with self._lock:
            result = self._plan(service, decision.desired)
            for alloc in result.allocations:
                for _ in range(alloc.count):
                    await self._start(service, alloc.role, group=alloc.dg, node=alloc.node,
                                      gpu_type=alloc.gpu_type, s1=alloc.s1, s2=alloc.s2,
                                      gpus=alloc.gpus // max(1, alloc.count))
            for release in result.releases:
                self._release(service.name, release.dg, release.role, release.count)
        placed = result.placed(service.name)
        shortfall = result.shortfall.get(service.name, PoolCounts(0, 0))
        whys = list(dict.fromkeys([a.why for a in result.allocations] + [r.why for r in result.releases]))
        self._remember_placement(service.name, decision, result)
        note = "; ".join([*whys, *result.reasons.get(service.name, ())])
        return ApplyResult(applied=placed, note=note, shortfall=shortfall)

    def _remember_placement(self, service: str, decision: Decision, result: PlacementPlan) -> None:
        """Keep what placement did and why (``placements``: the demo shows and reports them)."""
        self.placements.append({
            "at": self.clock(), "service": service, "reason": decision.reason,
            "from": decision.current.as_dict(), "to": decision.desired.as_dict(),
            "allocations": [a.to_dict() for a in result.allocations],
            "releases": [r.to_dict() for r in result.releases],
            "notes": list(result.reasons.get(service, ()))})
        del self.placements[:-PLACEMENTS_KEPT]

    async def close(self) -> None:
        """Stop every child process (all exit paths lead here)."""
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        await asyncio.gather(*(self._stop_procs(i) for i in self.instances.values()),
                             return_exceptions=True)
        for inst in self.instances.values():
            if inst.state != "failed":
                inst.state = "stopped"
            inst.stopped_s = inst.stopped_s or self.clock()
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def kill_all_now(self) -> None:
        """Last resort (synchronous, e.g. from ``atexit``): SIGKILL every child group."""
        for inst in self.instances.values():
            for proc in inst.procs:
                _signal_group(proc.pid, signal.SIGKILL)

    # ---------------------------------------------------------- ReportSource seam

    async def targets(self, service: "ServiceConfig") -> list[ReportTarget]:
        """Report URLs of the service's ready (and draining) instances."""
        return [ReportTarget(url=f"{i.sidecar_url}/v1/report", role=i.role, pod=i.name)
                for i in self.instances.values()
                if i.service == service.name and i.state in ("ready", "draining")]

    # ---------------------------------------------------------- router seam

    def routable(self, service: str | None = None) -> list[Instance]:
        return [i for i in self.instances.values()
                if i.in_traffic and i.state == "ready" and (service is None or i.service == service)]

    # ---------------------------------------------------------- TopologySource seam

    @property
    def switches(self) -> dict[str, tuple[str, str]]:
        """node name -> (S2, S1) of the simulated cluster (for the KV bandwidth map)."""
        return self.cluster.switches_of_nodes()

    @property
    def pod_groups(self) -> dict[str, str]:
        """instance name -> Deployment Group, for every instance holding GPUs."""
        return {i.name: i.group for i in self.instances.values() if i.holds_gpus}

    def all_pids(self) -> list[int]:
        return [pid for inst in self.history for pid in inst.pids()]

    # ---------------------------------------------------------- placement

    def _current_groups(self, service: str) -> list[DeploymentGroup]:
        svc = self._services[service]
        level = {"s1": "s1", "s2": "s2", "none": "cluster"}[svc.affinity]
        by_group: dict[str, list[Instance]] = {}
        for inst in self.instances.values():
            if inst.service == service and inst.live:
                by_group.setdefault(inst.group, []).append(inst)
        groups = []
        for name, members in sorted(by_group.items()):
            roles = {}
            for role in ROLES:
                of_role = [m for m in members if m.role == role]
                nodes: dict[str, int] = {}
                for m in of_role:
                    nodes[m.node] = nodes.get(m.node, 0) + 1
                gpu_type = of_role[0].gpu_type if of_role else self._role_types(svc, role)[0]
                roles[role] = RoleGroup(gpu_type, len(of_role), nodes)
            first = members[0]
            groups.append(DeploymentGroup(name=name, service=service, level=level,
                                          s2=first.s2 if level != "cluster" else "",
                                          s1=first.s1 if level == "s1" else "",
                                          prefill=roles["prefill"], decode=roles["decode"]))
        return groups

    @staticmethod
    def _role_types(svc: "ServiceConfig", role: str) -> tuple[str, ...]:
        types = svc.role(role).gpu_types
        if not types:
            raise ConfigError([f"services.{svc.name}.{role}.gpu_types: the local backend needs GPU types"],
                              source="config")
        return types

    def _plan(self, svc: "ServiceConfig", desired: PoolCounts):  # noqa: ANN202 - PlacementPlan
        used: dict[str, int] = {}
        for inst in self.instances.values():
            if inst.holds_gpus:
                used[inst.node] = used.get(inst.node, 0) + inst.gpus
        groups = self._current_groups(svc.name)
        hints = self._hints(svc, groups)
        result = plan(view=self.cluster.view(used), services=[with_bandwidth(demand_from_service(svc), hints)],
                      current={svc.name: groups}, desired={svc.name: desired})
        return result

    def use_bandwidth(self, service: str, bandwidth: ServiceBandwidth | None) -> None:
        """``seams.BandwidthAware``: the measured KV map the next placement of ``service`` uses."""
        self._bandwidth[service] = bandwidth

    def _hints(self, svc: "ServiceConfig", groups: list[DeploymentGroup]) -> PlacementHints:
        return placement_hints(self._bandwidth.get(svc.name), group_domains={g.name: g.domain for g in groups},
                               affinity_level=LEVEL_OF_AFFINITY[svc.affinity])

    def _group_docs(self, service: str) -> Iterable[dict[str, Any]]:
        """The service's DGs for the status page, as the Kubernetes DG actuator describes them
        (counts of live instances, ``tier`` of the switch domain, ``draining``), plus what this
        backend knows exactly: ``in_traffic`` per role, ``draining_by_role`` and the GPUs held
        (``gpus``, draining ones included, which they hold until they stop; ``gpus_draining``).
        A DG whose last instances are draining is still listed, with counts 0."""
        if service not in self._services:
            return []
        live = {dg.name: dg for dg in self._current_groups(service)}
        members: dict[str, list[Instance]] = {}
        for inst in self.instances.values():
            if inst.service == service and inst.holds_gpus:
                members.setdefault(inst.group, []).append(inst)
        docs = []
        for name in sorted(set(live) | set(members)):
            mine = members.get(name, [])
            dg = live.get(name) or self._emptied_group(service, name, mine)
            draining = [i for i in mine if i.state == "draining"]
            doc = dg.to_dict()
            doc["tier"] = self._tiers().get(dg.domain)
            doc["draining"] = len(draining)
            doc["draining_by_role"] = _count(draining).as_dict()
            doc["in_traffic"] = _count(i for i in mine if i.in_traffic).as_dict()
            doc["gpus"] = sum(i.gpus for i in mine)
            doc["gpus_draining"] = sum(i.gpus for i in draining)
            docs.append(doc)
        return docs

    def _emptied_group(self, service: str, name: str, members: list[Instance]) -> DeploymentGroup:
        """A DG with no live instance left (only draining ones): counts 0, same domain."""
        svc = self._services[service]
        level = {"s1": "s1", "s2": "s2", "none": "cluster"}[svc.affinity]
        first = members[0]
        roles = {role: RoleGroup(next((m.gpu_type for m in members if m.role == role),
                                      self._role_types(svc, role)[0]), 0, {}) for role in ROLES}
        return DeploymentGroup(name=name, service=service, level=level,
                               s2=first.s2 if level != "cluster" else "", s1=first.s1 if level == "s1" else "",
                               prefill=roles["prefill"], decode=roles["decode"])

    def _tiers(self) -> dict[tuple[str, ...], str]:
        """RDMA subgroup tier of every switch domain of the (static) simulated cluster, keyed
        like ``DeploymentGroup.domain``."""
        if self._tier_cache is None:
            view = self.cluster.view({})
            tiers: dict[tuple[str, ...], str] = {("s2", s2): t for s2, t in view.s2_tiers().items()}
            tiers.update({("s1", s2, s1): t for (s2, s1), t in view.s1_tiers().items()})
            if view.nodes:
                tiers[("cluster",)] = max((n.tier for n in view.nodes), key=TIER_VALUE.__getitem__)
            self._tier_cache = tiers
        return self._tier_cache

    # ---------------------------------------------------------- start / release / stop

    async def _start(self, svc: "ServiceConfig", role: str, *, group: str, node: str, gpu_type: str,
                     s1: str, s2: str, gpus: int) -> Instance:
        s = self.settings
        engine_port, kv_port, sidecar_port = free_ports(3, s.host)
        name = f"{svc.name}-{role[0]}{next(self._seq)}"
        inst = Instance(name=name, service=svc.name, role=role, group=group, node=node, gpu_type=gpu_type,
                        s1=s1, s2=s2, gpus=gpus, engine_port=engine_port, kv_port=kv_port,
                        sidecar_port=sidecar_port, created_s=self.clock())
        self.instances[name] = inst
        self.history.append(inst)
        tp = max(1, gpus)
        emulator = [s.python, "-m", "heteroscale", "emulate-engine", "--role", role, "--gpu", emulator_gpu(gpu_type),
                    "--model", s.model, "--tp", str(tp), "--port", str(engine_port), "--kv-port", str(kv_port),
                    "--host", s.host, "--speedup", repr(s.speedup), "--startup-delay", repr(s.startup_delay_s),
                    "--kv-location", f"{s2}/{s1}", *s.emulator_args]
        sidecar = [s.python, "-m", "heteroscale", "sidecar", "--engine", "vllm", "--engine-url", inst.engine_url,
                   "--role", role, "--service", svc.name, "--listen", f"{s.host}:{sidecar_port}",
                   "--interval", repr(s.sidecar_interval_s), "--window", repr(s.sidecar_window_s),
                   "--pod", name, "--node", node, "--gpu-source", "emulator",
                   "--emulator-gpu-url", f"{inst.engine_url}/emulator/gpu", "--log-level", "WARNING"]
        try:
            inst.procs.append(await self._spawn(emulator, f"{name}-engine"))
            inst.procs.append(await self._spawn(sidecar, f"{name}-sidecar"))
        except OSError as exc:
            log.error("%s: cannot start: %s", name, exc)
            inst.state = "failed"
            await self._stop_procs(inst)
        log.info("%s: starting %s on %s (%s, %s/%s)", name, role, node, gpu_type, s2, s1)
        return inst

    async def _spawn(self, argv: list[str], label: str) -> asyncio.subprocess.Process:
        out: Any = asyncio.subprocess.DEVNULL
        if self.settings.log_dir is not None:
            self.settings.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.settings.log_dir / f"{label}.log", "ab")   # noqa: SIM115 - the child owns it
        try:
            return await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            if out is not asyncio.subprocess.DEVNULL:
                out.close()

    def _release(self, service: str, group: str, role: str, count: int) -> None:
        """Pick ``count`` instances of ``role`` in ``group`` to leave: not-ready ones first,
        then the least busy; they leave traffic now and stop once drained."""
        members = [i for i in self.instances.values()
                   if i.service == service and i.group == group and i.role == role and i.live]
        svc = self._services.get(service)
        worst = self._hints(svc, self._current_groups(service)).worst_pods if svc is not None else ()
        rank = {name: k for k, name in enumerate(worst)}
        members.sort(key=lambda i: (i.state == "ready", rank.get(i.name, len(rank)), i.in_traffic,
                                    self.in_flight(i.name), -i.created_s))
        for inst in members[:count]:
            inst.in_traffic = False
            inst.state = "draining"
            inst.drain_started_s = self.clock()
            log.info("%s: draining (%s)", inst.name, role)

    async def _stop_procs(self, inst: Instance) -> None:
        for proc in inst.procs:
            if proc.returncode is None:
                _signal_group(proc.pid, signal.SIGTERM)
        for proc in inst.procs:
            try:
                await asyncio.wait_for(proc.wait(), self.settings.stop_grace_s)
            except asyncio.TimeoutError:
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()

    # ---------------------------------------------------------- monitoring

    def _ensure_monitor(self) -> None:
        if self._monitor is None and not self._closed:
            self._monitor = asyncio.create_task(self._monitor_loop(), name="local-actuator-monitor")

    async def _monitor_loop(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:   # the loop must survive any one bad poll
                log.exception("local actuator poll failed")
            await asyncio.sleep(self.settings.poll_s)

    async def poll(self) -> None:
        """One pass: health of starting instances, exits, drains, the gate."""
        now = self.clock()
        starting = [i for i in self.instances.values() if i.state == "starting"]
        healthy = await asyncio.gather(*(self._healthy(i) for i in starting))
        for inst, ok in zip(starting, healthy):
            if inst.state != "starting":
                continue
            if ok:
                inst.state, inst.ready_s = "ready", now
                log.info("%s: ready after %.1fs", inst.name, now - inst.created_s)
            elif now - inst.created_s > self.settings.ready_timeout_s:
                log.warning("%s: not ready after %.0fs; stopping it", inst.name, now - inst.created_s)
                inst.state = "failed"
                await self._stop_procs(inst)
        for inst in list(self.instances.values()):
            if inst.state in ("starting", "ready") and any(p.returncode is not None for p in inst.procs):
                log.warning("%s: a process exited (%s); stopping the pair", inst.name,
                            [p.returncode for p in inst.procs])
                inst.state, inst.in_traffic = "failed", False
                await self._stop_procs(inst)
            elif inst.state == "draining":
                waited = now - (inst.drain_started_s or now)
                if self.in_flight(inst.name) <= 0 or waited > self.settings.drain_timeout_s:
                    await self._stop_procs(inst)
                    inst.state, inst.stopped_s = "stopped", self.clock()
                    log.info("%s: stopped after draining %.1fs", inst.name, waited)
        for name in [n for n, i in self.instances.items() if i.state in ("stopped", "failed")]:
            inst = self.instances.pop(name)
            inst.stopped_s = inst.stopped_s or self.clock()
        self._apply_gate()

    def _apply_gate(self) -> None:
        for service, svc in self._services.items():
            groups: dict[str, list[Instance]] = {}
            for inst in self.instances.values():
                if inst.service == service and inst.state == "ready":
                    groups.setdefault(inst.group, []).append(inst)
            for members in groups.values():
                admitted = _count(i for i in members if i.in_traffic)
                waiting = [i for i in members if not i.in_traffic]
                allow = gate_admit(admitted, _count(waiting), ratio=tuple(svc.pd_ratio),
                                   tolerance=self.settings.gate_tolerance)
                for role, n in (("prefill", allow.prefill), ("decode", allow.decode)):
                    for inst in [i for i in waiting if i.role == role][:n]:
                        inst.in_traffic = True
                        log.info("%s: in traffic", inst.name)

    async def _healthy(self, inst: Instance) -> bool:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        try:
            async with self._session.get(f"{inst.engine_url}/health") as resp:
                if resp.status != 200:
                    return False
            async with self._session.get(f"{inst.sidecar_url}/readyz") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False


def _count(instances: Iterable[Instance]) -> PoolCounts:
    p = d = 0
    for inst in instances:
        if inst.role == "prefill":
            p += 1
        else:
            d += 1
    return PoolCounts(p, d)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
