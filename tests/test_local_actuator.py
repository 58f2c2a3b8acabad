"""The local actuator: topology files, the ready-ratio gate, and real process pairs.

The gate is pure and checked with worked examples and hypothesis; the process tests
start real ``heteroscale emulate-engine`` + ``heteroscale sidecar`` children on loopback
and check they become ready, are placed by the placement code, drain, stop, and leave
no process behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from heteroscale.coordinator.actuators.local import (
    DEFAULT_TOPOLOGY, LocalActuator, LocalSettings, SimulatedCluster, compact_nodes, emulator_gpu)
from heteroscale.coordinator.core.gate import gate_admit
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.types import Decision, PoolCounts
from heteroscale.errors import ConfigError

SERVICE_YAML = """
coordinator: {backend: local, interval_s: 1, collect: {timeout_s: 0.5}}
services:
  - name: chat
    pd_ratio: "2:1"
    target_decode_tps_per_instance: 1000
    affinity: s2
    slo: {ttft_s: 1.0, tbt_s: 0.05}
    prefill: {gpu_types: [NVIDIA-L20, NVIDIA-H20]}
    decode: {gpu_types: [NVIDIA-H20]}
"""


# ---------------------------------------------------------------- topology

def test_default_topology_is_two_s2_domains_of_l20_and_h20():
    cluster = SimulatedCluster.from_file(DEFAULT_TOPOLOGY)
    view = cluster.view({})
    assert {n.s2 for n in view.nodes} == {"pod-a", "pod-b"}
    assert {n.gpu_type for n in view.nodes} == {"NVIDIA-L20", "NVIDIA-H20"}
    # each S2 mixes two types over uniform S1s: the medium tier
    assert set(view.s2_tiers().values()) == {"medium"}


def test_used_gpus_are_reserved_in_the_view():
    cluster = SimulatedCluster(compact_nodes([{"s2": "a", "s1": "a1", "gpu_type": "NVIDIA-H20",
                                               "nodes": 1, "gpus_per_node": 4}]))
    (node,) = cluster.view({"a1-h20-0": 3}).nodes
    assert node.free_gpus == 1


@pytest.mark.parametrize("text, needle", [
    ("switches: []", "non-empty"),
    ("switches: [{s2: a, gpu_type: X}]", "needs s1"),
    ("switches: [{s2: a, s1: b, gpu_type: X, nodes: 0}]", "integers >= 1"),
    ("{a: [", "not valid YAML"),
    ("kind: Pod", "NodeList"),
])
def test_bad_topology_is_a_config_error(text, needle):
    with pytest.raises(ConfigError, match=needle):
        SimulatedCluster.from_yaml(text)


def test_emulator_gpu_names():
    assert emulator_gpu("NVIDIA-H20") == "H20"
    assert emulator_gpu("l40s") == "L40S"


# ---------------------------------------------------------------- the gate

def ratio_error(p: int, d: int, ratio: tuple[int, int]) -> float:
    return float("inf") if p == 0 or d == 0 else abs((p / d) / (ratio[0] / ratio[1]) - 1)


def test_gate_worked_examples():
    r = (5, 2)
    # the demo's first DG: (3, 1) is within 34% of 2.5 (3/1 = 3.0, 20% off): all join
    assert gate_admit(PoolCounts(0, 0), PoolCounts(3, 1), ratio=r, tolerance=0.34) == PoolCounts(3, 1)
    # prefills ready before their decode wait
    assert gate_admit(PoolCounts(0, 0), PoolCounts(2, 0), ratio=r, tolerance=0.34) == PoolCounts(0, 0)
    # growing 3P1D by 2P1D: the prefills alone would make 5:1 (100% off) — they wait ...
    assert gate_admit(PoolCounts(3, 1), PoolCounts(2, 0), ratio=r, tolerance=0.34) == PoolCounts(0, 0)
    # ... and join with the decode: 5:2 exactly
    assert gate_admit(PoolCounts(3, 1), PoolCounts(2, 1), ratio=r, tolerance=0.34) == PoolCounts(2, 1)
    # a decode alone waits: 3:2 is 40% off 2.5, and |3 - 2.5·2| = 2 is farther than |3 - 2.5·1| = 0.5
    assert gate_admit(PoolCounts(3, 1), PoolCounts(0, 1), ratio=r, tolerance=0.34) == PoolCounts(0, 0)
    # the local rule: a DG that cannot serve takes a ready pair even if unbalanced (1:1 vs 5:2)
    assert gate_admit(PoolCounts(0, 0), PoolCounts(1, 1), ratio=r, tolerance=0.34) == PoolCounts(1, 1)


@given(p=st.integers(0, 6), d=st.integers(0, 6), cp=st.integers(0, 6), cd=st.integers(0, 6),
       rp=st.integers(1, 5), rd=st.integers(1, 5), tol=st.floats(0.05, 0.6))
def test_gate_never_admits_more_than_ready_and_never_worsens(p, d, cp, cd, rp, rd, tol):
    allow = gate_admit(PoolCounts(p, d), PoolCounts(cp, cd), ratio=(rp, rd), tolerance=tol)
    assert 0 <= allow.prefill <= cp and 0 <= allow.decode <= cd
    if allow.total() and p and d:
        after = ratio_error(p + allow.prefill, d + allow.decode, (rp, rd))
        assert after <= tol + 1e-9 or after < ratio_error(p, d, (rp, rd)) + 1e-9
    if p == 0 or d == 0:
        # a DG that cannot serve never stays unable to when a pair is ready
        if (p + cp) and (d + cd):
            assert (p + allow.prefill) and (d + allow.decode)


# ---------------------------------------------------------------- real processes

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def _until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.2)


def _decision(current: PoolCounts, desired: PoolCounts) -> Decision:
    return Decision("chat", time.time(), "test", current, desired)


async def test_groups_carry_tier_draining_and_the_gpus_they_hold():
    """3P1D at 2 GPUs per prefill is 7 GPUs; with 1P+1D draining the DGs hold 10: the
    status page can only explain that if the groups say so."""
    svc = load_config(SERVICE_YAML.replace("prefill: {gpu_types: [NVIDIA-L20, NVIDIA-H20]}",
                                           "prefill: {gpu_types: [NVIDIA-L20, NVIDIA-H20], gpus_per_instance: 2}")
                      ).services[0]
    actuator = LocalActuator(cluster=SimulatedCluster.from_file(DEFAULT_TOPOLOGY),
                             in_flight=lambda name: 1)          # draining ones stay draining
    from heteroscale.coordinator.actuators.local import Instance

    def inst(name, role, group, s2, state, gpus):
        node = f"{s2[-1]}-{'l20' if role == 'prefill' else 'h20'}"
        return Instance(name=name, service="chat", role=role, group=group, node=node,
                        gpu_type="NVIDIA-L20" if role == "prefill" else "NVIDIA-H20", s1=node, s2=s2,
                        gpus=gpus, engine_port=1, kv_port=2, sidecar_port=3, created_s=0.0, state=state,
                        in_traffic=state == "ready")

    members = [inst("p0", "prefill", "chat-g1", "pod-a", "ready", 2),
               inst("p1", "prefill", "chat-g1", "pod-a", "ready", 2),
               inst("p2", "prefill", "chat-g1", "pod-a", "ready", 2),
               inst("d0", "decode", "chat-g1", "pod-a", "ready", 1),
               inst("p3", "prefill", "chat-g1", "pod-a", "draining", 2),
               inst("d1", "decode", "chat-g2", "pod-b", "draining", 1)]   # g2: only draining left
    actuator.instances = {i.name: i for i in members}
    try:
        status = await actuator.observe(svc)
    finally:
        await actuator.close()
    g1, g2 = status.groups
    assert status.current == PoolCounts(3, 1)
    assert (g1["name"], g1["tier"], g1["prefill"]["count"], g1["decode"]["count"]) == ("chat-g1", "medium", 3, 1)
    assert g1["draining"] == 1 and g1["draining_by_role"] == {"prefill": 1, "decode": 0}
    assert (g1["gpus"], g1["gpus_draining"]) == (9, 2)               # 3×2 + 1 serving, 2 draining
    assert (g2["name"], g2["s2"], g2["tier"]) == ("chat-g2", "pod-b", "medium")
    assert (g2["prefill"]["count"], g2["decode"]["count"], g2["draining"], g2["gpus"]) == (0, 0, 1, 1)
    assert sum(g["gpus"] for g in status.groups) == 10                # what "GPUs held" shows


@pytest.mark.slow
async def test_pairs_start_get_ready_drain_and_stop(tmp_path):
    svc = load_config(SERVICE_YAML).services[0]
    busy = {"n": 1}
    actuator = LocalActuator(cluster=SimulatedCluster.from_file(DEFAULT_TOPOLOGY),
                             settings=LocalSettings(model="8b", speedup=10.0, startup_delay_s=1.0,
                                                    poll_s=0.2, log_dir=tmp_path),
                             in_flight=lambda name: busy["n"] if "-p" in name else 0)
    try:
        status = await actuator.observe(svc)
        assert status.current == PoolCounts(0, 0)
        result = await actuator.apply(svc, _decision(PoolCounts(0, 0), PoolCounts(2, 1)))
        assert result.applied == PoolCounts(2, 1) and result.shortfall == PoolCounts(0, 0)
        pending = await actuator.observe(svc)
        assert pending.current == PoolCounts(2, 1) and pending.pending.total() >= 1
        assert pending.pending_since_s is not None
        await _until(lambda: len(actuator.routable("chat")) == 3)
        ready = await actuator.observe(svc)
        assert ready.ready == PoolCounts(2, 1) and ready.pending == PoolCounts(0, 0)
        (group,) = ready.groups
        assert group["s2"] in ("pod-a", "pod-b") and group["decode"]["gpu_type"] == "NVIDIA-H20"
        assert group["in_traffic"] == {"prefill": 2, "decode": 1}
        targets = await actuator.targets(svc)
        assert sorted(t.role for t in targets) == ["decode", "prefill", "prefill"]
        assert all(t.url.startswith("http://127.0.0.1:") and t.url.endswith("/v1/report") for t in targets)
        pids = actuator.all_pids()
        assert len(pids) == 6 and all(_alive(p) for p in pids)

        # scale in to 1P1D: the prefills have a request in flight (router hook), so the one
        # picked leaves traffic and drains, and stops only when its request is done
        await actuator.apply(svc, _decision(PoolCounts(2, 1), PoolCounts(1, 1)))
        after = await actuator.observe(svc)
        assert after.current == PoolCounts(1, 1)
        draining = [i for i in actuator.instances.values() if i.state == "draining"]
        assert [i.role for i in draining] == ["prefill"] and not draining[0].in_traffic
        (group,) = after.groups
        assert group["draining"] == 1 and group["draining_by_role"]["prefill"] == 1 and group["tier"] == "medium"
        assert group["prefill"]["count"] == 1 and (group["gpus"], group["gpus_draining"]) == (3, 1)
        assert [i.role for i in actuator.routable("chat")] .count("prefill") == 1
        await asyncio.sleep(1.0)                       # several polls: still draining while busy
        assert draining[0].state == "draining" and all(_alive(p) for p in draining[0].pids())
        busy["n"] = 0
        await _until(lambda: not any(i.state == "draining" for i in actuator.instances.values()), 20)
        stopped = [i for i in actuator.history if i.state == "stopped"]
        assert len(stopped) == 1 and not any(_alive(p) for p in stopped[0].pids())
    finally:
        await actuator.close()
    assert not [p for p in pids if _alive(p)]


@pytest.mark.slow
async def test_a_dead_engine_fails_its_pair_and_leaves_traffic(tmp_path):
    svc = load_config(SERVICE_YAML).services[0]
    actuator = LocalActuator(cluster=SimulatedCluster.from_file(DEFAULT_TOPOLOGY),
                             settings=LocalSettings(model="8b", speedup=10.0, startup_delay_s=0.5, poll_s=0.2))
    try:
        await actuator.apply(svc, _decision(PoolCounts(0, 0), PoolCounts(2, 1)))
        await _until(lambda: len(actuator.routable("chat")) == 3)
        victim = next(i for i in actuator.instances.values() if i.role == "prefill")
        engine_pid, sidecar_pid = victim.pids()
        os.kill(engine_pid, signal.SIGKILL)
        await _until(lambda: victim.name not in actuator.instances, 10)
        assert victim.state == "failed" and not victim.in_traffic
        await _until(lambda: not _alive(sidecar_pid), 10)
        status = await actuator.observe(svc)
        assert status.current == PoolCounts(1, 1)
        all_pids = actuator.all_pids()
    finally:
        await actuator.close()
    assert not [p for p in all_pids if _alive(p)]
