"""Collection against REAL sidecar processes: ``heteroscale emulate-engine`` behind
``heteroscale sidecar`` on loopback, read by the collector in-process and by a real
``heteroscale coordinator`` process, which is then stopped with SIGTERM and must exit
cleanly and release its lease."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from heteroscale.coordinator.core.aggregate import aggregate
from heteroscale.coordinator.collect import Collector, StaticSource
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.types import PoolCounts, PoolStatus
from tests.conftest import free_port

pytestmark = pytest.mark.slow
HETEROSCALE = [sys.executable, "-m", "heteroscale"]


def _get(url: str, timeout_s: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:   # noqa: S310 (loopback only)
            return resp.status, resp.read()
    except Exception:
        return 0, b""


def _wait(url: str, *, deadline_s: float = 30.0, want=lambda body: True) -> bytes:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status, body = _get(url)
        if status == 200 and want(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready in {deadline_s}s")


@pytest.fixture
def sidecar_process(tmp_path: Path):
    engine_port, sidecar_port = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(HETEROSCALE + ["emulate-engine", "--role", "decode", "--gpu", "H20",
                                                     "--model", "8b", "--host", "127.0.0.1",
                                                     "--port", str(engine_port)],
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "engine.log", "w")))
        procs.append(subprocess.Popen(HETEROSCALE + ["sidecar", "--engine", "vllm", "--engine-url",
                                                     f"http://127.0.0.1:{engine_port}", "--role", "decode",
                                                     "--service", "chat", "--pod", "chat-decode-0",
                                                     "--listen", f"127.0.0.1:{sidecar_port}",
                                                     "--gpu-source", "none", "--interval", "0.5", "--no-rdma"],
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sidecar.log", "w")))
        _wait(f"http://127.0.0.1:{sidecar_port}/readyz")
        # A rate needs two scrapes; until then decode_tps is "not measured" (None).
        _wait(f"http://127.0.0.1:{sidecar_port}/v1/report",
              want=lambda b: json.loads(b).get("decode_tps") is not None)
        yield f"http://127.0.0.1:{sidecar_port}/v1/report"
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _config_doc(report_url: str, *, lease_path: str, port: int) -> dict:
    return {"coordinator": {"backend": "static", "interval_s": 1, "collect": {"timeout_s": 0.5},
                            "listen": f"127.0.0.1:{port}", "lease": {"path": lease_path}},
            "services": [{"name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 1000,
                          "slo": {"tbt_s": 0.05}, "policy": {"warmup_s": 0},
                          # the prefill URL points at nothing: a dead sidecar is counted, not fatal
                          "prefill": {"sidecars": [f"http://127.0.0.1:{free_port()}/v1/report"]},
                          "decode": {"sidecars": [report_url]}}]}


async def test_collector_reads_a_real_sidecar(sidecar_process: str, tmp_path: Path):
    cfg = load_config(_config_doc(sidecar_process, lease_path=str(tmp_path / "l"), port=free_port()))
    svc = cfg.services[0]
    collector = Collector(source=StaticSource(), timeout_s=2)
    try:
        result = await collector.collect(svc)
    finally:
        await collector.close()
    decode = next(f for f in result.fetched if f.role == "decode")
    assert decode.error is None and decode.report.pod == "chat-decode-0" and decode.report.engine_up
    assert decode.report.decode_tps == 0.0                # an idle engine measures zero, not "unknown"
    prefill = next(f for f in result.fetched if f.role == "prefill")
    assert prefill.error == "connect"
    obs = aggregate(svc, result.fetched, pools=PoolStatus(current=PoolCounts(1, 1), ready=PoolCounts(1, 1)),
                    now_s=time.time())
    assert (obs.fresh_decode, obs.expected_decode, obs.decode_tps) == (1, 1, 0.0)


def test_coordinator_process_serves_status_and_stops_cleanly(sidecar_process: str, tmp_path: Path):
    import yaml
    port = free_port()
    lease = tmp_path / "coordinator.lease"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config_doc(sidecar_process, lease_path=str(lease), port=port)))
    proc = subprocess.Popen(HETEROSCALE + ["coordinator", "--config", str(config), "--identity", "test-coord"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        body = _wait(f"http://127.0.0.1:{port}/api/v1/status",
                     want=lambda b: json.loads(b)["services"][0]["reports"]["fresh_decode"] == 1)
        status = json.loads(body)
        assert status["identity"] == "test-coord" and status["backend"] == "static" and status["writes"] is False
        chat = status["services"][0]
        # One decode engine up at zero load: the floor is one decode, and it says why not less.
        assert chat["decode"]["current"] == 1 and chat["decode_tps"] == 0.0
        assert chat["reports"]["excluded"] == {"connect": 1}
        _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert b'heteroscale_service_decode_tokens_per_second{service="chat"} 0.0' in metrics
        _wait(f"http://127.0.0.1:{port}/api/v1/status", want=lambda b: json.loads(b)["leader"] is True)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    record = json.loads(lease.read_text())
    holder = record.get("holder", record.get("holderIdentity", ""))
    assert holder in ("", None), record                  # released on a clean shutdown
