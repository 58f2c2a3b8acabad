"""Replay adapter for the coordinator's placement planner (pure).

When ``simulation.topology`` is configured, every scaling decision in the
simulator goes through ``heteroscale.coordinator.core.placement.plan`` — the function the
live actuators call — against a synthetic cluster of S2/S1 switches and GPU nodes.
What the plan places is what the simulated service gets (a shortfall caps a
scale-out), and the plan's Deployment Groups decide how much KV traffic crosses
switches: a request's prefill and decode instances are taken to be a random pair
inside one DG (DGs weighted by their instance count), and a pair under different
S1 switches transfers at ``cross_switch_ratio`` of the same-switch bandwidth.

Each simulated instance carries the node, Deployment Group and S1 switch the plan gave
it (``realise`` keeps the cluster's instances in line with the plan's per-node counts),
so ``simulation.degraded_links`` (keyed by S1 switch, in node order: ``s2`` index ×
``s1_per_s2`` + S1 index) slows exactly the instances placed under that switch, and a
prefill's KV goes to a decode instance of its own DG.

**Measured bandwidth** (``bandwidth_aware``, the default): every tick the simulated
sidecars' reports (per-instance KV transfer speed, as an engine connector measures it)
go through the coordinator's own ``core.bandwidth.build_bandwidth_map`` and
``placement_hints``, and the next plan runs on ``with_bandwidth(demand, hints)``: scale-out
prefers domains whose DGs measure healthy, scale-in releases the slow domain first and,
inside a DG, the instances of the worst measured pairs first — what the live actuators
(``coordinator/actuators/groups.py``, ``local.py``) do. ``bandwidth_aware=False`` plans
blind to the map (the comparison in ``benchmarks/kv_degraded_bench.py``).

``TopologySpec`` builds the nodes: ``s2`` switches × ``s1_per_s2`` S1 switches ×
``nodes_per_s1`` nodes of ``gpus_per_node`` GPUs. ``mix: s1`` puts every GPU type
under each S1 (alternating nodes: the paper's high tier); ``mix: s2`` keeps each S1
to one type and alternates types across the S1s of an S2 (medium tier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from heteroscale.coordinator.core import bandwidth as coord_bandwidth
from heteroscale.coordinator.core import placement as coord_placement
from heteroscale.coordinator.core.topology import ClusterView, NodeView, classify_tiers
from heteroscale.coordinator.core.types import PoolCounts

if TYPE_CHECKING:
    from heteroscale.coordinator.core.settings import ServiceConfig
    from heteroscale.report import SidecarReport
    from heteroscale.simulator.model.cluster import Cluster, ClusterSpec

MIXES = ("s1", "s2")


@dataclass(frozen=True)
class TopologySpec:
    s2: int = 2
    s1_per_s2: int = 2
    nodes_per_s1: int = 8
    gpus_per_node: int = 8
    mix: str = "s1"

    def __post_init__(self) -> None:
        if min(self.s2, self.s1_per_s2, self.nodes_per_s1, self.gpus_per_node) < 1:
            raise ValueError("topology: every count must be >= 1")
        if self.mix not in MIXES:
            raise ValueError(f"topology.mix must be one of {', '.join(MIXES)}")

    def nodes(self, gpu_types: tuple[str, ...]) -> tuple[NodeView, ...]:
        out = []
        for a in range(self.s2):
            for b in range(self.s1_per_s2):
                for c in range(self.nodes_per_s1):
                    k = c if self.mix == "s1" else b
                    out.append(NodeView(name=f"n-{a}-{b}-{c}", gpu_type=gpu_types[k % len(gpu_types)],
                                        s1=f"s1-{a}-{b}", s2=f"s2-{a}",
                                        allocatable_gpus=self.gpus_per_node, free_gpus=self.gpus_per_node))
        return classify_tiers(out)


def demand_for(service: "ServiceConfig", cluster: "ClusterSpec") -> coord_placement.ServiceDemand:
    """The planner's view of a simulated service: its configured GPU types if any, else the
    simulated ones, and GPUs per instance = the simulated tensor parallelism."""
    def role(cfg, inst) -> coord_placement.RoleDemand:
        return coord_placement.RoleDemand(tuple(cfg.gpu_types) or (inst.gpu.name,), inst.tp)
    return coord_placement.ServiceDemand(name=service.name, priority=service.priority,
                                         affinity=service.affinity, ratio=tuple(service.pd_ratio),
                                         prefill=role(service.prefill, cluster.prefill),
                                         decode=role(service.decode, cluster.decode))


class Placement:
    """Keeps one service's Deployment Groups across simulated scaling decisions."""

    def __init__(self, topology: TopologySpec, demand: coord_placement.ServiceDemand, *,
                 bandwidth_aware: bool = True) -> None:
        self.demand = demand
        self.bandwidth_aware = bandwidth_aware
        types = tuple(dict.fromkeys((*demand.prefill.gpu_types, *demand.decode.gpu_types)))
        self.nodes = topology.nodes(types)
        self.switches = coord_bandwidth.switches_from_nodes(self.nodes)
        s1_order = list(dict.fromkeys((n.s2, n.s1) for n in self.nodes))
        self.switch_index = {n.name: s1_order.index((n.s2, n.s1)) for n in self.nodes}
        self.groups: tuple[coord_placement.DeploymentGroup, ...] = ()
        self.shortfalls = 0
        self.plans = 0
        self.bandwidth: coord_bandwidth.ServiceBandwidth | None = None
        self.hints = coord_bandwidth.PlacementHints()
        self.plans_with_hints = 0
        self.started_by_switch: dict[int, int] = {}   # instances started per S1 switch index

    def _view(self) -> ClusterView:
        used: dict[str, int] = {}
        for g in self.groups:
            for role in ("prefill", "decode"):
                per = self.demand.role(role).gpus_per_instance
                for node, count in g.role(role).nodes.items():
                    used[node] = used.get(node, 0) + count * per
        return ClusterView(nodes=tuple(
            NodeView(n.name, n.gpu_type, n.s1, n.s2, n.allocatable_gpus,
                     n.allocatable_gpus - used.get(n.name, 0), n.tier) for n in self.nodes))

    def apply(self, desired: PoolCounts) -> PoolCounts:
        """Plan ``desired`` with the coordinator's planner; return what was placed."""
        name = self.demand.name
        demand = self.demand
        if self.bandwidth_aware and self.hints.any:
            demand = coord_placement.with_bandwidth(demand, self.hints)
            self.plans_with_hints += 1
        result = coord_placement.plan(view=self._view(), services=[demand],
                                      current={name: self.groups}, desired={name: desired})
        self.plans += 1
        self.groups = tuple(result.groups.get(name, ()))
        short = result.shortfall.get(name)
        if short is not None and short.total() > 0:
            self.shortfalls += 1
        return result.placed(name)

    def measure(self, reports: "list[SidecarReport]", cluster: "Cluster", *, now_s: float) -> None:
        """The bandwidth map from this pull of the sidecars (``core.bandwidth``), and the
        placement hints it gives; a blind placement measures nothing."""
        if not self.bandwidth_aware:
            return
        groups = {f"{x.role}-{x.index}": x.group for x in (*cluster.prefill, *cluster.decode)
                  if x.accepting and x.group is not None}
        bmap = coord_bandwidth.build_bandwidth_map(reports, switches=self.switches, groups=groups, now_s=now_s)
        self.bandwidth = bmap.service(self.demand.name)
        self.hints = coord_bandwidth.placement_hints(
            self.bandwidth, group_domains={g.name: g.domain for g in self.groups},
            affinity_level=self.demand.level)

    def realise(self, cluster: "Cluster", *, now_s: float) -> None:
        """Bring the cluster's instances in line with the plan, node by node: instances not
        placed yet (the initial ones) take the first places, new ones start for the rest,
        and where a node holds more than the plan keeps, the surplus stops — starting ones
        first, then (measured bandwidth) those of the worst measured pairs, then the least
        loaded."""
        worst = {pod: i for i, pod in enumerate(self.hints.worst_pods)} if self.bandwidth_aware else {}
        for role in ("prefill", "decode"):
            want: dict[tuple[str, str], int] = {}
            for g in self.groups:
                for node, count in g.role(role).nodes.items():
                    want[(g.name, node)] = want.get((g.name, node), 0) + count
            pool = cluster.prefill if role == "prefill" else cluster.decode
            live = [x for x in pool if x.accepting]
            have: dict[tuple[str, str], list] = {}
            unplaced = []
            for x in live:
                if x.node is None:
                    unplaced.append(x)
                else:
                    have.setdefault((x.group, x.node), []).append(x)
            surplus = []
            for key, xs in have.items():
                extra = len(xs) - want.get(key, 0)
                if extra > 0:
                    order = cluster.stop_order(xs, now_s)
                    order.sort(key=lambda x: (x.ready_s <= now_s, worst.get(f"{x.role}-{x.index}", len(worst))))
                    surplus += order[:extra]
            cluster.stop(surplus, now_s=now_s)
            for key, count in sorted(want.items()):
                missing = count - len(have.get(key, ()))
                group, node = key
                for _ in range(max(0, missing)):
                    if unplaced:
                        x = unplaced.pop()
                        x.node, x.group, x.switch = node, group, self.switch_index[node]
                    else:
                        cluster.add_placed(role, node=node, group=group, switch=self.switch_index[node], now_s=now_s)
                        sw = self.switch_index[node]
                        self.started_by_switch[sw] = self.started_by_switch.get(sw, 0) + 1
            cluster.stop(unplaced, now_s=now_s)      # more than the plan placed (a shortfall)
        cluster.refresh(now_s)

    def cross_switch_share(self) -> float:
        """Share of (prefill, decode) instance pairs inside a DG that sit under different S1s."""
        s1_of = {n.name: n.s1_key for n in self.nodes}
        pairs = cross = 0.0
        for g in self.groups:
            total = g.prefill.count + g.decode.count
            if not g.prefill.nodes or not g.decode.nodes or total == 0:
                continue
            p_nodes, d_nodes = g.prefill.nodes, g.decode.nodes
            group_pairs = g.prefill.count * g.decode.count
            group_cross = sum(pc * dc for pn, pc in p_nodes.items() for dn, dc in d_nodes.items()
                              if s1_of.get(pn) != s1_of.get(dn))
            weight = total / group_pairs
            pairs += group_pairs * weight
            cross += group_cross * weight
        return cross / pairs if pairs else 0.0

    def describe(self) -> list[dict]:
        return [g.to_dict() for g in self.groups]
