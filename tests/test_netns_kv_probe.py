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

import asyncio
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


def _built(kind):
    """A testbed of ``kind`` built for one test and torn down after it; the test skips
    where network namespaces cannot be made."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    bed = kind(str(os.getpid() % 100000))
    try:
        bed.build()
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        bed.teardown()          # deleting a namespace deletes its veths, the root-side ends too
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"cannot build network namespaces here: {detail.strip()[:200]}")
    try:
        yield bed
    finally:
        bed.teardown()


@pytest.fixture
def testbed():
    yield from _built(NetnsBed)


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


# ---------------------------------------------------------------- detected, reported, avoided

# Two S2 domains, one Deployment Group in each (1 prefill + 1 decode): the simulated
# cluster the local actuator places on. The sidecars' --node names are its node names.
TWO_PODS = """
switches:
  - {s2: pod-a, s1: a-p, gpu_type: NVIDIA-H20, nodes: 1, gpus_per_node: 8}
  - {s2: pod-a, s1: a-d, gpu_type: NVIDIA-H20, nodes: 1, gpus_per_node: 8}
  - {s2: pod-b, s1: b-p, gpu_type: NVIDIA-H20, nodes: 1, gpus_per_node: 8}
  - {s2: pod-b, s1: b-d, gpu_type: NVIDIA-H20, nodes: 1, gpus_per_node: 8}
"""
SLOW_SWITCH_MBIT = 50            # pod-a's P->D link, shaped with tc
HEALTHY_SWITCH_MBIT = 200        # pod-b's
PODS = {  # pod: (namespace key, role, DG, s2, s1, node)
    "prefill-a": ("pa", "prefill", "chat-g0", "pod-a", "a-p", "a-p-h20-0"),
    "decode-a": ("da", "decode", "chat-g0", "pod-a", "a-d", "a-d-h20-0"),
    "prefill-b": ("pb", "prefill", "chat-g1", "pod-b", "b-p", "b-p-h20-0"),
    "decode-b": ("db", "decode", "chat-g1", "pod-b", "b-d", "b-d-h20-0"),
}


class TwoPodBed(NetnsBed):
    """Four hosts: each DG's prefill reaches its decode over a veth shaped with tc tbf (pod-a's
    slow, pod-b's healthy); every host has a management veth to this (root) namespace, where
    the coordinator runs and pulls the sidecars' reports."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.ns = {key: f"hskv{tag}{key}" for key in ("pa", "da", "pb", "db")}
        net = 100 + int(tag) % 100
        self.data = {"da": f"10.{net}.0.2", "db": f"10.{net}.1.2"}
        self.mgmt = {key: f"10.{net}.{10 + i}.2" for i, key in enumerate(self.ns)}
        self._net = net

    def build(self) -> None:
        for name in self.ns.values():
            _ip("netns", "add", name)
            self.created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        for i, (p, d, mbit) in enumerate((("pa", "da", SLOW_SWITCH_MBIT), ("pb", "db", HEALTHY_SWITCH_MBIT))):
            left, right = f"{self.ns[p]}k"[-15:], f"{self.ns[d]}k"[-15:]
            _ip("link", "add", left, "netns", self.ns[p], "type", "veth", "peer", "name", right, "netns", self.ns[d])
            _ip("-n", self.ns[p], "addr", "add", f"10.{self._net}.{i}.1/30", "dev", left)
            _ip("-n", self.ns[d], "addr", "add", f"10.{self._net}.{i}.2/30", "dev", right)
            _ip("-n", self.ns[p], "link", "set", left, "up")
            _ip("-n", self.ns[d], "link", "set", right, "up")
            shaped = subprocess.run(["ip", "netns", "exec", self.ns[p], "tc", "qdisc", "add", "dev", left, "root",
                                     "tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", "100ms"],
                                    capture_output=True, text=True, timeout=10)
            if shaped.returncode != 0:
                raise RuntimeError(f"tc tbf: {shaped.stderr.strip()}")
        for i, key in enumerate(self.ns):
            host, inner = f"hskvm{self._net}{i}{key}"[-15:], f"{self.ns[key]}m"[-15:]
            _ip("link", "add", host, "type", "veth", "peer", "name", inner, "netns", self.ns[key])
            _ip("addr", "add", f"10.{self._net}.{10 + i}.1/30", "dev", host)
            _ip("-n", self.ns[key], "addr", "add", f"{self.mgmt[key]}/30", "dev", inner)
            _ip("link", "set", host, "up")
            _ip("-n", self.ns[key], "link", "set", inner, "up")


@pytest.fixture
def two_pods():
    yield from _built(TwoPodBed)


def _config(two_pods: TwoPodBed, *, schedule: dict | None = None):
    from heteroscale.coordinator.config import load_config
    urls = {role: [f"http://{two_pods.mgmt[key]}:9400/v1/report" for key, r, *_ in PODS.values() if r == role]
            for role in ("prefill", "decode")}
    service = {"name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 100, "affinity": "s2",
               "min_decode": 1, "max_decode": 8, "slo": {"tbt_s": 0.05},
               "prefill": {"gpu_types": ["NVIDIA-H20"], "sidecars": urls["prefill"]},
               "decode": {"gpu_types": ["NVIDIA-H20"], "sidecars": urls["decode"]}}
    if schedule:
        service["schedules"] = [schedule]
    return load_config({"coordinator": {"backend": "local", "interval_s": 5, "collect": {"timeout_s": 3}},
                        "services": [service]}, origin="netns test")


async def test_a_shaped_switch_is_detected_reported_and_avoided_by_the_next_scale_out(two_pods, tmp_path):
    """Real sidecars probe their DG's decode across tc-shaped links (pod-a's at 50 Mbit/s,
    pod-b's at 200); a real coordinator (collector, reconciler, local actuator on the
    two-pod topology) pulls their reports over the network, flags pod-a's pair in its
    status document and /metrics, and its next scale-out grows pod-b's DG instead of
    pod-a's (which a placement blind to bandwidth picks), saying why."""
    import datetime

    from prometheus_client import generate_latest

    from heteroscale.coordinator.actuators.local import Instance, LocalActuator, LocalSettings, SimulatedCluster
    from heteroscale.coordinator.collect import Collector, StaticSource
    from heteroscale.coordinator.core.placement import (DeploymentGroup, RoleGroup, demand_from_service, plan)
    from heteroscale.coordinator.core.types import PoolCounts
    from heteroscale.coordinator.metrics import registry_for
    from heteroscale.coordinator.reconciler import Reconciler

    secret = tmp_path / "secret"
    secret.write_text("netns-testbed-shared-secret\n")
    common = ["sidecar", "--engine", "vllm", "--engine-url", "http://127.0.0.1:1", "--service", "chat",
              "--gpu-source", "none", "--no-rdma", "--probe-secret-file", str(secret), "--log-level", "WARNING"]
    for pod, (key, role, _, _, _, node) in PODS.items():
        if role == "decode":
            two_pods.spawn(key, *common, "--role", "decode", "--pod", pod, "--node", node,
                           "--listen", f"{two_pods.mgmt[key]}:9400",
                           "--probe-listen", f"{two_pods.data[key]}:{PORT}",
                           "--probe-server-max-rate", "1e9", "--probe-server-peer-rate", "1e9", module="heteroscale")
    time.sleep(1.0)
    for pod, (key, role, _, _, _, node) in PODS.items():
        if role == "prefill":
            peer = "decode-a" if key == "pa" else "decode-b"
            two_pods.spawn(key, *common, "--role", "prefill", "--pod", pod, "--node", node,
                           "--listen", f"{two_pods.mgmt[key]}:9400",
                           "--probe-peers", f"{peer}={two_pods.data['d' + key[1]]}:{PORT}",
                           "--probe-bytes", str(8 * 1024 * 1024), "--probe-interval-s", "2",
                           "--probe-max-rate", "1e9", module="heteroscale")

    cluster = SimulatedCluster.from_yaml(TWO_PODS)
    actuator = LocalActuator(cluster=cluster, settings=LocalSettings(model="8b", startup_delay_s=0.0))
    actuator.instances = {pod: Instance(name=pod, service="chat", role=role, group=dg, node=node,
                                        gpu_type="NVIDIA-H20", s1=s1, s2=s2, gpus=1, engine_port=1, kv_port=2,
                                        sidecar_port=3, created_s=time.time(), state="ready", in_traffic=True)
                          for pod, (_, role, dg, s2, s1, node) in PODS.items()}
    config = _config(two_pods)
    collector = Collector(source=StaticSource(), timeout_s=3)
    reconciler = Reconciler(config=config, actuator=actuator, collector=collector)
    try:
        # 1. Detected: tick until both pairs have two probes behind them.
        deadline = time.monotonic() + 60
        bw = None
        while time.monotonic() < deadline:
            await reconciler.tick()
            svc_doc = reconciler.status(history=False)["services"][0]
            bw = svc_doc["kv_bandwidth"]
            if bw and len(bw["pairs"]) == 2 and all(p["bytes_per_second"] for p in bw["pairs"]):
                reports = [f.report for f in reconciler.collector.latest["chat"].fetched if f.report]
                peers = [p for r in reports if r.role == "prefill" for p in r.kv_transfer["probe"]["peers"]]
                if all(p.get("recent_probes", 0) >= 2 for p in peers):
                    break
            await asyncio.sleep(1.0)
        else:
            raise AssertionError(f"the coordinator never saw both pairs measured: {bw}")
        pairs = {p["prefill"]: p for p in bw["pairs"]}
        slow, healthy = pairs["prefill-a"], pairs["prefill-b"]
        print(f"\nshaped {SLOW_SWITCH_MBIT} Mbit/s -> {slow['bytes_per_second'] * 8 / 1e6:.1f} Mbit/s (pod-a), "
              f"shaped {HEALTHY_SWITCH_MBIT} Mbit/s -> {healthy['bytes_per_second'] * 8 / 1e6:.1f} Mbit/s (pod-b)")
        assert abs(slow["bytes_per_second"] - SLOW_SWITCH_MBIT * 1e6 / 8) <= 0.10 * SLOW_SWITCH_MBIT * 1e6 / 8
        assert abs(healthy["bytes_per_second"] - HEALTHY_SWITCH_MBIT * 1e6 / 8) <= 0.10 * HEALTHY_SWITCH_MBIT * 1e6 / 8
        # 2. Reported: the status document flags pod-a's pair, /metrics counts it.
        assert (slow["decode"], slow["group"], slow["source"], slow["flagged"]) == ("decode-a", "chat-g0", "probe", True)
        assert healthy["group"] == "chat-g1" and not healthy["flagged"]
        assert bw["flagged"] == [{"prefill": "prefill-a", "decode": "decode-a", "reason": slow["reason"]}]
        metrics = generate_latest(registry_for(reconciler)).decode()
        assert 'heteroscale_kv_bandwidth_flagged_pairs{service="chat"} 1.0' in metrics
        assert 'heteroscale_kv_bandwidth_bytes_per_second{decode="decode-a"' in metrics

        # Blind to bandwidth, placement would grow the first DG, in pod-a.
        svc = config.services[0]
        current = [DeploymentGroup(dg, "chat", "s2", s2, "",
                                   RoleGroup("NVIDIA-H20", 1, {PODS[f"prefill-{x}"][5]: 1}),
                                   RoleGroup("NVIDIA-H20", 1, {PODS[f"decode-{x}"][5]: 1}))
                   for dg, s2, x in (("chat-g0", "pod-a", "a"), ("chat-g1", "pod-b", "b"))]
        blind = plan(view=cluster.view({n: 1 for *_, n in PODS.values()}), services=[demand_from_service(svc)],
                     current={"chat": current}, desired={"chat": PoolCounts(3, 3)})
        assert {(a.dg, a.s2) for a in blind.allocations} == {("chat-g0", "pod-a")}

        # 3. Avoided: the next scale-out (a fixed-count schedule: 3P3D now) grows pod-b's DG.
        now = datetime.datetime.now(datetime.timezone.utc)
        window = {"start": (now - datetime.timedelta(hours=1)).strftime("%H:%M"),
                  "end": (now + datetime.timedelta(hours=1)).strftime("%H:%M"), "prefill": 3, "decode": 3}
        scaling = Reconciler(config=_config(two_pods, schedule=window), actuator=actuator,
                             collector=Collector(source=StaticSource(), timeout_s=3))
        try:
            (decision,) = await scaling.tick()
        finally:
            await scaling.collector.close()
        assert (decision.reason, decision.desired) == ("schedule", PoolCounts(3, 3))
        placed = actuator.placements[-1]
        assert {(a["dg"], a["s2"]) for a in placed["allocations"]} == {("chat-g1", "pod-b")}, placed
        assert all("domains with slow links avoided" in a["why"] for a in placed["allocations"])
        note = scaling.status(history=False)["services"][0]["last_apply"]["note"]
        assert "grow DG in s2 pod-b" in note and "domains with slow links avoided" in note
        print(f"next scale-out: {note}")
    finally:
        await actuator.close()
        await collector.close()
