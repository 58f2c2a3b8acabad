"""heteroscale.coordinator.core.bandwidth: the prefill x decode map, medians by locality, flags (worked examples)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from heteroscale.coordinator.core.bandwidth import (CROSS_SWITCH, SAME_SWITCH, UNKNOWN, BandwidthSettings,
                                           build_bandwidth_map, locality, switches_from_nodes)
from heteroscale.coordinator.core.topology import NodeView
from heteroscale.report import SidecarReport

NOW = 1_800_000_000.0
MB = 1e6


def report(pod: str, role: str, node: str | None, *, peers=None, service: str = "chat") -> SidecarReport:
    kv = {} if peers is None else {"probe": {"peers": peers}}
    return SidecarReport(service=service, role=role, pod=pod, engine="vllm", engine_up=True, stale=False,
                         observed_at=NOW, window_s=5.0, kv_transfer=kv, node=node)


def peer(name: str, bps: float | None, *, age_s: float = 10.0, error: str | None = None) -> dict:
    doc = {"peer": name, "address": f"{name}:9401", "measured_at": NOW - age_s, "rtt_s": 1e-4}
    if bps is not None:
        doc["bytes_per_second"] = bps
    if error:
        doc["error"] = error
    return doc


SWITCHES = {"n1": ("s2-a", "s1-a"), "n2": ("s2-a", "s1-a"), "n3": ("s2-a", "s1-b"), "n4": ("s2-b", "s1-a")}


def test_locality():
    assert locality(("a", "x"), ("a", "x")) == (SAME_SWITCH, "s1")
    assert locality(("a", "x"), ("a", "y")) == (CROSS_SWITCH, "s2")
    # S1 names are unique only inside their S2: ("b", "x") is another switch.
    assert locality(("a", "x"), ("b", "x")) == (CROSS_SWITCH, "none")
    assert locality(None, ("a", "x")) == (UNKNOWN, None)


def test_two_pairs_fast_same_switch_and_slow_cross_switch():
    reports = [report("p0", "prefill", "n1", peers=[peer("d0", 25 * MB), peer("d1", 10 * MB)]),
               report("d0", "decode", "n2"), report("d1", "decode", "n3")]
    svc = build_bandwidth_map(reports, switches=SWITCHES, now_s=NOW).service("chat")
    by_decode = {p.decode: p for p in svc.pairs}
    assert by_decode["d0"].locality == SAME_SWITCH and by_decode["d1"].locality == CROSS_SWITCH
    assert svc.same_switch_median_bytes_per_second == 25 * MB
    assert svc.cross_switch_median_bytes_per_second == 10 * MB
    assert svc.cross_to_same_ratio == pytest.approx(0.4)
    # Leave-one-out: d1's reference is d0's 25 MB/s; 10 < 0.85 * 25 -> flagged.
    # d0's reference is d1's 10 MB/s; 25 > 8.5 -> not flagged.
    assert by_decode["d1"].flagged and by_decode["d1"].reference_bytes_per_second == 25 * MB
    assert "40%" in by_decode["d1"].reason and "cross_switch" in by_decode["d1"].reason
    assert not by_decode["d0"].flagged
    assert [(p.prefill, p.decode) for p in svc.flagged] == [("p0", "d1")]


def test_paper_twenty_percent_loss_is_flagged_by_default_and_not_at_a_lower_ratio():
    # 3 same-switch pairs at 100 MB/s, one cross-switch at 80 (the paper's ~20% loss).
    reports = [report("p0", "prefill", "n1", peers=[peer("d0", 100 * MB), peer("d1", 100 * MB),
                                                      peer("d2", 100 * MB), peer("dx", 80 * MB)]),
               report("d0", "decode", "n2"), report("d1", "decode", "n2"), report("d2", "decode", "n2"),
               report("dx", "decode", "n4")]
    svc = build_bandwidth_map(reports, switches=SWITCHES, now_s=NOW).service("chat")
    assert [p.decode for p in svc.flagged] == ["dx"]           # 80 < 0.85 x 100
    lenient = build_bandwidth_map(reports, switches=SWITCHES, now_s=NOW,
                                  settings=BandwidthSettings(flag_ratio=0.7)).service("chat")
    assert lenient.flagged == ()                                # 80 >= 0.7 x 100


def test_groups_stale_errors_and_malformed_entries():
    reports = [report("p0", "prefill", "n1", peers=[
                   peer("d0", 30 * MB), peer("d1", 20 * MB),
                   peer("d2", 99 * MB, age_s=3600),              # stale: left out, counted
                   peer("d3", None, error="timeout"),            # listed, no number, never flagged
                   {"peer": "d4"},                               # no measured_at: malformed
                   "garbage", peer("d5", -1.0)]),                # malformed
               report("d0", "decode", "n2"), report("d1", "decode", "n2"), report("d3", "decode", "n2")]
    groups = {"p0": "dg-1", "d0": "dg-1", "d1": "dg-2"}
    svc = build_bandwidth_map(reports, switches=SWITCHES, groups=groups, now_s=NOW).service("chat")
    assert {p.decode for p in svc.pairs} == {"d0", "d1", "d3"}
    assert svc.stale == 1 and svc.malformed == 3
    d3 = next(p for p in svc.pairs if p.decode == "d3")
    assert d3.bytes_per_second is None and d3.error == "timeout" and not d3.flagged
    assert [(g.group, g.pairs, g.median_bytes_per_second) for g in svc.groups] == [("dg-1", 1, 30 * MB)]
    doc = build_bandwidth_map(reports, switches=SWITCHES, groups=groups, now_s=NOW).to_dict()
    assert doc["services"][0]["service"] == "chat" and len(doc["services"][0]["pairs"]) == 3


def test_unknown_locality_and_no_reports():
    reports = [report("p0", "prefill", None, peers=[peer("d0", 5 * MB), peer("ghost", 5 * MB)]),
               report("d0", "decode", "n2")]
    svc = build_bandwidth_map(reports, switches=SWITCHES, now_s=NOW).service("chat")
    assert {p.locality for p in svc.pairs} == {UNKNOWN}
    assert svc.same_switch_median_bytes_per_second is None and svc.cross_to_same_ratio is None
    assert build_bandwidth_map([], switches={}, now_s=NOW).services == ()


def test_services_are_kept_apart():
    reports = [report("a-p", "prefill", "n1", service="a", peers=[peer("a-d", 1 * MB)]),
               report("b-p", "prefill", "n1", service="b", peers=[peer("b-d", 100 * MB)])]
    m = build_bandwidth_map(reports, switches=SWITCHES, now_s=NOW)
    assert [s.service for s in m.services] == ["a", "b"]
    assert all(not s.flagged for s in m.services)               # one pair each: nothing to compare


def test_switches_from_topology_nodes():
    nodes = [NodeView(name="n1", gpu_type="H20", s1="x", s2="a", allocatable_gpus=8, free_gpus=8)]
    assert switches_from_nodes(nodes) == {"n1": ("a", "x")}


def test_settings_validation():
    with pytest.raises(ValueError):
        BandwidthSettings(flag_ratio=1.5)


@given(st.lists(st.floats(1e3, 1e11), min_size=1, max_size=12))
def test_equal_or_better_than_every_peer_is_never_flagged(rates):
    peers = [peer(f"d{i}", r) for i, r in enumerate(rates)]
    svc = build_bandwidth_map([report("p0", "prefill", "n1", peers=peers)], switches=SWITCHES,
                              now_s=NOW).service("chat")
    best = max(rates)
    for pair in svc.pairs:
        if pair.bytes_per_second == best:
            assert not pair.flagged
        if pair.flagged:
            assert pair.bytes_per_second < 0.85 * pair.reference_bytes_per_second


def test_bandwidth_families_read_back_through_a_registry():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from heteroscale.coordinator.metrics import bandwidth_families

    reports = [report("p0", "prefill", "n1", peers=[peer("d0", 25 * MB), peer("d1", 10 * MB),
                                                      peer("d2", None, error="timeout")]),
               report("d0", "decode", "n2"), report("d1", "decode", "n3")]
    bmap = build_bandwidth_map(reports, switches=SWITCHES, now_s=NOW)

    class _C:
        def collect(self):
            return bandwidth_families(bmap)

    registry = CollectorRegistry()
    registry.register(_C())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert samples[("heteroscale_kv_bandwidth_bytes_per_second",
                    (("decode", "d1"), ("locality", "cross_switch"), ("prefill", "p0"), ("service", "chat")))] == 10 * MB
    assert samples[("heteroscale_kv_bandwidth_median_bytes_per_second",
                    (("locality", "same_switch"), ("service", "chat")))] == 25 * MB
    assert samples[("heteroscale_kv_bandwidth_flagged_pairs", (("service", "chat"),))] == 1
    # The failed probe has no number: no series, never a 0.
    assert not any(k[0] == "heteroscale_kv_bandwidth_bytes_per_second" and ("decode", "d2") in k[1]
                   for k in samples)


def test_best_recent_rate_is_preferred_over_the_latest_probe():
    # d0's latest probe hit contention (5 MB/s) but its best recent is 25 MB/s: judged by 25.
    d0 = peer("d0", 5 * MB)
    d0["best_recent_bytes_per_second"] = 25 * MB
    reports = [report("p0", "prefill", "n1", peers=[d0, peer("d1", 24 * MB)])]
    svc = build_bandwidth_map(reports, switches=SWITCHES, now_s=NOW).service("chat")
    assert {p.decode: p.bytes_per_second for p in svc.pairs} == {"d0": 25 * MB, "d1": 24 * MB}
    assert svc.flagged == ()


# ---------------------------------------------------------------- engine connector pairs

def engine_report(pod: str, role: str, node: str, speed: float | None, *, observed_at: float = NOW,
                  peers=None) -> SidecarReport:
    engine = {"connector": "vllm_nixl", "bytes_per_second": 1e5}
    if speed is not None:
        engine["transfer_speed_bytes_per_second"] = speed
    kv = {"bytes_per_second": 1e5, "direction": "send" if role == "prefill" else "receive", "source": "engine",
          "sources": {"engine": engine}}
    if peers is not None:
        kv["probe"] = {"peers": peers}
    return SidecarReport(service="chat", role=role, pod=pod, engine="vllm", engine_up=True, stale=False,
                         observed_at=observed_at, window_s=5.0, kv_transfer=kv, node=node)


def test_engine_connector_speeds_make_the_pairs_of_each_deployment_group():
    """vLLM's NIXL metrics carry no peer: each DG's (prefill, decode) pairs are estimated from
    the two ends' per-transfer speeds (the lower one); a slow DG's pairs are flagged."""
    from heteroscale.coordinator.core.bandwidth import ENGINE_CONNECTOR, placement_hints
    reports = [engine_report("p0", "prefill", "n1", 24 * MB), engine_report("p1", "prefill", "n1", 25 * MB),
               engine_report("d0", "decode", "n3", 24.5 * MB),
               engine_report("p2", "prefill", "n4", 6.1 * MB), engine_report("d1", "decode", "n4", 6 * MB),
               engine_report("p9", "prefill", "n4", 30 * MB)]                 # in no DG: not paired
    groups = {"p0": "g0", "p1": "g0", "d0": "g0", "p2": "g1", "d1": "g1"}
    svc = build_bandwidth_map(reports, switches=SWITCHES, groups=groups, now_s=NOW).service("chat")
    pairs = {(p.prefill, p.decode): p for p in svc.pairs}
    assert set(pairs) == {("p0", "d0"), ("p1", "d0"), ("p2", "d1")}          # never across DGs
    assert all(p.source == ENGINE_CONNECTOR and p.to_dict()["source"] == ENGINE_CONNECTOR for p in svc.pairs)
    assert pairs[("p0", "d0")].bytes_per_second == 24 * MB                    # the lower end
    assert pairs[("p1", "d0")].bytes_per_second == 24.5 * MB
    assert pairs[("p0", "d0")].locality == CROSS_SWITCH and pairs[("p2", "d1")].locality == SAME_SWITCH
    assert [(p.prefill, p.decode) for p in svc.flagged] == [("p2", "d1")]
    assert "25% of the median of 2 other pair(s)" in pairs[("p2", "d1")].reason
    assert {g.group: g.median_bytes_per_second for g in svc.groups} == {"g0": 24.25 * MB, "g1": 6 * MB}
    hints = placement_hints(svc, group_domains={"g0": ("s2", "s2-a"), "g1": ("s2", "s2-b")}, affinity_level="s2")
    assert list(hints.slow_domains) == [("s2", "s2-b")]
    assert hints.worst_pods == ("d1", "p2")


def test_engine_pairs_need_groups_a_measured_end_and_fresh_reports_and_yield_to_probes():
    reports = [engine_report("p0", "prefill", "n1", None, peers=[peer("d0", 40 * MB)]),
               engine_report("d0", "decode", "n2", 20 * MB),
               engine_report("p1", "prefill", "n1", None), engine_report("d1", "decode", "n2", None),
               engine_report("p2", "prefill", "n1", 9 * MB, observed_at=NOW - 3600),
               engine_report("d2", "decode", "n2", 9 * MB)]
    groups = {"p0": "g0", "d0": "g0", "p1": "g1", "d1": "g1", "p2": "g2", "d2": "g2"}
    svc = build_bandwidth_map(reports, switches=SWITCHES, groups=groups, now_s=NOW).service("chat")
    # p0->d0 is probed (40 MB/s): the probe wins over the engine estimate (20 MB/s); g1 has no
    # measured end; g2's prefill report is an hour old: left out and counted.
    assert [(p.prefill, p.decode, p.source, p.bytes_per_second) for p in svc.pairs] == \
        [("p0", "d0", "probe", 40 * MB)]
    assert svc.stale == 1
    # Without Deployment Groups nobody knows who sends to whom: no engine pairs at all.
    blind = build_bandwidth_map(reports[1:], switches=SWITCHES, now_s=NOW)
    assert blind.services == ()
