"""Placement: worked examples for each tier rule, fallback, reservation, shortfall and scale-in."""

from __future__ import annotations

import pytest
import yaml

from heteroscale.coordinator.core.placement import (
    DeploymentGroup, RoleDemand, RoleGroup, ServiceDemand, plan, split_increments)
from heteroscale.coordinator.core.topology import build_view, nodes_from_document
from heteroscale.coordinator.core.types import PoolCounts

L20, H20 = "NVIDIA-L20", "NVIDIA-H20"


def node(name: str, gpu_type: str, s1: str, s2: str, gpus: int = 8) -> dict:
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": gpu_type,
                                                  "heteroscale.io/s1": s1, "heteroscale.io/s2": s2}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


@pytest.fixture
def tiers_view(data_dir):
    # s2-homo: 4 x H20 nodes (low); s2-het: 2 L20 + 2 H20 nodes in uniform S1s (medium);
    # s2-mix: S1 "mix" with 1 L20 + 1 H20 node (high). 8 GPUs per node.
    return build_view(nodes_from_document(yaml.safe_load((data_dir / "nodes_tiers.yaml").read_text())))


def svc(name: str = "chat", *, prefill=(L20, H20), decode=(H20,), affinity: str = "s2", priority: int = 0,
        gp: int = 1, gd: int = 1, ratio=(1, 1)) -> ServiceDemand:
    return ServiceDemand(name=name, priority=priority, affinity=affinity, ratio=ratio,
                         prefill=RoleDemand(tuple(prefill), gp), decode=RoleDemand(tuple(decode), gd))


def by_role(p, service="chat"):
    out: dict[tuple[str, str], int] = {}
    for a in p.allocations:
        if a.service == service:
            out[(a.role, a.node)] = out.get((a.role, a.node), 0) + a.count
    return out


def test_split_increments_worked_examples():
    # floor((i+1)*9/7) - floor(i*9/7) for i = 0..6: 1,1,1,2,1,1,2
    assert split_increments(9, 7) == [(1, 1), (1, 1), (1, 1), (2, 1), (1, 1), (1, 1), (2, 1)]
    assert split_increments(2, 6) == [(1, 3), (1, 3)]
    assert split_increments(3, 0) == [(1, 0)] * 3
    assert split_increments(0, 0) == []
    with pytest.raises(ValueError):
        split_increments(-1, 2)


def test_homogeneous_service_takes_the_low_tier(tiers_view):
    # H20 for both roles: s2-homo (low), s2-het (medium) and s2-mix (high) all have H20; low wins.
    p = plan(view=tiers_view, services=[svc(prefill=[H20])], current={}, desired={"chat": PoolCounts(4, 4)})
    assert {a.s2 for a in p.allocations} == {"s2-homo"}
    assert {a.tier for a in p.allocations} == {"low"}
    assert p.placed("chat") == PoolCounts(4, 4) and not p.shortfall
    assert "low tier is the least valuable that fits" in p.allocations[0].why


def test_heterogeneous_service_takes_medium_before_high(tiers_view):
    # Prefill prefers L20, decode H20, within one S2: s2-het (medium) and s2-mix (high) qualify.
    p = plan(view=tiers_view, services=[svc()], current={}, desired={"chat": PoolCounts(9, 7)})
    assert {a.s2 for a in p.allocations} == {"s2-het"}
    assert {(a.role, a.gpu_type) for a in p.allocations} == {("prefill", L20), ("decode", H20)}
    assert {a.tier for a in p.allocations} == {"medium"}
    (dg,) = p.groups["chat"]
    assert (dg.level, dg.s2, dg.s1, dg.counts) == ("s2", "s2-het", "", PoolCounts(9, 7))


def test_s1_affinity_heterogeneous_needs_the_high_tier(tiers_view):
    # Only S1 "mix" holds both L20 and H20 under one S1 switch.
    p = plan(view=tiers_view, services=[svc(affinity="s1")], current={}, desired={"chat": PoolCounts(2, 2)})
    assert {(a.role, a.node) for a in p.allocations} == {("prefill", "mix-l20-0"), ("decode", "mix-h20-0")}
    (dg,) = p.groups["chat"]
    assert (dg.level, dg.s2, dg.s1) == ("s1", "s2-mix", "mix")


def test_s1_affinity_homogeneous_uses_one_uniform_s1(tiers_view):
    p = plan(view=tiers_view, services=[svc(prefill=[H20], affinity="s1")], current={},
             desired={"chat": PoolCounts(8, 8)})
    # 16 H20 instances fill exactly one low-tier S1 (2 nodes x 8 GPUs): homo-a
    (dg,) = p.groups["chat"]
    assert (dg.s2, dg.s1) == ("s2-homo", "homo-a")
    assert {a.node for a in p.allocations} == {"homo-a-h20-0", "homo-a-h20-1"}


def test_fallback_gpu_type_when_preferred_is_exhausted(tiers_view):
    # 24 L20 GPUs exist (s2-het 16, s2-mix 8). Asking for 30 prefill: L20 first, then the H20 fallback.
    p = plan(view=tiers_view, services=[svc()], current={}, desired={"chat": PoolCounts(30, 10)})
    assert p.placed("chat") == PoolCounts(30, 10) and not p.shortfall
    prefill_types = {}
    for a in p.allocations:
        if a.role == "prefill":
            prefill_types[a.gpu_type] = prefill_types.get(a.gpu_type, 0) + a.count
    assert prefill_types[L20] >= 16 and prefill_types.get(H20, 0) > 0
    # every DG keeps one type per role, and each P+D pair shares an S2
    for dg in p.groups["chat"]:
        assert dg.balanced()
        roles = {(a.role, a.gpu_type, a.s2) for a in p.allocations if a.dg == dg.name}
        assert {r[1] for r in roles if r[0] == "prefill"} == {dg.prefill.gpu_type}
        assert {r[2] for r in roles} == {dg.s2}


def test_grows_an_existing_dg_before_opening_one_in_the_same_tier(tiers_view):
    current = {"chat": [DeploymentGroup("chat-g7", "chat", "s2", "s2-homo", "",
                                        RoleGroup(H20, 1, {"homo-b-h20-1": 1}), RoleGroup(H20, 1, {"homo-b-h20-1": 1}))]}
    p = plan(view=tiers_view, services=[svc(prefill=[H20])], current=current, desired={"chat": PoolCounts(3, 3)})
    assert {a.dg for a in p.allocations} == {"chat-g7"}
    assert not any(a.new_dg for a in p.allocations)
    assert p.groups["chat"][0].counts == PoolCounts(3, 3)
    assert p.groups["chat"][0].prefill.nodes["homo-b-h20-1"] >= 1


def test_new_dg_in_a_cheaper_pool_beats_growing_one_in_a_scarce_pool(tiers_view):
    # PAPER §3.2: the existing DG sits in the high-tier s2-mix; the next increments open a new DG in
    # the low-tier s2-homo instead of growing it.
    current = {"chat": [DeploymentGroup("chat-g0", "chat", "s2", "s2-mix", "",
                                        RoleGroup(H20, 1, {"mix-h20-0": 1}), RoleGroup(H20, 1, {"mix-h20-0": 1}))]}
    p = plan(view=tiers_view, services=[svc(prefill=[H20])], current=current, desired={"chat": PoolCounts(3, 3)})
    assert {(a.dg, a.s2, a.new_dg) for a in p.allocations} == {("chat-g1", "s2-homo", True)}
    assert sorted(g.name for g in p.groups["chat"]) == ["chat-g0", "chat-g1"]


def test_priority_and_virtual_reservation(tiers_view):
    # Both services need the only mixed S1 (8 L20 + 8 H20 GPUs). "gold" (priority 10) goes first and
    # takes 6+6; "bronze" (L20 prefill only, no fallback) gets the remaining 2+2 and a shortfall of
    # 4+4, even though it is listed first.
    gold = svc("gold", affinity="s1", priority=10)
    bronze = svc("bronze", prefill=[L20], affinity="s1", priority=1)
    p = plan(view=tiers_view, services=[bronze, gold], current={},
             desired={"gold": PoolCounts(6, 6), "bronze": PoolCounts(6, 6)})
    assert p.placed("gold") == PoolCounts(6, 6)
    assert p.placed("bronze") == PoolCounts(2, 2)
    assert p.shortfall == {"bronze": PoolCounts(4, 4)}
    assert p.allocations[0].service == "gold"
    assert "shortfall" in p.reasons["bronze"][0]


def test_shortfall_places_what_fits_and_keeps_the_ratio():
    # One S1 with 3 L20 and 4 H20 GPUs; asking 9P:7D. Steps (1,1),(1,1),(1,1),(2,1)...: three fit
    # (3 P, 3 D); the fourth needs 2 more L20. Placed 3:3, shortfall 6:4.
    view = build_view([node("l", L20, "x", "S", gpus=3), node("h", H20, "x", "S", gpus=4)])
    p = plan(view=view, services=[svc(prefill=[L20])], current={}, desired={"chat": PoolCounts(9, 7)})
    assert p.placed("chat") == PoolCounts(3, 3)
    assert p.shortfall["chat"] == PoolCounts(6, 4)


def test_affinity_none_may_split_p_and_d_across_s2s():
    view = build_view([node("l", L20, "x", "S"), node("h", H20, "y", "T")])
    for affinity, placed in (("none", PoolCounts(2, 2)), ("s2", PoolCounts(0, 0))):
        p = plan(view=view, services=[svc(prefill=[L20], affinity=affinity)], current={},
                 desired={"chat": PoolCounts(2, 2)})
        assert p.placed("chat") == placed
    (dg,) = plan(view=view, services=[svc(prefill=[L20], affinity="none")], current={},
                 desired={"chat": PoolCounts(2, 2)}).groups["chat"]
    assert (dg.level, dg.s2, dg.s1) == ("cluster", "", "")


def test_multi_gpu_instances_pack_per_node():
    # 8-GPU nodes, 3 GPUs per prefill instance: 2 per node; 4 per decode instance: 2 per node.
    view = build_view([node("l1", L20, "x", "S"), node("l2", L20, "x", "S"), node("h1", H20, "y", "S")])
    p = plan(view=view, services=[svc(prefill=[L20], gp=3, gd=4)], current={}, desired={"chat": PoolCounts(4, 3)})
    # decode fits only 2 on h1: steps for (4,3) are (1,1),(1,1),(2,1) -> two steps fit: 2P 2D
    assert p.placed("chat") == PoolCounts(2, 2)
    assert by_role(p) == {("prefill", "l1"): 2, ("decode", "h1"): 2}
    assert sum(a.gpus for a in p.allocations if a.node == "h1") == 8


def test_shared_type_with_different_sizes_never_overallocates():
    # One 8-GPU H20 node: prefill 3 GPUs, decode 2 GPUs. Estimate uses 3-GPU slots (2 slots):
    # one step (1P+1D = 5 GPUs) fits; two would need 10.
    view = build_view([node("h", H20, "x", "S")])
    p = plan(view=view, services=[svc(prefill=[H20], gp=3, gd=2)], current={}, desired={"chat": PoolCounts(2, 2)})
    assert p.placed("chat") == PoolCounts(1, 1)
    assert sum(a.gpus for a in p.allocations) == 5


def test_single_role_growth_only_grows_existing_dgs(tiers_view):
    dg = DeploymentGroup("chat-g0", "chat", "s2", "s2-het", "", RoleGroup(L20, 2), RoleGroup(H20, 2))
    p = plan(view=tiers_view, services=[svc()], current={"chat": [dg]}, desired={"chat": PoolCounts(5, 2)})
    assert {(a.dg, a.role, a.s2) for a in p.allocations} == {("chat-g0", "prefill", "s2-het")}
    assert p.placed("chat") == PoolCounts(5, 2)
    # with no DG to grow, a prefill-only request cannot be placed without unbalancing
    p = plan(view=tiers_view, services=[svc()], current={}, desired={"chat": PoolCounts(3, 0)})
    assert p.placed("chat") == PoolCounts(0, 0) and p.shortfall["chat"] == PoolCounts(3, 0)
    assert "needs both roles" in p.reasons["chat"][0]


def _dg(name, s2, p, d, tp=H20, td=H20):
    return DeploymentGroup(name, "chat", "s2", s2, "", RoleGroup(tp, p), RoleGroup(td, d))


def test_scale_in_releases_the_most_valuable_pool_first(tiers_view):
    current = {"chat": [_dg("g-low", "s2-homo", 2, 2), _dg("g-high", "s2-mix", 2, 2), _dg("g-med", "s2-het", 2, 2)]}
    p = plan(view=tiers_view, services=[svc(prefill=[H20])], current=current, desired={"chat": PoolCounts(4, 4)})
    # 6:6 -> 4:4 removes the whole high-tier DG
    assert {(r.dg, r.role, r.count, r.delete_dg, r.tier) for r in p.releases} == {
        ("g-high", "prefill", 2, True, "high"), ("g-high", "decode", 2, True, "high")}
    assert sorted(g.name for g in p.groups["chat"]) == ["g-low", "g-med"]
    # 6:6 -> 3:3: high goes, then medium shrinks to 1:1 (never to 0:x)
    p = plan(view=tiers_view, services=[svc(prefill=[H20])], current=current, desired={"chat": PoolCounts(3, 3)})
    left = {g.name: g.counts for g in p.groups["chat"]}
    assert left == {"g-low": PoolCounts(2, 2), "g-med": PoolCounts(1, 1)}
    assert not p.allocations


def test_scale_in_prefers_fallback_gpu_types_then_small_dgs(tiers_view):
    # same (medium) tier: the DG on the fallback prefill type (H20) goes before the preferred one
    current = {"chat": [_dg("pref", "s2-het", 2, 2, tp=L20), _dg("fallback", "s2-het", 2, 2)]}
    p = plan(view=tiers_view, services=[svc()], current=current, desired={"chat": PoolCounts(2, 2)})
    assert [g.name for g in p.groups["chat"]] == ["pref"]


def test_scale_in_never_unbalances_and_reports_what_stays(tiers_view):
    current = {"chat": [_dg("a", "s2-homo", 1, 1), _dg("b", "s2-homo", 1, 1)]}
    p = plan(view=tiers_view, services=[svc(prefill=[H20])], current=current, desired={"chat": PoolCounts(1, 2)})
    # removing one prefill alone would leave a DG with decode only
    assert not p.releases
    assert p.unreleased == {"chat": PoolCounts(1, 0)}
    assert all(g.balanced() for g in p.groups["chat"])
    assert "one role only" in p.reasons["chat"][0]


def test_partial_scale_in_follows_the_ratio(tiers_view):
    current = {"chat": [_dg("a", "s2-homo", 9, 7)]}
    p = plan(view=tiers_view, services=[svc(prefill=[H20])], current=current, desired={"chat": PoolCounts(5, 4)})
    # cut 4:3 -> steps (1,1),(2,1),(1,1): all fit leaving 5:4
    assert p.groups["chat"][0].counts == PoolCounts(5, 4)
    assert not p.unreleased


def test_scale_in_forgets_instances_on_the_highest_tier_nodes(tiers_view):
    dg = DeploymentGroup("a", "chat", "cluster", "", "", RoleGroup(H20, 2, {"homo-a-h20-0": 1, "mix-h20-0": 1}),
                         RoleGroup(H20, 2, {"homo-a-h20-0": 1, "het-h20-0": 1}))
    p = plan(view=tiers_view, services=[svc(prefill=[H20], affinity="none")], current={"chat": [dg]},
             desired={"chat": PoolCounts(1, 1)})
    (left,) = p.groups["chat"]
    assert left.prefill.nodes == {"homo-a-h20-0": 1} and left.decode.nodes == {"homo-a-h20-0": 1}


def test_services_without_desired_counts_are_kept(tiers_view):
    dg = _dg("a", "s2-homo", 1, 1)
    p = plan(view=tiers_view, services=[svc(prefill=[H20])], current={"chat": [dg]}, desired={})
    assert p.groups["chat"] == (dg,) and not p.allocations and not p.releases


def test_plan_rejects_bad_input(tiers_view):
    with pytest.raises(ValueError, match="twice"):
        plan(view=tiers_view, services=[svc(), svc()], current={}, desired={})
    with pytest.raises(ValueError, match=">= 0"):
        plan(view=tiers_view, services=[svc()], current={}, desired={"chat": PoolCounts(-1, 1)})


@pytest.mark.parametrize("kwargs", [
    {"affinity": "rack"}, {"ratio": (0, 1)}, {"ratio": (1.5, 1)}, {"name": ""}, {"priority": "high"}])
def test_service_demand_validation(kwargs):
    base = {"name": "chat", "prefill": RoleDemand(("A",)), "decode": RoleDemand(("A",))}
    with pytest.raises(ValueError):
        ServiceDemand(**(base | kwargs))


@pytest.mark.parametrize("types,gpus", [((), 1), (("A", "A"), 1), (("A",), 0), (("A",), True)])
def test_role_demand_validation(types, gpus):
    with pytest.raises(ValueError):
        RoleDemand(types, gpus)


def test_deployment_group_round_trip_and_errors():
    dg = DeploymentGroup("g", "chat", "s1", "S", "x", RoleGroup(L20, 2, {"n": 2}), RoleGroup(H20, 1))
    assert DeploymentGroup.from_dict(dg.to_dict()) == dg
    bad = dg.to_dict()
    bad["prefill"]["nodes"] = {"n": 1}
    with pytest.raises(ValueError, match="adds up to 1"):
        DeploymentGroup.from_dict(bad)
    with pytest.raises(ValueError, match="needs s1"):
        DeploymentGroup.from_dict(dg.to_dict() | {"s1": ""})
    with pytest.raises(ValueError, match="level"):
        DeploymentGroup.from_dict(dg.to_dict() | {"level": "rack"})
