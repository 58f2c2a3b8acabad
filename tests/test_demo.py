"""``heteroscale demo``: sizing, load shape, flags, and whole runs as a person would do them.

The pure parts (sizing from the perf model, the diurnal profile, arrival draws) are
checked with worked numbers; the end-to-end tests run the real command as a
subprocess — real emulator and sidecar processes, the real coordinator parts — and
check that it scaled out and back in with the P/D ratio kept, that the report says
so, and that no child process survives, including after Ctrl-C.
"""

from __future__ import annotations

import json
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
from heteroscale.demo.loadgen import (PACKAGE_SAMPLE, LoadGenerator, RequestSize, arrival_times,
                                  default_trace_path, profile_at, read_sizes)
from heteroscale.demo.router import RequestResult
from heteroscale.demo.sizing import decode_capacity, size_service

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- sizing

def test_decode_capacity_is_the_largest_batch_within_the_tbt_budget():
    spec = perfmodel.InstanceSpec(perfmodel.model("32b"), perfmodel.gpu("H20"), 1)
    batch, step = decode_capacity(spec, mean_prompt=1155, mean_output=211, tbt_slo_s=0.05)
    context = 1155 + 211 / 2
    assert step == spec.decode_step_time_s(batch, batch * context) <= 0.8 * 0.05
    assert spec.decode_step_time_s(batch + 1, (batch + 1) * context) > 0.8 * 0.05


def test_size_service_worked_example():
    z = size_service(model="32b", prefill_gpu="L20", decode_gpu="H20", prefill_tp=2,
                     mean_prompt=1155, mean_output=211, tbt_slo_s=0.05, max_instances=16)
    assert z.target_decode_tps == pytest.approx(0.7 * z.decode_capacity_tps)
    # one decode instance at τ takes τ/211 req/s; prefill serves 0.7 × its capacity each
    per_decode = (z.target_decode_tps / 211) / (0.7 * z.prefill_capacity_rps)
    p, d = z.pd_ratio
    assert abs(p / d - per_decode) <= 0.5
    assert (p, d) == (5, 2)
    # 16 instances: D = floor(16·2/7) = 4, P = round(4·5/2) = 10 → 14 instances
    assert (z.max_prefill, z.max_decode) == (10, 4)
    small = size_service(model="32b", prefill_gpu="L20", decode_gpu="H20", prefill_tp=2,
                         mean_prompt=1155, mean_output=211, tbt_slo_s=0.05, max_instances=4)
    assert (small.max_prefill, small.max_decode) == (3, 1)      # round(2.5) = 3, ties up
    # the profile's peak asks for max_decode: ceil(peak tps / τ) == max_decode
    assert -(-(z.peak_rps * 211) // z.target_decode_tps) == z.max_decode


def test_build_world_scales_targets_and_slos_to_wall_time(tmp_path):
    settings = DemoSettings(speedup=2.0, max_instances=8)
    world = build_world(settings, mean_prompt=1000, mean_output=200, p90_prompt=2500,
                        lease_path=tmp_path / "lease")
    svc = world.service
    assert svc.target_decode_tps_per_instance == pytest.approx(2 * world.sizing.target_decode_tps, rel=1e-3)
    assert svc.slo.tbt_s == pytest.approx(0.05 / 2)
    assert world.peak_rps_wall == pytest.approx(2 * world.sizing.peak_rps)
    assert svc.affinity == "s2" and svc.prefill.gpus_per_instance == 2
    assert world.config.coordinator.lease.path == str(tmp_path / "lease")


# ---------------------------------------------------------------- load

def test_profile_rises_from_the_trough_to_the_peak_and_falls_again():
    start, peak, end = profile_at(0.0), max(profile_at(i / 100) for i in range(101)), profile_at(1.0)
    assert start < 0.15 and end < 0.2 and peak == pytest.approx(1.0)
    peak_at = max(range(101), key=lambda i: profile_at(i / 100)) / 100
    assert 0.2 < peak_at < 0.6


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
    assert sent[:2] == [(10, 2), (20, 3)]                    # sizes replayed in trace order
    assert stats.shed == 0


def test_slo_attainment_counts_failures_as_misses():
    ok = RequestResult(True, 1, 1, 0.0, ttft_s=0.5, tbt_s=0.02)
    slow = RequestResult(True, 1, 1, 0.0, ttft_s=3.0, tbt_s=0.02)
    failed = RequestResult(False, 1, 0, 0.0, error="x")
    assert _attainment([ok, slow, failed, ok], 1.0, 0.05) == 0.5


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
    (["--trace", __file__], "unknown format"),
    (["--topology", str(REPO / "pyproject.toml")], "not valid YAML"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, needle):
    proc = subprocess.run([sys.executable, "-m", "heteroscale", "demo", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_short_demo_scales_out_and_in_keeping_the_ratio(tmp_path):
    report_path = tmp_path / "report.json"
    (port,) = free_ports(1)
    proc = _demo("--duration", "45", "--max-instances", "7", "--startup-delay", "2", "--listen",
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
    time.sleep(0.5)
    assert report["child_pids"] and not [pid for pid in report["child_pids"] if _alive(pid)]


def _serving_demo() -> subprocess.Popen:
    """A demo started in the background and read up to its 'serving:' line (instances up)."""
    (port,) = free_ports(1)
    proc = _demo("--duration", "120", "--max-instances", "7", "--startup-delay", "1",
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
        assert len(children) >= 8                             # 3P+1D: an emulator and a sidecar each
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
