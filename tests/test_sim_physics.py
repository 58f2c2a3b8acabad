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
from tests.sim_helpers import M8, spec_8b



def _spec(**kw) -> ClusterSpec:
    return spec_8b(decode_gpu="L20", **kw)


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


# ---------------------------------------------------------------- configuration

from heteroscale.errors import ConfigError  # noqa: E402
from heteroscale.simulator.config import load_sim_config  # noqa: E402

_BASE = """
services:
  - {name: svc, pd_ratio: "2:1", target_decode_tps_per_instance: 1000, slo: {tbt_s: 0.05}, prefill: {}, decode: {}}
simulation:
  model: 8b
"""


def test_fidelity_keys_load_into_the_cluster_spec():
    cfg = load_sim_config(_BASE + """
  prefill: {gpu: L40S, tp: 1, startup_s: 90}
  decode: {gpu: H20, tp: 1, startup_s: 150}
  startup_jitter_s: 5
  gpu_capacity: {h20: 8, L40S: 4}
  kv_uplink_gbps: 800
  kv_switches: 2
  degraded_links: {1: 0.25}
  prefill_kv_buffer_ratio: 0.5
  preemption: swap
  router: round-robin
  prefix_cache_ratio: 0.2
  report_loss: 0.1
""")
    c = cfg.cluster
    assert (c.role_startup_s("prefill"), c.role_startup_s("decode"), c.startup_jitter_s) == (90.0, 150.0, 5.0)
    assert dict(c.gpu_capacity) == {"H20": 8, "L40S": 4}
    assert (c.kv_uplink_gbps, c.kv_switches, dict(c.degraded_links)) == (800.0, 2, {1: 0.25})
    assert (c.prefill_kv_buffer_ratio, c.preemption, c.router, c.prefix_cache_ratio) == (
        0.5, "swap", "round-robin", 0.2)
    assert cfg.report_loss == 0.1


def test_todays_configs_get_the_realistic_defaults():
    cfg = load_sim_config(_BASE + "  prefill: {gpu: L40S, tp: 1}\n  decode: {gpu: H20, tp: 1}\n  startup_s: 100\n")
    c = cfg.cluster
    assert c.role_startup_s("prefill") == c.role_startup_s("decode") == 100.0
    assert c.startup_jitter_s > 0 and c.preemption == "recompute" and c.router == "least-loaded"


def test_fidelity_key_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_sim_config(_BASE + """
  prefill: {gpu: L40S, tp: 1, startup_s: -1}
  decode: {gpu: H20, tp: 1}
  gpu_capacity: {B300: 8, H20: -1}
  degraded_links: {3: 0.5}
  preemption: discard
  router: random
  report_loss: 2
""")
    text = "\n".join(err.value.problems)
    for key in ("prefill.startup_s", "gpu_capacity.B300", "gpu_capacity.H20", "degraded_links.3",
                "preemption", "router", "report_loss"):
        assert f"simulation.{key}" in text, key


# ---------------------------------------------------------------- start-up and scarcity

def test_startup_times_are_per_role_with_seeded_jitter():
    spec = _spec(prefill_startup_s=30.0, decode_startup_s=200.0, startup_jitter_s=10.0)
    wl = _load(1.0, 10.0)

    def ready_times(seed):
        cluster = Cluster(spec, wl, horizon_s=400, initial_prefill=1, initial_decode=1, seed=seed)
        cluster.set_counts(9, 9, now_s=5.0)
        return ([p.ready_s for p in cluster.prefill[1:]], [d.ready_s for d in cluster.decode[1:]])

    p, d = ready_times(1)
    assert all(25.0 <= t <= 45.0 for t in p) and all(195.0 <= t <= 215.0 for t in d)
    assert len(set(p)) == len(p)                       # jittered, not all the same
    assert ready_times(1) == (p, d) and ready_times(2) != (p, d)


def test_an_instance_without_gpus_stays_pending_and_holds_no_gpus():
    spec = _spec(gpu_capacity={"L20": 2}, startup_jitter_s=0.0)
    wl = _load(1.0, 10.0)
    cluster = Cluster(spec, wl, horizon_s=400, initial_prefill=1, initial_decode=1)
    cluster.set_counts(1, 3, now_s=0.0)
    assert cluster.unplaced_counts() == (0, 1)
    cluster.advance_to(100.0)
    assert cluster.ready_counts(100.0) == (1, 2)       # the third never started
    assert cluster.gpu_seconds(100.0)[1] == pytest.approx(200.0)
    cluster.set_counts(1, 2, now_s=100.0)             # cancelling it leaves nothing behind
    cluster.advance_to(101.0)
    assert cluster.unplaced_counts() == (0, 0) and cluster.counts() == (1, 2)


def test_a_pending_role_holds_the_policys_pending_guard(monkeypatch):
    import heteroscale.coordinator.core.policy as coordinator_policy
    from heteroscale.coordinator.config import load_config

    calls = []
    real = coordinator_policy.decide

    def spy(**kwargs):
        out = real(**kwargs)
        calls.append((kwargs["observation"], out[0]))
        return out

    monkeypatch.setattr(coordinator_policy, "decide", spy)
    service = load_config({"coordinator": {"backend": "local", "interval_s": 10}, "services": [
        {"name": "svc", "pd_ratio": "1:1", "target_decode_tps_per_instance": 300.0,
         "slo": {"ttft_s": 5.0, "tbt_s": 0.2}, "max_decode": 16,
         "policy": {"scale_out_cooldown_s": 20, "pending_timeout_s": 600},
         "prefill": {}, "decode": {}}]}).services[0]
    # Only three decode GPUs: a load that wants more leaves the rest pending for good.
    spec = _spec(gpu_capacity={"L20": 3}, startup_s=30.0, startup_jitter_s=0.0)
    wl = _load(6.0, 500.0, prompt=1000, output=300)
    res = simulate(wl, spec, policies.build("heteroscale", service=service, workload=wl),
                   initial=PoolCounts(1, 1), settings=RunSettings(interval_s=10, duration_s=500))
    pending = [(obs, dec) for obs, dec in calls if obs.pools.pending.decode > 0
               and obs.pools.ready.decode == 3]
    assert pending, "no tick saw the unplaceable decode instance pending"
    assert all(dec.desired.decode <= obs.pools.current.decode for obs, dec in pending)
    assert any(dec.reason == "hold_pending" for _, dec in pending)
    assert res.summary["mean_instances"]["decode"] <= 3.0


# ---------------------------------------------------------------- prefix caches and routing

def _shared_prefix_load(*, prefixes: int = 20, requests: int = 1200, rps: float = 6.0, seed: int = 0):
    # Chat-like prompts: one of ``prefixes`` system prompts (8 blocks of 512 tokens) plus
    # two blocks of the user's own text.
    import numpy as np
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1.0 / rps, requests))
    which = rng.integers(0, prefixes, requests)
    blocks = [[int(w) * 100 + b for b in range(8)] + [10_000_000 + 2 * i, 10_000_001 + 2 * i]
              for i, w in enumerate(which)]
    return traces.make_workload("prefix", arrival, [10 * 512] * requests, [50] * requests,
                                block_hashes=blocks)


def test_more_prefill_instances_under_round_robin_lower_the_hit_rate():
    wl = _shared_prefix_load()
    spec = _spec(router="round-robin")
    few = _run(wl, (2, 4), spec=spec, duration_s=240).summary
    many = _run(wl, (8, 4), spec=spec, duration_s=240).summary
    assert 0 < many["prefix_hit_ratio"] < few["prefix_hit_ratio"] < 0.8
    # What a prefill sidecar reports diverges: all prompt tokens vs the ones computed.
    assert few["prefill_uncached_tokens"] < 0.6 * few["prefill_tokens"]
    # A cache-aware router keeps each prefix on the instance that holds it.
    aware = _run(wl, (8, 4), spec=_spec(router="cache-aware"), duration_s=240).summary
    assert aware["prefix_hit_ratio"] > many["prefix_hit_ratio"]


def test_a_small_prefix_cache_evicts():
    wl = _shared_prefix_load()
    big = _run(wl, (2, 4), spec=_spec(router="round-robin"), duration_s=240).summary
    small = _run(wl, (2, 4), spec=_spec(router="round-robin", prefix_cache_ratio=0.002), duration_s=240).summary
    assert small["prefix_hit_ratio"] < big["prefix_hit_ratio"]


def test_traces_without_block_hashes_keep_their_cached_tokens():
    wl = traces.make_workload("shared", [1.0, 2.0, 3.0], [2000] * 3, [20] * 3, cached_tokens=[0, 1000, 1000])
    s = _run(wl, (3, 1), spec=_spec(router="round-robin"), duration_s=30).summary
    assert s["prefill_uncached_tokens"] == 4000


# ---------------------------------------------------------------- KV links with capacity

def test_loaded_cross_switch_links_lower_throughput():
    # 8000-token prompts carry ~1 GB of KV each. Across switches every transfer also needs
    # the one shared uplink (25 Gbit/s here: ~3 transfers/s); under one switch each
    # prefill instance's own 400 Gbit/s NIC carries its transfers.
    spec_same = _spec(kv_uplink_gbps=25.0)
    spec_cross = _spec(kv_uplink_gbps=25.0, cross_switch_share=1.0)
    light = _load(0.5, 300.0, prompt=8000, output=50)
    heavy = _load(4.5, 300.0, prompt=8000, output=50)
    run = lambda wl, spec: _run(wl, (6, 2), spec=spec, duration_s=300).summary  # noqa: E731
    light_same, light_cross = run(light, spec_same), run(light, spec_cross)
    heavy_same, heavy_cross = run(heavy, spec_same), run(heavy, spec_cross)
    # Light load: crossing costs its time on the narrower uplink, no queueing on the wire.
    assert light_cross["kv_transfer_wait_s"] < 0.05
    assert light_cross["ttft_p90_s"] < 2 * light_same["ttft_p90_s"]
    # Heavy load: the uplink queues, TTFT climbs and fewer requests are served in the run.
    assert heavy_cross["kv_transfer_wait_s"] > 10 * max(heavy_same["kv_transfer_wait_s"], 0.01)
    assert heavy_cross["ttft_p90_s"] > 5 * heavy_same["ttft_p90_s"]
    assert heavy_cross["completed"] < 0.9 * heavy_same["completed"]


def test_a_degraded_switch_slows_the_transfers_under_it():
    wl = _load(2.0, 200.0, prompt=8000, output=50)
    base = _run(wl, (6, 2), spec=_spec(kv_switches=2, kv_link_gbps=50.0), duration_s=200).summary
    bad = _run(wl, (6, 2), spec=_spec(kv_switches=2, kv_link_gbps=50.0, degraded_links={0: 0.2}),
               duration_s=200).summary
    assert bad["ttft_p90_s"] > 1.5 * base["ttft_p90_s"]
    assert bad["ttft_s"]["p50"] < bad["ttft_p90_s"]        # only the half under switch 0


def test_a_pending_instance_starts_when_a_draining_one_releases_its_gpus():
    # Scale in, then out again at once: the new instance waits for the GPU the draining one
    # still holds (it finishes its running requests first), like a Pending pod.
    spec = _spec(gpu_capacity={"L20": 2}, startup_s=10.0, startup_jitter_s=0.0)
    wl = _load(4.0, 60.0, prompt=1000, output=400)
    cluster = Cluster(spec, wl, horizon_s=400, initial_prefill=2, initial_decode=2)
    cluster.submit_through(len(wl))
    cluster.advance_to(30.0)
    assert all(d.running for d in cluster.decode)
    cluster.set_counts(2, 1, now_s=30.0)
    cluster.set_counts(2, 2, now_s=30.0)
    assert cluster.unplaced_counts() == (0, 1)
    cluster.advance_to(31.0)
    assert cluster.unplaced_counts() == (0, 1)          # still draining
    cluster.advance_to(200.0)
    assert cluster.unplaced_counts() == (0, 0)
    new = max(cluster.decode, key=lambda d: d.created_s)
    assert new.placed_s > 31.0 and new.ready_s == new.placed_s + 10.0
    assert cluster.ready_counts(200.0) == (2, 2)


def test_many_prefills_feeding_one_decode_queue_on_its_nic():
    # Six prefill instances, one decode instance, 50 Gbit/s NICs: every transfer lands
    # through the one decode NIC, so they wait for each other although each prefill NIC idles.
    wl = _load(3.0, 120.0, prompt=8000, output=20)
    one = _run(wl, (6, 1), spec=_spec(kv_link_gbps=50.0), duration_s=150).summary
    three = _run(wl, (6, 3), spec=_spec(kv_link_gbps=50.0), duration_s=150).summary
    assert one["kv_transfer_wait_s"] > 2 * three["kv_transfer_wait_s"]


def test_cache_aware_routing_does_not_pile_onto_the_warm_instance():
    # Every prompt shares one long prefix: a router that only chased the longest match would
    # send everything to the first instance that saw it. The cache-aware router takes the
    # instance where the request would finish first, so it accepts a queue only up to what
    # the hit saves; past one instance's capacity it spreads the load (warming the others).
    import numpy as np
    spec = _spec(router="cache-aware")
    n = 1800
    rng = np.random.default_rng(3)
    arrival = np.cumsum(rng.exponential(1 / 30.0, n))              # ~1.5x one warm instance
    blocks = [list(range(8)) + [1000 + i] for i in range(n)]
    wl = traces.make_workload("one-prefix", arrival, [9 * 512] * n, [30] * n, block_hashes=blocks)
    cluster = Cluster(spec, wl, horizon_s=120, initial_prefill=4, initial_decode=4)
    cluster.submit_through(n)
    cluster.advance_to(120.0)
    saved = pm.prefill_time_s(M8, spec.prefill.gpu, 1, 9 * 512) - pm.prefill_time_s(
        M8, spec.prefill.gpu, 1, 9 * 512, cached_tokens=8 * 512)
    served = [p.cache.queries for p in cluster.prefill]
    assert sum(1 for q in served if q > 0) >= 2
    assert float(np.nanpercentile(cluster.ttft_s, 99)) < saved + 0.5
