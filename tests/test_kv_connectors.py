"""heteroscale.kv_transfer.connectors: engine and transfer-library pages through the real prometheus_client parser."""

from __future__ import annotations

import math

import pytest

from heteroscale.kv_transfer import connectors as kvc
from heteroscale.errors import ScrapeError


def _page(data_dir, name: str) -> str:
    return (data_dir / name).read_text()


def test_vllm_nixl_page(data_dir):
    kv = kvc.parse_engine_page(_page(data_dir, "kv_vllm_nixl.txt"), direction="receive")
    assert [r.connector for r in kv.connectors] == [kvc.VLLM_NIXL]
    nixl = kv.connectors[0]
    # _sum of the bytes histogram is cumulative bytes; _count is transfers.
    assert nixl.bytes_total == {"receive": 3.9e8}
    assert nixl.transfers_total == 60
    assert nixl.busy_seconds_total == pytest.approx(0.78)
    assert nixl.failures_total == 2
    assert nixl.latency.bounds[0] == 0.005 and nixl.latency.bounds[-1] == math.inf
    assert nixl.latency.count == 60
    assert kv.requests_waiting == 0


def test_real_vllm_page_without_a_kv_connector_has_no_reading(data_dir):
    # A real vLLM 0.32 CPU page (no P/D): no connector metrics -> nothing, not zeros.
    page = data_dir / "vllm_0.32_cpu.txt"
    if not page.exists():
        pytest.skip("captured vLLM page not in tests/data")
    kv = kvc.parse_engine_page(page.read_text(), direction="send")
    assert kv.connectors == ()
    assert kv.requests_waiting is not None


def test_sglang_gauge_page_dedups_tp_ranks(data_dir):
    kv = kvc.parse_engine_page(_page(data_dir, "kv_sglang_gauges.txt"), direction="send")
    (sg,) = kv.connectors
    assert sg.connector == kvc.SGLANG
    # Two TP ranks report the same 18.2 GB/s: one value, GB read as 2**30 bytes.
    assert sg.speed_bytes_per_s == pytest.approx(18.2 * 2 ** 30)
    assert sg.latency_s == pytest.approx(0.0125)
    assert sg.failures_total == 5            # 4 transfer + 1 bootstrap failures
    assert sg.bytes_total == {}              # gauges carry no cumulative bytes
    assert kv.requests_waiting == 3
    assert kv.transfer_queue_reqs == 5


def _sglang_histogram_page(mb_sum: float, count: int, ms_sum: float, tp_ranks=("0", "1")) -> str:
    lines = ["# TYPE sglang:kv_transfer_total_mb histogram",
             "# TYPE sglang:kv_transfer_latency_ms histogram"]
    for tp in tp_ranks:
        labels = f'engine_type="prefill",model_name="m",tp_rank="{tp}"'
        lines += [f'sglang:kv_transfer_total_mb_bucket{{{labels},le="10.0"}} {count}',
                  f'sglang:kv_transfer_total_mb_bucket{{{labels},le="+Inf"}} {count}',
                  f'sglang:kv_transfer_total_mb_sum{{{labels}}} {mb_sum}',
                  f'sglang:kv_transfer_total_mb_count{{{labels}}} {count}',
                  f'sglang:kv_transfer_latency_ms_bucket{{{labels},le="50.0"}} {count}',
                  f'sglang:kv_transfer_latency_ms_bucket{{{labels},le="+Inf"}} {count}',
                  f'sglang:kv_transfer_latency_ms_sum{{{labels}}} {ms_sum}',
                  f'sglang:kv_transfer_latency_ms_count{{{labels}}} {count}']
    return "\n".join(lines) + "\n"


def test_sglang_histogram_page():
    kv = kvc.parse_engine_page(_sglang_histogram_page(189.0, 83, 830.0), direction="send")
    (sg,) = kv.connectors
    # 189 MB over 83 transfers, reported identically by 2 TP ranks: counted once.
    assert sg.bytes_total == {"send": pytest.approx(189.0 * 2 ** 20)}
    assert sg.transfers_total == 83
    assert sg.busy_seconds_total == pytest.approx(0.83)     # 830 ms
    assert sg.latency.bounds[0] == pytest.approx(0.05)
    assert sg.speed_bytes_per_s is None and sg.latency_s is None


def test_nixl_telemetry_page(data_dir):
    r = kvc.parse_connector_page(_page(data_dir, "kv_nixl_telemetry.txt"))
    assert r.connector == kvc.NIXL_TELEMETRY
    assert r.bytes_total == {"send": 5.0e9, "receive": 1.0e6}
    assert r.busy_seconds_total == pytest.approx(0.25)      # 2.5e5 µs
    assert r.latency.bounds[:3] == pytest.approx((1e-4, 1e-3, 1e-2))
    assert r.failures_total == 4


def test_mooncake_tent_page(data_dir):
    r = kvc.parse_connector_page(_page(data_dir, "kv_mooncake_tent.txt"))
    assert r.connector == kvc.MOONCAKE_TENT
    assert r.bytes_total == {"send": 8.2e10}                 # rdma + tcp writes; no reads yet -> no key
    assert r.transfers_total == 20000
    assert r.failures_total == 7
    assert r.busy_seconds_total == pytest.approx(30.0)


def test_engine_page_direction_is_validated():
    with pytest.raises(ValueError):
        kvc.parse_engine_page("x 1\n", direction="sideways")


@pytest.mark.parametrize("page,reason", [
    ("", "empty"),
    ("   \n", "empty"),
    ('vllm:nixl_bytes_transferred_sum{engine="0"} 1.0', "parse"),           # truncated: no final newline
    ('vllm:nixl_bytes_transferred_sum{engine="0" 1.0\n', "parse"),          # garbage in a wanted family
    ('vllm:nixl_bytes_transferred_bucket{le="abc"} 1\n', "parse"),
    ('vllm:nixl_xfer_time_seconds_bucket{le="1.0"} 5\n', "parse"),          # no +Inf bucket
    ('vllm:nixl_xfer_time_seconds_bucket{le="1.0"} 5\nvllm:nixl_xfer_time_seconds_bucket{le="+Inf"} 3\n',
     "parse"),                                                              # not cumulative
])
def test_bad_engine_pages(page, reason):
    with pytest.raises(ScrapeError) as err:
        kvc.parse_engine_page(page, direction="send")
    assert err.value.reason == reason


def test_garbage_outside_wanted_families_is_not_read(data_dir):
    page = "this is { not prometheus\n" + _page(data_dir, "kv_vllm_nixl.txt")
    kv = kvc.parse_engine_page(page, direction="send")
    assert kv.connectors[0].bytes_total == {"send": 3.9e8}


def test_connector_page_of_something_else_is_wrong_engine(data_dir):
    with pytest.raises(ScrapeError) as err:
        kvc.parse_connector_page(_page(data_dir, "kv_vllm_nixl.txt"))
    assert err.value.reason == "wrong_engine"


def test_dp_engines_are_summed():
    page = ("# TYPE vllm:nixl_bytes_transferred histogram\n"
            'vllm:nixl_bytes_transferred_bucket{engine="0",le="+Inf"} 2\n'
            'vllm:nixl_bytes_transferred_sum{engine="0"} 100\n'
            'vllm:nixl_bytes_transferred_count{engine="0"} 2\n'
            'vllm:nixl_bytes_transferred_bucket{engine="1",le="+Inf"} 3\n'
            'vllm:nixl_bytes_transferred_sum{engine="1"} 50\n'
            'vllm:nixl_bytes_transferred_count{engine="1"} 3\n')
    (r,) = kvc.parse_engine_page(page, direction="send").connectors
    assert r.bytes_total == {"send": 150} and r.transfers_total == 5


def test_sglang_0523_prefill_page(data_dir):
    # Built from SGLang 0.5.23's metric definitions (tests/data/sglang_pages.py): 83 transfers of
    # 2-4 MB each (248 MB in all) taking 8-12 ms (827 ms in all).
    kv = kvc.parse_engine_page(_page(data_dir, "sglang_0.5.23_prefill_tp1.txt"), direction="send")
    (sg,) = kv.connectors
    assert sg.bytes_total == {"send": pytest.approx(248.0 * 2 ** 20)}
    assert sg.transfers_total == 83 and sg.busy_seconds_total == pytest.approx(0.827)
    # kv_transfer_speed_gb_s is a histogram now (no gauge): per-transfer speeds in bytes/s
    assert sg.speed_bytes_per_s is None and sg.speed.count == 83
    assert sg.speed.sum / sg.speed.count == pytest.approx(
        sum((2.0 + i % 3) / 1024 / ((8.0 + i % 5) / 1000) for i in range(83)) / 83 * 2 ** 30)
    assert sg.bootstrap.count == 83 and sg.alloc_wait.sum == pytest.approx(83 * 0.5e-3)
    assert sg.failures_total == 1 and sg.retries_total == 2
    assert kv.requests_waiting == 3 and kv.transfer_queue_reqs == 4 + 0     # prefill inflight + decode transfer


def test_sglang_0523_decode_page_with_priorities_counts_queues_once(data_dir):
    kv = kvc.parse_engine_page(_page(data_dir, "sglang_0.5.23_decode_dp2_tp2_priority.txt"), direction="receive")
    # num_queue_reqs: priority="" totals 5 (dp0) + 6 (dp1), each written by two TP ranks
    # and broken down by priority next to it; read once: 11.
    assert kv.requests_waiting == 11
    assert kv.transfer_queue_reqs == 0 + 9          # prefill inflight (0) + decode transfer (5 + 4)
