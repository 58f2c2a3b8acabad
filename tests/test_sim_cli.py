"""``heteroscale simulate`` / ``heteroscale curate`` end to end, on small traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heteroscale.cli import main

CONFIG = """
coordinator: {interval_s: 10}
services:
  - name: chat
    pd_ratio: "2:1"
    target_decode_tps_per_instance: 800
    slo: {ttft_s: 1.0, tbt_s: 0.04}
    policy: {scale_in_stabilization_s: 60, smoothing_window_s: 20}
    prefill: {gpus_per_instance: 1}
    decode: {gpus_per_instance: 1}
simulation:
  model: 8b
  prefill: {gpu: L40S, tp: 1}
  decode: {gpu: H20, tp: 1}
  startup_s: 30
  diurnal: {peak_rps: 3}
  pressure: {instances: 4, duration_s: 60, iterations: 3}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "sim.yaml"
    path.write_text(CONFIG)
    return path


def test_simulate_on_a_mooncake_trace(config: Path, data_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    rc = main(["simulate", "--config", str(config), "--trace", str(data_dir / "mooncake_sample.jsonl"),
               "--policies", "heteroscale,static-peak,hpa-gpu-util", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "summary.json").read_text())
    assert set(doc["policies"]) == {"heteroscale", "static-peak", "hpa-gpu-util"}
    for summary in doc["policies"].values():
        assert summary["requests"] == 240
        assert summary["gpu_hours"] > 0
        assert set(summary["mean_gpu_utilization"]) == {"prefill", "decode"}
        assert 0 <= summary["slo_attainment"] <= 1
        for key in ("ttft_p90_s", "tbt_p90_s", "scaling_actions"):
            assert key in summary
    assert doc["policies"]["heteroscale"]["decision_reasons"]
    assert doc["meta"]["workload"]["cached_share"] > 0          # hash_ids prefix reuse
    assert len(doc["signal_study"]) == 8
    for name in ("report.md", "load_vs_gpus.png", "utilization.png", "latency.png", "signals.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "load_vs_gpus.png").read_bytes()[:4] == b"\x89PNG"
    assert "| heteroscale |" in (out / "report.md").read_text()
    err = capsys.readouterr().err
    assert "100%" in err                                        # the progress bar


def test_simulate_diurnal_from_burstgpt(config: Path, data_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    rc = main(["simulate", "--config", str(config), "--trace", str(data_dir / "burstgpt_sample.csv"),
               "--diurnal", "--duration-h", "0.25", "--policies", "heteroscale", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["meta"]["diurnal"] is True
    assert doc["policies"]["heteroscale"]["duration_s"] == 900.0


def test_curate_recommends_ratio_target_and_policy(config: Path, data_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "cur"
    rc = main(["curate", "--config", str(config), "--trace", str(data_dir / "mooncake_sample.jsonl"),
               "--service", "chat", "--policies", "heteroscale,static-peak", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "summary.json").read_text())
    points = doc["pressure_test"]["points"]
    assert [p["ratio"] for p in points] == ["1P3D", "2P2D", "3P1D"]
    best = max(points, key=lambda p: (p["decode_tps"], p["prefill_tps"]))
    assert doc["pressure_test"]["best"] == best["ratio"]
    rec = doc["recommended"]
    assert rec["policy"] in {"heteroscale", "static-peak"}
    assert rec["pd_ratio"] == f"{best['prefill']}:{best['decode']}"
    assert rec["target_decode_tps_per_instance"] == pytest.approx(
        0.9 * best["decode_tps"] / best["decode"], rel=1e-3)
    assert (out / "ratio_sweep.png").stat().st_size > 0
    assert "recommended: policy" in capsys.readouterr().out
    # The independent-tps baseline is configured from the same pressure test.
    tau_p = 0.9 * best["prefill_uncached_tps"] / best["prefill"]
    assert doc["pressure_test"]["prefill_target_tps_per_instance"] == pytest.approx(tau_p, rel=1e-3)
    assert rec["baselines"]["independent-tps"]["prefill_target_tps_per_instance"] == pytest.approx(tau_p, rel=1e-3)
    assert "prefill_target_tps_per_instance" in (out / "report.md").read_text()


def test_independent_tps_needs_its_configured_target(config: Path, data_dir: Path, tmp_path: Path, capsys):
    argv = ["simulate", "--trace", str(data_dir / "mooncake_sample.jsonl"), "--policies",
            "independent-tps,static-peak", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv + ["--config", str(config)]) == 2
    assert "prefill_target_tps_per_instance" in capsys.readouterr().err
    cfg = tmp_path / "with.yaml"
    cfg.write_text(CONFIG + "  baselines: {independent-tps: {prefill_target_tps_per_instance: 6000},\n"
                            "              static-peak: {prefill: 2, decode: 1}}\n")
    assert main(argv + ["--config", str(cfg)]) == 0
    doc = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert doc["policies"]["independent-tps"]["requests"] == 240
    assert "oracle_sized" not in doc["policies"]["static-peak"]
    assert doc["policies"]["static-peak"]["mean_instances"]["decode"] == pytest.approx(1.0)


def test_simulate_diurnal_order_and_drift(config: Path, data_dir: Path, tmp_path: Path):
    cfg = tmp_path / "drift.yaml"
    cfg.write_text(CONFIG + "  drift: [{hour: 0, prompt_scale: 1, output_scale: 1, cache_share: 0.0},\n"
                            "          {hour: 12, prompt_scale: 3, output_scale: 0.5, cache_share: 0.5}]\n")
    out = tmp_path / "out"
    rc = main(["simulate", "--config", str(cfg), "--trace", str(data_dir / "burstgpt_sample.csv"),
               "--diurnal", "--diurnal-order", "shuffle", "--duration-h", "0.1", "--policies", "heteroscale",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["diurnal_order"] == "shuffle" and meta["drift"][1]["prompt_scale"] == 3.0
    assert 0.0 < meta["workload"]["cached_share"] < 0.02          # hour 0..0.1: share ramps from 0


@pytest.mark.parametrize("args, message", [
    (["--policies", "nope"], "unknown policy nope"),
    (["--trace", "/nonexistent.csv"], "no such file"),
    (["--trace", "/tmp"], "is a directory: give a trace file"),
    (["--service", "other"], "no service 'other'"),
    (["--diurnal-order", "shuffle"], "--diurnal-order needs --diurnal"),
])
def test_user_mistakes_are_one_line_exit_2(config: Path, data_dir: Path, tmp_path: Path, capsys, args, message):
    base = {"--config": str(config), "--trace": str(data_dir / "mooncake_sample.jsonl"),
            "--out": str(tmp_path / "o"), "--policies": "heteroscale"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["simulate", "--no-progress"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_config_lists_every_problem(tmp_path: Path, data_dir: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("gpu: L40S", "gpu: B300").replace("tp: 1}\n  startup", "tp: 3}\n  startup")
                   .replace('pd_ratio: "2:1"', 'pd_ratio: "x"'))
    rc = main(["simulate", "--config", str(bad), "--trace", str(data_dir / "mooncake_sample.jsonl"),
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # Every problem, one line each: the ratio, the unknown GPU, the odd TP.
    assert len(lines) == 3 and all(line.startswith("heteroscale simulate: error: ") for line in lines), lines
    assert "pd_ratio" in lines[0] and any("B300" in line for line in lines) and any("tp" in line for line in lines)


def test_curate_says_when_no_split_can_meet_the_slo(config: Path, data_dir: Path, tmp_path: Path, capsys):
    tight = tmp_path / "tight.yaml"
    tight.write_text(CONFIG.replace("ttft_s: 1.0", "ttft_s: 0.01"))
    out = tmp_path / "cur"
    rc = main(["curate", "--config", str(tight), "--trace", str(data_dir / "mooncake_sample.jsonl"),
               "--out", str(out), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "meets the SLO at any load" in err and len(err.splitlines()) == 1
    doc = json.loads((out / "summary.json").read_text())
    assert doc["pressure_test"]["feasible"] is False and doc["recommended"] is None


def test_simulate_with_a_topology_uses_placement(tmp_path: Path, data_dir: Path):
    cfg = tmp_path / "topo.yaml"
    cfg.write_text(CONFIG.replace("    decode: {gpus_per_instance: 1}\n",
                                  "    decode: {gpus_per_instance: 1}\n    affinity: s1\n")
                   + "  topology: {s2: 1, s1_per_s2: 2, nodes_per_s1: 4, gpus_per_node: 8, mix: s1}\n")
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(cfg), "--trace", str(data_dir / "mooncake_sample.jsonl"),
                 "--policies", "heteroscale", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["policies"]["heteroscale"]["placement"]["plans"] >= 1
    assert doc["meta"]["hardware"]["topology"]["mix"] == "s1"
