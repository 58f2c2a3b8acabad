"""benchmarks/control_bench.py: its days drift as described, its step metrics, its run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from heteroscale.simulator import traces
from heteroscale.simulator.model.runner import RunResult

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import control_bench  # noqa: E402


def test_the_drift_day_goes_chat_then_rag_then_agent(shared_dir: Path):
    if not (shared_dir / "traces" / "AzureLLMInferenceTrace_code.csv").is_file():
        pytest.skip("no Azure traces")
    day = control_bench.build_drift_day(1, True, 0.0)          # quick: 24 h squeezed into 3
    per_h = (day.arrival_s // 450.0).astype(int)               # 450 s = one hour of the profile
    ratio = np.array([day.prompt_tokens[per_h == h].sum() / day.output_tokens[per_h == h].sum()
                      for h in range(24)])
    out = np.array([day.output_tokens[per_h == h].mean() for h in range(24)])
    chat, rag, agent = ratio[2], ratio[11], ratio[18]
    assert 4 < chat < 8                                         # Azure conversation: ~1,155 / 211
    assert rag > 40                                             # Azure code: ~2,048 / 28
    assert out[18] > 2.5 * out[2] and agent < chat              # agent: answers ×3, prompts ×1.5
    assert day.duration_s < 3 * 3600


def test_the_cache_day_swings_the_cached_share():
    day = control_bench.build_cache_day(1, True, 0.0)
    mix = traces.mix_share_by_hour(traces.Workload(day.name, day.arrival_s * 8, day.prompt_tokens,
                                                   day.output_tokens, day.cached_tokens))
    share = mix["cached_share"]
    assert share[0] < 0.2 and share[5] > 0.6 and share[11] < 0.3 and share[17] > 0.7


def _result(ttft: list[float], tbt: list[float], decisions: list[dict]) -> RunResult:
    n = len(ttft)
    series = {"t_h": (np.arange(n) * 60 + 30) / 3600.0, "ttft_p90_s": np.array(ttft), "tbt_p90_s": np.array(tbt)}
    return RunResult("p", {}, series, decisions)


def test_step_times():
    ok, bad = 0.5, 3.0
    res = _result([ok] * 10 + [bad] * 3 + [ok] * 7, [0.02] * 20,
                  [{"at": 300.0, "from": {"prefill": 1, "decode": 1}, "to": {"prefill": 1, "decode": 1}},
                   {"at": 645.0, "from": {"prefill": 2, "decode": 1}, "to": {"prefill": 4, "decode": 2}}])
    got = control_bench.step_times(res, 600.0, 1.0, 0.04)
    assert got == {"first_scale_out_s": 45.0, "slo_restored_s": 180.0}     # minutes 10-12 breach
    calm = control_bench.step_times(_result([ok] * 20, [0.02] * 20, []), 600.0, 1.0, 0.04)
    assert calm == {"first_scale_out_s": None, "slo_restored_s": 0.0}
    never = control_bench.step_times(_result([ok] * 10 + [bad] * 10, [0.02] * 20, []), 600.0, 1.0, 0.04)
    assert never["slo_restored_s"] is None


def test_days_are_tagged_and_selectable():
    assert {d.tag for d in control_bench.DAYS} == {"tune", "held_out"}
    assert [d.key for d in control_bench.select("a,e-step")] == ["a-drift", "e-step"]
    assert [d.key for d in control_bench.select("d")] == ["d-small", "d-medium", "d-large"]
    with pytest.raises(SystemExit):
        control_bench.select("z")


@pytest.mark.slow
def test_a_quick_run_records_every_metric(tmp_path: Path):
    out = tmp_path / "control.json"
    proc = subprocess.run([sys.executable, "benchmarks/control_bench.py", "--quick", "--days", "e",
                           "--policies", "heteroscale,independent-tps,static-peak", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    day = doc["days"]["e-step"]
    assert day["tag"] == "tune" and day["curated"]["on"] == "the generated mix"
    for row in day["policies"].values():
        for key in ("gpu_hours", "vs_static_peak", "slo_attainment", "ttft_minutes_ok", "tbt_minutes_ok",
                    "reversals", "reversals_per_2h", "first_scale_out_s", "slo_restored_s"):
            assert key in row
    assert day["policies"]["static-peak"]["vs_static_peak"] == 1.0
    assert "| heteroscale |" in proc.stdout
