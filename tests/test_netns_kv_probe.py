"""The probe across a real, shaped network: three hosts in network namespaces, veth links, tc tbf.

Topology (addresses exist only inside the namespaces this test creates)::

    prefill ns ──veth 200 Mbit/s──▶ decode-0 ns   (same S1 switch)
               ──veth  80 Mbit/s──▶ decode-1 ns   (another S1: cross-switch)

The rates are shaped with ``tc qdisc ... tbf`` on the prefill side (the
direction KV caches travel). Real probe servers run in the decode namespaces
and the real extension, built from the sidecar's own flags, probes from the
prefill namespace (``python -m heteroscale.kv_transfer serve|sample``). Its JSON sample
becomes the prefill pod's report; the coordinator's bandwidth map must show
each shaped rate within 10% and flag the cross-switch pair.

Needs root and iproute2 (CI runs as root); skips cleanly where a namespace
cannot be created. Every namespace (and so every veth in it) and every process
is removed in the fixture's finalizer, even when the test fails.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heteroscale.coordinator.core.bandwidth import CROSS_SWITCH, SAME_SWITCH, build_bandwidth_map
from heteroscale.report import SidecarReport

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[1]
FAST_MBIT = 200
SLOW_MBIT = 80
PROBE_BYTES = 12 * 1024 * 1024
PORT = 9401


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


class NetnsBed:
    def __init__(self, tag: str) -> None:
        self.ns = {role: f"hskv{tag}{role}" for role in ("p", "d0", "d1")}
        self.created: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def build(self) -> None:
        for name in self.ns.values():
            _ip("netns", "add", name)
            self.created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        for i, (decode, mbit) in enumerate((("d0", FAST_MBIT), ("d1", SLOW_MBIT))):
            left, right = f"{self.ns['p']}{i}"[-15:], f"{self.ns[decode]}x"[-15:]
            _ip("link", "add", left, "netns", self.ns["p"], "type", "veth", "peer", "name", right,
                "netns", self.ns[decode])
            _ip("-n", self.ns["p"], "addr", "add", f"10.231.{i}.1/30", "dev", left)
            _ip("-n", self.ns[decode], "addr", "add", f"10.231.{i}.2/30", "dev", right)
            _ip("-n", self.ns["p"], "link", "set", left, "up")
            _ip("-n", self.ns[decode], "link", "set", right, "up")
            shaped = subprocess.run(
                ["ip", "netns", "exec", self.ns["p"], "tc", "qdisc", "add", "dev", left, "root", "tbf",
                 "rate", f"{mbit}mbit", "burst", "256kb", "latency", "100ms"],
                capture_output=True, text=True, timeout=10)
            if shaped.returncode != 0:
                raise RuntimeError(f"tc tbf: {shaped.stderr.strip()}")

    def spawn(self, role: str, *args: str, module: str = "heteroscale.kv_transfer") -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[role], sys.executable, "-m", module, *args],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def get_json(self, role: str, url: str) -> dict:
        """GET a URL from inside a namespace (the sidecars listen on their own loopback)."""
        code = f"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=2).read().decode())"
        out = subprocess.run(["ip", "netns", "exec", self.ns[role], sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=10)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for name in self.created:
            _ip("netns", "del", name, check=False)


@pytest.fixture
def testbed():
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    bed = NetnsBed(str(os.getpid() % 100000))
    try:
        bed.build()
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        bed.teardown()
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"cannot build network namespaces here: {detail.strip()[:200]}")
    try:
        yield bed
    finally:
        bed.teardown()


def _wait_listening(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("listening"):
        proc.kill()
        raise AssertionError(f"probe server did not start: {line!r} {proc.stderr.read()[:500]}")


def test_shaped_links_are_measured_within_ten_percent_and_the_slow_pair_is_flagged(testbed, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("netns-testbed-shared-secret\n")
    for i, decode in enumerate(("d0", "d1")):
        server = testbed.spawn(decode, "serve", "--role", "decode", "--pod", f"decode-{i}", "--no-rdma",
                               "--probe-listen", f"10.231.{i}.2:{PORT}", "--probe-secret-file", str(secret))
        _wait_listening(server)
    client = testbed.spawn(
        "p", "sample", "--role", "prefill", "--pod", "prefill-0", "--no-rdma", "--probe-secret-file", str(secret),
        "--probe-peers", f"10.231.0.2:{PORT},10.231.1.2:{PORT}", "--probe-bytes", str(PROBE_BYTES),
        "--probe-interval-s", "1", "--probe-max-rate", "1e9", "--rounds", "2")
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    sample = json.loads(out)

    # The prefill pod's report, as the coordinator would parse it.
    def report(pod: str, role: str, node: str, kv: dict) -> SidecarReport:
        return SidecarReport.from_dict({
            "service": "chat", "role": role, "pod": pod, "engine": "vllm", "engine_up": True, "stale": False,
            "observed_at": time.time(), "window_s": 5.0, "node": node, "kv_transfer": kv})

    reports = [report("prefill-0", "prefill", "node-p", sample),
               report("decode-0", "decode", "node-d0", {}), report("decode-1", "decode", "node-d1", {})]
    switches = {"node-p": ("s2-a", "s1-a"), "node-d0": ("s2-a", "s1-a"), "node-d1": ("s2-a", "s1-b")}
    svc = build_bandwidth_map(reports, switches=switches, now_s=time.time()).service("chat")
    assert svc is not None
    pairs = {p.decode: p for p in svc.pairs}
    assert set(pairs) == {"decode-0", "decode-1"}, sample

    fast_bps, slow_bps = FAST_MBIT * 1e6 / 8, SLOW_MBIT * 1e6 / 8
    measured = {name: p.bytes_per_second for name, p in pairs.items()}
    print(f"\nshaped {FAST_MBIT} Mbit/s -> measured {measured['decode-0'] * 8 / 1e6:.1f} Mbit/s; "
          f"shaped {SLOW_MBIT} Mbit/s -> measured {measured['decode-1'] * 8 / 1e6:.1f} Mbit/s")
    assert abs(measured["decode-0"] - fast_bps) <= 0.10 * fast_bps, measured
    assert abs(measured["decode-1"] - slow_bps) <= 0.10 * slow_bps, measured
    assert pairs["decode-0"].locality == SAME_SWITCH and pairs["decode-1"].locality == CROSS_SWITCH
    assert [p.decode for p in svc.flagged] == ["decode-1"]
    assert abs(svc.same_switch_median_bytes_per_second - fast_bps) <= 0.10 * fast_bps
    assert abs(svc.cross_switch_median_bytes_per_second - slow_bps) <= 0.10 * slow_bps
    assert all(p.rtt_s is not None and p.rtt_s < 0.05 for p in svc.pairs)


def test_real_sidecars_probe_each_other_and_the_map_reads_their_reports(testbed, tmp_path):
    """The same testbed with the real ``heteroscale sidecar`` processes, reports fetched over HTTP."""
    secret = tmp_path / "secret"
    secret.write_text("netns-testbed-shared-secret\n")
    common = ["sidecar", "--engine", "vllm", "--engine-url", "http://127.0.0.1:1", "--service", "chat",
              "--gpu-source", "none", "--no-rdma", "--listen", "127.0.0.1:9400",
              "--probe-secret-file", str(secret)]
    for i, decode in enumerate(("d0", "d1")):
        testbed.spawn(decode, *common, "--role", "decode", "--pod", f"decode-{i}", "--node", f"node-d{i}",
                      "--probe-listen", f"10.231.{i}.2:{PORT}", module="heteroscale")
    time.sleep(1.0)      # let the probe servers bind before the first probe (a refusal would only delay it)
    testbed.spawn("p", *common, "--role", "prefill", "--pod", "prefill-0", "--node", "node-p",
                  "--probe-peers", f"10.231.0.2:{PORT},10.231.1.2:{PORT}", "--probe-bytes", str(PROBE_BYTES),
                  "--probe-interval-s", "2", "--probe-max-rate", "1e9", module="heteroscale")
    deadline = time.monotonic() + 40
    doc: dict = {}
    while time.monotonic() < deadline:
        doc = testbed.get_json("p", "http://127.0.0.1:9400/v1/report")
        peers = doc.get("kv_transfer", {}).get("probe", {}).get("peers", [])
        # Two probes per peer: the map judges a pair by the best of its recent probes.
        if len(peers) == 2 and all(p.get("recent_probes", 0) >= 2 for p in peers):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no probe results in the prefill report: {doc}")
    decode_docs = [testbed.get_json(d, "http://127.0.0.1:9400/v1/report") for d in ("d0", "d1")]
    reports = [SidecarReport.from_dict(d) for d in [doc, *decode_docs]]
    switches = {"node-p": ("s2-a", "s1-a"), "node-d0": ("s2-a", "s1-a"), "node-d1": ("s2-a", "s1-b")}
    svc = build_bandwidth_map(reports, switches=switches, now_s=time.time()).service("chat")
    pairs = {p.decode: p for p in svc.pairs}
    fast_bps, slow_bps = FAST_MBIT * 1e6 / 8, SLOW_MBIT * 1e6 / 8
    print(f"\nsidecars: {pairs['decode-0'].bytes_per_second * 8 / 1e6:.1f} / "
          f"{pairs['decode-1'].bytes_per_second * 8 / 1e6:.1f} Mbit/s")
    assert abs(pairs["decode-0"].bytes_per_second - fast_bps) <= 0.10 * fast_bps
    assert abs(pairs["decode-1"].bytes_per_second - slow_bps) <= 0.10 * slow_bps
    assert [p.decode for p in svc.flagged] == ["decode-1"]
    assert pairs["decode-1"].locality == CROSS_SWITCH
    # The decode sidecars' probe servers saw the bytes, and refused nobody.
    for d in decode_docs:
        server = d["kv_transfer"]["probe"]["server"]
        assert server["probes"] >= 1 and server["refusals"] == {}
