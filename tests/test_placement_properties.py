"""Placement invariants over random clusters and services (hypothesis).

For any cluster, services and desired counts, one cycle:
* never reserves more GPUs on a node than it had free;
* puts every instance on a node of the DG's domain (the service's affinity) and of the
  DG role's GPU type, which is one of the service's preferred types;
* leaves every DG with both roles (never prefill without decode);
* places, on shortfall, a prefix of the ratio path (the ratio is kept);
* on scale-in only shrinks, never leaves a DG unbalanced, and accounts for every instance.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heteroscale.coordinator.core.placement import RoleDemand, ServiceDemand, plan, split_increments
from heteroscale.coordinator.core.topology import build_view
from heteroscale.coordinator.core.types import PoolCounts

TYPES = ("A", "B", "C")


def _node(name, gpu_type, s1, s2, gpus):
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": gpu_type,
                                                  "heteroscale.io/s1": s1, "heteroscale.io/s2": s2}},
            "status": {"allocatable": {"nvidia.com/gpu": gpus},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


@st.composite
def clusters(draw):
    nodes = []
    for s2 in range(draw(st.integers(1, 3))):
        for s1 in range(draw(st.integers(1, 3))):
            for i in range(draw(st.integers(1, 3))):
                nodes.append(_node(f"n{s2}-{s1}-{i}", draw(st.sampled_from(TYPES)), f"r{s1}", f"S{s2}",
                                   draw(st.integers(1, 8))))
    # some GPUs already taken by pods bound to the nodes
    reserved = {n["metadata"]["name"]: draw(st.integers(0, 3)) for n in nodes}
    return build_view(nodes, reserved=reserved)


@st.composite
def services(draw):
    out = []
    for i in range(draw(st.integers(1, 3))):
        out.append(ServiceDemand(
            name=f"svc{i}", priority=draw(st.integers(0, 3)),
            affinity=draw(st.sampled_from(("s1", "s2", "none"))),
            ratio=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
            prefill=RoleDemand(tuple(draw(st.permutations(TYPES))[:draw(st.integers(1, 3))]),
                               draw(st.integers(1, 3))),
            decode=RoleDemand(tuple(draw(st.permutations(TYPES))[:draw(st.integers(1, 3))]),
                              draw(st.integers(1, 3)))))
    return out


def _check_allocations(view, svcs, p):
    free = {n.name: n.free_gpus for n in view.nodes}
    nodes = {n.name: n for n in view.nodes}
    by_name = {s.name: s for s in svcs}
    groups = {(s, g.name): g for s, gs in p.groups.items() for g in gs}
    for a in p.allocations:
        free[a.node] -= a.gpus
        node = nodes[a.node]
        svc = by_name[a.service]
        dg = groups[(a.service, a.dg)]
        assert a.gpus == a.count * svc.role(a.role).gpus_per_instance
        assert node.gpu_type == a.gpu_type == dg.role(a.role).gpu_type
        assert a.gpu_type in svc.role(a.role).gpu_types
        assert dg.level == {"s1": "s1", "s2": "s2", "none": "cluster"}[svc.affinity]
        if dg.level in ("s1", "s2"):
            assert node.s2 == dg.s2
        if dg.level == "s1":
            assert node.s1 == dg.s1
    assert all(v >= 0 for v in free.values()), f"over-allocated: {free}"
    for gs in p.groups.values():
        for g in gs:
            assert g.balanced() and g.prefill.count > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(view=clusters(), svcs=services(), data=st.data())
def test_scale_out_invariants(view, svcs, data):
    desired = {s.name: PoolCounts(data.draw(st.integers(0, 12)), data.draw(st.integers(0, 12))) for s in svcs}
    p = plan(view=view, services=svcs, current={}, desired=desired)
    _check_allocations(view, svcs, p)
    for s in svcs:
        placed, want = p.placed(s.name), desired[s.name]
        short = p.shortfall.get(s.name, PoolCounts(0, 0))
        assert placed.prefill + short.prefill == want.prefill
        assert placed.decode + short.decode == want.decode
        # the placed counts are a prefix of the ratio path: the ratio is kept
        steps = split_increments(want.prefill, want.decode) if want.prefill and want.decode else []
        if steps:
            prefixes = {(0, 0)}
            cp = cd = 0
            for sp, sd in steps:
                cp, cd = cp + sp, cd + sd
                prefixes.add((cp, cd))
            assert (placed.prefill, placed.decode) in prefixes
        else:
            assert placed == PoolCounts(0, 0)  # one role alone never opens a DG


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(view=clusters(), svcs=services(), data=st.data())
def test_second_cycle_scale_in_and_out_invariants(view, svcs, data):
    first = {s.name: PoolCounts(data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))) for s in svcs}
    p1 = plan(view=view, services=svcs, current={}, desired=first)
    # the next cycle's view: the first cycle's instances now hold their GPUs
    used: dict[str, int] = {}
    for a in p1.allocations:
        used[a.node] = used.get(a.node, 0) + a.gpus
    nodes = [_node(n.name, n.gpu_type, n.s1, n.s2, n.allocatable_gpus) for n in view.nodes]
    held = {n.name: n.allocatable_gpus - n.free_gpus for n in view.nodes}
    view2 = build_view(nodes, reserved={k: held[k] + used.get(k, 0) for k in held})
    second = {s.name: PoolCounts(data.draw(st.integers(0, 12)), data.draw(st.integers(0, 12))) for s in svcs}
    p2 = plan(view=view2, services=svcs, current=dict(p1.groups), desired=second)
    _check_allocations(view2, svcs, p2)
    for s in svcs:
        before = {g.name: g for g in p1.groups[s.name]}
        after = {g.name: g for g in p2.groups[s.name]}
        have, want = p1.placed(s.name), second[s.name]
        released = {"prefill": 0, "decode": 0}
        for r in p2.releases:
            if r.service == s.name:
                released[r.role] += r.count
                assert r.count > 0
                assert (r.dg not in after) == r.delete_dg
        for name, g in after.items():
            if name in before:
                old = before[name]
                grew = any(a.dg == name and a.service == s.name for a in p2.allocations)
                if not grew:
                    assert g.prefill.count <= old.prefill.count and g.decode.count <= old.decode.count
        unrel = p2.unreleased.get(s.name, PoolCounts(0, 0))
        # every instance asked away is released or reported as kept
        for role in ("prefill", "decode"):
            cut = max(0, getattr(have, role) - getattr(want, role))
            assert released[role] + getattr(unrel, role) == cut
        placed = p2.placed(s.name)
        short = p2.shortfall.get(s.name, PoolCounts(0, 0))
        for role in ("prefill", "decode"):
            target = getattr(want, role)
            assert getattr(placed, role) == target - getattr(short, role) + getattr(unrel, role)


@given(st.integers(0, 200), st.integers(0, 200))
def test_split_increments_sums_and_shape(dp, dd):
    steps = split_increments(dp, dd)
    assert sum(s[0] for s in steps) == dp and sum(s[1] for s in steps) == dd
    if dp and dd:
        assert all(s[0] >= 1 and s[1] >= 1 for s in steps)
        assert len(steps) == min(dp, dd)
