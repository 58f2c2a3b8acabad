"""SGLang adapter on pages built from SGLang's documented names and label sets (ENGINES.md §3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from heteroscale.engine_adapters import sglang
from heteroscale.engine_adapters import snapshot as S
from heteroscale.errors import ScrapeError

DATA = Path(__file__).resolve().parent / "data"


def test_decode_dp2_tp2_sums_dp_ranks_and_drops_tp_copies():
    snap = sglang.parse((DATA / "sglang_decode_dp2_tp2.txt").read_text())
    assert snap.engine == "sglang" and snap.ranks == frozenset({"0", "1"})
    # every TP rank reports the same batch (--enable-metrics-for-all-schedulers):
    # dp0 = 64 (x2 TP copies), dp1 = 65 (x2) -> 64 + 65, not 258
    assert snap.gauges[S.REQUESTS_RUNNING] == 64 + 65
    assert snap.gauges[S.REQUESTS_WAITING] == 5 + 6          # num_queue_reqs
    assert snap.gauges[S.KV_CACHE_USAGE] == pytest.approx((0.71 + 0.61) / 2)
    # tokenizer counters have no rank labels: taken as they are
    assert snap.counters == {S.GENERATION_TOKENS: 1.42e6, S.PROMPT_TOKENS: 5.1e6, S.PROMPT_CACHED_TOKENS: 1.3e6}
    assert snap.histograms[S.TTFT].count == 2210
    assert snap.histograms[S.TTFT].bounds[:3] == (0.1, 0.2, 0.4)


def test_prefill_tp1_page():
    snap = sglang.parse((DATA / "sglang_prefill_tp1.txt").read_text())
    assert snap.gauges[S.REQUESTS_RUNNING] == 64
    assert snap.ranks == frozenset()          # no dp_rank label without DP


def test_histogram_rank_copies_are_not_double_counted():
    base = 'engine_type="decode",model_name="m",pp_rank="0"'
    lines = []
    for tp in ("0", "1"):
        lines += [f'sglang:inter_token_latency_seconds_bucket{{{base},le="0.01",tp_rank="{tp}"}} 4.0',
                  f'sglang:inter_token_latency_seconds_bucket{{{base},le="+Inf",tp_rank="{tp}"}} 10.0',
                  f'sglang:inter_token_latency_seconds_sum{{{base},tp_rank="{tp}"}} 0.2']
    snap = sglang.parse("\n".join(lines) + "\n")
    assert snap.histograms[S.TBT].count == 10.0


def test_vllm_page_is_wrong_engine_for_sglang():
    with pytest.raises(ScrapeError) as err:
        sglang.parse((DATA / "vllm_constructed_dp1.txt").read_text())
    assert err.value.reason == "wrong_engine"


def test_sglang_page_is_wrong_engine_for_vllm():
    from heteroscale.engine_adapters import vllm
    with pytest.raises(ScrapeError) as err:
        vllm.parse((DATA / "sglang_prefill_tp1.txt").read_text())
    assert err.value.reason == "wrong_engine"


def test_engine_type_is_reported():
    assert sglang.parse((DATA / "sglang_decode_dp2_tp2.txt").read_text()).engine_role == "decode"
    assert sglang.parse((DATA / "sglang_prefill_tp1.txt").read_text()).engine_role == "prefill"
