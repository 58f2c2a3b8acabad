"""The discrete-event P/D cluster, the replay runner and the policies.

Small workloads and short spans: each simulation here takes well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest

import heteroscale.coordinator.core.policy as coordinator_policy
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.types import PoolCounts
from heteroscale.simulator import perfmodel as pm
from heteroscale.simulator import policies, traces
from heteroscale.simulator.model.cluster import Cluster, ClusterSpec
from heteroscale.simulator.model.runner import RunSettings, simulate
from tests.sim_helpers import M8, spec_8b



def _spec(**kw) -> ClusterSpec:
    return spec_8b(**kw)


def _service(**kw):
    svc = {"name": "svc", "pd_ratio": "2:1", "target_decode_tps_per_instance": 1500.0,
           "slo": {"ttft_s": 1.0, "tbt_s": 0.04}, "max_decode": 32,
           "policy": {"scale_out_cooldown_s": 30, "scale_in_stabilization_s": 120, "smoothing_window_s": 30},
           "prefill": {}, "decode": {}}
    svc.update(kw)
    return load_config({"coordinator": {"backend": "local", "interval_s": 10},
                        "services": [svc]}).services[0]


def _load(rps: float, duration_s: float, *, prompt: int = 1000, output: int = 100, seed: int = 0):
    src = traces.synthetic_sizes(prompt_mean=prompt, output_mean=output, spread_ratio=0.1, seed=seed)
    return traces.poisson(src, rate_rps=rps, duration_s=duration_s, seed=seed)


def _run(wl, counts=(2, 1), controller=None, spec=None, duration_s=None, placement=None, **settings):
    counts = PoolCounts(*counts)
    ctl = controller or policies.Static("fixed", counts)
    return simulate(wl, spec or _spec(), ctl, initial=counts, placement=placement,
                    settings=RunSettings(interval_s=10, duration_s=duration_s, slo_ttft_s=1.0,
                                         slo_tbt_s=0.04, **settings))


def test_low_load_latency_equals_the_performance_model():
    # One request alone: TTFT = its prefill time + KV transfer; TBT = one decode step.
    wl = traces.make_workload("one", [1.0], [2000], [101])
    spec = _spec()
    res = _run(wl, spec=spec, duration_s=30)
    prefill_s = pm.prefill_time_s(M8, spec.prefill.gpu, 1, 2000)
    kv_s = pm.kv_transfer_time_s(M8, 2000, bandwidth_gbps=spec.kv_link_gbps)
    assert res.summary["ttft_s"]["p50"] == pytest.approx(prefill_s + kv_s, rel=1e-3)
    # Decode starts when the KV lands; the fluid steps run at the model's step time for
    # a batch of one holding 2000..2100 tokens of KV.
    step_lo = pm.decode_step_time_s(M8, spec.decode.gpu, 1, 1, 2000)
    step_hi = pm.decode_step_time_s(M8, spec.decode.gpu, 1, 1, 2100)
    tbt = res.summary["tbt_s"]["p50"]
    assert step_lo - 1e-4 <= tbt <= step_hi + 1e-4


def test_all_requests_finish_and_tokens_are_conserved():
    wl = _load(2.0, 120.0)
    res = _run(wl, duration_s=200)
    assert res.summary["completed"] == res.summary["requests"] == len(wl)
    # Decode emits output - 1 tokens per request (the first comes from prefill).
    assert res.summary["decode_tokens"] == pytest.approx(float((wl.output_tokens - 1).sum()), rel=1e-6)
    assert res.summary["prefill_tokens"] == pytest.approx(float(wl.prompt_tokens.sum()))


def test_ttft_falls_off_a_cliff_past_prefill_capacity():
    spec = _spec()
    cap_rps = 2 / pm.prefill_time_s(M8, spec.prefill.gpu, 1, 1000)     # two prefill instances
    light = _run(_load(0.4 * cap_rps, 300.0), spec=spec, duration_s=300)
    heavy = _run(_load(1.2 * cap_rps, 300.0), spec=spec, duration_s=300)
    assert light.summary["ttft_p90_s"] < 0.5
    assert heavy.summary["ttft_p90_s"] > 10 * light.summary["ttft_p90_s"]
    assert heavy.summary["slo_attainment"] < light.summary["slo_attainment"]


def test_utilisation_prefill_linear_decode_flat():
    spec = _spec()
    cap_rps = 2 / pm.prefill_time_s(M8, spec.prefill.gpu, 1, 1000)
    lo = _run(_load(0.2 * cap_rps, 600.0), spec=spec, duration_s=600).summary
    hi = _run(_load(0.6 * cap_rps, 600.0), spec=spec, duration_s=600).summary
    ratio = hi["mean_gpu_utilization"]["prefill"] / lo["mean_gpu_utilization"]["prefill"]
    assert ratio == pytest.approx(3.0, rel=0.15)                      # linear in load
    assert hi["mean_gpu_utilization"]["decode"] > 0.8
    assert hi["mean_gpu_utilization"]["decode"] - lo["mean_gpu_utilization"]["decode"] < 0.1   # flat
    assert hi["mean_sm_activity"]["decode"] > lo["mean_sm_activity"]["decode"]                  # sluggish


def test_kv_capacity_forces_queueing_and_preemption():
    # 8b on one L20 holds ~137k KV tokens; 4000-token prompts growing by 2000 tokens
    # each overflow it and the newest sequences are preempted, yet all finish.
    spec = _spec(decode=pm.InstanceSpec(M8, pm.gpu("L20"), 1), kv_watermark=1.0)
    wl = _load(3.0, 60.0, prompt=4000, output=2000)
    res = _run(wl, counts=(4, 1), spec=spec, duration_s=1200)
    assert res.summary["preemptions"] > 0
    assert res.summary["completed"] == len(wl)


def test_cross_switch_transfers_cost_bandwidth():
    wl = traces.make_workload("one", [1.0], [8000], [10])
    same = _run(wl, spec=_spec(kv_link_gbps=50.0), duration_s=20).summary["ttft_s"]["p50"]
    cross = _run(wl, spec=_spec(kv_link_gbps=50.0, cross_switch_share=1.0, cross_switch_ratio=0.8),
                 duration_s=20).summary["ttft_s"]["p50"]
    kv_s = pm.kv_transfer_time_s(M8, 8000, bandwidth_gbps=50.0)
    assert cross - same == pytest.approx(kv_s / 0.8 - kv_s, abs=2e-4)    # summary rounds to 0.1 ms


def test_new_instances_take_traffic_only_after_startup():
    wl = _load(1.0, 100.0)
    # (No start-up jitter here: exact times. Jitter is the default since issue #13.)
    cluster = Cluster(_spec(startup_s=60.0, startup_jitter_s=0.0), wl, horizon_s=200, initial_prefill=1,
                      initial_decode=1)
    cluster.advance_to(10.0)
    cluster.set_counts(3, 2, now_s=10.0)
    assert cluster.counts() == (3, 2)
    assert cluster.ready_counts(69.0) == (1, 1)
    assert cluster.ready_counts(70.0) == (3, 2)
    cluster.advance_to(20.0)
    cluster.set_counts(1, 1, now_s=20.0)             # cancelling starting instances frees them at once
    cluster.advance_to(21.0)
    assert cluster.counts() == (1, 1) and len(cluster.retired) == 3
    # GPU time of the cancelled instances: created at 10, released at 20.5 (next tick end).
    p_gs, d_gs = cluster.gpu_seconds(21.0)
    assert p_gs == pytest.approx(21.0 + 2 * 10.5)
    assert d_gs == pytest.approx(21.0 + 10.5)


def test_seeded_runs_are_reproducible():
    a = _run(_load(3.0, 120.0, seed=4), duration_s=150).summary
    b = _run(_load(3.0, 120.0, seed=4), duration_s=150).summary
    assert a == b


def test_heteroscale_calls_the_coordinators_own_decide(monkeypatch):
    # The adapter must not copy the policy: spy on the function the coordinator uses.
    assert policies.coord_policy is coordinator_policy
    calls = []
    real = coordinator_policy.decide

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(coordinator_policy, "decide", spy)
    service = _service()
    wl = _load(4.0, 300.0)
    ctl = policies.build("heteroscale", service=service, workload=wl)
    res = _run(wl, counts=(2, 1), controller=ctl, duration_s=300)
    assert len(calls) == 30                                   # one per 10 s tick
    assert all(c["service"] is service for c in calls)
    obs = calls[-1]["observation"]
    assert obs.decode_tps == pytest.approx(obs.decode_tps) and obs.decode_tps > 0
    assert sum(res.summary["decision_reasons"].values()) == 30


def test_heteroscale_follows_load_and_keeps_the_ratio():
    service = _service(target_decode_tps_per_instance=400.0, pd_ratio="2:1")
    src = traces.synthetic_sizes(prompt_mean=800, output_mean=200, seed=1)
    # 15 minutes at 8 rps, then 15 at 1 rps.
    hi = traces.poisson(src, rate_rps=8.0, duration_s=900, seed=1)
    lo = traces.poisson(src, rate_rps=1.0, duration_s=900, seed=2)
    wl = traces.make_workload("step", np.concatenate([hi.arrival_s, 900 + lo.arrival_s]),
                              np.concatenate([hi.prompt_tokens, lo.prompt_tokens]),
                              np.concatenate([hi.output_tokens, lo.output_tokens]))
    ctl = policies.build("heteroscale", service=service, workload=wl)
    res = _run(wl, counts=(2, 1), controller=ctl, duration_s=1800)
    to = [d["to"] for d in res.decisions]
    peak = max(t["decode"] for t in to)
    assert peak >= 3                                   # 8 rps × 199 tok ≈ 1600 tok/s / 400
    assert to[-1]["decode"] < peak                     # scaled in when load fell
    assert all(t["prefill"] == 2 * t["decode"] for t in to)   # 2:1 kept at every step


def test_hpa_on_gpu_utilisation_never_scales_decode_in():
    # 6 rps × 199 tokens ≈ 1200 tok/s: under one instance's τ = 1500, but spread over
    # four decode instances each still runs ~3 sequences, so its GPU stays "busy".
    service = _service(target_decode_tps_per_instance=1500.0)
    wl = _load(6.0, 1200.0, prompt=400, output=200)
    ctl = policies.build("hpa-gpu-util", service=service, workload=wl)
    res = _run(wl, counts=(4, 4), controller=ctl, duration_s=1200)
    decode_counts = [d["to"]["decode"] for d in res.decisions] or [4]
    assert min(decode_counts) >= 4
    hs = _run(wl, counts=(4, 4), controller=policies.build("heteroscale", service=service, workload=wl),
              duration_s=1200)
    assert min(d["to"]["decode"] for d in hs.decisions) < 4
    # What HPA sees: decode "utilisation" stays high even where load is a fraction of τ.
    assert hs.summary["mean_gpu_utilization"]["decode"] > 0.75


def test_every_policy_builds_and_runs():
    service = _service()
    wl = _load(2.0, 120.0)
    base = policies.BaselineSettings(prefill_target_tps_per_instance=5000.0)
    for name in policies.POLICY_NAMES:
        res = _run(wl, controller=policies.build(name, service=service, workload=wl, baselines=base),
                   duration_s=120)
        assert res.summary["requests"] == len(wl), name
    with pytest.raises(KeyError):
        policies.build("magic", service=service, workload=wl)


def test_independent_tps_takes_its_targets_from_the_config_never_the_workload():
    from heteroscale.errors import UsageError
    service = _service()
    wl = _load(2.0, 120.0)
    with pytest.raises(UsageError, match="prefill_target_tps_per_instance"):
        policies.build("independent-tps", service=service, workload=wl)
    # The same settings on a workload with 10x longer prompts give the same controller
    # decisions for the same windows: the target is not derived from the replay.
    base = policies.BaselineSettings(prefill_target_tps_per_instance=2000.0, decode_target_tps_per_instance=300.0)
    other = _load(2.0, 120.0, prompt=10_000)
    a = policies.build("independent-tps", service=service, workload=wl, baselines=base)
    b = policies.build("independent-tps", service=service, workload=other, baselines=base)
    counts = PoolCounts(2, 2)
    win = _window(prefill_uncached_tps=6000.0, decode_tps=300.0)
    assert a.signal(win, counts) == b.signal(win, counts) == pytest.approx((1.5, 0.5))


def _window(**kw):
    from heteroscale.simulator.model.runner import Window
    base = dict(now_s=0.0, window_s=30.0, prefill_tps=0.0, prefill_uncached_tps=0.0, decode_tps=0.0,
                ttft_p90_s=None, tbt_p90_s=None, prefill_gpu_util=0.0, decode_gpu_util=0.0,
                prefill_sm=0.0, decode_sm=0.0)
    base.update(kw)
    return Window(**base)


def test_static_and_periodic_use_the_operators_forecast_or_say_they_are_oracles():
    service = _service(target_decode_tps_per_instance=1000.0)
    wl = _load(2.0, 120.0)                       # ~200 decode tok/s
    fixed = policies.build("static-peak", service=service, workload=wl,
                           baselines=policies.BaselineSettings(static_counts=(6, 3)))
    assert fixed.counts == PoolCounts(6, 3) and not fixed.oracle
    forecast = policies.build("static-peak", service=service, workload=wl,
                              baselines=policies.BaselineSettings(peak_decode_tps=4500.0, peak_headroom=1.0))
    assert forecast.counts == PoolCounts(10, 5) and not forecast.oracle      # 4500/1000 -> 5 D, 2:1
    oracle = policies.build("static-peak", service=service, workload=wl)
    assert oracle.oracle and oracle.counts.decode == 1
    hourly = tuple(1000.0 * (h + 1) for h in range(24))
    per = policies.build("periodic", service=service, workload=wl,
                         baselines=policies.BaselineSettings(hourly_decode_tps=hourly, peak_headroom=1.0))
    assert not per.oracle and len(per.service.schedules) == 24
    assert [e.decode for e in per.service.schedules[:3]] == [1, 2, 3]
    assert policies.build("periodic", service=service, workload=wl).oracle


def test_parse_baselines_per_policy_blocks_and_problems():
    problems: list[str] = []
    got = policies.parse_baselines({"target_utilization": 0.6, "independent-tps": {"prefill_target_tps_per_instance": 9000},
                                    "static-peak": {"prefill": 10, "decode": 6},
                                    "periodic": {"hourly_decode_tps": [100] * 24}}, problems)
    assert problems == [] and got is not None
    assert (got.target_utilization, got.prefill_target_tps_per_instance, got.static_counts) == (0.6, 9000.0, (10, 6))
    assert got.hourly_decode_tps == (100.0,) * 24
    problems = []
    assert policies.parse_baselines({"target_utilization": 2, "independent-tps": {"prefill_target_tps_per_instance": -1,
                                                                                  "tau": 1},
                                     "static-peak": {"prefill": 3}, "periodic": {"hourly_decode_tps": [1]},
                                     "prefill_tps_target": 5}, problems) is None
    text = "\n".join(problems)
    for frag in ("target_utilization", "prefill_target_tps_per_instance", "independent-tps.tau: unknown key",
                 "static-peak: give both", "periodic.hourly_decode_tps", "prefill_tps_target: unknown key"):
        assert frag in text, frag
    assert len(problems) == 6


def test_from_pressure_test_sets_the_independent_tps_targets():
    got = policies.from_pressure_test({"prefill_target_tps_per_instance": 7000.0,
                                       "target_decode_tps_per_instance": 900.0},
                                      policies.BaselineSettings(target_utilization=0.5))
    assert (got.prefill_target_tps_per_instance, got.decode_target_tps_per_instance,
            got.target_utilization) == (7000.0, 900.0, 0.5)


def test_periodic_uses_the_coordinators_schedules():
    service = _service()
    wl = _load(2.0, 120.0)
    ctl = policies.build("periodic", service=service, workload=wl)
    assert isinstance(ctl, policies.HeteroScale) and ctl.service.schedules
    res = _run(wl, controller=ctl, duration_s=60)
    assert set(res.summary["decision_reasons"]) == {"schedule"}


def test_cluster_spec_validates():
    with pytest.raises(ValueError, match="cross_switch_ratio"):
        _spec(cross_switch_ratio=0.0)


# ---------------------------------------------------------------- placement replay

import heteroscale.coordinator.core.placement as coordinator_placement  # noqa: E402
from heteroscale.simulator.placement import Placement, TopologySpec, demand_for  # noqa: E402


def _placement(service, topology: TopologySpec) -> Placement:
    return Placement(topology, demand_for(service, _spec()))


def test_simulation_places_through_the_coordinators_planner(monkeypatch):
    calls = []
    real = coordinator_placement.plan

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(coordinator_placement, "plan", spy)
    service = _service(affinity="s1", target_decode_tps_per_instance=400.0)
    wl = _load(6.0, 600.0, prompt=800, output=200)
    placement = _placement(service, TopologySpec(s2=1, s1_per_s2=2, nodes_per_s1=4, gpus_per_node=8, mix="s1"))
    ctl = policies.build("heteroscale", service=service, workload=wl)
    res = _run(wl, counts=(2, 1), controller=ctl, duration_s=600, placement=placement)
    assert calls and calls[0]["desired"] == {"svc": PoolCounts(2, 1)}
    assert res.summary["placement"]["plans"] == len(calls)
    # Every count the cluster ran was a placed one, held in Deployment Groups.
    last = res.decisions[-1]["to"]
    assert placement.groups and sum(g.decode.count for g in placement.groups) == last["decode"]
    # An S1-affinity DG keeps prefill and decode under one switch: no cross-switch KV.
    assert placement.cross_switch_share() == 0.0
    assert res.summary["cross_switch_transfer_share"] == 0.0


def test_topology_blind_placement_crosses_switches():
    # Each S1 holds one GPU type (mix s2): prefill (L40S) and decode (H20) of any DG
    # sit under different S1 switches.
    service = _service(affinity="s2")
    placement = _placement(service, TopologySpec(s2=1, s1_per_s2=2, nodes_per_s1=4, gpus_per_node=8, mix="s2"))
    placed = placement.apply(PoolCounts(4, 2))
    assert placed == PoolCounts(4, 2)
    assert placement.cross_switch_share() == 1.0
    wl = _load(3.0, 120.0)
    res = _run(wl, counts=(4, 2), duration_s=150, placement=placement)
    assert res.summary["cross_switch_transfer_share"] == 1.0


def test_placement_shortfall_caps_a_scale_out():
    service = _service(affinity="s1")
    # One S1 with one 8-GPU node per type: at most 8 prefill and 8 decode single-GPU instances.
    placement = _placement(service, TopologySpec(s2=1, s1_per_s2=1, nodes_per_s1=2, gpus_per_node=8, mix="s1"))
    placed = placement.apply(PoolCounts(20, 10))
    assert placed.prefill <= 8 and placed.decode <= 8
    assert placement.shortfalls == 1
