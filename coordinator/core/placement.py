"""Where instances go: Deployment Groups and one scheduling cycle of PAPER.md Algorithm 4 (pure).

The policy says *how many* prefill and decode instances a service should run; this
module says *where*. It is pure: it reads a :class:`~heteroscale.coordinator.core.topology.ClusterView`
(built from Node objects by ``topology.build_view``), the services' current Deployment
Groups and the desired counts, and returns a :class:`PlacementPlan`. The live
Kubernetes actuator, the local demo actuator, the simulator and ``heteroscale place``
all call the same :func:`plan`.

API (stable)::

    plan(*, view: ClusterView, services: Sequence[ServiceDemand],
         current: Mapping[str, Sequence[DeploymentGroup]],
         desired: Mapping[str, PoolCounts]) -> PlacementPlan

    ServiceDemand(name, priority=0, affinity="s2", ratio=(1, 1),
                  prefill=RoleDemand(gpu_types=("NVIDIA-L20", "NVIDIA-H20"), gpus_per_instance=1),
                  decode=RoleDemand(gpu_types=("NVIDIA-H20",)))
    DeploymentGroup(name, service, level, s2, s1, prefill=RoleGroup(gpu_type, count, nodes),
                    decode=RoleGroup(...))
    PlacementPlan.allocations   # Allocation(service, dg, role, node, s1, s2, gpu_type, tier, count, new_dg, why)
    PlacementPlan.releases      # Release(service, dg, role, count, delete_dg, why)
    PlacementPlan.groups        # service -> the DGs after the plan (what the actuator should realise)
    PlacementPlan.shortfall     # service -> PoolCounts that could not be placed (scale-out)
    PlacementPlan.unreleased    # service -> PoolCounts that could not be removed without unbalancing a DG
    PlacementPlan.reasons       # service -> human-readable notes
    PlacementPlan.placed(service) -> PoolCounts   # counts after the plan

Concepts:

* A **Deployment Group** (DG, PAPER.md §3.2) holds M prefill and N decode instances
  inside one network domain of the service's ``affinity``: one S2 switch (``s2``),
  one S1 switch (``s1``), or the whole cluster (``none``). Each role of a DG uses one
  GPU type (it becomes one Kubernetes Deployment with node affinity to the domain
  and the type). A DG never holds prefill without decode, or decode without prefill.
* **Tiers** (``topology``): ``low`` < ``medium`` < ``high`` value. A candidate's tier
  is the highest tier of the nodes it would use.

One cycle (PAPER.md §3.5-3.6):

1. Services are handled in descending ``priority`` (then by name); what one service
   takes is reserved in the cycle's working view, so a later, lower-priority service
   cannot take it (virtual reservation). Released capacity is *not* reused in the same
   cycle: the next cycle rebuilds the view from the cluster (paper §3.5).
2. **Scale-out.** The missing ``ΔP`` prefill and ``ΔD`` decode instances are cut into
   small increments along the ratio line (``k = min(ΔP, ΔD)`` increments, each with
   ``≥ 1`` of both roles; e.g. ΔP=9, ΔD=7 gives seven increments of 1 or 2 prefill
   and 1 decode). Each increment is placed all-or-nothing inside one DG, so P and D of
   an increment always share a domain and a new DG is born balanced. Candidates are
   every existing DG of the service whose domain still has room, and a new DG in every
   compatible domain. They are ranked by the key

       (GPU-type preference rank, tier, new DG after growing one, domain order)

   i.e. the service's preferred GPU types first (falling back in the order given), then
   the least valuable tier, then growing an existing DG before opening a new one (the
   paper's rule that a new DG in a cheaper pool beats growing one in a scarce pool
   follows from tier coming before growth). The best candidate takes as many of the
   remaining increments as fit (Algorithm 4's inner ``while CanAssignOnePod``), then
   candidates are ranked again.
   When an increment fits nowhere the service stops there: what was placed is a
   prefix of the ratio path (the ratio is kept), the rest is the **shortfall**.
   Increments with only one role (the ratio itself moved) only grow existing DGs.
3. **Scale-in.** DGs are shrunk most valuable first: highest tier, then least preferred
   GPU types, then smallest (so it empties and goes). A DG is removed whole when the
   remaining cut covers it; otherwise it gives back increments along the ratio line
   while keeping at least one instance of each role. What cannot be removed without
   unbalancing a DG is reported as ``unreleased``.

Capacity is counted per node in whole instances (``free_gpus // gpus_per_instance``).
When prefill and decode share a GPU type but need different GPUs per instance, the
estimate uses the larger size (conservative) and the assignment double-checks.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from heteroscale.coordinator.core.topology import TIER_VALUE, TIERS, ClusterView, NodeView
from heteroscale.coordinator.core.types import PoolCounts
from heteroscale.errors import ConfigError

AFFINITIES = ("s1", "s2", "none")
LEVEL_OF_AFFINITY = {"s1": "s1", "s2": "s2", "none": "cluster"}
LEVELS = ("s1", "s2", "cluster")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RoleDemand:
    """One role's hardware needs: ``gpu_types`` in order of preference (node label
    values; the first is preferred, the rest are fallbacks) and ``gpus_per_instance``
    (whole GPUs one instance takes on one node)."""

    gpu_types: tuple[str, ...]
    gpus_per_instance: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_types", tuple(self.gpu_types))
        problems = []
        if not self.gpu_types or not all(isinstance(t, str) and t for t in self.gpu_types):
            problems.append("gpu_types must be a non-empty list of label values")
        elif len(set(self.gpu_types)) != len(self.gpu_types):
            problems.append("gpu_types lists a type twice")
        if not isinstance(self.gpus_per_instance, int) or isinstance(self.gpus_per_instance, bool) \
                or self.gpus_per_instance < 1:
            problems.append("gpus_per_instance must be an integer >= 1")
        if problems:
            raise ConfigError(problems, source="deployment group")

    def rank(self, gpu_type: str) -> int | None:
        return self.gpu_types.index(gpu_type) if gpu_type in self.gpu_types else None


@dataclass(frozen=True)
class ServiceDemand:
    """What placement needs to know of a service (a thin view of its config).

    ``priority``: higher is placed first in a cycle. ``affinity``: the domain a DG must
    fit in (``s1`` tightest, ``s2``, or ``none`` = the whole cluster). ``ratio``:
    the configured prefill:decode ratio ``(P, D)``, used to judge DG balance.
    """

    name: str
    priority: int = 0
    affinity: str = "s2"
    ratio: tuple[int, int] = (1, 1)
    prefill: RoleDemand = field(default_factory=lambda: RoleDemand(("gpu",)))
    decode: RoleDemand = field(default_factory=lambda: RoleDemand(("gpu",)))
    slow_domains: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    """Domains whose measured KV bandwidth is well below their peers' (``core.bandwidth.
    placement_hints``), with why: scale-out prefers other domains (after GPU-type
    preference), scale-in releases these first."""
    new_level: str | None = None
    """A tighter level for NEW groups (``s2`` for an ``affinity: none`` service whose
    cross-switch pairs measure slow): no new group straddles the slow links."""
    new_level_reason: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not self.name:
            problems.append("name must be a non-empty string")
        if self.affinity not in AFFINITIES:
            problems.append(f"affinity must be one of {', '.join(AFFINITIES)}, got {self.affinity!r}")
        if (not isinstance(self.ratio, tuple) or len(self.ratio) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in self.ratio)):
            problems.append(f"ratio must be two positive integers (P, D), got {self.ratio!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            problems.append("priority must be an integer")
        if self.new_level is not None and self.new_level not in LEVELS:
            problems.append(f"new_level must be one of {', '.join(LEVELS)}, got {self.new_level!r}")
        if problems:
            raise ConfigError(problems, source=f"service {self.name!r}")

    @property
    def level(self) -> str:
        return LEVEL_OF_AFFINITY[self.affinity]

    @property
    def creates_at(self) -> str:
        """The level of a new group: the affinity's, or the tighter ``new_level``."""
        return self.new_level or self.level

    def slow(self, domain: tuple[str, ...]) -> str | None:
        """Why ``domain`` is avoided, or ``None``. Groups at the affinity's own level are
        avoided too while new groups must be tighter (they straddle the slow links)."""
        if domain in self.slow_domains:
            return self.slow_domains[domain]
        if self.new_level is not None and domain[0] == self.level != self.new_level:
            return self.new_level_reason or "straddles slow links"
        return None

    def role(self, role: str) -> RoleDemand:
        return self.prefill if role == "prefill" else self.decode


@dataclass(frozen=True)
class RoleGroup:
    """One role of a DG: its GPU type, instance count and, where known, instances per node."""

    gpu_type: str
    count: int = 0
    nodes: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gpu_type": self.gpu_type, "count": self.count}
        if self.nodes:
            out["nodes"] = dict(sorted(self.nodes.items()))
        return out


@dataclass(frozen=True)
class DeploymentGroup:
    """A service's prefill and decode instances inside one domain.

    ``level``: ``s1``, ``s2`` or ``cluster``; ``s2``/``s1``: the switch label values
    that pin the domain (``s1`` is ``""`` for an S2-level DG, both are ``""`` at cluster
    level).
    """

    name: str
    service: str
    level: str
    s2: str
    s1: str
    prefill: RoleGroup
    decode: RoleGroup

    @property
    def domain(self) -> tuple[str, ...]:
        return _domain_key(self.level, self.s2, self.s1)

    @property
    def counts(self) -> PoolCounts:
        return PoolCounts(self.prefill.count, self.decode.count)

    def role(self, role: str) -> RoleGroup:
        return self.prefill if role == "prefill" else self.decode

    def balanced(self) -> bool:
        """True when the DG holds both roles or neither (never P without D)."""
        return (self.prefill.count == 0) == (self.decode.count == 0)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "service": self.service, "level": self.level,
                "s2": self.s2, "s1": self.s1,
                "prefill": self.prefill.to_dict(), "decode": self.decode.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, service: str | None = None) -> DeploymentGroup:
        """Parse a DG; raises ``ValueError`` naming the first bad field."""
        if not isinstance(data, Mapping):
            raise ValueError("a deployment group must be a mapping")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("a deployment group needs a name")
        level = data.get("level", "s2")
        if level not in LEVELS:
            raise ValueError(f"group {name}: level must be one of {', '.join(LEVELS)}")
        roles = {}
        for role in ("prefill", "decode"):
            raw = data.get(role)
            if not isinstance(raw, Mapping) or not isinstance(raw.get("gpu_type"), str):
                raise ValueError(f"group {name}: {role} needs gpu_type and count")
            count = raw.get("count", 0)
            nodes = raw.get("nodes") or {}
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"group {name}: {role}.count must be an integer >= 0")
            if not isinstance(nodes, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in nodes.items()):
                raise ValueError(f"group {name}: {role}.nodes must map node names to counts")
            if nodes and sum(nodes.values()) != count:
                raise ValueError(f"group {name}: {role}.nodes adds up to {sum(nodes.values())}, not {count}")
            roles[role] = RoleGroup(raw["gpu_type"], count, dict(nodes))
        s2 = str(data.get("s2") or "")
        s1 = str(data.get("s1") or "")
        if level in ("s1", "s2") and not s2:
            raise ValueError(f"group {name}: an {level} group needs s2")
        if level == "s1" and not s1:
            raise ValueError(f"group {name}: an s1 group needs s1")
        return cls(name=name, service=str(data.get("service") or service or ""), level=level,
                   s2=s2 if level != "cluster" else "", s1=s1 if level == "s1" else "",
                   prefill=roles["prefill"], decode=roles["decode"])


def demand_from_service(service: Any, *, cluster_types: Iterable[str] = ()) -> ServiceDemand:
    """Map a coordinator ``ServiceConfig`` (duck-typed: ``name``, ``priority``, ``affinity``,
    ``pd_ratio``, ``prefill``/``decode`` with ``gpu_types`` and ``gpus_per_instance``) to a
    :class:`ServiceDemand`.

    A role with no ``gpu_types`` accepts every GPU type of the cluster, in name order
    (``cluster_types``); raises ``ValueError`` if there is none to choose from.
    """
    fallback = tuple(sorted(set(cluster_types)))

    def role(cfg: Any) -> RoleDemand:
        types = tuple(getattr(cfg, "gpu_types", ()) or ()) or fallback
        if not types:
            raise ValueError(f"service {service.name}: no GPU types configured and none in the cluster")
        return RoleDemand(types, int(getattr(cfg, "gpus_per_instance", 1)))

    return ServiceDemand(name=service.name, priority=int(getattr(service, "priority", 0)),
                         affinity=str(getattr(service, "affinity", "none")),
                         ratio=tuple(getattr(service, "pd_ratio", (1, 1))),
                         prefill=role(service.prefill), decode=role(service.decode))


def with_bandwidth(demand: ServiceDemand, hints: Any) -> ServiceDemand:
    """``demand`` with the measured-bandwidth preferences of ``core.bandwidth.placement_hints``."""
    if not hints.slow_domains and hints.new_level is None:
        return demand
    new_level = hints.new_level if hints.new_level is not None and LEVELS.index(hints.new_level) < \
        LEVELS.index(demand.level) else None
    return replace(demand, slow_domains=dict(hints.slow_domains), new_level=new_level,
                   new_level_reason=hints.new_level_reason if new_level else "")


# ---------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Allocation:
    """``count`` new instances of ``role`` for DG ``dg`` on ``node`` (virtually reserved)."""

    service: str
    dg: str
    role: str
    node: str
    s1: str
    s2: str
    gpu_type: str
    tier: str
    count: int
    gpus: int
    new_dg: bool
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "role": self.role, "node": self.node, "s1": self.s1,
                "s2": self.s2, "gpu_type": self.gpu_type, "tier": self.tier, "dg": self.dg,
                "count": self.count, "gpus": self.gpus, "new_dg": self.new_dg, "why": self.why}


@dataclass(frozen=True)
class Release:
    """``count`` instances of ``role`` leave DG ``dg``; ``delete_dg`` when it empties."""

    service: str
    dg: str
    role: str
    count: int
    delete_dg: bool
    tier: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "dg": self.dg, "role": self.role, "count": self.count,
                "delete_dg": self.delete_dg, "tier": self.tier, "why": self.why}


@dataclass(frozen=True)
class PlacementPlan:
    allocations: tuple[Allocation, ...]
    releases: tuple[Release, ...]
    groups: Mapping[str, tuple[DeploymentGroup, ...]]
    shortfall: Mapping[str, PoolCounts]
    unreleased: Mapping[str, PoolCounts]
    reasons: Mapping[str, tuple[str, ...]]

    def placed(self, service: str) -> PoolCounts:
        groups = self.groups.get(service, ())
        return PoolCounts(sum(g.prefill.count for g in groups), sum(g.decode.count for g in groups))

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocations": [a.to_dict() for a in self.allocations],
            "releases": [r.to_dict() for r in self.releases],
            "groups": {s: [g.to_dict() for g in gs] for s, gs in self.groups.items()},
            "shortfall": {s: c.as_dict() for s, c in self.shortfall.items()},
            "unreleased": {s: c.as_dict() for s, c in self.unreleased.items()},
            "reasons": {s: list(r) for s, r in self.reasons.items()},
        }


# ---------------------------------------------------------------- small pure helpers


def _domain_key(level: str, s2: str, s1: str) -> tuple[str, ...]:
    if level == "s1":
        return ("s1", s2, s1)
    if level == "s2":
        return ("s2", s2)
    return ("cluster",)


def _node_domains(node: NodeView) -> tuple[tuple[str, ...], ...]:
    return (("s1", node.s2, node.s1), ("s2", node.s2), ("cluster",))


def _domain_label(domain: tuple[str, ...]) -> str:
    if domain[0] == "s1":
        return f"s1 {domain[2]} (s2 {domain[1]})"
    if domain[0] == "s2":
        return f"s2 {domain[1]}"
    return "cluster"


def split_increments(delta_prefill: int, delta_decode: int) -> list[tuple[int, int]]:
    """Cut a scale-out (or scale-in) delta into small steps along the ratio line.

    With both deltas positive: ``k = min(ΔP, ΔD)`` steps, step ``i`` gets
    ``floor((i+1)·ΔP/k) − floor(i·ΔP/k)`` prefill (likewise decode), so every step has at
    least one of each role and every prefix stays on the ratio line.
    Worked example: (9, 7) → [(1,1), (1,1), (2,1), (1,1), (1,1), (2,1), (1,1)].
    With one delta zero: single-instance steps of the other role.
    """
    if delta_prefill < 0 or delta_decode < 0:
        raise ValueError("deltas must be >= 0")
    if delta_prefill == 0 or delta_decode == 0:
        return [(1, 0)] * delta_prefill + [(0, 1)] * delta_decode
    k = min(delta_prefill, delta_decode)
    return [((i + 1) * delta_prefill // k - i * delta_prefill // k,
             (i + 1) * delta_decode // k - i * delta_decode // k) for i in range(k)]


_Cum = tuple[list[int], list[int], list[int]]


def _prefix(steps: Sequence[tuple[int, int]]) -> _Cum:
    """Cumulative prefill, decode and total instances after each step."""
    cum_p, cum_d, cum_t, p, d = [], [], [], 0, 0
    for sp, sd in steps:
        p += sp
        d += sd
        cum_p.append(p)
        cum_d.append(d)
        cum_t.append(p + d)
    return cum_p, cum_d, cum_t


# ---------------------------------------------------------------- the working view


class _Working:
    """The cycle's mutable copy of free GPUs, indexed by domain and GPU type.

    Capacity queries are cached per domain and dropped when a node of the domain
    changes, so one cycle over thousands of nodes stays in the millisecond range.
    """

    def __init__(self, view: ClusterView) -> None:
        self.nodes: dict[str, NodeView] = {n.name: n for n in view.nodes}
        self.free: dict[str, int] = {n.name: n.free_gpus for n in view.nodes}
        self.index: dict[tuple[str, ...], dict[str, list[str]]] = {}
        self.domains_by_type: dict[tuple[str, str], set[tuple[str, ...]]] = {}
        order = sorted(view.nodes, key=lambda n: (TIER_VALUE[n.tier], n.name))
        for node in order:
            for domain in _node_domains(node):
                self.index.setdefault(domain, {}).setdefault(node.gpu_type, []).append(node.name)
                self.domains_by_type.setdefault((domain[0], node.gpu_type), set()).add(domain)
        self._cache: dict[tuple[str, ...], dict[tuple[str, int], tuple[int, int, int]]] = {}
        self._sorted_domains: dict[tuple[str, str, str], list[tuple[str, ...]]] = {}

    def domain_tier(self, domain: tuple[str, ...], gpu_types: Iterable[str]) -> str:
        best = 0
        for gpu_type in gpu_types:
            for name in self.index.get(domain, {}).get(gpu_type, ()):
                best = max(best, TIER_VALUE[self.nodes[name].tier])
        return TIERS[best]

    def capacity(self, domain: tuple[str, ...], gpu_type: str, gpus: int) -> tuple[int, int, int]:
        """Instances of ``gpus`` GPUs that still fit, counting nodes up to each tier."""
        per_domain = self._cache.setdefault(domain, {})
        hit = per_domain.get((gpu_type, gpus))
        if hit is not None:
            return hit
        by_tier = [0, 0, 0]
        for name in self.index.get(domain, {}).get(gpu_type, ()):
            by_tier[TIER_VALUE[self.nodes[name].tier]] += self.free[name] // gpus
        result = (by_tier[0], by_tier[0] + by_tier[1], by_tier[0] + by_tier[1] + by_tier[2])
        per_domain[(gpu_type, gpus)] = result
        return result

    def candidate_domains(self, level: str, type_p: str, type_d: str) -> list[tuple[str, ...]]:
        key = (level, type_p, type_d)
        if key not in self._sorted_domains:
            both = (self.domains_by_type.get((level, type_p), set())
                    & self.domains_by_type.get((level, type_d), set()))
            self._sorted_domains[key] = sorted(both)
        return self._sorted_domains[key]

    def take(self, domain: tuple[str, ...], gpu_type: str, *, gpus: int, count: int,
             max_tier: int) -> list[tuple[str, int]] | None:
        """Reserve ``count`` instances on nodes of the domain, lowest tier first;
        returns ``[(node, instances)]`` or ``None`` (and reserves nothing) if they do not fit."""
        picked: list[tuple[str, int]] = []
        left = count
        for name in self.index.get(domain, {}).get(gpu_type, ()):
            if left == 0:
                break
            if TIER_VALUE[self.nodes[name].tier] > max_tier:
                break  # the list is sorted by tier
            fits = min(self.free[name] // gpus, left)
            if fits > 0:
                picked.append((name, fits))
                left -= fits
        if left > 0:
            return None
        for name, fits in picked:
            self._reserve(name, fits * gpus)
        return picked

    def give_back(self, picked: Iterable[tuple[str, int]], gpus: int) -> None:
        for name, fits in picked:
            self._reserve(name, -fits * gpus)

    def _reserve(self, name: str, gpus: int) -> None:
        self.free[name] -= gpus
        for domain in _node_domains(self.nodes[name]):
            self._cache.pop(domain, None)


# ---------------------------------------------------------------- scale-out


@dataclass
class _Group:
    """A DG being edited during the cycle."""

    dg: DeploymentGroup
    new: bool
    prefill_nodes: dict[str, int]
    decode_nodes: dict[str, int]
    prefill: int
    decode: int

    @classmethod
    def of(cls, dg: DeploymentGroup, *, new: bool = False) -> _Group:
        return cls(dg, new, dict(dg.prefill.nodes), dict(dg.decode.nodes), dg.prefill.count, dg.decode.count)

    def freeze(self) -> DeploymentGroup:
        return replace(self.dg,
                       prefill=RoleGroup(self.dg.prefill.gpu_type, self.prefill,
                                         {k: v for k, v in self.prefill_nodes.items() if v > 0}),
                       decode=RoleGroup(self.dg.decode.gpu_type, self.decode,
                                        {k: v for k, v in self.decode_nodes.items() if v > 0}))


@dataclass(frozen=True)
class _Candidate:
    key: tuple[Any, ...]
    domain: tuple[str, ...]
    type_p: str
    type_d: str
    tier: int
    fits: int
    group: _Group | None


def _fits(work: _Working, svc: ServiceDemand, domain: tuple[str, ...], type_p: str, type_d: str,
          cum: _Cum, tier: int) -> int:
    """How many of the remaining increments (a prefix) fit in the domain at ``tier``."""
    cum_p, cum_d, cum_t = cum
    gp, gd = svc.prefill.gpus_per_instance, svc.decode.gpus_per_instance
    if type_p == type_d:
        size = max(gp, gd)
        slots = work.capacity(domain, type_p, size)[tier]
        return bisect.bisect_right(cum_t, slots)
    cap_p = work.capacity(domain, type_p, gp)[tier] if cum_p[-1] else 0
    cap_d = work.capacity(domain, type_d, gd)[tier] if cum_d[-1] else 0
    return min(bisect.bisect_right(cum_p, cap_p), bisect.bisect_right(cum_d, cap_d))


def _best_candidate(work: _Working, svc: ServiceDemand, groups: list[_Group],
                    cum: _Cum, *, new_allowed: bool) -> _Candidate | None:
    """The first candidate in key order (type rank, slow domain last, tier, grow-before-new,
    domain): a domain with measured KV-bandwidth trouble is taken only when no healthy
    one of the same GPU types fits."""
    combos = sorted(((rp + rd, rp, rd, tp, td)
                     for rp, tp in enumerate(svc.prefill.gpu_types)
                     for rd, td in enumerate(svc.decode.gpu_types)))
    levels = {svc.level, svc.creates_at}
    for _, rp, rd, tp, td in combos:
        growable = [g for g in groups if g.dg.level in levels
                    and g.dg.prefill.gpu_type == tp and g.dg.decode.gpu_type == td
                    # a single-role step may only grow a DG that already holds both roles
                    and (new_allowed or (g.prefill > 0 and g.decode > 0))]
        used = {g.dg.domain for g in growable}
        for slow in (False, True):
            for tier in range(len(TIERS)):
                for group in sorted(growable, key=lambda g: g.dg.name):
                    if (svc.slow(group.dg.domain) is not None) != slow:
                        continue
                    fits = _fits(work, svc, group.dg.domain, tp, td, cum, tier)
                    if fits:
                        return _Candidate((rp + rd, slow, tier, 0), group.dg.domain, tp, td, tier, fits, group)
                if not new_allowed:
                    continue
                for domain in work.candidate_domains(svc.creates_at, tp, td):
                    if domain in used or (svc.slow(domain) is not None) != slow:
                        continue
                    fits = _fits(work, svc, domain, tp, td, cum, tier)
                    if fits:
                        return _Candidate((rp + rd, slow, tier, 1), domain, tp, td, tier, fits, None)
    return None


def _new_group_name(service: str, taken: set[str]) -> str:
    n = 0
    while f"{service}-g{n}" in taken:
        n += 1
    return f"{service}-g{n}"


def _scale_out(work: _Working, svc: ServiceDemand, groups: list[_Group], delta: PoolCounts,
               allocations: list[Allocation], notes: list[str]) -> PoolCounts:
    """Place ``delta`` for one service; returns the shortfall."""
    steps = split_increments(delta.prefill, delta.decode)
    both_roles = delta.prefill > 0 and delta.decode > 0
    gp, gd = svc.prefill.gpus_per_instance, svc.decode.gpus_per_instance
    while steps:
        cum = _prefix(steps)
        cand = _best_candidate(work, svc, groups, cum, new_allowed=both_roles)
        if cand is None:
            break
        fits = cand.fits
        while fits > 0:
            want_p, want_d = cum[0][fits - 1], cum[1][fits - 1]
            got_p = work.take(cand.domain, cand.type_p, gpus=gp, count=want_p, max_tier=cand.tier)
            got_d = None
            if got_p is not None:
                got_d = work.take(cand.domain, cand.type_d, gpus=gd, count=want_d, max_tier=cand.tier)
                if got_d is None:
                    work.give_back(got_p, gp)
            if got_p is not None and got_d is not None:
                break
            fits -= 1  # only when P and D share a type with different sizes
        if fits == 0:
            break
        group = cand.group
        if group is None:
            taken = {g.dg.name for g in groups}
            level, s2, s1 = cand.domain[0], (cand.domain[1] if len(cand.domain) > 1 else ""), \
                (cand.domain[2] if len(cand.domain) > 2 else "")
            group = _Group.of(DeploymentGroup(
                name=_new_group_name(svc.name, taken), service=svc.name, level=level, s2=s2, s1=s1,
                prefill=RoleGroup(cand.type_p), decode=RoleGroup(cand.type_d)), new=True)
            groups.append(group)
        tier_name = TIERS[cand.tier]
        why = (f"{'new DG' if cand.group is None else 'grow DG'} in {_domain_label(cand.domain)}: "
               f"GPU types {cand.type_p}/{cand.type_d} (preference rank {cand.key[0]}), "
               f"{tier_name} tier is the least valuable that fits")
        slow_why = svc.slow(cand.domain)
        if slow_why is not None:
            why += f"; measured KV bandwidth is low here ({slow_why}), but no healthy domain fits"
        elif svc.slow_domains or svc.new_level:
            why += "; measured KV bandwidth: domains with slow links avoided"
        for role, got, size, gpu_type, nodes in (
                ("prefill", got_p, gp, cand.type_p, group.prefill_nodes),
                ("decode", got_d, gd, cand.type_d, group.decode_nodes)):
            for name, count in got or ():
                node = work.nodes[name]
                nodes[name] = nodes.get(name, 0) + count
                allocations.append(Allocation(
                    service=svc.name, dg=group.dg.name, role=role, node=name, s1=node.s1, s2=node.s2,
                    gpu_type=gpu_type, tier=node.tier, count=count, gpus=count * size,
                    new_dg=group.new, why=why))
        group.prefill += cum[0][fits - 1]
        group.decode += cum[1][fits - 1]
        steps = steps[fits:]
    short = PoolCounts(sum(s[0] for s in steps), sum(s[1] for s in steps))
    if short.total():
        if not both_roles and not any(g.prefill or g.decode for g in groups):
            notes.append(f"cannot add {short.prefill} prefill / {short.decode} decode alone: "
                         "a new DG needs both roles")
        else:
            present = {node.gpu_type for node in work.nodes.values()}
            unknown = [(role, demand.gpu_types) for role, demand in (("prefill", svc.prefill), ("decode", svc.decode))
                       if not present & set(demand.gpu_types)]
            if unknown:
                # The usual cause is a type spelled differently from the node labels
                # (GPU feature discovery writes e.g. NVIDIA-H20): say that, not "no room".
                for role, types in unknown:
                    notes.append(f"shortfall: no schedulable node has a {role} GPU type "
                                 f"{'/'.join(types)} (types present: {', '.join(sorted(present)) or 'none'})")
            else:
                notes.append(f"shortfall: no compatible domain ({svc.affinity} affinity, prefill "
                             f"{'/'.join(svc.prefill.gpu_types)}, decode {'/'.join(svc.decode.gpu_types)}) "
                             f"has room for {short.prefill} prefill + {short.decode} decode more")
    return short


# ---------------------------------------------------------------- scale-in


def _group_tier(work: _Working, group: _Group) -> int:
    names = list(group.prefill_nodes) + list(group.decode_nodes)
    known = [TIER_VALUE[work.nodes[n].tier] for n in names if n in work.nodes]
    if known:
        return max(known)
    tier = work.domain_tier(group.dg.domain, (group.dg.prefill.gpu_type, group.dg.decode.gpu_type))
    return TIER_VALUE[tier]


def _type_rank(svc: ServiceDemand, group: _Group) -> int:
    rp = svc.prefill.rank(group.dg.prefill.gpu_type)
    rd = svc.decode.rank(group.dg.decode.gpu_type)
    return (len(svc.prefill.gpu_types) if rp is None else rp) + \
        (len(svc.decode.gpu_types) if rd is None else rd)


def _drop_from_nodes(work: _Working, nodes: dict[str, int], count: int) -> None:
    """Forget ``count`` instances from the highest-tier nodes first (where known)."""
    order = sorted(nodes, key=lambda n: (-TIER_VALUE[work.nodes[n].tier] if n in work.nodes else -9, n))
    for name in order:
        if count == 0:
            break
        take = min(nodes[name], count)
        nodes[name] -= take
        count -= take


def _scale_in(work: _Working, svc: ServiceDemand, groups: list[_Group], delta: PoolCounts,
              releases: list[Release], notes: list[str]) -> PoolCounts:
    """Remove ``delta`` (counts to remove) for one service; returns what could not be removed."""
    left_p, left_d = delta.prefill, delta.decode
    order = sorted(groups, key=lambda g: (svc.slow(g.dg.domain) is None, -_group_tier(work, g),
                                          -_type_rank(svc, g), g.prefill + g.decode, g.dg.name))
    for group in order:
        if left_p == 0 and left_d == 0:
            break
        tier = TIERS[_group_tier(work, group)]
        if group.prefill <= left_p and group.decode <= left_d:
            rp, rd, whole = group.prefill, group.decode, True
        else:
            rp = rd = 0
            for sp, sd in split_increments(left_p, left_d):
                # keep at least one of each role; a step that does not fit is skipped
                if rp + sp <= group.prefill - 1 and rd + sd <= group.decode - 1:
                    rp, rd = rp + sp, rd + sd
            whole = False
        if rp == 0 and rd == 0:
            continue
        slow_why = svc.slow(group.dg.domain)
        why = (f"{'remove DG' if whole else 'shrink DG'} in {_domain_label(group.dg.domain)}: "
               + (f"measured KV bandwidth is low here ({slow_why}): released first" if slow_why is not None
                  else f"{tier} tier pools are released first"))
        for role, count in (("prefill", rp), ("decode", rd)):
            if count:
                releases.append(Release(service=svc.name, dg=group.dg.name, role=role, count=count,
                                        delete_dg=whole, tier=tier, why=why))
        _drop_from_nodes(work, group.prefill_nodes, rp)
        _drop_from_nodes(work, group.decode_nodes, rd)
        group.prefill -= rp
        group.decode -= rd
        left_p -= rp
        left_d -= rd
    if left_p or left_d:
        notes.append(f"kept {left_p} prefill / {left_d} decode more than desired: removing them "
                     "would leave a DG with one role only")
    return PoolCounts(left_p, left_d)


# ---------------------------------------------------------------- the cycle


def plan(*, view: ClusterView, services: Sequence[ServiceDemand],
         current: Mapping[str, Sequence[DeploymentGroup]],
         desired: Mapping[str, PoolCounts]) -> PlacementPlan:
    """One scheduling cycle (see the module docstring). Pure: the inputs are not changed.

    Services without an entry in ``desired`` keep their DGs unchanged (their
    capacity is already counted in ``view``). Raises ``ValueError`` for a desired
    count below zero or a service named twice.
    """
    names = [s.name for s in services]
    if len(set(names)) != len(names):
        raise ValueError("a service is listed twice")
    work = _Working(view)
    allocations: list[Allocation] = []
    releases: list[Release] = []
    groups_out: dict[str, tuple[DeploymentGroup, ...]] = {}
    shortfall: dict[str, PoolCounts] = {}
    unreleased: dict[str, PoolCounts] = {}
    reasons: dict[str, tuple[str, ...]] = {}
    for svc in sorted(services, key=lambda s: (-s.priority, s.name)):
        groups = [_Group.of(dg) for dg in current.get(svc.name, ())]
        target = desired.get(svc.name)
        notes: list[str] = []
        if target is not None:
            if target.prefill < 0 or target.decode < 0:
                raise ValueError(f"service {svc.name}: desired counts must be >= 0")
            have = PoolCounts(sum(g.prefill for g in groups), sum(g.decode for g in groups))
            cut = PoolCounts(max(0, have.prefill - target.prefill), max(0, have.decode - target.decode))
            grow = PoolCounts(max(0, target.prefill - have.prefill), max(0, target.decode - have.decode))
            if cut.total():
                left = _scale_in(work, svc, groups, cut, releases, notes)
                if left.total():
                    unreleased[svc.name] = left
            if grow.total():
                short = _scale_out(work, svc, groups, grow, allocations, notes)
                if short.total():
                    shortfall[svc.name] = short
        groups_out[svc.name] = tuple(g.freeze() for g in groups if g.prefill or g.decode)
        reasons[svc.name] = tuple(notes)
    return PlacementPlan(allocations=tuple(allocations), releases=tuple(releases), groups=groups_out,
                         shortfall=shortfall, unreleased=unreleased, reasons=reasons)
