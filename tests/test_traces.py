"""Trace readers (Azure, Mooncake, BurstGPT) and synthetic diurnal days."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from heteroscale.simulator import traces
from heteroscale.simulator.traces import TraceError


def test_azure_timestamp_with_seven_fractional_digits():
    a = traces.parse_azure_timestamp("2023-11-16 18:15:46.6805900")
    b = traces.parse_azure_timestamp("2023-11-16 18:15:50.9951690")
    assert b - a == pytest.approx(4.314579, abs=1e-6)


def test_azure_reader(tmp_path: Path):
    f = tmp_path / "az.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:50.9951690,396,109\n"
                 "2023-11-16 18:15:46.6805900,374,44\n")
    wl = traces.load_trace(f)
    # Sorted by arrival and re-based to 0.
    assert wl.arrival_s.tolist() == pytest.approx([0.0, 4.314579])
    assert wl.prompt_tokens.tolist() == [374, 396]
    assert wl.output_tokens.tolist() == [44, 109]
    assert wl.cached_tokens.tolist() == [0, 0]


def test_shared_azure_traces(shared_dir: Path):
    conv = traces.load_trace(shared_dir / "traces" / "AzureLLMInferenceTrace_conv.csv")
    assert len(conv) == 19366
    assert 1100 < conv.prompt_tokens.mean() < 1200       # README: ~1,155
    assert 3300 < conv.duration_s < 3700                  # ~58 min


def test_mooncake_prefix_reuse_from_hash_ids(tmp_path: Path):
    f = tmp_path / "mc.jsonl"
    recs = [{"timestamp": 0, "input_length": 1500, "output_length": 10, "hash_ids": [1, 2, 3]},
            {"timestamp": 1000, "input_length": 1300, "output_length": 20, "hash_ids": [1, 2, 9]},
            {"timestamp": 2500, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]},
            {"timestamp": 3000, "input_length": 400, "output_length": 5, "hash_ids": [1]}]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    wl = traces.load_trace(f)
    assert wl.arrival_s.tolist() == [0.0, 1.0, 2.5, 3.0]          # ms -> s
    # 2nd request: blocks 1, 2 seen before -> 2 × 512 cached; 4th: block 1 covers its
    # whole 400-token prompt, but one token is always computed -> 399.
    assert wl.cached_tokens.tolist() == [0, 1024, 0, 399]


def test_mooncake_lru_capacity_forgets(tmp_path: Path):
    f = tmp_path / "mc.jsonl"
    recs = [{"timestamp": i, "input_length": 600, "output_length": 5, "hash_ids": [h]}
            for i, h in enumerate([1, 2, 1])]
    f.write_text("\n".join(json.dumps(r) for r in recs))
    assert traces.load_trace(f, prefix_cache_blocks=1).cached_tokens.tolist() == [0, 0, 0]
    assert traces.load_trace(f, prefix_cache_blocks=8).cached_tokens.tolist() == [0, 0, 512]


def test_mooncake_sample_file(data_dir: Path):
    wl = traces.load_trace(data_dir / "mooncake_sample.jsonl")
    assert len(wl) == 240
    assert wl.cached_tokens.sum() > 0                 # shared system prompts are reused
    assert (wl.cached_tokens < wl.prompt_tokens).all()


def test_burstgpt_skips_failed_requests(data_dir: Path):
    wl = traces.load_trace(data_dir / "burstgpt_sample.csv")
    rows = (data_dir / "burstgpt_sample.csv").read_text().strip().splitlines()[1:]
    served = [r for r in rows if int(r.split(",")[3]) > 0]
    assert len(wl) == len(served) < len(rows)
    assert traces.detect_format(data_dir / "burstgpt_sample.csv") == "burstgpt"


@pytest.mark.parametrize("content, match", [
    ("hello,world\n1,2\n", "unknown format"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nnot-a-date,1,2\n", "line 2"),
    ('{"timestamp": 1, "input_length": 5}\n', "line 1"),
])
def test_bad_traces_raise_one_line_errors(tmp_path: Path, content: str, match: str):
    f = tmp_path / ("t.jsonl" if content.startswith("{") else "t.csv")
    f.write_text(content)
    with pytest.raises(TraceError, match=match) as info:
        traces.load_trace(f)
    assert "\n" not in str(info.value)


def test_missing_and_empty_traces(tmp_path: Path):
    with pytest.raises(TraceError, match="no such file"):
        traces.load_trace(tmp_path / "nope.csv")
    empty = tmp_path / "e.csv"
    empty.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(TraceError, match="no requests"):
        traces.load_trace(empty)


def _source() -> traces.Workload:
    return traces.synthetic_sizes(prompt_mean=1000, output_mean=100, count=500, seed=3)


def test_diurnal_day_is_seeded_and_follows_the_profile():
    src = _source()
    a = traces.diurnal_day(src, peak_rps=10.0, duration_h=24, seed=5)
    b = traces.diurnal_day(src, peak_rps=10.0, duration_h=24, seed=5)
    c = traces.diurnal_day(src, peak_rps=10.0, duration_h=24, seed=6)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.arrival_s[:100], c.arrival_s[:100])
    # Expected count = peak × mean(profile) × 86400 (linear interpolation keeps the mean).
    expected = 10.0 * np.mean(traces.DEFAULT_PROFILE) * 86400
    assert abs(len(a) - expected) < 0.02 * expected
    _, rps = traces.rate_profile(a, bin_s=3600)
    assert rps[3] > 8.0 and rps[20] < 1.2       # hour 3 ≈ mean(1.0, 0.82) × 10; hour 20 ≈ 0.85
    assert np.all(np.diff(a.arrival_s) >= 0)
    # Sizes come from the source distribution.
    assert set(np.unique(a.prompt_tokens)) <= set(np.unique(src.prompt_tokens))


def test_poisson_constant_rate():
    wl = traces.poisson(_source(), rate_rps=5.0, duration_s=2000, seed=1)
    assert abs(len(wl) - 10_000) < 400


def test_window_rebases():
    wl = traces.make_workload("w", [0, 10, 20, 30], [5, 5, 5, 5], [2, 2, 2, 2])
    part = wl.window(10, 30)
    assert part.arrival_s.tolist() == [0.0, 10.0]
