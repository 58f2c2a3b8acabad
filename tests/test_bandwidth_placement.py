"""Placement by measured KV bandwidth: the map's slow domains and straddling links become
bounded, explained preferences (coordinator/core/bandwidth.placement_hints and
ServiceDemand.slow_domains / new_level)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from heteroscale.coordinator.core.bandwidth import (GroupBandwidth, PairBandwidth, ServiceBandwidth,
                                                    placement_hints)
from heteroscale.coordinator.core.placement import (DeploymentGroup, RoleDemand, RoleGroup, ServiceDemand, plan,
                                                    with_bandwidth)
from heteroscale.coordinator.core.topology import build_view, nodes_from_document
from heteroscale.coordinator.core.types import PoolCounts

H20 = "NVIDIA-H20"


def node(name: str, s1: str, s2: str, gpus: int = 8) -> dict:
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": H20, "heteroscale.io/s1": s1,
                                                  "heteroscale.io/s2": s2}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}, "conditions": [{"type": "Ready", "status": "True"}]}}


@pytest.fixture
def two_switches():
    # Two uniform S2 switches of H20: the same tier, so only the measured map can tell them apart.
    return build_view([node(f"a{i}", "a-1", "s2-a") for i in range(2)] + [node(f"b{i}", "b-1", "s2-b") for i in range(2)])


def chat(affinity: str = "s2") -> ServiceDemand:
    return ServiceDemand(name="chat", affinity=affinity, prefill=RoleDemand((H20,)), decode=RoleDemand((H20,)))


def group(name: str, s2: str, count: int, *, level: str = "s2") -> DeploymentGroup:
    return DeploymentGroup(name, "chat", level, s2 if level != "cluster" else "", "",
                           RoleGroup(H20, count), RoleGroup(H20, count))


def measured(**medians: float) -> ServiceBandwidth:
    return ServiceBandwidth(service="chat", pairs=(), same_switch_median_bytes_per_second=None,
                            cross_switch_median_bytes_per_second=None,
                            groups=tuple(GroupBandwidth(g, 4, v) for g, v in medians.items()))


def test_a_group_far_below_its_peers_marks_its_domain_slow():
    hints = placement_hints(measured(**{"chat-g0": 20e9, "chat-g1": 6e9}),
                            group_domains={"chat-g0": ("s2", "s2-a"), "chat-g1": ("s2", "s2-b")},
                            affinity_level="s2")
    assert list(hints.slow_domains) == [("s2", "s2-b")]
    assert "30% of group chat-g0's" in hints.slow_domains[("s2", "s2-b")]
    # 85% is not "far below": no preference, no churn on ordinary noise.
    calm = placement_hints(measured(**{"chat-g0": 20e9, "chat-g1": 17e9}),
                           group_domains={"chat-g0": ("s2", "s2-a"), "chat-g1": ("s2", "s2-b")}, affinity_level="s2")
    assert not calm.any


def test_scale_out_grows_the_healthy_domain_and_scale_in_releases_the_slow_one_first(two_switches):
    current = {"chat": [group("chat-g0", "s2-a", 2), group("chat-g1", "s2-b", 2)]}
    blind = plan(view=two_switches, services=[chat()], current=current, desired={"chat": PoolCounts(6, 6)})
    assert {a.dg for a in blind.allocations} == {"chat-g0"}          # name order: g0 first anyway
    hints = placement_hints(measured(**{"chat-g0": 5e9, "chat-g1": 20e9}),
                            group_domains={"chat-g0": ("s2", "s2-a"), "chat-g1": ("s2", "s2-b")}, affinity_level="s2")
    aware = plan(view=two_switches, services=[with_bandwidth(chat(), hints)], current=current,
                 desired={"chat": PoolCounts(6, 6)})
    assert {a.dg for a in aware.allocations} == {"chat-g1"}          # the slow s2-a is passed over
    assert all("domains with slow links avoided" in a.why for a in aware.allocations)
    shrink = plan(view=two_switches, services=[with_bandwidth(chat(), hints)], current=current,
                  desired={"chat": PoolCounts(2, 2)})
    assert {r.dg for r in shrink.releases} == {"chat-g0"}
    assert all("measured KV bandwidth is low here" in r.why for r in shrink.releases)


def test_a_slow_domain_is_still_used_when_nothing_else_fits():
    nodes = [node(f"a{i}", "a-1", "s2-a") for i in range(2)] + [node(f"b{i}", "b-1", "s2-b") for i in range(2)]
    full_b = build_view(nodes, reserved={"b0": 8, "b1": 8})                      # s2-b has no GPU left
    current = {"chat": [group("chat-g0", "s2-a", 2), group("chat-g1", "s2-b", 8)]}
    hints = placement_hints(measured(**{"chat-g0": 5e9, "chat-g1": 20e9}),
                            group_domains={"chat-g0": ("s2", "s2-a"), "chat-g1": ("s2", "s2-b")}, affinity_level="s2")
    p = plan(view=full_b, services=[with_bandwidth(chat(), hints)], current=current,
             desired={"chat": PoolCounts(13, 13)})
    assert p.placed("chat") == PoolCounts(13, 13)                    # bounded: a preference, never a refusal
    assert {a.dg for a in p.allocations} == {"chat-g0"}
    assert all("no healthy domain fits" in a.why for a in p.allocations)


def test_slow_cross_switch_pairs_stop_new_groups_from_straddling(two_switches):
    bw = ServiceBandwidth(service="chat", pairs=(), same_switch_median_bytes_per_second=20e9,
                          cross_switch_median_bytes_per_second=8e9)
    hints = placement_hints(bw, group_domains={}, affinity_level="cluster")
    assert hints.new_level == "s2" and "40% of same-switch" in hints.new_level_reason
    p = plan(view=two_switches, services=[with_bandwidth(chat("none"), hints)], current={},
             desired={"chat": PoolCounts(3, 3)})
    assert {(g.level, g.s2) for g in p.groups["chat"]} in ({("s2", "s2-a")}, {("s2", "s2-b")})
    blind = plan(view=two_switches, services=[chat("none")], current={}, desired={"chat": PoolCounts(3, 3)})
    assert {g.level for g in blind.groups["chat"]} == {"cluster"}


def test_flagged_pairs_name_the_pods_to_release_first():
    pair = PairBandwidth(service="chat", prefill="p0", decode="d3", bytes_per_second=2e9, rtt_s=None, age_s=1,
                         locality="cross_switch", shared_domain="s2", group=None)
    bw = ServiceBandwidth(service="chat", pairs=(replace(pair, flagged=True),
                                                 replace(pair, decode="d1", bytes_per_second=19e9)),
                          same_switch_median_bytes_per_second=None, cross_switch_median_bytes_per_second=None)
    assert placement_hints(bw, group_domains={}, affinity_level="s2").worst_pods == ("d3", "p0")
