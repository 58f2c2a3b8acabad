"""``heteroscale demo``: sizing, load shape, flags, and whole runs as a person would do them.

The pure parts (sizing from the perf model, the diurnal profile, arrival draws) are
checked with worked numbers; the end-to-end tests run the real command as a
subprocess — real emulator and sidecar processes, the real coordinator parts — and
check that it scaled out and back in with the P/D ratio kept, that the report says
so, and that no child process survives, including after Ctrl-C.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heteroscale.simulator import perfmodel
from heteroscale.net import free_ports
from heteroscale.demo.app import DemoSettings, _attainment, build_world
from heteroscale.demo.loadgen import (PACKAGE_SAMPLE, DayClock, LoadGenerator, RequestSize, arrival_times,
                                     default_trace_path, profile_at, read_sizes)
from heteroscale.demo.router import RequestResult
from heteroscale.demo.sizing import (decode_capacity, fleet_bounds, prefill_capacity_rps, prefill_rate_within,
                                     prefill_ttft_p90_s, ratio_for, size_service)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- sizing

L20X2 = perfmodel.InstanceSpec(perfmodel.model("32b"), perfmodel.gpu("L20"), 2)


def _trace_sizes():
    sizes = read_sizes(PACKAGE_SAMPLE)
    return [s.prompt_tokens for s in sizes], [s.output_tokens for s in sizes]


def test_decode_capacity_is_the_largest_batch_within_the_tbt_budget():
    spec = perfmodel.InstanceSpec(perfmodel.model("32b"), perfmodel.gpu("H20"), 1)
    batch, step = decode_capacity(spec, mean_prompt=1155, mean_output=211, tbt_slo_s=0.05)
    context = 1155 + 211 / 2
    assert step == spec.decode_step_time_s(batch, batch * context) <= 0.8 * 0.05
    assert spec.decode_step_time_s(batch + 1, (batch + 1) * context) > 0.8 * 0.05


def test_prefill_capacity_packs_passes_in_the_budget():
    # 1,000-token prompts, 2,048-token passes: two per pass, so 4 prompts take two passes
    one_pass = perfmodel.prefill_batch_time_s(L20X2.model, L20X2.gpu, 2, new_tokens=2000,
                                              attention_pairs=2 * perfmodel.attention_pairs(1000))
    assert prefill_capacity_rps(L20X2, [1000] * 4, batch_tokens=2048) == pytest.approx(4 / (2 * one_pass))


def test_prefill_pressure_test_is_monotone_and_bounded_by_the_budget():
    prompts, _ = _trace_sizes()
    capacity = prefill_capacity_rps(L20X2, prompts, batch_tokens=2048)
    p90s = [prefill_ttft_p90_s(L20X2, prompts, rate_rps=f * capacity, batch_tokens=2048) for f in (0.2, 0.5, 0.8)]
    assert p90s == sorted(p90s)                              # queueing: more load, longer waits
    assert p90s[-1] > 2 * p90s[0]                            # and it bends up near saturation
    rate, p90 = prefill_rate_within(L20X2, prompts, ttft_budget_s=3.0, batch_tokens=2048,
                                    max_rate_rps=0.7 * capacity)
    assert p90 <= 3.0 < prefill_ttft_p90_s(L20X2, prompts, rate_rps=rate * 1.1, batch_tokens=2048)
    # a generous budget is bounded by the throughput cap instead
    assert prefill_rate_within(L20X2, prompts, ttft_budget_s=100.0, batch_tokens=2048,
                               max_rate_rps=0.7 * capacity)[0] == pytest.approx(0.7 * capacity)


def test_ratio_rounds_up_to_a_half_and_the_fleet_fits():
    assert ratio_for(2.25) == (5, 2)         # 2.25 / 1.05 = 2.14 -> 2.5
    assert ratio_for(3.04) == (3, 1)         # within 5% of 3: 3, not 3.5
    assert ratio_for(3.2) == (7, 2)
    assert ratio_for(0.3) == (1, 2)          # at least one prefill per two decode
    # 16 instances at 3:1: D = 4, P = 12; at 5:2: D = floor(16·2/7) = 4, P = round(10) = 10
    assert fleet_bounds((3, 1), max_instances=16) == (12, 4)
    assert fleet_bounds((5, 2), max_instances=16) == (10, 4)
    assert fleet_bounds((5, 2), max_instances=4) == (3, 1)   # round(2.5) = 3, ties up
    # a cluster that holds only 9 prefill instances caps the fleet at D = 3 (P = 9)
    assert fleet_bounds((3, 1), max_instances=16, fits=lambda p, d: p <= 9) == (9, 3)
    # not even 4P+1D fits in 4 instances: an error, never a fleet larger than asked for
    with pytest.raises(ValueError, match="smallest fleet at 4:1 is 4P\\+1D"):
        fleet_bounds((4, 1), max_instances=4)


def test_size_service_worked_example():
    prompts, outputs = _trace_sizes()
    z = size_service(model="32b", prefill_gpu="L20", decode_gpu="H20", prefill_tp=2, prompts=prompts,
                     outputs=outputs, tbt_slo_s=0.05, ttft_slo_s=4.5, max_instances=16)
    assert z.mean_output == pytest.approx(sum(outputs) / len(outputs))
    assert z.target_decode_tps == pytest.approx(0.7 * z.decode_capacity_tps)
    assert z.prefill_batch_tokens == 2048                                   # vLLM's default on L20
    # the prefill limit keeps p90 time to prefill within 80% of the TTFT SLO
    assert z.prefill_ttft_p90_s <= 0.8 * 4.5
    # balanced: at decode's limit each prefill instance is at its own (ratio rounded up, -5%)
    per_decode = (z.decode_capacity_tps / z.mean_output) / z.prefill_rate_rps
    p, d = z.pd_ratio
    assert per_decode / 1.05 <= p / d < per_decode / 1.05 + 0.5
    assert z.prefill_rate_rps <= z.prefill_capacity_rps
    assert z.max_prefill + z.max_decode <= 16
    # the profile's peak asks for max_decode: ceil(peak tps / τ) == max_decode, with 15% head-room
    assert -(-(z.peak_rps * z.mean_output) // z.target_decode_tps) == z.max_decode
    assert z.peak_decode_tps == pytest.approx(0.85 * z.max_decode * z.target_decode_tps)
    # at the peak both pools keep about the same head-room below their limits (0.85 × 0.7 ≈ 0.6)
    assert 0.5 < z.peak_decode_load < 0.65 and 0.5 < z.peak_prefill_load < 0.7


def test_build_world_keeps_latency_modelled_and_rates_per_wall_second(tmp_path):
    settings = DemoSettings(speedup=10.0, max_instances=8)
    sizes = read_sizes(PACKAGE_SAMPLE)
    world = build_world(settings, sizes=sizes, lease_path=tmp_path / "lease")
    svc = world.service
    # tokens/s are counted per wall second: τ × 10; SLOs stay in modelled seconds
    assert svc.target_decode_tps_per_instance == pytest.approx(10 * world.sizing.target_decode_tps, rel=1e-3)
    assert svc.slo.tbt_s == pytest.approx(0.05)
    assert world.peak_rps_wall == pytest.approx(10 * world.sizing.peak_rps)
    assert svc.affinity == "s2" and svc.prefill.gpus_per_instance == 2
    assert world.config.coordinator.lease.path == str(tmp_path / "lease")
    same = build_world(DemoSettings(speedup=1.0, max_instances=8), sizes=sizes, lease_path=tmp_path / "l2")
    assert same.service.slo == svc.slo                       # the speed-up never moves an SLO


def test_default_fleet_fits_the_default_topology():
    from heteroscale.coordinator.actuators.local import SimulatedCluster
    from heteroscale.demo.app import DEFAULT_TOPOLOGY, cluster_fits
    fits = cluster_fits(DemoSettings(), SimulatedCluster.from_file(DEFAULT_TOPOLOGY))
    # two S2 pods, each 16 L20 + 4 H20 GPUs: 12 prefill (24 L20) and 4 decode fit; 17 prefill do not
    assert fits(12, 4) and fits(16, 4)
    assert not fits(17, 4) and not fits(4, 9)


# ---------------------------------------------------------------- load

def test_profile_rises_from_the_trough_to_the_peak_and_falls_again():
    start, peak, end = profile_at(0.0), max(profile_at(i / 100) for i in range(101)), profile_at(1.0)
    assert start < 0.15 and end < 0.2 and peak == pytest.approx(1.0)
    peak_at = max(range(101), key=lambda i: profile_at(i / 100)) / 100
    assert 0.2 < peak_at < 0.6


def test_day_clock_slows_the_rise_above_the_floor_and_keeps_the_duration():
    even = DayClock(duration_s=180)
    day = DayClock(duration_s=180, floor=0.3, max_growth_per_s=0.015)
    assert day.hour_at(0) == 20 and day.hour_at(180) == pytest.approx(44)
    hours = [day.hour_at(t / 10) for t in range(1801)]
    assert hours == sorted(hours)                                  # the day only moves forward
    for t in range(179):                                            # above the floor, ≤ 1.5% a second
        low, high = max(day.rate_at(t), 0.3), max(day.rate_at(t + 1), 0.3)
        assert high / low <= math.exp(0.015) * 1.001
    # evenly compressed the rise grows several times faster than that
    assert max(max(even.rate_at(t + 1), 0.3) / max(even.rate_at(t), 0.3) for t in range(179)) > 1.04
    # worked example: from the floor to the first peak takes at least ln(1 / 0.3) / 0.015 = 80.3 s
    # (a little more: near the peak the rise is slower than the cap, and runs at the even pace)
    ticks = [t / 10 for t in range(1801)]
    first_peak = next(t for t in ticks if day.hour_at(t) >= 27)            # hour 3, rate 1
    crossed = max(t for t in ticks if t < first_peak and day.rate_at(t) <= 0.3)
    assert math.log(1 / 0.3) / 0.015 - 0.2 <= first_peak - crossed <= math.log(1 / 0.3) / 0.015 + 3
    # a run too short for the cap still holds the whole day, evenly compressed
    short = DayClock(duration_s=20, floor=0.1, max_growth_per_s=0.015)
    assert short.hour_at(20) == pytest.approx(44) and short.hour_at(10) == pytest.approx(32)


def test_arrivals_follow_a_day_clock():
    day = DayClock(duration_s=600, floor=0.3, max_growth_per_s=0.005)
    a = arrival_times(duration_s=600, peak_rps=5.0, rng=random.Random(7), day=day)
    expected = sum(5.0 * day.rate_at(i + 0.5) for i in range(600))
    assert abs(len(a) - expected) < 4 * expected ** 0.5


def test_arrivals_are_reproducible_and_follow_the_rate():
    a = arrival_times(duration_s=600, peak_rps=5.0, rng=random.Random(7))
    b = arrival_times(duration_s=600, peak_rps=5.0, rng=random.Random(7))
    assert a == b and a == sorted(a) and 0 <= a[0] and a[-1] < 600
    expected = sum(5.0 * profile_at((i + 0.5) / 600) for i in range(600))   # ∫ rate dt
    assert abs(len(a) - expected) < 4 * expected ** 0.5


def test_default_trace_falls_back_to_the_packaged_sample(tmp_path):
    assert default_trace_path(tmp_path / "checkout") == PACKAGE_SAMPLE
    sizes = read_sizes(PACKAGE_SAMPLE)
    assert len(sizes) == 3000 and all(1 <= s.prompt_tokens <= 8000 for s in sizes)


async def test_load_generator_sends_every_arrival_and_sheds_beyond_the_cap():
    sent = []

    async def send(prompt: int, output: int) -> RequestResult:
        sent.append((prompt, output))
        return RequestResult(True, prompt, output, 0.0, ttft_s=0.1, tbt_s=0.01, e2e_s=0.2)

    gen = LoadGenerator(sizes=[RequestSize(10, 2), RequestSize(20, 3)], send=send, duration_s=0.5,
                        peak_rps=200.0, seed=3)
    stats = await gen.run()
    assert len(stats.results) == len(gen.arrivals) == len(sent) > 10
    assert set(sent) == {(10, 2), (20, 3)}                   # sizes drawn from the trace's
    assert sent == [(x.prompt_tokens, x.output_tokens) for x in gen.picks]
    assert stats.shed == 0 and gen.sending_done and gen.in_flight == 0


def test_sizes_are_drawn_from_the_whole_trace_reproducibly():
    sizes = read_sizes(PACKAGE_SAMPLE)
    a = LoadGenerator(sizes=sizes, send=None, duration_s=180, peak_rps=8.0, seed=1)
    b = LoadGenerator(sizes=sizes, send=None, duration_s=180, peak_rps=8.0, seed=1)
    assert a.picks == b.picks
    drawn = sum(x.output_tokens for x in a.picks) / len(a.picks)
    mean = sum(x.output_tokens for x in sizes) / len(sizes)
    # the draw follows the trace's mean, which is what sizing plans for
    assert abs(drawn - mean) < 0.08 * mean


def test_slo_attainment_counts_failures_as_misses():
    ok = RequestResult(True, 1, 1, 0.0, ttft_s=0.5, tbt_s=0.02)
    slow = RequestResult(True, 1, 1, 0.0, ttft_s=3.0, tbt_s=0.02)
    failed = RequestResult(False, 1, 0, 0.0, error="x")
    assert _attainment([ok, slow, failed, ok], 1.0, 0.05) == 0.5
    # all tokens in one chunk: no TBT to judge, TTFT alone decides
    one_chunk = RequestResult(True, 1, 3, 0.0, ttft_s=0.5, tbt_s=None)
    assert _attainment([one_chunk, slow], 1.0, 0.05) == 0.5


# ---------------------------------------------------------------- the command

def _demo(*flags: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "heteroscale", "demo", *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


@pytest.mark.parametrize("flags, needle", [
    (["--duration", "3"], "--duration"),
    (["--speedup", "0"], "--speedup"),
    (["--listen", "nowhere"], "--listen"),
    (["--trace", "/no/such/trace.csv"], "no such file"),
    (["--max-instances", "2"], "--max-instances"),
    (["--max-instances", "4"], "smallest fleet"),
    (["--trace", __file__], "unknown format"),
    (["--topology", str(REPO / "pyproject.toml")], "not valid YAML"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, needle):
    proc = subprocess.run([sys.executable, "-m", "heteroscale", "demo", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_outputs_are_checked_before_anything_starts(tmp_path):
    """--report DIR and --log-dir FILE used to fail only after the whole run (or not at all)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "heteroscale", "demo", "--report", str(tmp_path),
                           "--log-dir", str(a_file)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()                             # both problems, at once
    assert len(lines) == 2 and "Traceback" not in proc.stderr
    assert f"--report {tmp_path}: is a directory" in lines[0]
    assert f"--log-dir {a_file}: not a directory" in lines[1]
    assert "starting" not in proc.stdout and time.monotonic() - started < 50   # nothing ran


@pytest.mark.parametrize("make, flag, needle", [
    (lambda t: ["--report", str(t / "missing" / "r.json")], "--report", "no such directory"),
    (lambda t: ["--report", str(t / "r.json"), "--log-dir", str(t / "r.json" / "logs")], "--log-dir", "not a directory"),
    (lambda t: (t / "r-timeline.png").mkdir() or ["--report", str(t / "r.json")], "timeline plot",
     "is a directory"),
])
def test_bad_output_paths_are_one_line_and_exit_2(tmp_path, make, flag, needle):
    (tmp_path / "r.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "heteroscale", "demo", *make(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert flag in proc.stderr and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_an_unwritable_report_at_the_end_is_rescued_not_lost(tmp_path, capsys):
    from heteroscale.demo.app import Demo, write_outputs
    gone = tmp_path / "gone"
    gone.mkdir()
    target = gone / "report.json"
    gone.rmdir()                                # the directory vanished during the run
    report = {"requests": 1, "timeline": [], "slo": {}, "decisions": []}
    assert not write_outputs(Demo(DemoSettings(quiet=True)), report, target)
    err = capsys.readouterr().err
    assert "cannot write the report" in err and len(err.strip().splitlines()) == 1
    rescued = Path(err.strip().rsplit("it is in ", 1)[1])
    assert json.loads(rescued.read_text()) == report
    rescued.unlink()


@pytest.mark.slow
def test_short_demo_scales_out_and_in_keeping_the_ratio(tmp_path):
    report_path = tmp_path / "report.json"
    (port,) = free_ports(1)
    proc = _demo("--duration", "45", "--max-instances", "10", "--startup-delay", "2", "--listen",
                 f"127.0.0.1:{port}", "--report", str(report_path))
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"status page: http://127.0.0.1:{port}/demo" in out
    report = json.loads(report_path.read_text())
    assert report["requests"] > 50 and report["requests_ok"] > 0.9 * report["requests"]
    assert report["scale_out"] >= 1 and report["scale_in"] >= 1, out
    assert report["max_instances"] > 4                      # grew beyond the initial 3P+1D
    p, d = (int(x) for x in report["pd_ratio"].split(":"))
    moves = [x for x in report["decisions"] if x["direction"] != "hold"]
    for move in moves:                                       # the ratio is kept in every move
        expected_p = max(1, int(move["decode"] * p / d + 0.5))
        assert move["prefill"] == expected_p, move
    assert moves[-1]["direction"] == "in"
    for key in ("slo_attainment", "gpu_seconds", "mean_gpu_utilization", "decisions", "max_instances"):
        assert key in report
    assert report["gpu_seconds"] > 0
    assert 0 < report["mean_gpu_utilization"]["decode"] <= 1
    assert 0 <= report["mean_gpu_utilization"]["prefill"] < report["mean_gpu_utilization"]["decode"]
    # one terminal line per decision
    assert sum(1 for line in out.splitlines() if line.startswith("[") and "->" in line) == len(report["decisions"])
    # the end is explained while it drains, and the timeline plot lies beside the report
    assert "load over:" in out and "every request is done" in out
    plot = tmp_path / "report-timeline.png"
    assert f"timeline plot: {plot}" in out and plot.read_bytes().startswith(b"\x89PNG")
    time.sleep(0.5)
    assert report["child_pids"] and not [pid for pid in report["child_pids"] if _alive(pid)]


@pytest.mark.slow
def test_a_sped_up_demo_judges_latency_in_modelled_time(tmp_path):
    """At --speedup 10 a wall-clock SLO would be 5 ms, below the engines' 50 ms tick: every
    tick read over it and the latency net never let go. In modelled seconds it reads as at 1×."""
    report_path = tmp_path / "report.json"
    (port,) = free_ports(1)
    proc = _demo("--duration", "40", "--speedup", "10", "--max-instances", "10", "--startup-delay", "10",
                 "--listen", f"127.0.0.1:{port}", "--report", str(report_path))
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    report = json.loads(report_path.read_text())
    assert report["slo"]["tbt_s"] == 0.05 and report["slo"]["ttft_s"] >= 1.0     # not ÷ 10
    assert report["latency_unit"] == "modelled seconds"
    engine_tbt = sorted(x["engine_tbt_p90_s"] for x in report["timeline"] if x["engine_tbt_p90_s"] is not None)
    assert engine_tbt, out
    median = engine_tbt[len(engine_tbt) // 2]
    assert 0.01 < median < 0.05           # the engines' modelled steps (~30 ms), under the 50 ms SLO
    assert report["latency"]["tbt_p50_s"] > 0.01                       # clients: modelled too, not wall
    # the pools follow the load back down instead of only growing
    assert report["scale_out"] >= 1 and report["scale_in"] >= 1, out
    assert report["timeline"][-1]["decode"] < max(x["decode"] for x in report["timeline"])


def _serving_demo() -> subprocess.Popen:
    """A demo started in the background and read up to its 'serving:' line (instances up)."""
    (port,) = free_ports(1)
    proc = _demo("--duration", "120", "--max-instances", "10", "--startup-delay", "1",
                 "--listen", f"127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "serving:" in line or not line:
            break
    if "serving:" not in lines[-1]:
        proc.kill()
        proc.wait()
        pytest.fail("the demo did not start serving:\n" + "".join(lines))
    return proc


@pytest.mark.slow
def test_ctrl_c_stops_everything_and_leaves_no_process():
    proc = _serving_demo()
    children: set[int] = set()
    try:
        time.sleep(2.0)
        children = _descendants(proc.pid)
        assert len(children) >= 8                             # 4P+1D: an emulator and a sidecar each
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)]


@pytest.mark.slow
def test_children_die_with_a_killed_demo():
    """Even SIGKILL, which no handler sees, leaves no child behind (PR_SET_PDEATHSIG)."""
    proc = _serving_demo()
    children: set[int] = set()
    try:
        children = _descendants(proc.pid)
        assert len(children) >= 8
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while [pid for pid in children if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not [pid for pid in children if _alive(pid)]


def test_kv_transfer_summary_rows_and_sums_from_sidecar_reports():
    from heteroscale.coordinator.core.bandwidth import transfer_summary as kv_transfer_summary
    from heteroscale.report import SidecarReport

    def report(pod: str, role: str, kv: dict) -> SidecarReport:
        return SidecarReport.from_dict({"service": "chat", "role": role, "pod": pod, "engine": "vllm",
                                        "engine_up": True, "stale": False, "observed_at": 1.0, "window_s": 5.0,
                                        "kv_transfer": kv})

    engine = {"connector": "vllm_nixl", "bytes_per_second": 2e5, "transfers_per_second": 1.5,
              "latency_p90_s": 0.01, "window_s": 5.0}
    reports = [report("chat-d1", "decode", {"bytes_per_second": 3e5, "direction": "receive", "source": "engine",
                                            "sources": {"engine": dict(engine, bytes_per_second=3e5)}}),
               report("chat-p0", "prefill", {"bytes_per_second": 2e5, "direction": "send", "source": "engine",
                                             "sources": {"engine": engine}}),
               report("chat-p1", "prefill", {"bytes_per_second": 1e5, "direction": "send", "source": "engine",
                                             "sources": {"engine": dict(engine, bytes_per_second=1e5)}}),
               report("chat-p2", "prefill", {"bytes_per_second": None, "direction": "send", "sources": {}}),
               report("chat-p3", "prefill", {})]
    doc = kv_transfer_summary(reports)
    assert [r["pod"] for r in doc["instances"]] == ["chat-p0", "chat-p1", "chat-d1"]   # measured ones, prefill first
    assert doc["send_bytes_per_second"] == pytest.approx(3e5) and doc["receive_bytes_per_second"] == pytest.approx(3e5)
    assert doc["instances"][0] == {"pod": "chat-p0", "role": "prefill", "direction": "send", "source": "engine",
                                   "connector": "vllm_nixl", "bytes_per_second": 2e5, "transfers_per_second": 1.5,
                                   "latency_p90_s": 0.01, "window_s": 5.0}
    assert kv_transfer_summary(reports[3:]) is None            # nothing measured: absent, not zero


# ---------------------------------------------------------------- a degraded KV link

@pytest.mark.parametrize("value, needle", [
    ("pod-z:3", "no switch named pod-z"),
    ("pod-b:1", "FACTOR must be above 1"),
    ("pod-b:fast", "FACTOR must be a number"),
    ("a-l20,b-h20,pod-a", "SWITCH,SWITCH"),
])
def test_bad_degrade_link_is_one_line_and_exit_2(value, needle):
    proc = subprocess.run([sys.executable, "-m", "heteroscale", "demo", "--degrade-link", value], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert needle in proc.stderr and "--degrade-link" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def _get_json(url: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_a_degraded_link_is_flagged_from_engine_metrics_and_placement_then_avoids_it(tmp_path):
    """``--degrade-link pod-b``: the emulators' NIXL histograms (read by the real sidecars)
    make pod-b's Deployment Group measure a quarter of pod-a's; the status document's
    kv_bandwidth flags pod-b's pairs (source engine_connector) and the placement that
    follows releases pod-b first, or places elsewhere, and says why."""
    report_path = tmp_path / "report.json"
    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    proc = _demo("--duration", "80", "--max-instances", "15", "--startup-delay", "1", "--listen",
                 f"127.0.0.1:{port}", "--degrade-link", "pod-b", "--report", str(report_path))
    flagged_doc = flagged_at = None
    where: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
            try:
                before = _get_json(f"{base}/api/v1/demo")
                status = _get_json(f"{base}/api/v1/status")
            except OSError:
                continue
            where.update({i["name"]: i["s2"] for i in before["instances"]})
            bw = status["services"][0]["kv_bandwidth"]
            if flagged_doc is None and bw and bw["flagged"]:
                flagged_doc, flagged_at = bw, before["elapsed_s"]
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "degraded KV links: pod-b 4x slower" in out
    assert "pod-b" in where.values(), f"the load never grew the fleet into pod-b (past 8P2D):\n{out}"
    assert flagged_doc is not None, out
    # The map is built from the engines' connector metrics, and what it flags is pod-b's.
    assert {p["source"] for p in flagged_doc["pairs"]} == {"engine_connector"}
    flagged = [p for p in flagged_doc["pairs"] if p["flagged"]]
    assert flagged and all(where.get(p["prefill"]) == where.get(p["decode"]) == "pod-b" for p in flagged), flagged
    healthy = [p for p in flagged_doc["pairs"] if where.get(p["prefill"]) == "pod-a"]
    assert healthy and not any(p["flagged"] for p in healthy)
    slowest_healthy = min(p["bytes_per_second"] for p in healthy)
    assert all(p["bytes_per_second"] < 0.5 * slowest_healthy for p in flagged)      # 4x slower: ~25%
    # Every placement after the flag keeps away from pod-b, and at least one says so.
    report = json.loads(report_path.read_text())
    assert report["degraded_links"] == ["pod-b"]
    later = [p for p in report["placements"] if p["at"] >= flagged_at]
    assert later, report["placements"]
    for p in later:
        for a in p["allocations"]:
            assert a["s2"] != "pod-b" or "no healthy domain fits" in a["why"], p
    # The first scale-in after it releases pod-b first because of the measurement. (Without
    # it the smaller pod-b DG would go first too, by size: the why is what tells them apart;
    # tests/test_bandwidth_placement.py has the cases where the measurement changes the choice.)
    first_in = next(p for p in later if p["releases"])
    assert "pod-b" in first_in["releases"][0]["why"], first_in
    assert "measured KV bandwidth is low here" in first_in["releases"][0]["why"], first_in
    assert "placement: " in out and "measured KV bandwidth" in out
