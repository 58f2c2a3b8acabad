"""vLLM adapter on real-format pages: constructed with prometheus_client (and the real
captured vLLM 0.32 page when tests/data/vllm_0.32_cpu.txt exists)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from heteroscale.engine_adapters import snapshot as S
from heteroscale import promtext
from heteroscale.engine_adapters import vllm
from heteroscale.errors import ScrapeError

DATA = Path(__file__).resolve().parent / "data"


def page(name: str) -> str:
    return (DATA / name).read_text()


def test_dp1_page_values():
    snap = vllm.parse(page("vllm_constructed_dp1.txt"))
    assert snap.engine == "vllm" and snap.ranks == frozenset({"0"})
    # 400 requests x 250 generated tokens each
    assert snap.counters[S.GENERATION_TOKENS] == 100_000
    # prompt = local_compute 53100 + cache_hit 12000 + external 1.9e6
    assert snap.counters[S.PROMPT_TOKENS] == 53_100 + 12_000 + 1_900_000
    assert snap.counters[S.PROMPT_UNCACHED_TOKENS] == 53_100
    assert snap.counters[S.PROMPT_CACHED_TOKENS] == 12_000 + 1_900_000
    # num_requests_waiting is 3, of which reason="capacity" 1 and "deferred" 2: waiting is the capacity share
    assert snap.gauges == {S.REQUESTS_RUNNING: 12, S.REQUESTS_WAITING: 1, S.REQUESTS_DEFERRED: 2,
                           S.KV_CACHE_USAGE: 0.4375}
    assert snap.counters[S.PREEMPTIONS] == 2
    assert snap.kv_stages == {}             # not a KV consumer: vLLM does not register the family
    ttft = snap.histograms[S.TTFT]
    assert ttft.count == 400 and ttft.bounds[0] == 0.001 and ttft.bounds[-1] == math.inf
    assert len(ttft.bounds) == 23          # 22 default bounds + +Inf
    assert snap.histograms[S.TBT].count == 400


def test_dp2_sums_engines_and_averages_kv_usage():
    snap = vllm.parse(page("vllm_constructed_dp2.txt"))
    assert snap.ranks == frozenset({"0", "1"})
    # engine 0: 400 req x 250; engine 1: 450 req x 250
    assert snap.counters[S.GENERATION_TOKENS] == 400 * 250 + 450 * 250
    assert snap.gauges[S.REQUESTS_RUNNING] == 12 + 13
    assert snap.gauges[S.REQUESTS_WAITING] == 1 + 2          # capacity shares of 3 and 4
    assert snap.gauges[S.REQUESTS_DEFERRED] == 2 + 2
    assert snap.gauges[S.KV_CACHE_USAGE] == pytest.approx((0.4375 + 0.5375) / 2)
    assert snap.histograms[S.TTFT].count == 800


def test_dp2_page_is_multiprocess_shaped():
    text = page("vllm_constructed_dp2.txt")
    assert "_created" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:time_to_first_token_seconds")]
    assert lines[0].startswith("vllm:time_to_first_token_seconds_sum")   # _sum first, like the MP collector


def test_pre_010_names_are_accepted():
    old = vllm.parse(page("vllm_constructed_old_names.txt"))
    new = vllm.parse(page("vllm_constructed_dp1.txt"))
    assert "vllm:gpu_cache_usage_perc" in page("vllm_constructed_old_names.txt")
    assert old.gauges[S.KV_CACHE_USAGE] == new.gauges[S.KV_CACHE_USAGE]
    assert old.histograms[S.TBT] == new.histograms[S.TBT]


def test_created_series_and_sample_order_do_not_matter():
    text = page("vllm_constructed_dp1.txt")
    assert "vllm:prompt_tokens_created" in text
    lines = text.splitlines()
    samples = [ln for ln in lines if not ln.startswith("#")]
    shuffled = "\n".join(reversed(samples)) + "\n"      # no comments, reversed order
    assert vllm.parse(shuffled) == vllm.parse(text)


def test_fast_path_agrees_with_full_parser():
    # The adapter parses only wanted lines, reusing parsed label sets: it must
    # read exactly what text_string_to_metric_families reads.
    text = page("vllm_constructed_dp2.txt")
    full = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            full.setdefault(s.name, []).append((s.labels, s.value))
    for _ in range(2):      # second round exercises the label cache
        fast = S.parse_page(text, families=vllm.FAMILIES, prefix="vllm:", engine="vllm")
        for name, samples in fast.items():
            assert [(s.labels, s.value) for s in samples] == full[name]
    assert "vllm:time_to_first_token_seconds_bucket" in fast


def test_decode_pod_kv_fetch_stages_and_deferred_requests():
    snap = vllm.parse(page("vllm_constructed_decode_kv_consumer.txt"))
    # two engines: waiting_to_start 1 + 1, in_progress 1 + 2, completed_waiting 0 + 0
    assert snap.kv_stages == {"waiting_to_start": 2.0, "in_progress": 3.0, "completed_waiting": 0.0}
    assert snap.gauges[S.REQUESTS_DEFERRED] == 4 and snap.gauges[S.REQUESTS_WAITING] == 3


def test_waiting_falls_back_to_the_total_without_reasons():
    text = ('vllm:num_requests_waiting{engine="0"} 5\n'
            'vllm:num_preemptions_total{engine="0"} 7\n')
    snap = vllm.parse(text)
    assert snap.gauges == {S.REQUESTS_WAITING: 5}            # older vLLM: no split, no deferred
    assert snap.counters == {S.PREEMPTIONS: 7}


def test_prefix_cache_fallbacks_without_by_source():
    text = (
        "# TYPE vllm:prompt_tokens_total counter\n"
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0\n'
        "# TYPE vllm:prefix_cache_hits_total counter\n"
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0\n'
        'vllm:external_prefix_cache_hits_total{engine="0",model_name="m"} 200.0\n'
    )
    snap = vllm.parse(text)
    assert snap.counters[S.PROMPT_CACHED_TOKENS] == 500.0       # 300 local + 200 external hits
    assert S.PROMPT_UNCACHED_TOKENS not in snap.counters        # not reported directly
    assert S.GENERATION_TOKENS not in snap.counters             # missing, not zero


def test_nan_and_negative_values_are_missing_not_numbers():
    text = ('vllm:num_requests_running{engine="0"} NaN\n'
            'vllm:kv_cache_usage_perc{engine="0"} 7.5\n'
            'vllm:generation_tokens_total{engine="0"} -3\n')
    snap = vllm.parse(text)
    assert snap.gauges == {} and snap.counters == {}


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("   \n\n", "empty"),
    ("# only a comment\n", "empty"),
    ("<html><body>502 Bad Gateway</body></html>\n", "parse"),
    ('vllm:num_requests_running{engine="0" 12\n', "parse"),
    ('vllm:generation_tokens_total{engine="0"} twelve\n', "parse"),
    ('vllm:num_requests_running{engine="0"} 12', "parse"),           # no final newline: truncated
    ('sglang:num_running_reqs{tp_rank="0"} 3.0\n', "wrong_engine"),
    ("node_cpu_seconds_total{cpu=\"0\"} 12.0\n", "wrong_engine"),
])
def test_bad_pages_raise_scrape_error(text, reason):
    with pytest.raises(ScrapeError) as err:
        vllm.parse(text)
    assert err.value.reason == reason


def test_truncated_real_page_mid_line_is_a_parse_error():
    text = page("vllm_constructed_dp1.txt")
    cut = text.index("vllm:time_to_first_token_seconds_bucket") + 30
    with pytest.raises(ScrapeError) as err:
        vllm.parse(text[:cut])
    assert err.value.reason == "parse"


def test_broken_histogram_is_a_parse_error():
    text = ('vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1"} 5.0\n'
            'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf"} 3.0\n')
    with pytest.raises(ScrapeError) as err:
        vllm.parse(text)
    assert err.value.reason == "parse"


REAL = DATA / "vllm_0.32_cpu.txt"            # captured from a real vLLM 0.32 CPU server after traffic
REAL_IDLE = DATA / "vllm_0.32_cpu_idle.txt"   # the same server before any request


@pytest.mark.parametrize("path", [REAL, REAL_IDLE], ids=lambda p: p.name)
def test_real_captured_vllm_032_pages(path):
    if not path.exists():
        pytest.skip(f"real captured vLLM page not committed yet ({path.name})")
    text = path.read_text()
    snap = vllm.parse(text)
    assert snap.ranks == frozenset({"0"})
    for key in (S.GENERATION_TOKENS, S.PROMPT_TOKENS, S.PROMPT_CACHED_TOKENS, S.PROMPT_UNCACHED_TOKENS):
        assert key in snap.counters
    # by_source splits every prompt token into computed here + from a cache
    assert snap.counters[S.PROMPT_CACHED_TOKENS] + snap.counters[S.PROMPT_UNCACHED_TOKENS] == \
        snap.counters[S.PROMPT_TOKENS]
    assert set(snap.gauges) == {S.REQUESTS_RUNNING, S.REQUESTS_WAITING, S.REQUESTS_DEFERRED, S.KV_CACHE_USAGE}
    assert len(snap.histograms[S.TTFT].bounds) == 23 and len(snap.histograms[S.TBT].bounds) == 20
    # and the fast path reads what the full parser reads
    full = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            full.setdefault(s.name, []).append((s.labels, s.value))
    for name, samples in S.parse_page(text, families=vllm.FAMILIES, prefix="vllm:", engine="vllm").items():
        assert [(s.labels, s.value) for s in samples] == full[name]


def test_real_pages_idle_then_traffic_give_the_generated_token_rate():
    if not (REAL.exists() and REAL_IDLE.exists()):
        pytest.skip("real captured vLLM pages not committed yet")
    from heteroscale.engine_adapters.rates import SignalWindow
    idle, busy = vllm.parse(REAL_IDLE.read_text()), vllm.parse(REAL.read_text())
    window = SignalWindow(window_s=60)
    window.add(0.0, idle)
    window.add(10.0, busy)
    stats = window.stats(10.0)
    # generated tokens went from 0 to N in 10 s -> N / 10 tok/s
    assert stats.decode_tps == busy.counters[S.GENERATION_TOKENS] / 10 > 0
    assert stats.ttft_p50_s is not None and stats.tbt_p50_s is not None


@pytest.mark.parametrize("lines", [
    [f'vllm:num_requests_running{{engine="{i}"}} 1' for i in range(S.MAX_RANKS + 1)],          # too many engines
    ['vllm:num_requests_running{engine="' + "7" * (S.MAX_RANK_CHARS + 1) + '"} 1'],         # an absurd rank
    ['vllm:generation_tokens_total{engine="0",x="' + "v" * 17_000 + '"} 1'],                 # a wanted line > 16 KiB
])
def test_what_would_grow_the_window_is_too_large(lines):
    with pytest.raises(ScrapeError) as err:
        vllm.parse("\n".join(lines) + "\n")
    assert err.value.reason == "too_large"


def test_a_huge_line_in_a_family_the_sidecar_ignores_is_ignored():
    text = 'vllm:cache_config_info{block_size="' + "1" * 100_000 + '"} 1\nvllm:num_requests_running{engine="0"} 2\n'
    assert vllm.parse(text).gauges[S.REQUESTS_RUNNING] == 2


def test_kv_stages_are_bounded():
    lines = [f'vllm:num_requests_kv_fetch_by_stage{{engine="0",stage="s{i}"}} 1' for i in range(100)]
    lines.append('vllm:num_requests_kv_fetch_by_stage{engine="0",stage="' + "x" * 100 + '"} 1')
    stages = vllm.parse("\n".join(lines) + "\n").kv_stages
    assert len(stages) == S.MAX_KV_STAGES and all(len(k) <= S.MAX_STAGE_CHARS for k in stages)


def test_a_page_larger_than_one_scan_slice_reads_every_line():
    # Wanted lines are found in slices of SCAN_CHUNK_CHARS; none is lost or cut at a slice edge.
    lines = page("vllm_0.32_cpu.txt").splitlines()
    per_engine = [ln for ln in lines if 'engine="0"' in ln and not ln.startswith("#")]
    engines = 3 * S.SCAN_CHUNK_CHARS // sum(len(ln) + 1 for ln in per_engine) + 2
    big = "\n".join(ln.replace('engine="0"', f'engine="{e}"') for e in range(engines) for ln in per_engine) + "\n"
    assert len(big) > 3 * S.SCAN_CHUNK_CHARS
    one, many = vllm.parse(page("vllm_0.32_cpu.txt")), vllm.parse(big)
    assert many.ranks == frozenset(str(e) for e in range(engines))
    assert many.counters[S.GENERATION_TOKENS] == engines * one.counters[S.GENERATION_TOKENS]
    assert many.histograms[S.TTFT].count == engines * one.histograms[S.TTFT].count
    wanted = sum(1 for ln in big.splitlines() if promtext.parse_line(ln).name in S.wanted_sample_names(vllm.FAMILIES))
    index = S.parse_page(big, families=vllm.FAMILIES, prefix="vllm:", engine="vllm")
    assert sum(len(v) for v in index.values()) == wanted
