"""SGLang adapter on pages built from SGLang 0.5.23's own metric definitions (tests/data/sglang_pages.py)
and on older pages without the per-batch token counters (ENGINES.md §3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from heteroscale.engine_adapters import sglang
from heteroscale.engine_adapters import snapshot as S
from heteroscale.errors import ScrapeError

DATA = Path(__file__).resolve().parent / "data"
DECODE_0523 = DATA / "sglang_0.5.23_decode_dp2_tp2_priority.txt"
PREFILL_0523 = DATA / "sglang_0.5.23_prefill_tp1.txt"


def test_committed_0523_pages_are_what_the_builder_writes(tmp_path):
    # The fixtures are reproducible from SGLang's definitions by the real prometheus_client.
    subprocess.run([sys.executable, str(DATA / "sglang_pages.py"), str(tmp_path)], check=True, capture_output=True)
    for page in (DECODE_0523, PREFILL_0523):
        assert (tmp_path / page.name).read_text() == page.read_text()


def test_0523_decode_page_with_priority_scheduling_reads_totals_once():
    snap = sglang.parse(DECODE_0523.read_text())
    assert snap.ranks == frozenset({"0", "1"}) and snap.engine_role == "decode"
    # running: dp0 64 (40 + 24 by priority), dp1 65; every value is there twice (priority="" total and
    # the breakdown) on each of two TP copies: 4x 129 = 516 if summed blindly
    assert snap.gauges[S.REQUESTS_RUNNING] == 64 + 65
    assert snap.gauges[S.REQUESTS_WAITING] == 5 + 6
    assert snap.gauges[S.KV_CACHE_USAGE] == pytest.approx((0.71 + 0.61) / 2)
    # P/D queues the same way: decode prealloc 2 + 1, transfer 5 + 4; prefill-side queues are 0 here
    assert snap.kv_stages == {"prefill_bootstrap": 0.0, "prefill_inflight": 0.0, "decode_prealloc": 3.0,
                              "decode_transfer": 9.0, "decode_host_receive": 0.0}
    # per-batch tokens (realtime_tokens_total), not the finished-request counters (2.4e6)
    assert snap.token_source == "realtime"
    assert snap.counters[S.GENERATION_TOKENS] == 1_200_000 + 1_300_000
    # a decode pod runs no prefill batch: SGLang never writes those modes, which count 0
    assert snap.counters[S.PROMPT_TOKENS] == 0 and snap.counters[S.PROMPT_UNCACHED_TOKENS] == 0
    assert snap.counters[S.PREEMPTIONS] == 7 + 5               # num_retracted_requests_total, TP copies once
    # TTFT observed by the tokenizer per priority and is_streaming: 100 + 50 + 10 requests
    assert snap.histograms[S.TTFT].count == 160 and len(snap.histograms[S.TTFT].bounds) == 19
    assert snap.histograms[S.TBT].count == 1200


def test_0523_prefill_page():
    snap = sglang.parse(PREFILL_0523.read_text())
    assert snap.engine_role == "prefill" and snap.ranks == frozenset()
    assert snap.token_source == "realtime"
    assert snap.counters[S.PROMPT_UNCACHED_TOKENS] == 3_000_000           # prefill_compute
    assert snap.counters[S.PROMPT_CACHED_TOKENS] == 5_000_000             # prefill_cache
    assert snap.counters[S.PROMPT_TOKENS] == 8_000_000
    assert snap.counters[S.GENERATION_TOKENS] == 0                        # no decode batches on a prefill pod
    assert S.PREEMPTIONS not in snap.counters                              # nothing retracted yet: no series
    assert snap.gauges[S.REQUESTS_RUNNING] == 8 and snap.gauges[S.REQUESTS_WAITING] == 3
    assert snap.kv_stages["prefill_bootstrap"] == 2 and snap.kv_stages["prefill_inflight"] == 4
    assert S.TTFT not in snap.histograms                                   # P/D prefill never observes TTFT


def test_rates_do_not_difference_across_a_token_source_change():
    # An SGLang page gains realtime_tokens_total (the first batch ran): the counter jumps
    # from the finished-request count to the per-batch count; that pair is skipped.
    from heteroscale.engine_adapters.rates import SignalWindow
    older = 'sglang:generation_tokens_total{{model_name="m"}} {v}\n'
    newer = older + 'sglang:realtime_tokens_total{{mode="decode",model_name="m",tp_rank="0"}} {r}\n'
    w = SignalWindow(10.0)
    w.add(0.0, sglang.parse(older.format(v=1000.0)))
    w.add(1.0, sglang.parse(older.format(v=1100.0)))
    w.add(2.0, sglang.parse(newer.format(v=1100.0, r=50.0)))
    w.add(3.0, sglang.parse(newer.format(v=1100.0, r=350.0)))
    assert w.stats(3.0).decode_tps == pytest.approx((100.0 + 300.0) / 2)


def test_priority_breakdown_without_a_total_is_summed():
    # Tokenizer series carry each request's own priority: a partition, summed.
    text = ('sglang:generation_tokens_total{model_name="m",priority="1",is_streaming="true"} 10\n'
            'sglang:generation_tokens_total{model_name="m",priority="5",is_streaming="false"} 5\n'
            'sglang:num_queue_reqs{model_name="m",priority="1",tp_rank="0"} 2\n'
            'sglang:num_queue_reqs{model_name="m",priority="5",tp_rank="0"} 3\n')
    snap = sglang.parse(text)
    assert snap.counters[S.GENERATION_TOKENS] == 15 and snap.gauges[S.REQUESTS_WAITING] == 5
    assert snap.token_source == "finished"


def test_decode_dp2_tp2_sums_dp_ranks_and_drops_tp_copies():
    snap = sglang.parse((DATA / "sglang_pre_realtime_decode_dp2_tp2.txt").read_text())
    assert snap.engine == "sglang" and snap.ranks == frozenset({"0", "1"})
    # every TP rank reports the same batch (--enable-metrics-for-all-schedulers):
    # dp0 = 64 (x2 TP copies), dp1 = 65 (x2) -> 64 + 65, not 258
    assert snap.gauges[S.REQUESTS_RUNNING] == 64 + 65
    assert snap.gauges[S.REQUESTS_WAITING] == 5 + 6          # num_queue_reqs
    assert snap.gauges[S.KV_CACHE_USAGE] == pytest.approx((0.71 + 0.61) / 2)
    # tokenizer counters have no rank labels: taken as they are
    assert snap.counters == {S.GENERATION_TOKENS: 1.42e6, S.PROMPT_TOKENS: 5.1e6, S.PROMPT_CACHED_TOKENS: 1.3e6}
    assert snap.token_source == "finished"         # no realtime_tokens_total on this older page
    assert snap.histograms[S.TTFT].count == 2210
    assert snap.histograms[S.TTFT].bounds[:3] == (0.1, 0.2, 0.4)


def test_prefill_tp1_page():
    snap = sglang.parse((DATA / "sglang_pre_realtime_prefill_tp1.txt").read_text())
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
        vllm.parse((DATA / "sglang_pre_realtime_prefill_tp1.txt").read_text())
    assert err.value.reason == "wrong_engine"


def test_engine_type_is_reported():
    assert sglang.parse((DATA / "sglang_pre_realtime_decode_dp2_tp2.txt").read_text()).engine_role == "decode"
    assert sglang.parse((DATA / "sglang_pre_realtime_prefill_tp1.txt").read_text()).engine_role == "prefill"
