"""The pure P/D policy: worked examples (arithmetic in comments), tick-by-tick runs with
a fake clock, and hypothesis invariants."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.policy import (
    PolicyState, active_schedule, clamp, damp, decide, fit_budget, settle, latency_step, prefill_for_decode,
    proportional_decode, stabilized_recommendation,
)
from heteroscale.coordinator.core.types import Observation, PoolCounts, PoolStatus


def service(**over: Any):
    """A one-service config (kubernetes backend) with overrides merged into the service."""
    policy = over.pop("policy", {})
    doc = {
        "coordinator": {"backend": "static"},
        "services": [{
            "name": "chat", "pd_ratio": over.pop("pd_ratio", "9:7"),
            "target_decode_tps_per_instance": over.pop("tau", 2400),
            "min_decode": over.pop("min_decode", 1), "max_decode": over.pop("max_decode", 64),
            "slo": over.pop("slo", {"ttft_s": 1.0, "tbt_s": 0.04}),
            "prefill": {"sidecars": ["http://127.0.0.1:1/v1/report"], **over.pop("prefill", {})},
            "decode": {"sidecars": ["http://127.0.0.1:2/v1/report"], **over.pop("decode", {})},
            "policy": {"smoothing_window_s": 0, "scale_in_stabilization_s": 0,
                       "scale_out_cooldown_s": 0, **policy},
            **over,
        }],
    }
    return load_config(doc).services[0]


def obs(current: tuple[int, int], tps: float | None, *, fresh: int | None = None, expected: int | None = None,
        tbt: float | None = None, ttft: float | None = None, pending: tuple[int, int] = (0, 0),
        pending_since: float | None = None, manual: bool = False) -> Observation:
    cur = PoolCounts(*current)
    return Observation(
        pools=PoolStatus(current=cur, ready=cur, pending=PoolCounts(*pending), pending_since_s=pending_since,
                         manual_override=manual),
        decode_tps=tps,
        fresh_decode=cur.decode if fresh is None else fresh,
        expected_decode=cur.decode if expected is None else expected,
        tbt_p90_s=tbt, ttft_p90_s=ttft)


def once(svc, observation, *, state=None, now_s=1000.0):
    return decide(service=svc, observation=observation, state=state or PolicyState(), now_s=now_s)


def applied(svc, observation, *, state, now_s):
    """A tick whose decision the backend wrote (the reconciler's path when it leads)."""
    d, state = decide(service=svc, observation=observation, state=state, now_s=now_s)
    return d, settle(state, decision=d, applied=True)


# ---------------------------------------------------------------- building blocks

@pytest.mark.parametrize("ratio,decode,prefill", [
    ("9:7", 7, 9),     # exact
    ("9:7", 8, 10),    # 8*9/7 = 10.29 -> 10
    ("9:7", 1, 1),     # 1.29 -> 1
    ("9:7", 3, 4),     # 3.857 -> 4
    ("3:2", 1, 2),     # 1.5 is a tie -> up (more prefill protects TTFT)
    ("3:2", 3, 5),     # 4.5 -> 5
    ("1:3", 1, 1),     # 0.33 -> 0, but at least one prefill while decode >= 1
    ("1:3", 4, 1),     # 1.33 -> 1
    ("10:6", 6, 10),
    ("10:6", 0, 0),
])
def test_prefill_rounding_rule(ratio, decode, prefill):
    assert prefill_for_decode(service(pd_ratio=ratio), decode) == prefill


@pytest.mark.parametrize("tps,tau,want", [
    (4800, 2400, 2),     # exactly 2 instances' worth, no float dust pushing it to 3
    (4801, 2400, 3),
    (0, 2400, 0),
    (0.1 * 3, 0.1, 3),   # 0.30000000000000004 / 0.1 is 3.0000000000000004: still 3
    (26700, 26700 / 7, 7),
])
def test_proportional_decode(tps, tau, want):
    assert proportional_decode(tps, tau) == want


@pytest.mark.parametrize("current,desired,out_f,in_f,expected", [
    (4, 20, 2.0, 0.5, 8),    # at most 4*2
    (1, 5, 2.0, 0.5, 2),     # 1*2 = 2
    (1, 5, 1.0, 0.5, 2),     # factor 1 would freeze: at least +1
    (10, 1, 2.0, 0.5, 5),    # at least 10*0.5
    (2, 1, 2.0, 0.5, 1),
    (3, 1, 2.0, 0.9, 2),     # ceil(2.7) = 3 would freeze: at least -1
    (0, 9, 2.0, 0.5, 9),     # from zero straight to the target
    (5, 5, 2.0, 0.5, 5),
])
def test_damp(current, desired, out_f, in_f, expected):
    assert damp(current, desired, max_out_factor=out_f, max_in_factor=in_f) == expected


def test_stabilization_takes_the_highest_recommendation_in_the_window():
    recs = ((100.0, 9), (200.0, 4), (390.0, 6))
    # At 400 with a 300 s window, 100 is out (300 s > window? 400-100 = 300, inclusive -> in).
    assert stabilized_recommendation(recs, now_s=400.0, window_s=300.0) == 9
    assert stabilized_recommendation(recs, now_s=401.0, window_s=300.0) == 6
    assert stabilized_recommendation((), now_s=1.0, window_s=300.0) is None


def test_latency_step_tiers():
    svc = service()
    assert latency_step(svc, tbt_p90_s=0.040, ttft_p90_s=None)[:2] == (0.0, None)       # at SLO: fine
    assert latency_step(svc, tbt_p90_s=0.045, ttft_p90_s=None)[:2] == (0.10, "latency_moderate")  # 1.125x
    assert latency_step(svc, tbt_p90_s=0.050, ttft_p90_s=None)[:2] == (0.20, "latency_severe")    # 1.25x
    assert latency_step(svc, tbt_p90_s=0.01, ttft_p90_s=1.3)[:2] == (0.20, "latency_severe")      # TTFT 1.3x
    off = service(policy={"latency_net": {"use_ttft": False}})
    assert latency_step(off, tbt_p90_s=0.01, ttft_p90_s=1.3)[:2] == (0.0, None)


def test_fit_budget_counts_both_pools():
    # 1:1 ratio, prefill 1 GPU, decode 2 GPUs: D decode need 3*D GPUs; budget 20 -> D = 6 (18 GPUs).
    svc = service(pd_ratio="1:1", decode={"gpus_per_instance": 2}, policy={"gpu_budget": 20})
    assert fit_budget(svc, 10, low=1) == 6
    assert fit_budget(svc, 5, low=1) == 5
    assert clamp(70, 1, 64) == 64 and clamp(0, 1, 64) == 1


# ---------------------------------------------------------------- worked decisions

def test_scale_out_moves_both_pools_and_keeps_the_ratio():
    # 7 decode x 2400 = 16800 capacity; 20000 tok/s is 119% > 110% -> D = ceil(20000/2400) = 9,
    # P = round(9*9/7 = 11.57) = 12.
    d, _ = once(service(), obs((9, 7), 20000))
    assert d.reason == "scale_out_tps"
    assert d.desired == PoolCounts(12, 9)
    assert d.direction == "out"


def test_inside_the_band_holds():
    # 18000 / 16800 = 107% < 110%: hold; 14500/16800 = 86% > 85%: hold.
    assert once(service(), obs((9, 7), 18000))[0].reason == "hold_tolerance"
    assert once(service(), obs((9, 7), 14500))[0].reason == "hold_tolerance"


def test_scale_in_with_damping_and_consolidation():
    # tau 1000, margin 0.9: 5 decode carrying 2950 is 59% < 80% -> want ceil(2.95) = 3;
    # damping allows down to max(3, ceil(5*0.5)=3) = 3, but consolidation needs
    # ceil(2950 / (0.9*1000)) = 4 survivors -> 4.
    svc = service(pd_ratio="1:1", tau=1000)
    d, _ = once(svc, obs((5, 5), 2950))
    assert d.reason == "scale_in_tps"
    assert d.desired == PoolCounts(4, 4)
    assert d.inputs["consolidation_need"] == 4


def test_consolidation_can_hold_a_scale_in():
    # 4 decode, 2990 tok/s: 75% < 80% -> want 3; survivors need ceil(2990/900) = 4 -> hold.
    svc = service(pd_ratio="1:1", tau=1000)
    d, _ = once(svc, obs((4, 4), 2990))
    assert d.reason == "hold_consolidation"
    assert d.desired == d.current


def test_latency_moderate_adds_ten_percent_to_both_pools():
    # 10 decode at 100% of target (no tps reason); TBT 45 ms / 40 ms = 1.125 -> +10%:
    # D = ceil(10*1.1) = 11, P = round(11*9/7 = 14.14) = 14 (from 13: +1 each side at least).
    d, _ = once(service(), obs((13, 10), 24000, tbt=0.045))
    assert d.reason == "latency_moderate"
    assert d.desired == PoolCounts(14, 11)


def test_latency_severe_adds_twenty_percent():
    # TBT 50 ms = 1.25x SLO -> D = ceil(10*1.2) = 12, P = round(12*9/7 = 15.43) = 15.
    d, _ = once(service(), obs((13, 10), 24000, tbt=0.050))
    assert (d.reason, d.desired) == ("latency_severe", PoolCounts(15, 12))


def test_latency_never_scales_in():
    # Load says scale in (10% utilisation) but latency is over the SLO: no scale-in.
    d, _ = once(service(), obs((13, 10), 2400, tbt=0.045))
    assert d.desired.decode >= 10
    assert d.reason == "latency_moderate"


def test_a_latency_step_up_is_held_for_the_stabilisation_window():
    # The simulator found the net and the proportional rule undoing each other: latency
    # adds an instance, the next tick's tokens/s asks for fewer, and the pools flap.
    # 10 decode at 80% of target (19200 tok/s, inside the band). TBT 45 ms -> +10%:
    # D = 11. Then latency recovers; 19200 / (11 x 2400) = 73% < 80% asks for
    # ceil(8.0) = 8, but the window still holds the latency net's 11. (Without the
    # effective target: that is its own test below.)
    svc = service(policy={"scale_in_stabilization_s": 300, "adaptive_target": {"enabled": False}})
    d, state = once(svc, obs((13, 10), 19200, tbt=0.045), state=PolicyState(first_data_s=0.0), now_s=1000.0)
    assert (d.reason, d.desired.decode) == ("latency_moderate", 11)
    d, state = once(svc, obs((14, 11), 19200), state=state, now_s=1005.0)
    assert (d.reason, d.desired.decode) == ("hold_stabilization", 11)
    d, state = once(svc, obs((14, 11), 19200), state=state, now_s=1299.0)
    assert d.reason == "hold_stabilization"
    # After the window, the tokens/s recommendation rules again.
    d, state = once(svc, obs((14, 11), 19200), state=state, now_s=1306.0)
    assert d.reason == "scale_in_tps" and d.desired.decode < 11


def test_proportional_wins_when_larger_than_the_latency_step():
    # 40000 tok/s wants ceil(16.7) = 17 (damped to 20 max) > latency's 11.
    d, _ = once(service(), obs((13, 10), 40000, tbt=0.045))
    assert (d.reason, d.desired.decode) == ("scale_out_tps", 17)


def test_missing_data_holds_and_never_scales_in():
    svc = service()
    # 1 fresh of 4 expected (25% < 50%): hold even though the one report says ~0 load.
    d, _ = once(svc, obs((5, 4), 10.0, fresh=1, expected=4))
    assert (d.reason, d.desired) == ("hold_missing_data", PoolCounts(5, 4))
    d, _ = once(svc, obs((5, 4), None, fresh=0, expected=4))
    assert d.reason == "hold_missing_data"
    d, _ = once(svc, obs((5, 4), None, fresh=0, expected=0))
    assert d.reason == "hold_missing_data"
    # 2 of 4 is enough (50%).
    assert once(svc, obs((5, 4), 10.0, fresh=2, expected=4))[0].reason != "hold_missing_data"


def test_pending_guard_with_timeout():
    svc = service(policy={"pending_timeout_s": 600})
    # Pods pending for 100 s: no new scale-out.
    d, _ = once(svc, obs((9, 7), 40000, pending=(1, 1), pending_since=900.0), now_s=1000.0)
    assert d.reason == "hold_pending" and d.desired == d.current
    # Pending for 700 s > 600 s: the guard lifts, scale-out goes ahead.
    d, _ = once(svc, obs((9, 7), 40000, pending=(1, 1), pending_since=300.0), now_s=1000.0)
    assert d.reason == "scale_out_tps" and "timeout" in d.detail
    # Scale-in is never blocked by pending pods.
    d, _ = once(svc, obs((9, 7), 2400, pending=(1, 1), pending_since=990.0), now_s=1000.0)
    assert d.reason == "scale_in_tps"


def test_pending_without_a_timestamp_is_timed_from_first_sight():
    svc = service(policy={"pending_timeout_s": 60})
    state = PolicyState()
    d, state = applied(svc, obs((9, 7), 40000, pending=(0, 1)), state=state, now_s=0.0)
    assert d.reason == "hold_pending"
    d, state = applied(svc, obs((9, 7), 40000, pending=(0, 1)), state=state, now_s=61.0)
    assert d.reason == "scale_out_tps"


def test_cooldown_after_scale_out():
    svc = service(policy={"scale_out_cooldown_s": 30})
    d, state = applied(svc, obs((9, 7), 20000), state=PolicyState(), now_s=0.0)
    assert d.reason == "scale_out_tps"
    d, state = applied(svc, obs((12, 9), 40000), state=state, now_s=10.0)
    assert d.reason == "hold_cooldown"
    d, _ = decide(service=svc, observation=obs((12, 9), 40000), state=state, now_s=31.0)
    assert d.reason == "scale_out_tps"


def test_bounds():
    svc = service(max_decode=8, min_decode=2)
    # wants ceil(50000/2400) = 21, damped to 14, bounded to 8; P = round(8*9/7) = 10.
    d, _ = once(svc, obs((9, 7), 50000))
    assert (d.reason, d.desired) == ("bounded_max", PoolCounts(10, 8))
    # at the maximum already: hold, reason says why
    d, _ = once(svc, obs((10, 8), 50000))
    assert (d.reason, d.desired) == ("bounded_max", PoolCounts(10, 8))
    # no load: from 4, damped to half = 2; at 2 the floor holds and says so.
    d, _ = once(svc, obs((5, 4), 1.0))
    assert (d.reason, d.desired) == ("scale_in_tps", PoolCounts(3, 2))
    d, _ = once(svc, obs((3, 2), 1.0))
    assert (d.reason, d.desired) == ("bounded_min", PoolCounts(3, 2))


def test_gpu_budget_caps_both_pools():
    # 1:1, 2 GPUs per decode, 1 per prefill, budget 12: D <= 4 (4 + 8 = 12).
    svc = service(pd_ratio="1:1", decode={"gpus_per_instance": 2}, policy={"gpu_budget": 12})
    # From 3: wants ceil(20000/2400) = 9, damped to 6 (18 GPUs), the budget allows 4.
    d, _ = once(svc, obs((3, 3), 20000))
    assert (d.reason, d.desired) == ("bounded_budget", PoolCounts(4, 4))
    # At the budget: holds, and says it is the budget.
    d, _ = once(svc, obs((4, 4), 20000))
    assert (d.reason, d.desired) == ("bounded_budget", PoolCounts(4, 4))


def test_manual_override_is_adopted_not_fought():
    svc = service(policy={"scale_out_cooldown_s": 60, "scale_in_stabilization_s": 300})
    d, state = once(svc, obs((2, 2), 2400, manual=True), now_s=0.0)
    assert (d.reason, d.desired) == ("manual_override", PoolCounts(2, 2))
    # The backend keeps the flag up until we write. Next tick the load asks for more,
    # but the human's change started the cooldown.
    d, state = applied(svc, obs((2, 2), 20000, manual=True), state=state, now_s=5.0)
    assert d.reason == "hold_cooldown"
    # Another edit while flagged is adopted again (a new edge).
    d, state = applied(svc, obs((3, 3), 20000, manual=True), state=state, now_s=10.0)
    assert (d.reason, d.desired) == ("manual_override", PoolCounts(3, 3))
    d, _ = decide(service=svc, observation=obs((3, 3), 20000, manual=True), state=state, now_s=71.0)
    assert d.reason == "scale_out_tps"


def test_ratio_repair_when_prefill_drifted():
    # 7 decode at 100%: hold on tps, but prefill is 5 instead of 9 -> repair to 9.
    d, _ = once(service(), obs((5, 7), 16800))
    assert (d.reason, d.desired) == ("ratio_repair", PoolCounts(9, 7))


def test_fixed_schedule_and_bound_override():
    svc = service(schedules=[
        {"start": "09:00", "end": "17:00", "days": ["mon", "tue", "wed", "thu", "fri"], "prefill": 6, "decode": 4},
        {"start": "22:00", "end": "06:00", "min_decode": 3},
    ])
    monday_10 = 4 * 86400 + 10 * 3600          # 1970-01-05 was a Monday
    d, _ = once(svc, obs((2, 2), 100.0), now_s=monday_10)
    assert (d.reason, d.desired) == ("schedule", PoolCounts(6, 4))
    saturday_10 = monday_10 + 5 * 86400
    assert active_schedule(svc, saturday_10) is None
    # 23:00 (wraps past midnight): min_decode 3 -> bounded_min to 3.
    d, _ = once(svc, obs((2, 2), 100.0), now_s=4 * 86400 + 23 * 3600)
    assert (d.reason, d.desired.decode) == ("bounded_min", 3)
    # 05:00 Tuesday belongs to Monday's 22:00 window.
    assert active_schedule(svc, 5 * 86400 + 5 * 3600).min_decode == 3


def test_schedule_utc_offset():
    svc = service(schedules=[{"start": "09:00", "end": "10:00", "utc_offset_min": 480, "prefill": 2, "decode": 2}])
    assert active_schedule(svc, 4 * 86400 + 1 * 3600 + 30 * 60) is not None    # 01:30 UTC = 09:30 UTC+8
    assert active_schedule(svc, 4 * 86400 + 9 * 3600 + 30 * 60) is None


# ---------------------------------------------------------------- tick by tick

class Cluster:
    """A fake clock and instant actuation: what the policy decides becomes current."""

    def __init__(self, svc, pools: tuple[int, int]) -> None:
        self.svc = svc
        self.current = PoolCounts(*pools)
        self.state = PolicyState()
        self.now_s = 0.0

    def tick(self, tps: float, *, dt_s: float = 5.0, **kw: Any):
        self.now_s += dt_s
        observation = obs((self.current.prefill, self.current.decode), tps, **kw)
        d, self.state = applied(self.svc, observation, state=self.state, now_s=self.now_s)
        self.current = d.desired
        return d


def test_up_hold_down_with_a_fake_clock():
    svc = service(pd_ratio="3:2", tau=1000, policy={
        "smoothing_window_s": 30, "scale_out_cooldown_s": 30, "scale_in_stabilization_s": 120,
        "max_scale_out_factor": 2.0, "max_scale_in_factor": 0.5})
    c = Cluster(svc, (3, 2))
    # Steady at 2000 tok/s = 100% of 2x1000: hold.
    assert {c.tick(2000).reason for _ in range(6)} == {"hold_tolerance"}
    # Load jumps to 6000. The 30 s window's mean is still (5*2000 + 6000)/6 = 2667, but a
    # scale-out reads this tick's rate when it is higher: want 6, damped to 2x2 = 4; P = 6.
    d = c.tick(6000)
    assert (d.reason, d.desired) == ("scale_out_tps", PoolCounts(6, 4))
    assert d.inputs["smoothed_decode_tps"] < d.inputs["latest_decode_tps"] == 6000
    # The step bound cut that scale-out (6 -> 4): the next tick goes on to 6 (cooldown or
    # not), as HPA doubles every period; 6000/1000 = 6, P = 9.
    d = c.tick(6000)
    assert (d.reason, d.desired) == ("scale_out_tps", PoolCounts(9, 6))
    assert "continuing a scale-out the step bound cut" in d.detail
    # That one was not cut, and 6 carries the load: the next ticks hold there (the smoothed
    # rate still remembers 2000, so the scale-in side's stabilisation is what holds first).
    reasons = [c.tick(6000).reason for _ in range(12)]
    assert "scale_out_tps" not in reasons and c.current.decode == 6, reasons
    assert c.current.decode == 6 and c.current.prefill == 9
    # Holds at the new level.
    assert {c.tick(6000).reason for _ in range(10)} == {"hold_tolerance"}
    # Load drops to 1500: stabilisation (120 s) keeps the highest recommendation (6) first.
    reasons = [c.tick(1500).reason for _ in range(10)]
    assert "hold_stabilization" in reasons and c.current.decode == 6
    # After the window, it comes down, damped to half per step, and settles at 2.
    reasons = [c.tick(1500).reason for _ in range(60)]
    assert "scale_in_tps" in reasons
    assert c.current == PoolCounts(3, 2)      # ceil(1500/1000) = 2; survivors 1500 <= 0.9*2000
    assert {c.tick(1500).reason for _ in range(10)} <= {"hold_tolerance"}


def test_data_gap_holds_then_resumes():
    svc = service(pd_ratio="1:1", tau=1000)
    c = Cluster(svc, (4, 4))
    assert c.tick(4000).reason == "hold_tolerance"
    for _ in range(5):   # sidecars unreachable: nothing fresh; load "looks" like zero
        assert c.tick(None, fresh=0).reason == "hold_missing_data"
    assert c.current == PoolCounts(4, 4)
    assert c.tick(4000).reason == "hold_tolerance"


# ---------------------------------------------------------------- invariants

SVC_LOOSE = service(pd_ratio="9:7", tau=1000, min_decode=2, max_decode=40,
                    policy={"max_scale_out_factor": 100, "max_scale_in_factor": 0.01})
SVC_DEFAULT = service(pd_ratio="9:7", tau=1000, min_decode=2, max_decode=40)

currents = st.integers(min_value=0, max_value=60)
loads = st.floats(min_value=0, max_value=80000, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(d=currents, tps=loads)
def test_bounds_always_hold(d, tps):
    dec, _ = once(SVC_DEFAULT, obs((prefill_for_decode(SVC_DEFAULT, d), d), tps))
    assert 2 <= dec.desired.decode <= 40


@settings(max_examples=300, deadline=None)
@given(d=currents, tps=loads)
def test_ratio_kept_whenever_pools_move(d, tps):
    dec, _ = once(SVC_DEFAULT, obs((3, d), tps))
    if dec.desired != dec.current:
        D, P = dec.desired.decode, dec.desired.prefill
        assert P == prefill_for_decode(SVC_DEFAULT, D)
        # nearest integer: |P - D*r| <= 1/2, so |P/D - r| <= 1/(2D)
        assert abs(Fraction(P) - D * Fraction(9, 7)) <= Fraction(1, 2)


@settings(max_examples=300, deadline=None)
@given(d=st.integers(min_value=1, max_value=40), a=loads, b=loads)
def test_monotone_in_load(d, a, b):
    low, high = sorted((a, b))
    cur = (prefill_for_decode(SVC_DEFAULT, d), d)
    d_low, _ = once(SVC_DEFAULT, obs(cur, low))
    d_high, _ = once(SVC_DEFAULT, obs(cur, high))
    assert d_low.desired.decode <= d_high.desired.decode
    assert d_low.desired.prefill <= d_high.desired.prefill


@settings(max_examples=300, deadline=None)
@given(d=st.integers(min_value=1, max_value=40), tps=loads)
def test_deciding_on_the_result_holds(d, tps):
    # Without damping, one decision reaches a fixed point: deciding again on it holds.
    cur = (prefill_for_decode(SVC_LOOSE, d), d)
    first, state = once(SVC_LOOSE, obs(cur, tps), now_s=0.0)
    second, _ = decide(service=SVC_LOOSE, observation=obs((first.desired.prefill, first.desired.decode), tps),
                       state=state, now_s=10_000.0)
    assert second.desired == second.current, (first, second)


@settings(max_examples=100, deadline=None)
@given(d=currents, tps=loads)
def test_pure_same_inputs_same_output(d, tps):
    a = once(SVC_DEFAULT, obs((3, d), tps, tbt=0.05))
    b = once(SVC_DEFAULT, obs((3, d), tps, tbt=0.05))
    assert a == b


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), base=st.floats(min_value=500, max_value=30000),
       noise=st.floats(min_value=0.0, max_value=0.08), start=st.floats(min_value=0.3, max_value=3.0))
def test_no_flapping_under_constant_noisy_load(seed, base, noise, start):
    # Default policy (60 s smoothing, 10%/20% band, 300 s stabilisation), a constant load
    # with +-8% noise, starting anywhere from 0.3x to 3x the right size: it converges
    # without ever reversing direction, and then stays put.
    svc = service(pd_ratio="9:7", tau=1000, min_decode=1, max_decode=200,
                  policy={"smoothing_window_s": 60, "scale_in_stabilization_s": 300,
                          "scale_out_cooldown_s": 30})
    rng = random.Random(seed)
    start_d = max(1, round(math.ceil(base / 1000) * start))
    c = Cluster(svc, (prefill_for_decode(svc, start_d), start_d))
    directions = []
    for _ in range(500):
        d = c.tick(base * (1 + rng.uniform(-noise, noise)))
        directions.append(d.direction)
    moves = [x for x in directions if x != "hold"]
    reversals = sum(1 for a, b in zip(moves, moves[1:]) if a != b)
    assert reversals == 0, moves
    # Settled for the last 1000 s: at most one late step, when the noise band itself
    # straddles a band edge (a 60 s mean of the noise can cross it) -- and never back.
    late = [x for x in directions[-200:] if x != "hold"]
    assert late in ([], ["out"], ["in"]), late
    # ... inside the band: every sample is at least base*(1-noise), so a size whose
    # capacity x 1.1 is below that would have scaled out.
    assert c.current.decode * 1000 * 1.10 >= base * (1 - noise)


@settings(max_examples=300, deadline=None)
@given(d=st.integers(min_value=2, max_value=40), tps=loads,
       tbt=st.floats(min_value=0.0, max_value=0.5), ttft=st.floats(min_value=0.0, max_value=5.0))
def test_latency_only_ever_adds(d, tps, tbt, ttft):
    cur = (prefill_for_decode(SVC_DEFAULT, d), d)
    plain, _ = once(SVC_DEFAULT, obs(cur, tps))
    with_latency, _ = once(SVC_DEFAULT, obs(cur, tps, tbt=tbt, ttft=ttft))
    assert with_latency.desired.decode >= plain.desired.decode
    if tbt > 0.04 or ttft > 1.0:                 # over the SLO: never a scale-in
        assert with_latency.desired.decode >= d


def test_a_decision_not_applied_starts_no_cooldown():
    """settle() is the only place cooldown clocks start: a standby, a dry run or a failed
    write (applied=False) leaves the next tick free to act."""
    svc = service(policy={"scale_out_cooldown_s": 30})
    d, state = decide(service=svc, observation=obs((9, 7), 20000), state=PolicyState(), now_s=0.0)
    assert d.reason == "scale_out_tps"
    state = settle(state, decision=d, applied=False)
    assert state.last_scale_out_s is None
    d, _ = decide(service=svc, observation=obs((9, 7), 20000), state=state, now_s=10.0)
    assert d.reason == "scale_out_tps"
    # Applied, the same decision starts the cooldown at its own time.
    assert settle(state, decision=d, applied=True).last_scale_out_s == 10.0


# ---------------------------------------------------------------- partial data (never scale in on it)

def partial(current: tuple[int, int], tps: float, *, reporting: int, missing: int, **kw: Any) -> Observation:
    """``reporting`` decode sidecars summed to ``tps``; ``missing`` others said nothing usable."""
    o = obs(current, tps, fresh=reporting, expected=reporting + missing, **kw)
    return replace(o, reporting_decode=reporting, missing_decode=missing)


def test_partial_data_never_scales_in_even_when_load_dropped():
    svc = service()
    # 2 of 4 decode report 1000 tok/s in all: the estimate is 500 x 4 = 2000, 21% of 4 x 2400.
    # Complete, that would be a scale-in; partial, both pools hold.
    d, _ = once(svc, partial((5, 4), 1000, reporting=2, missing=2))
    assert (d.reason, d.desired) == ("hold_partial_data", PoolCounts(5, 4))
    assert d.inputs["estimated_decode_tps"] == 2000 and d.inputs["missing_decode"] == 2


def test_partial_data_scales_out_on_the_estimate():
    svc = service()
    # 2 of 4 report 6000 tok/s: estimate 3000 x 4 = 12000 on 4 x 2400 = 125% -> want 5.
    d, _ = once(svc, partial((5, 4), 6000, reporting=2, missing=2))
    assert d.reason == "scale_out_tps" and d.desired.decode == 5
    # The measured sum alone (6000 = 63%) would have asked for a scale-in.
    complete, _ = once(svc, obs((5, 4), 6000))
    assert complete.desired.decode < 4


def test_partial_data_never_repairs_the_ratio_downwards():
    svc = service()                     # 9:7: for 4 decode the ratio wants 5 prefill
    d, _ = once(svc, partial((8, 4), 9000, reporting=3, missing=1))
    assert d.desired.prefill >= 8 and d.desired.decode >= 4


@settings(max_examples=400, deadline=None)
@given(tps=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0.0, -1.0, 1e308, 1.7976931348623157e308, 5e-324])),
       tbt=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       ttft=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       prefill=st.integers(0, 10**6), decode=st.integers(0, 10**6),
       fresh=st.integers(-3, 10**6), expected=st.integers(-3, 10**6), missing=st.integers(-3, 10**6),
       reporting=st.integers(-3, 10**6), pending=st.integers(0, 10**6), manual=st.booleans(),
       steps=st.integers(1, 3))
def test_decide_never_raises_for_any_observation(tps, tbt, ttft, prefill, decode, fresh, expected, missing,
                                                 reporting, pending, manual, steps):
    svc = service(max_decode=64, policy={"gpu_budget": 400})
    o = Observation(pools=PoolStatus(current=PoolCounts(prefill, decode), ready=PoolCounts(prefill, decode),
                                     pending=PoolCounts(0, pending), manual_override=manual),
                    decode_tps=tps, fresh_decode=fresh, expected_decode=expected, reporting_decode=reporting,
                    missing_decode=missing, tbt_p90_s=tbt, ttft_p90_s=ttft)
    state = PolicyState()
    for i in range(steps):
        d, state = applied(svc, o, state=state, now_s=1000.0 + 5 * i)
        assert d.desired.prefill >= 0 and d.desired.decode >= 0
        # Not-finite or negative load is missing data: such a tick never shrinks a pool.
        if tps is None or not math.isfinite(tps) or tps < 0:
            assert d.desired.decode >= min(decode, 64) or d.reason in ("bounded_max", "bounded_budget",
                                                                          "manual_override")


def test_the_stabilisation_hold_says_it_is_holding_a_scale_in():
    svc = service(policy={"scale_in_stabilization_s": 60})
    state = PolicyState(first_data_s=-600.0)                                 # long past the cold start
    _, state = applied(svc, obs((9, 7), 16000), state=state, now_s=0.0)      # 16000/2400 -> 7: hold
    d, _ = applied(svc, obs((9, 7), 4000), state=state, now_s=10.0)          # wants 2, window says 7
    assert d.reason == "hold_stabilization" and d.desired == PoolCounts(9, 7)
    assert d.detail.startswith("wants 2 decode, but the highest recommendation in the last 60s was 7")
    assert "no scale-in yet" in d.detail


# ---------------------------------------------------------------- one controller: the effective target

def test_a_decode_breach_under_target_lowers_the_effective_target_and_keeps_the_capacity():
    # 10 decode carry 19200 tok/s (1920 each, 80% of tau 2400) and TBT breaks (45 ms > 40):
    # tau is too high for this traffic. The effective tau drops by at most 15%, to
    # max(0.85 x 2400 = 2040, 0.95 x 1920 = 1824) = 2040; the net adds 10% (D = 11).
    svc = service(policy={"scale_in_stabilization_s": 60, "scale_out_cooldown_s": 30})
    d, state = applied(svc, obs((13, 10), 19200, tbt=0.045), state=PolicyState(), now_s=1000.0)
    assert (d.reason, d.desired.decode) == ("latency_moderate", 11)
    assert state.target.scale == pytest.approx(0.85) and "latency broke at 1920" in state.target.why
    # Latency recovers. 19200 / (11 x 2040) = 86% is inside the band: the proportional
    # rule keeps the 11 latency asked for instead of handing them back after the window.
    for t in range(1005, 1400, 5):
        d, state = applied(svc, obs((14, 11), 19200, tbt=0.035), state=state, now_s=float(t))
        assert d.desired.decode == 11, (t, d.reason)
    assert d.inputs["effective_target_decode_tps_per_instance"] == pytest.approx(2040)


def test_the_effective_target_recovers_slowly_while_latency_is_well_inside():
    svc = service(policy={"adaptive_target": {"recover_after_s": 600, "recover_step": 0.05}})
    _, state = applied(svc, obs((13, 10), 19200, tbt=0.045), state=PolicyState(), now_s=0.0)
    low = state.target.scale
    t = 0.0
    for _ in range(2):                     # TBT 20 ms = 50% of the SLO, under the 70% calm line
        for _ in range(121):
            t += 5.0
            _, state = applied(svc, obs((13, 10), 15000, tbt=0.020), state=state, now_s=t)
    assert state.target.scale == pytest.approx(min(1.0, low + 0.10))
    assert "back up to" in state.target.why


def test_a_prefill_side_breach_teaches_the_target_only_while_the_ratio_cannot_move():
    # TTFT breaks while TBT is fine and decode does not queue: prefill is short. Under
    # pd_ratio_mode adapt that is the ratio's to fix: τ learns nothing.
    adapt = service(pd_ratio_mode="adapt")
    d, state = applied(adapt, obs((13, 10), 19200, ttft=1.3, tbt=0.02), state=PolicyState(), now_s=0.0)
    assert d.reason == "latency_severe" and state.target.scale == 1.0
    # With the ratio fixed (advise, the default, or fixed), decode's count is the only lever:
    # without a lower τ the tokens/s rule would hand back what the net added (the flapping
    # of the drift day), so the breach at 80% of τ teaches it.
    for mode in ("advise", "fixed"):
        svc = service(pd_ratio_mode=mode)
        d, state = applied(svc, obs((13, 10), 19200, ttft=1.3, tbt=0.02), state=PolicyState(), now_s=0.0)
        assert d.reason == "latency_severe" and state.target.scale < 1.0


# ---------------------------------------------------------------- demand, KV pressure, cold start

def test_demand_while_decode_queues_scales_out_beyond_what_is_served():
    # Saturated: 10 decode serve 24000 tok/s (100% of 2400), 200 running and 100 waiting.
    # Demand = 24000 x 300/200 = 36000 -> 15 decode; served alone would hold.
    svc = service()
    o = replace(obs((13, 10), 24000), decode_running=200, decode_waiting=100)
    d, _ = once(svc, o)
    assert (d.reason, d.desired.decode) == ("scale_out_tps", 15)
    assert d.inputs["demand_decode_tps"] == 36000
    assert once(svc, obs((13, 10), 24000))[0].reason == "hold_tolerance"


def test_a_prefill_queue_is_decode_demand_on_its_way():
    # A sudden rise shows first as prefill's queue: decode runs 200 with none waiting, while
    # 100 requests wait for prefill. Demand = 24000 x 300/200 = 36000 -> 15 decode.
    svc = service()
    o = replace(obs((13, 10), 24000), decode_running=200, decode_waiting=0, prefill_waiting=100)
    d, _ = once(svc, o)
    assert (d.reason, d.desired.decode, d.inputs["demand_decode_tps"]) == ("scale_out_tps", 15, 36000)
    # Switched off, only decode's own queue counts.
    off = service(policy={"demand": {"include_prefill_queue": False}})
    assert once(off, o)[0].reason == "hold_tolerance"


def test_a_backlog_that_drains_fast_buys_nothing_and_a_slow_one_still_counts():
    # Capacity arrived: the served rate (30000 = 125% of 10 x 2400) includes the backlog's
    # flush, and the queue fell 1000 -> 400 in 15 s (40/s: gone in 10 s < 60 s): hold.
    svc = service()
    state = replace(PolicyState(), queued=(1000.0, 985.0))
    o = replace(obs((13, 10), 30000), decode_running=300, decode_waiting=0, prefill_waiting=400)
    d, _ = once(svc, o, state=state)
    assert d.reason == "hold_draining" and "gone in ~10s" in d.detail
    # 1000 -> 900 in 15 s (6.7/s: 135 s to go, beyond the 60 s horizon): the backlog still
    # asks for capacity, on the estimate 30000 x 1200/300 capped at 3x = 90000 -> 38, damped.
    # The forecast's history goes on while a backlog drains.
    with_forecast = service(policy={"forecast": {"enabled": True}})
    _, drained = once(with_forecast, replace(o, prefill_waiting=400), state=state)
    assert [load for _, load in drained.forecast.recent] == [30000]
    state = replace(PolicyState(), queued=(1000.0, 985.0))
    o = replace(o, prefill_waiting=900)
    d, _ = once(svc, o, state=state)
    assert d.reason == "scale_out_tps" and d.inputs["demand_decode_tps"] == 90000


def test_the_effective_target_learns_nothing_while_capacity_is_short_or_on_its_way():
    # TBT breaks at 1500 tok/s per counted instance, but 2 of the 10 are still starting
    # (8 ready serve 12000 = 1500 each... below τ only if the pending ones are counted).
    svc = service()
    o = obs((13, 10), 12000, tbt=0.06, pending=(0, 2), pending_since=990.0)
    o = replace(o, pools=replace(o.pools, ready=PoolCounts(13, 8)))
    _, state = once(svc, o)
    assert state.target.scale == 1.0
    # Requests queue faster than they are served (the demand estimate is on): an overload,
    # not a τ that is too high.
    o = replace(obs((13, 10), 20000, tbt=0.06), decode_running=200, decode_waiting=100)
    _, state = once(svc, o)
    assert state.target.scale == 1.0
    # The same breach with every instance ready and nothing queued does teach it.
    _, state = once(svc, obs((13, 10), 20000, tbt=0.06))
    assert state.target.scale < 1.0


def test_the_scale_out_cooldown_counts_from_when_the_new_instances_are_ready():
    svc = service(policy={"scale_out_cooldown_s": 30, "pending_timeout_s": 600})
    state = PolicyState()
    d, state = applied(svc, obs((13, 10), 36000), state=state, now_s=0.0)        # 150%: out to 15
    assert d.desired.decode == 15
    d, state = applied(svc, obs((20, 15), 45000, pending=(7, 5)), state=state, now_s=15.0)
    assert d.reason == "hold_pending"
    # Ready at 120 s, long after the decision's own cooldown: their effect is not yet in
    # the rates, so a further scale-out waits 30 s more.
    d, state = applied(svc, obs((20, 15), 45000), state=state, now_s=120.0)
    assert d.reason == "hold_cooldown" and "ready 0s ago" in d.detail
    d, state = applied(svc, obs((20, 15), 45000), state=state, now_s=150.0)
    assert d.reason == "scale_out_tps"


def test_a_scale_in_keeps_the_prefill_its_measured_load_needs():
    # Decode asks for 10 -> 5 (tps 12000 is 50% of 10 x 2400) and the 9:7 ratio would take
    # prefill 13 -> 6; but prefill runs at 40% GPU on 13: 5.2 instances' worth, 9 at 60%.
    # Decode follows its own signal; prefill keeps 9. (The floor set to 0.6 here; 0.7 is
    # the default.)
    svc = service(policy={"consolidation_margin": 1.0, "prefill_busy_utilization": 0.6})
    o = replace(obs((13, 10), 12000), prefill_gpu_utilization=0.4)
    d, _ = once(svc, o)
    assert d.reason == "scale_in_tps" and d.desired == PoolCounts(9, 5) and "keeps 9" in d.detail
    # At 58% on 13 (13 needed at 60%) prefill stays whole while decode shrinks.
    d, _ = once(svc, replace(o, prefill_gpu_utilization=0.58))
    assert d.desired == PoolCounts(13, 5)
    # Bounds win: with max_prefill 8 the floor keeps no more than 8.
    capped = service(max_prefill=8, policy={"consolidation_margin": 1.0, "prefill_busy_utilization": 0.6})
    assert once(capped, replace(o, prefill_gpu_utilization=0.58))[0].desired.prefill <= 8
    # Off, the ratio alone decides.
    off = service(policy={"consolidation_margin": 1.0, "prefill_busy_utilization": None})
    assert once(off, o)[0].desired == PoolCounts(6, 5)


def test_prefill_above_the_ratio_is_not_trimmed_on_a_hold():
    # 13P5D at the 9:7 ratio would be 6P5D; holding decode, prefill is left for the next
    # decode scale-in to take down (through the prefill floor), not trimmed by itself.
    svc = service()
    d, _ = once(svc, obs((13, 5), 12000))               # 100% of 5 x 2400: hold
    assert (d.reason, d.desired) == ("hold_tolerance", PoolCounts(13, 5))
    # Prefill below the ratio is still repaired up.
    d, _ = once(svc, obs((3, 5), 12000))
    assert (d.reason, d.desired) == ("ratio_repair", PoolCounts(6, 5))


def test_a_scale_in_that_latency_undoes_backs_off_and_the_backoff_doubles():
    svc = service(pd_ratio="1:1", tau=1000, policy={"adaptive_target": {"enabled": False},
                                                    "scale_in_backoff_window_s": 600, "scale_in_backoff_s": 900,
                                                    "scale_in_backoff_max_s": 3600})
    state = PolicyState()
    d, state = applied(svc, obs((2, 2), 800), state=state, now_s=0.0)             # 40%: in to 1
    assert d.desired.decode == 1
    d, state = applied(svc, obs((1, 1), 800, ttft=1.5), state=state, now_s=120.0)  # the net undoes it
    assert d.reason == "latency_severe" and d.desired.decode == 2
    assert state.backoff.floor == 2 and state.backoff.backoff_s == 900
    # Within the backoff the same scale-in is held, with the reason.
    d, state = applied(svc, obs((2, 2), 800), state=state, now_s=600.0)
    assert d.reason == "hold_scale_in_backoff" and "latency broke 120s after a scale-in" in d.detail
    # After it, the scale-in goes ahead; undone again, the backoff doubles.
    d, state = applied(svc, obs((2, 2), 800), state=state, now_s=1100.0)
    assert d.desired.decode == 1
    d, state = applied(svc, obs((1, 1), 800, ttft=1.5), state=state, now_s=1200.0)
    assert state.backoff.backoff_s == 1800
    # A scale-out long after a scale-in teaches nothing.
    fresh = PolicyState(last_scale_in_s=0.0)
    d, fresh = applied(svc, obs((1, 1), 800, ttft=1.5), state=fresh, now_s=5000.0)
    assert d.reason == "latency_severe" and fresh.backoff is None


def test_a_scale_in_the_load_undoes_soon_after_backs_off_too():
    # A flap: load that swings on a scale of minutes is followed down, then up again by
    # tokens/s (no latency breach at all). Within reversal_window_s of the scale-in that
    # scale-out marks it a mistake, and the size it restored is kept.
    svc = service(pd_ratio="1:1", tau=1000, policy={"adaptive_target": {"enabled": False},
                                                    "scale_in_backoff_window_s": 600, "reversal_window_s": 1200,
                                                    "scale_in_backoff_s": 900, "scale_in_stabilization_s": 0,
                                                    "smoothing_window_s": 0})
    state = PolicyState(first_data_s=-1000.0)
    d, state = applied(svc, obs((4, 4), 1600), state=state, now_s=0.0)            # 40%: in to 2
    assert (d.reason, d.desired.decode) == ("scale_in_tps", 2)
    d, state = applied(svc, obs((2, 2), 3600), state=state, now_s=900.0)          # back up: 4
    assert (d.reason, d.desired.decode) == ("scale_out_tps", 4)
    assert state.backoff.floor == 4 and state.backoff.backoff_s == 900
    d, state = applied(svc, obs((4, 4), 1600), state=state, now_s=1200.0)         # down again: held
    assert d.reason == "hold_scale_in_backoff" and "the load came back 900s after a scale-in" in d.detail
    d, state = applied(svc, obs((4, 4), 1600), state=state, now_s=1850.0)         # after the backoff
    assert (d.reason, d.desired.decode) == ("scale_in_tps", 2)
    # The same rise later than the window is a new load, not a flap; 0 turns it off.
    late = PolicyState(first_data_s=-1000.0, last_scale_in_s=0.0)
    _, late = applied(svc, obs((2, 2), 3600), state=late, now_s=1300.0)
    assert late.backoff is None
    off = replace(svc, policy=replace(svc.policy, reversal_window_s=0.0))
    _, early = applied(off, obs((2, 2), 3600), state=PolicyState(first_data_s=-1000.0, last_scale_in_s=0.0),
                       now_s=60.0)
    assert early.backoff is None


def test_kv_pressure_is_an_early_moderate_step_and_never_a_scale_in():
    svc = service()
    o = replace(obs((13, 10), 12000), decode_kv_usage_max=0.97)     # 50% of target, but KV full
    d, _ = once(svc, o)
    assert (d.reason, d.desired.decode) == ("kv_pressure", 11) and "KV cache at 97%" in d.detail
    o = replace(obs((13, 10), 19000), decode_preemptions_per_s=2.0)
    assert once(svc, o)[0].reason == "kv_pressure"


@pytest.mark.parametrize("stabilization_s, holds, after", [
    # The cold-start case from the field: the first ticks of a 60 s window read a low load.
    (0, (5.0, 30.0, 60.0), 66.0),
    # After a start or a failover the stabilisation window holds a few ticks'
    # recommendations; their maximum is not yet the window's. A load rising through the
    # first minutes (a diurnal morning) was cut 5 -> 3 decode at 75 s, then bought back
    # by the latency net.
    (300, (5.0, 75.0, 299.0), 306.0),
])
def test_no_scale_in_before_a_full_smoothing_and_stabilisation_window_of_data(stabilization_s, holds, after):
    svc = service(policy={"smoothing_window_s": 60, "scale_in_stabilization_s": stabilization_s})
    state = PolicyState()
    for t in holds:
        d, state = applied(svc, obs((17, 10), 4000), state=state, now_s=t)
        assert d.reason == "hold_cold_start" and d.desired == PoolCounts(17, 10)
    assert f"less than the {max(60, stabilization_s)}s smoothing and stabilisation windows" in d.detail
    d, _ = applied(svc, obs((17, 10), 4000), state=state, now_s=after)
    assert d.reason == "scale_in_tps"
    # Scale-out is never held by it.
    d, _ = applied(svc, obs((17, 10), 40000), state=PolicyState(), now_s=5.0)
    assert d.reason == "scale_out_tps"


# ---------------------------------------------------------------- a KV-transfer bottleneck is not a decode shortage

def test_requests_waiting_for_kv_are_not_bought_decode_instances():
    # TTFT breaks (1.5 s > 1.0 s) because 30 decode requests wait for their KV to arrive,
    # none for decode capacity; TBT is fine and the KV cache half full: the links are the
    # bottleneck. The net would add 10% of both pools; it is held, with the evidence.
    svc = service()
    o = replace(obs((13, 10), 19200, ttft=1.5, tbt=0.02), decode_kv_waiting=30, decode_waiting=0,
                decode_kv_usage_max=0.5)
    d, state = once(svc, o)
    assert (d.reason, d.desired) == ("hold_kv_transfer", PoolCounts(13, 10))
    assert "30 decode request(s) waiting for their KV to arrive, 0 for decode capacity" in d.detail
    assert "kv_transfer_bottleneck" in d.inputs
    assert state.target.scale == 1.0                      # and it teaches the target nothing


def test_transfers_in_flight_behind_a_prefill_queue_are_not_a_link_bottleneck():
    # After a rise: 12 decode requests wait for their KV, but 756 wait for prefill. That is a
    # busy fleet; the net's scale-out goes ahead.
    svc = service()
    o = replace(obs((13, 10), 19200, ttft=1.5, tbt=0.02), decode_kv_waiting=12, decode_waiting=0,
                prefill_waiting=756, decode_running=200, decode_kv_usage_max=0.3)
    d, _ = once(svc, o)
    assert d.reason != "hold_kv_transfer" and d.desired.decode > 10 and "kv_transfer_bottleneck" not in d.inputs


def test_the_kv_transfer_hold_is_bounded():
    # The same bottleneck for longer than kv_transfer_hold_max_s (120 s) with latency still
    # broken: the fleet may sit entirely behind the slow links, so the net's scale-out goes
    # ahead (placement then grows where the links have headroom). A calm tick ends the episode.
    svc = service()
    o = replace(obs((13, 10), 19200, ttft=1.5, tbt=0.02), decode_kv_waiting=30, decode_waiting=0,
                decode_kv_usage_max=0.5)
    state = PolicyState()
    for t in (0.0, 60.0, 105.0):
        d, state = applied(svc, o, state=state, now_s=t)
        assert d.reason == "hold_kv_transfer"
    d, state = applied(svc, o, state=state, now_s=120.0)
    assert d.reason == "latency_severe" and d.desired.decode == 12
    assert "hold lifted after 120s" in d.detail and d.inputs["kv_transfer_hold_lifted"]
    # That TTFT breach was the links': no prefill count is remembered as too few.
    assert state.prefill_floor is None
    d, state = applied(svc, obs((15, 12), 24000, ttft=0.3, tbt=0.02), state=state, now_s=150.0)
    assert state.kv_hold_since_s is None
    # 0: never held.
    never = service(policy={"kv_transfer_hold_max_s": 0})
    assert once(never, o)[0].reason == "latency_severe"


def test_a_decode_that_is_really_loaded_still_scales_out_with_kv_waiting():
    svc = service()
    o = replace(obs((13, 10), 31200, tbt=0.02), decode_kv_waiting=30, decode_waiting=0)   # 130% of target
    d, _ = once(svc, o)
    assert d.reason == "scale_out_tps" and d.desired.decode == 13


def test_kv_waiting_with_tbt_broken_is_a_decode_shortage():
    svc = service()
    o = replace(obs((13, 10), 19200, tbt=0.06), decode_kv_waiting=30, decode_waiting=0)
    d, _ = once(svc, o)
    assert d.reason == "latency_severe" and d.desired.decode == 12


def test_every_reason_the_policy_gives_is_listed_and_documented():
    # REASONS is the label set the decision metrics and docs/coordinator.md's table promise.
    import re
    from pathlib import Path

    import heteroscale.coordinator.core.policy as policy

    source = Path(policy.__file__).read_text()
    given = set(re.findall(r'reason="([a-z_]+)"', source)) | set(re.findall(r'decision\("([a-z_]+)"', source))
    assert given and given <= set(policy.REASONS), given - set(policy.REASONS)
    table = (Path(__file__).resolve().parents[1] / "docs" / "coordinator.md").read_text()
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    documented = set(re.findall(r"`([a-z_]+)`", " ".join(rows)))
    assert set(policy.REASONS) - documented == set()


def test_a_scale_out_the_step_bound_cut_goes_on_while_its_instances_start():
    # 3x step: 10 decode saturated at 24000 tok/s with 400 requests queued for prefill behind
    # 200 running. Demand 72000 -> 30 decode, damped to 2 x 10 = 20.
    svc = service(policy={"scale_out_cooldown_s": 30, "pending_timeout_s": 600})
    o = replace(obs((13, 10), 24000), decode_running=200, decode_waiting=0, prefill_waiting=400)
    d, state = applied(svc, o, state=PolicyState(), now_s=0.0)
    assert (d.reason, d.desired.decode) == ("scale_out_tps", 20) and "step damped 30 -> 20" in d.detail
    # Next tick, 10 still pending and inside the cooldown: the cut step goes on to 30 (the
    # pending instances are in the 20 it starts from).
    pending = replace(o, pools=replace(o.pools, current=PoolCounts(26, 20), pending=PoolCounts(13, 10)),
                      prefill_waiting=500)
    d, state = applied(svc, pending, state=state, now_s=15.0)
    assert (d.reason, d.desired.decode) == ("scale_out_tps", 30), d.detail
    assert "continuing a scale-out the step bound cut" in d.detail
    # That step was not cut: a further rise while instances start waits for them, as before.
    more = replace(pending, pools=replace(pending.pools, current=PoolCounts(39, 30), pending=PoolCounts(26, 20)),
                   decode_tps=30000.0, prefill_waiting=900)
    d, _ = applied(svc, more, state=state, now_s=30.0)
    assert d.reason == "hold_pending"


def test_a_cut_step_is_continued_on_the_load_only_not_on_the_latency_net():
    svc = service(policy={"scale_out_cooldown_s": 30, "pending_timeout_s": 600})
    o = replace(obs((13, 10), 24000), decode_running=200, decode_waiting=0, prefill_waiting=400)
    _, state = applied(svc, o, state=PolicyState(), now_s=0.0)
    assert state.cut_scale_out == 20
    # The queue is gone (served faster than it came) but latency still breaks: the net
    # sees nothing of the pending capacity, so it waits for it.
    calm = replace(obs((26, 20), 24000, tbt=0.08, pending=(13, 10), pending_since=0.0),
                   decode_running=200, decode_waiting=0, prefill_waiting=0)
    calm = replace(calm, pools=replace(calm.pools, ready=PoolCounts(13, 10)))
    d, _ = applied(svc, calm, state=replace(state, queued=None), now_s=15.0)
    assert d.reason == "hold_pending" and d.desired.decode == 20


def test_no_latency_step_and_no_lesson_for_a_backlog_that_drains_within_the_horizon():
    # New capacity is working off a backlog (1000 -> 400 in 15 s, gone in ~10 s): the
    # window's p90 TTFT is the backlog's. Instances ordered now would start after it is
    # gone: hold, and the effective τ learns nothing.
    svc = service()
    state = replace(PolicyState(), queued=(1000.0, 985.0))
    o = replace(obs((13, 10), 20000, ttft=30.0, tbt=0.05), decode_running=300, decode_waiting=0,
                prefill_waiting=400)
    d, after = once(svc, o, state=state)
    assert d.reason == "hold_draining" and d.desired == PoolCounts(13, 10)
    assert "no step for a draining backlog" in d.detail and after.target.scale == 1.0
    assert after.backlog
    # The tick that backlog empties still carries the flush.
    d, after = once(svc, replace(o, prefill_waiting=0), state=replace(PolicyState(), queued=(36.0, 985.0),
                                                                        backlog=True))
    assert d.reason == "hold_draining" and "drained" in d.detail and after.target.scale == 1.0
    # A few requests queued for a moment (2 -> 0 behind 300 running) are no backlog: the
    # breach is latency's to answer.
    d, _ = once(svc, replace(o, prefill_waiting=0), state=replace(PolicyState(), queued=(2.0, 985.0)))
    assert d.reason == "latency_severe"
    d, _ = once(svc, replace(o, prefill_waiting=1), state=replace(PolicyState(), queued=(20.0, 985.0)))
    assert d.reason == "latency_severe"
    # A queue that does not drain (1000 -> 990) is an overload: it scales out (here on the
    # demand estimate, 20000 x 1290/300 capped at 3x -> 25 decode, damped to 20).
    d, _ = once(svc, replace(o, prefill_waiting=990), state=state)
    assert (d.reason, d.desired.decode) == ("scale_out_tps", 20)


def test_prefill_need_adds_square_root_headroom_to_small_pools():
    from heteroscale.coordinator.core.policy import prefill_need
    svc = service()                                   # 0.7 per instance, beta 1.5
    # 0.34 busy instances' worth: 0.34 / 0.7 -> 1, but 0.34 + 1.5 x 0.58 = 1.21 -> 2.
    assert prefill_need(svc, util=0.17, ready=2) == 2
    # 20 busy: 20 / 0.7 = 28.6 -> 29 dominates 20 + 1.5 x 4.47 = 26.7.
    assert prefill_need(svc, util=0.5, ready=40) == 29
    off = service(policy={"prefill_staffing_beta": 0})
    assert prefill_need(off, util=0.17, ready=2) == 1


def _idle_prefill(o: Observation, util: float) -> Observation:
    return replace(o, prefill_gpu_utilization=util, ttft_p90_s=0.2, tbt_p90_s=0.01)


def test_idle_prefill_above_the_ratio_comes_down_after_the_window_with_latency_calm():
    # 6 prefill for 2 decode (ratio 9:7 wants 3) at 5% GPU: 0.3 busy -> need 2 (staffing).
    # Held for the 300 s window first, then trimmed, damped to half: 6 -> 3.
    svc = service(policy={"scale_in_stabilization_s": 300})
    o = _idle_prefill(obs((6, 2), 4000), 0.05)
    state, reasons = PolicyState(), []
    for t in range(0, 301, 15):
        d, state = applied(svc, o, state=state, now_s=float(t))
        reasons.append(d.reason)
    assert reasons[:-1] == ["hold_tolerance"] * 20 and reasons[-1] == "scale_in_prefill", reasons
    assert d.desired == PoolCounts(3, 2) and "prefill 6 -> 3" in d.detail
    # Only a written trim is remembered (settle), as only a written move starts a cooldown.
    assert state.prefill_trim_s == 300.0
    assert settle(PolicyState(), decision=d, applied=False).prefill_trim_s is None
    # Not while latency is above the calm line (70% of the SLO), nor with instances pending.
    warm = replace(o, ttft_p90_s=0.8)
    state = PolicyState()
    for t in range(0, 601, 15):
        d, state = applied(svc, warm, state=state, now_s=float(t))
        assert d.reason == "hold_tolerance"
    pending = replace(o, pools=replace(o.pools, pending=PoolCounts(1, 0)))
    state = PolicyState()
    for t in range(0, 601, 15):
        d, state = applied(svc, pending, state=state, now_s=float(t))
        assert d.reason != "scale_in_prefill"


def test_a_prefill_count_ttft_broke_at_is_kept_above_for_the_backoff():
    svc = service(policy={"scale_in_stabilization_s": 0, "scale_in_backoff_s": 900, "max_scale_in_factor": 0.3})
    # TTFT breaks at 2 prefill (TBT fine, decode not queueing): the net adds both pools.
    d, state = applied(svc, replace(obs((2, 2), 4000, ttft=1.3, tbt=0.01), prefill_gpu_utilization=0.5),
                       state=PolicyState(), now_s=0.0)
    assert d.reason == "latency_severe" and state.prefill_floor.floor == 3
    # Later decode shrinks 3 -> 1 and the ratio would take prefill to 1, its load to 2: 3 is kept.
    quiet = replace(obs((4, 3), 1000, ttft=0.2, tbt=0.01), prefill_gpu_utilization=0.1)
    d, state = applied(svc, quiet, state=state, now_s=400.0)
    assert d.desired == PoolCounts(3, 1) and "TTFT broke at 2 prefill" in d.detail
    # After the backoff the floor is gone.
    d, _ = applied(svc, quiet, state=state, now_s=1000.0)
    assert d.desired.prefill < 3
