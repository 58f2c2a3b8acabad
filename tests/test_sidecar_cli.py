"""``heteroscale sidecar`` as a real process: bad flags end in one line and exit 2;
a real run scrapes a real local engine server and serves /metrics read back with
the real prometheus_client parser; SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, free_port
from tests.test_sidecar_fakes import FakeEngine, vllm_page

BASE = ["--engine", "vllm", "--engine-url", "http://127.0.0.1:8000", "--role", "decode", "--service", "s"]


@pytest.mark.parametrize("extra,needle", [
    (["--interval", "-1"], "--interval must be > 0"),
    (["--interval", "1", "--scrape-timeout", "2"], "must be below --interval"),
    (["--engine-url", "localhost:8000"], "--engine-url"),
    (["--listen", "nowhere"], "--listen must be HOST:PORT"),
    (["--engine", "tgi"], "invalid choice"),
    (["--interval", "abc"], "invalid float value"),
])
def test_bad_flags_one_line_per_problem_exit_2(extra, needle):
    proc = subprocess.run([sys.executable, "-m", "heteroscale", "sidecar", *BASE, *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines and "Traceback" not in proc.stderr, proc.stderr
    assert all(line.startswith("heteroscale sidecar: error: ") for line in lines), proc.stderr
    assert needle in lines[0], proc.stderr


@pytest.mark.parametrize("gpu_source", ["none", "nvml"])
def test_listen_port_in_use_is_one_line_before_anything_runs(gpu_source):
    # The socket is bound first: no GPU probing, engine scrape or extension runs (or logs) before the error.
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "heteroscale", "sidecar", *BASE, "--gpu-source", gpu_source,
                               "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, cwd=REPO,
                              timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot listen on 127.0.0.1:" in lines[0] and "in use" in lines[0]


async def test_real_process_against_real_engine_server():
    started = time.monotonic()
    tps = 500.0
    engine = await FakeEngine(page_fn=lambda: vllm_page(gen=tps * (time.monotonic() - started),
                                                         running=3.0)).start()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "heteroscale", "sidecar", "--engine", "vllm", "--engine-url", engine.url,
        "--role", "decode", "--service", "chat", "--listen", f"127.0.0.1:{port}", "--interval", "0.2",
        "--window", "1.0", "--gpu-source", "none", "--pod", "pod-a",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            fams = None
            for _ in range(150):         # bounded wait: startup + window filling (a few seconds at most)
                await asyncio.sleep(0.1)
                try:
                    async with session.get(base + "/metrics") as r:
                        text = await r.text()
                except aiohttp.ClientError:
                    continue
                fams = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
                rate = fams.get("heteroscale_decode_tokens_per_second")
                window = fams.get("heteroscale_rate_window_seconds")
                if rate is not None and window is not None and window.value >= 0.6:
                    break
            assert fams is not None
            assert fams["heteroscale_engine_up"].value == 1.0
            assert fams["heteroscale_engine_up"].labels == {"service": "chat", "role": "decode"}
            # the page's counter grows at 500/s of real time; the window measures it
            assert fams["heteroscale_decode_tokens_per_second"].value == pytest.approx(tps, rel=0.1)
            assert fams["heteroscale_requests_running"].value == 3.0
            assert fams["heteroscale_gpu_mode"].labels["mode"] == "none"
            async with session.get(base + "/v1/report") as r:
                doc = await r.json()
            assert doc["pod"] == "pod-a" and doc["engine_up"] is True
            async with session.get(base + "/readyz") as r:
                assert r.status == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await engine.close()
    stderr = (await proc.stderr.read()).decode()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "listening on http://127.0.0.1:" in stderr
