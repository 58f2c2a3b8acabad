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


# ---------------------------------------------------------------- workload drift


def _ramp_source(n: int = 2000) -> traces.Workload:
    """A recorded hour whose prompts grow from 100 to ~2100 tokens over its span
    (outputs shrink), i.e. a mix that drifts over the trace."""
    t = np.linspace(0.0, 3600.0, n)
    prompt = (100 + t / 3600.0 * 2000).astype(np.int64)
    output = (400 - t / 3600.0 * 300).astype(np.int64)
    return traces.make_workload("ramp", t, prompt, output, prompt // 4)


def test_replay_as_recorded_keeps_the_traces_mix_over_time():
    src = _ramp_source()
    first, last = src.window(0, 600), src.window(3000, 3600)
    assert last.prompt_tokens.mean() > 5 * first.prompt_tokens.mean()
    assert first.output_tokens.mean() > 2 * last.output_tokens.mean()


def test_diurnal_keep_order_stretches_the_traces_mix_over_the_day():
    day = traces.diurnal_day(_ramp_source(), peak_rps=2.0, duration_h=24, profile=(1.0, 1.0), seed=1)
    mix = traces.mix_share_by_hour(day)
    # Hour h of the day carries minutes 2.5h..2.5(h+1) of the trace: prompts grow all day.
    assert mix["prompt_mean"][0] < 250 and mix["prompt_mean"][23] > 1900
    assert np.all(np.diff(mix["prompt_mean"]) > 0)
    assert mix["prompt_per_output"][23] > 10 * mix["prompt_per_output"][0]
    assert np.all(np.diff(day.arrival_s) >= 0)
    # Cached tokens travel with their request.
    assert np.array_equal(day.cached_tokens, day.prompt_tokens // 4)


def test_diurnal_shuffle_keeps_the_mix_flat_all_day():
    day = traces.diurnal_day(_ramp_source(), peak_rps=2.0, duration_h=24, profile=(1.0, 1.0), seed=1,
                             order="shuffle")
    mix = traces.mix_share_by_hour(day)["prompt_mean"]
    assert mix.max() / mix.min() < 1.15                  # ~7,200 draws per hour from one distribution
    with pytest.raises(traces.UsageError, match="order"):
        traces.diurnal_day(_ramp_source(), peak_rps=2.0, order="sorted")


def test_diurnal_keep_order_is_seeded():
    a = traces.diurnal_day(_ramp_source(), peak_rps=1.0, duration_h=2, seed=4)
    b = traces.diurnal_day(_ramp_source(), peak_rps=1.0, duration_h=2, seed=4)
    assert np.array_equal(a.prompt_tokens, b.prompt_tokens) and np.array_equal(a.arrival_s, b.arrival_s)


def test_drift_interpolates_by_hour_and_wraps():
    drift = traces.Drift((traces.DriftPoint(hour=6, prompt_scale=1.0, output_scale=2.0),
                          traces.DriftPoint(hour=18, prompt_scale=3.0, output_scale=1.0)))
    p, o, share = drift.at(np.array([6.0, 12.0, 18.0, 0.0, 24.0 + 12.0, 3.0]))
    assert p.tolist() == pytest.approx([1.0, 2.0, 3.0, 2.0, 2.0, 1.5])     # 0 h: midway back to 6 h
    assert o.tolist() == pytest.approx([2.0, 1.5, 1.0, 1.5, 1.5, 1.75])
    assert share is None


def test_apply_drift_shifts_prompts_outputs_and_cache_share():
    src = traces.synthetic_sizes(prompt_mean=1000, output_mean=200, spread_ratio=0.0, count=10)
    day = traces.diurnal_day(src, peak_rps=1.0, duration_h=24, profile=(1.0, 1.0), seed=2, order="shuffle")
    drift = traces.Drift((traces.DriftPoint(hour=0, prompt_scale=1.0, output_scale=1.0, cache_share=0.0),
                          traces.DriftPoint(hour=12, prompt_scale=4.0, output_scale=0.25, cache_share=0.6)))
    out = traces.apply_drift(day, drift)
    mix = traces.mix_share_by_hour(out)
    assert mix["prompt_mean"][0] == pytest.approx(1000 * (1 + 3 * 0.5 / 12), rel=0.02)   # hour 0-1 mean
    assert mix["prompt_mean"][12] == pytest.approx(1000 * (4 - 3 * 0.5 / 12), rel=0.02)
    assert mix["output_mean"][12] < 60 and mix["output_mean"][0] > 190
    assert mix["cached_share"][12] == pytest.approx(0.6 - 0.6 * 0.5 / 12, abs=0.01)
    assert mix["cached_share"][0] < 0.03
    assert (out.cached_tokens < out.prompt_tokens).all()
    # start_hour shifts the clock: starting at 12 h puts the RAG-like mix first.
    shifted = traces.mix_share_by_hour(traces.apply_drift(day, drift, start_hour=12.0))
    assert shifted["prompt_mean"][0] == pytest.approx(mix["prompt_mean"][12], rel=0.02)


def test_parse_drift_reports_every_problem():
    problems: list[str] = []
    assert traces.parse_drift([{"hour": 25}, {"hour": 3, "prompt_scale": 0, "cache_share": 2, "x": 1},
                               {"prompt_scale": 1}, "no"], problems) is None
    text = "\n".join(problems)
    for frag in ("[0].hour: must be a number in [0, 24)", "[1].prompt_scale", "[1].cache_share",
                 "[1].x: unknown key", "[2].hour: is required", "[3]: must be a mapping"):
        assert frag in text, frag
    problems = []
    assert traces.parse_drift([{"hour": 1, "cache_share": 0.2}, {"hour": 2}], problems) is None
    assert problems == ["simulation.drift: give cache_share in every point or in none"]
    problems = []
    drift = traces.parse_drift([{"hour": 0}, {"hour": 9.5, "prompt_scale": 2, "output_scale": 0.5}], problems)
    assert problems == [] and drift is not None and drift.points[1].prompt_scale == 2.0


def test_sim_config_reads_order_and_drift_and_lists_their_problems():
    from heteroscale.errors import ConfigError
    from heteroscale.simulator.config import load_sim_config
    base = ("services: [{name: s, pd_ratio: '1:1', target_decode_tps_per_instance: 100, prefill: {}, decode: {}, slo: {ttft_s: 1}}]\n"
            "simulation:\n  prefill: {gpu: H20}\n  decode: {gpu: H20}\n")
    cfg = load_sim_config(base + "  diurnal: {order: shuffle}\n"
                                 "  drift: [{hour: 0}, {hour: 12, prompt_scale: 2, cache_share: null}]\n")
    assert cfg.diurnal.order == "shuffle" and cfg.drift is not None and len(cfg.drift.points) == 2
    assert load_sim_config(base).diurnal.order == "keep" and load_sim_config(base).drift is None
    with pytest.raises(ConfigError) as info:
        load_sim_config(base + "  diurnal: {order: sorted}\n  drift: [{hour: 30}]\n"
                               "  baselines: {independent-tps: {prefill_target_tps_per_instance: 0}}\n")
    text = "\n".join(info.value.problems)
    assert "simulation.diurnal.order" in text and "simulation.drift[0].hour" in text
    assert "simulation.baselines.independent-tps.prefill_target_tps_per_instance" in text
