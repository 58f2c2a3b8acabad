"""What the simulated policy sees: per-instance sidecar reports pooled by the coordinator's
own ``aggregate`` (warm-up exclusion, report loss), never the cluster's ground truth."""

from __future__ import annotations

import numpy as np

import heteroscale.coordinator.core.aggregate as coordinator_aggregate
import heteroscale.coordinator.core.policy as coordinator_policy
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.types import PoolCounts
from heteroscale.simulator import policies, traces
from heteroscale.simulator.model.cluster import ClusterSpec
from heteroscale.simulator.model.runner import RunSettings, simulate
from tests.sim_helpers import spec_8b



def _spec(**kw) -> ClusterSpec:
    return spec_8b(**kw)


def _service(**kw):
    svc = {"name": "svc", "pd_ratio": "2:1", "target_decode_tps_per_instance": 400.0,
           "slo": {"ttft_s": 1.0, "tbt_s": 0.04}, "max_decode": 32,
           "policy": {"scale_out_cooldown_s": 30, "scale_in_stabilization_s": 60, "smoothing_window_s": 30,
                      "warmup_s": 60},
           "prefill": {}, "decode": {}}
    svc.update(kw)
    return load_config({"coordinator": {"backend": "local", "interval_s": 10}, "services": [svc]}).services[0]


def _step_load():
    src = traces.synthetic_sizes(prompt_mean=800, output_mean=200, seed=1)
    hi = traces.poisson(src, rate_rps=8.0, duration_s=900, seed=1)
    lo = traces.poisson(src, rate_rps=1.0, duration_s=900, seed=2)
    return traces.make_workload("step", np.concatenate([hi.arrival_s, 900 + lo.arrival_s]),
                                np.concatenate([hi.prompt_tokens, lo.prompt_tokens]),
                                np.concatenate([hi.output_tokens, lo.output_tokens]))


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(({**kwargs, "args": args}, out))
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


def test_the_observation_is_the_coordinators_aggregate_of_sidecar_reports(monkeypatch):
    agg = _spy(monkeypatch, coordinator_aggregate, "aggregate")
    service = _service()
    wl = _step_load()
    res = simulate(wl, _spec(), policies.build("heteroscale", service=service, workload=wl),
                   initial=PoolCounts(2, 1), settings=RunSettings(interval_s=10, duration_s=600))
    assert len(agg) == 60
    kwargs, obs = agg[-1]
    # One report per ready instance, from the simulated sidecars, each with its own window.
    fetched = kwargs["args"][1]
    assert len(fetched) == obs.pools.ready.prefill + obs.pools.ready.decode
    assert all(f.report.window_s == 30.0 for f in fetched)
    # Instances started by the policy say when (warm-up); those serving before t = 0 do not.
    assert any(f.report.started_at is not None for f in fetched)
    assert all(o.warming_decode == 0 and o.fresh_decode == 1 for _, o in agg[:4])   # no warm-up hole at t = 0
    assert obs.decode_tps == sum(f.report.decode_tps for f in fetched if f.role == "decode")
    assert obs.pools.current == PoolCounts(*[res.decisions[-1]["to"][r] for r in ("prefill", "decode")])
    assert obs.decode_tps is not None and obs.decode_tps > 0
    assert obs.decode_running is not None and obs.decode_kv_usage_max is not None
    # Scale-outs brought instances that reported while still warming up: their load counts,
    # their latency and their capacity do not (the live coordinator's warm-up exclusion).
    assert any(o.warming_decode > 0 for _, o in agg)
    assert any(o.excluded.get("warming", 0) > 0 for _, o in agg)


def test_with_report_loss_the_policy_never_scales_in_on_partial_data(monkeypatch):
    calls = _spy(monkeypatch, coordinator_policy, "decide")
    service = _service()
    wl = _step_load()
    res = simulate(wl, _spec(), policies.build("heteroscale", service=service, workload=wl),
                   initial=PoolCounts(2, 1),
                   settings=RunSettings(interval_s=10, duration_s=1800, report_loss=0.3, seed=3))
    assert res.summary["reports_lost"] > 0
    partial = 0
    for kwargs, (decision, _) in calls:
        obs = kwargs["observation"]
        if obs.missing_decode > 0:
            partial += 1
            assert decision.desired.decode >= obs.pools.current.decode
            assert decision.desired.prefill >= obs.pools.current.prefill
    assert partial > 10
    # It did scale in once the view was complete again (so the check above could fail).
    to = [d["to"]["decode"] for d in res.decisions]
    assert to and min(to[to.index(max(to)):]) < max(to)


def test_report_loss_is_seeded():
    service = _service()
    wl = _step_load()

    def run(seed):
        return simulate(wl, _spec(), policies.build("heteroscale", service=service, workload=wl),
                        initial=PoolCounts(2, 1),
                        settings=RunSettings(interval_s=10, duration_s=600, report_loss=0.2, seed=seed)).summary

    assert run(1) == run(1)
    assert run(1)["reports_lost"] != run(2)["reports_lost"]
