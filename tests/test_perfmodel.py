"""The roofline performance model: worked examples and invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from heteroscale.simulator import perfmodel as pm

M8 = pm.model("8b")
H20 = pm.gpu("H20")


def test_kv_bytes_per_token_worked_examples():
    # 2 × 32 layers × 8 kv heads × 128 × 2 bytes = 131,072
    assert pm.kv_bytes_per_token(M8) == 131_072
    # 70b: 2 × 80 × 8 × 128 × 2 = 327,680
    assert pm.kv_bytes_per_token(pm.model("70b")) == 327_680


def test_catalog_holds_datasheet_figures():
    assert set(pm.CATALOG) >= {"H20", "L20", "H100", "H200", "A100", "L40S"}
    assert (H20.bf16_tflops, H20.mem_bandwidth_tbps, H20.mem_gb) == (148.0, 4.0, 96.0)
    assert pm.gpu("h100-sxm").mem_bandwidth_tbps == 3.35
    assert pm.gpu("A100-80G").bf16_tflops == 312.0
    with pytest.raises(KeyError):
        pm.gpu("B200")


def test_prefill_time_worked_example():
    # 8b, 1000 tokens on 1×H20: FLOPs = 2×8.03e9×1000 + 4×32×4096×(1000²/2) = 1.606e13 + 2.62e11
    eff = pm.Efficiency(pass_overhead_s=0.0)
    flops = 2 * 8.03e9 * 1000 + 4 * 32 * 32 * 128 * 500_000
    expected = flops / (148e12 * eff.prefill_mfu)
    assert pm.prefill_time_s(M8, H20, 1, 1000, eff=eff) == pytest.approx(expected)


def test_decode_step_worked_example():
    # batch 1, 1000 tokens of KV on 1×H20: bytes = 16.06e9 + 1000×131072, memory-bound.
    eff = pm.Efficiency(pass_overhead_s=0.0)
    expected = (8.03e9 * 2 + 1000 * 131_072) / (4.0e12 * eff.decode_bandwidth_eff)
    assert pm.decode_step_time_s(M8, H20, 1, 1, 1000, eff=eff) == pytest.approx(expected)


def test_cached_tokens_make_prefill_cheaper():
    full = pm.prefill_time_s(M8, H20, 1, 4000)
    half = pm.prefill_time_s(M8, H20, 1, 4000, cached_tokens=2000)
    assert half < full


def test_tensor_parallel_speeds_up_but_sublinearly():
    one = pm.prefill_time_s(M8, H20, 1, 4000)
    four = pm.prefill_time_s(M8, H20, 4, 4000)
    assert one / 4 < four < one


def test_kv_capacity_zero_when_weights_do_not_fit():
    assert pm.kv_capacity_tokens(pm.model("70b"), pm.gpu("L20"), 1) == 0
    with pytest.raises(ValueError):
        pm.InstanceSpec(pm.model("70b"), pm.gpu("L20"), 1)
    assert pm.InstanceSpec(pm.model("70b"), pm.gpu("H200"), 2).kv_capacity_tokens > 100_000


def test_bad_tp_rejected():
    with pytest.raises(ValueError):
        pm.prefill_time_s(M8, H20, 3, 100)


@given(st.integers(1, 256), st.integers(0, 400_000))
def test_decode_step_monotone_in_batch_and_context(batch, ctx):
    t = pm.decode_step_time_s(M8, H20, 2, batch, ctx)
    assert pm.decode_step_time_s(M8, H20, 2, batch + 1, ctx) >= t
    assert pm.decode_step_time_s(M8, H20, 2, batch, ctx + 1000) >= t
    assert 0.0 <= pm.decode_compute_share(M8, H20, 2, batch, ctx) <= 1.0


def test_utilization_shapes_match_the_paper():
    # Prefill: linear in load. Decode: any traffic keeps kernels running → flat and high.
    p = [pm.gpu_utilization("prefill", busy_fraction=x) for x in (0.1, 0.5, 1.0)]
    assert p[1] == pytest.approx(5 * p[0]) and p[2] == pytest.approx(2 * p[1])
    assert pm.gpu_utilization("decode", busy_fraction=1.0) >= 0.85
    lo = pm.sm_activity("decode", busy_fraction=1.0, compute_share=0.05)
    hi = pm.sm_activity("decode", busy_fraction=1.0, compute_share=0.6)
    assert 0.25 < lo < hi <= 1.0
    with pytest.raises(ValueError):
        pm.gpu_utilization("router", busy_fraction=0.5)


def test_efficiency_validated():
    with pytest.raises(ValueError, match="prefill_mfu"):
        pm.Efficiency(prefill_mfu=1.5)


@given(st.integers(1, 300), st.integers(0, 2_000_000))
def test_decode_coefficients_match_the_step_function(batch, ctx):
    for name, tp in (("H20", 1), ("L20", 4), ("H100", 2)):
        g = pm.gpu(name)
        co = pm.decode_coefficients(M8, g, tp)
        assert co.step_s(batch, ctx) == pytest.approx(pm.decode_step_time_s(M8, g, tp, batch, ctx))


def test_vectorised_prefill_matches_scalar():
    import numpy as np
    prompts = np.array([1, 100, 3000, 8000])
    cached = np.array([0, 50, 1024, 0])
    got = pm.prefill_times_s(M8, H20, 2, prompts, cached)
    want = [pm.prefill_time_s(M8, H20, 2, int(p), cached_tokens=int(c)) for p, c in zip(prompts, cached)]
    assert got == pytest.approx(want)
