"""The simulator's physics: what couples prefill and decode, and what each shortage shows.

Each test sets up a small service (8B model, one GPU per instance) whose capacity is
known from the performance model, and pins one mechanism of ``simulator/model``
(docs/simulator.md has the table of mechanisms and the engine behaviour each follows).
"""

from __future__ import annotations

import pytest

from heteroscale.coordinator.core.types import PoolCounts
from heteroscale.simulator import perfmodel as pm
from heteroscale.simulator import policies, traces
from heteroscale.simulator.model.cluster import Cluster, ClusterSpec
from heteroscale.simulator.model.runner import RunSettings, simulate

M8 = pm.model("8b")


def _spec(**kw) -> ClusterSpec:
    base = dict(prefill=pm.InstanceSpec(M8, pm.gpu("L40S"), 1), decode=pm.InstanceSpec(M8, pm.gpu("L20"), 1),
                startup_s=60.0, tick_s=0.5)
    base.update(kw)
    return ClusterSpec(**base)


def _load(rps: float, duration_s: float, *, prompt: int = 2000, output: int = 300, seed: int = 0):
    src = traces.synthetic_sizes(prompt_mean=prompt, output_mean=output, spread_ratio=0.1, seed=seed)
    return traces.poisson(src, rate_rps=rps, duration_s=duration_s, seed=seed)


def _run(wl, counts, *, spec=None, duration_s=None, **settings):
    counts = PoolCounts(*counts)
    return simulate(wl, spec or _spec(), policies.Static("fixed", counts), initial=counts,
                    settings=RunSettings(interval_s=10, duration_s=duration_s, **settings))


def _prefill_rps(spec: ClusterSpec, prompt: int) -> float:
    return 1.0 / pm.prefill_time_s(M8, spec.prefill.gpu, 1, prompt)


def test_a_decode_shortage_raises_ttft_as_well_as_tbt():
    # Prefill has room to spare in both runs; only the decode pool shrinks. Decode can hold
    # only so many sequences (KV capacity), so requests wait for admission with their KV
    # on the prefill instance, and the client's first token waits with them.
    spec = _spec()
    rps = 0.5 * 4 * _prefill_rps(spec, 2000)
    wl = _load(rps, 300.0)
    enough = _run(wl, (4, 6), spec=spec, duration_s=300).summary
    short = _run(wl, (4, 1), spec=spec, duration_s=300).summary
    assert short["tbt_p90_s"] > 1.5 * enough["tbt_p90_s"]
    assert short["ttft_p90_s"] > 3 * enough["ttft_p90_s"]
    # The prefill instances held KV that decode could not take, so their passes stalled.
    assert short["prefill_stalls"] > 0 and enough["prefill_stalls"] == 0


def test_a_prefill_shortage_raises_ttft_not_tbt():
    spec = _spec()
    rps = 1.3 * _prefill_rps(spec, 2000)          # more than one prefill instance can take
    wl = _load(rps, 300.0)
    enough = _run(wl, (4, 6), spec=spec, duration_s=300).summary
    short = _run(wl, (1, 6), spec=spec, duration_s=300).summary
    assert short["ttft_p90_s"] > 10 * enough["ttft_p90_s"]
    # Decode sees fewer requests at once, never a longer step.
    assert short["tbt_p90_s"] <= enough["tbt_p90_s"] * 1.02


def test_the_first_token_waits_for_decode_admission():
    # One decode slot: the second of two simultaneous requests is admitted (and streams
    # its first token) only after the first has finished.
    spec = _spec(decode_max_batch=1)
    wl = traces.make_workload("two", [1.0, 1.0], [1000, 1000], [200, 200])
    cluster = Cluster(spec, wl, horizon_s=60, initial_prefill=2, initial_decode=1)
    cluster.submit(0)
    cluster.submit(1)
    cluster.advance_to(60.0)
    alone = pm.prefill_time_s(M8, spec.prefill.gpu, 1, 1000) + pm.kv_transfer_time_s(
        M8, 1000, bandwidth_gbps=spec.kv_link_gbps)
    first, second = sorted(cluster.ttft_s)
    assert first == pytest.approx(alone, rel=1e-6)
    assert 1.0 + second >= min(cluster.done_s) - 1e-9            # after the first one finished
    assert max(cluster.tbt_s) < 2 * min(cluster.tbt_s)          # and its TBT is not the wait


def test_a_full_prefill_kv_buffer_stalls_prefill():
    # A tiny buffer (one prompt) and a slow decode: prefill cannot run ahead of decode.
    roomy = _run(_load(4.0, 120.0), (2, 1), spec=_spec(decode_max_batch=4), duration_s=150).summary
    tight = _run(_load(4.0, 120.0), (2, 1), spec=_spec(decode_max_batch=4, prefill_kv_buffer_ratio=0.02),
                 duration_s=150).summary
    assert tight["prefill_stalls"] > roomy["prefill_stalls"]
    assert tight["mean_gpu_utilization"]["prefill"] < roomy["mean_gpu_utilization"]["prefill"]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_under_kv_pressure_finishes_every_request(mode):
    spec = _spec(kv_watermark=1.0, preemption=mode)
    wl = _load(3.0, 60.0, prompt=4000, output=2000)
    res = _run(wl, (4, 1), spec=spec, duration_s=1500)
    assert res.summary["preemptions"] > 0
    assert res.summary["completed"] == len(wl)


def test_recompute_costs_the_decode_batch_more_than_swap():
    # Recomputing prompt + output on the decode GPU takes compute; swapping back in takes
    # only PCIe time: the same overflow costs recompute more decode time, and with decode
    # the bottleneck that time shows as later admissions (TTFT).
    wl = _load(3.0, 60.0, prompt=4000, output=2000)
    rec = _run(wl, (4, 1), spec=_spec(kv_watermark=1.0, preemption="recompute"), duration_s=1500).summary
    swp = _run(wl, (4, 1), spec=_spec(kv_watermark=1.0, preemption="swap"), duration_s=1500).summary
    assert rec["preemptions"] > 0 and swp["preemptions"] > 0
    assert rec["ttft_s"]["p50"] > 1.05 * swp["ttft_s"]["p50"]
