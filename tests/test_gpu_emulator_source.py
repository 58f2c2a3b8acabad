"""The emulator GPU source against a real aiohttp server on 127.0.0.1.

Good pages, and every way a page can go wrong: refused connection, a handler that
hangs, HTTP 500, not JSON, wrong shape, values out of range. The reader must
return ``()`` and count the reason, never raise and never pass bad numbers on.
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heteroscale.sidecar.gpu.emulator_source import EmulatorGpuReader, EmulatorPageError, parse_emulator_gpu_page
from heteroscale.report import GpuReading
from tests.conftest import free_port

GOOD_PAGE = {"gpus": [
    {"gpu": "0", "utilization_ratio": 0.86, "sm_activity_ratio": 0.41,
     "memory_used_bytes": 71_000_000_000, "power_watts": 512.0},
    {"gpu": 1, "utilization_ratio": 0.2, "sm_activity_ratio": None},
]}


class EmulatorGpuPage:
    """A real HTTP server whose /emulator/gpu answer the test changes at will."""

    def __init__(self) -> None:
        self.status = 200
        self.body: str = json.dumps(GOOD_PAGE)
        self.hang = asyncio.Event()
        self.hanging = False
        self.requests = 0
        app = web.Application()
        app.router.add_get("/emulator/gpu", self.handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.hanging:
            await self.hang.wait()
        return web.Response(status=self.status, text=self.body, content_type="application/json")

    @property
    def url(self) -> str:
        return str(self.server.make_url("/emulator/gpu"))


@pytest.fixture
async def page():
    server = EmulatorGpuPage()
    await server.server.start_server()
    yield server
    server.hang.set()
    await server.server.close()


async def test_reads_the_modelled_gpus(page):
    reader = EmulatorGpuReader(page.url)
    try:
        assert reader.mode == "emulator"
        readings = await reader.read()
        assert readings == (
            GpuReading(gpu="0", utilization_ratio=0.86, sm_activity_ratio=0.41,
                       memory_used_bytes=71e9, power_watts=512.0),
            GpuReading(gpu="1", utilization_ratio=0.2),          # missing/null fields are None
        )
        assert reader.errors_total == {}
    finally:
        await reader.close()


@pytest.mark.parametrize(("status", "body", "reason"), [
    (500, "boom", "http_status"),
    (404, "{}", "http_status"),
    (200, "<html>not json</html>", "bad_document"),
    (200, '{"gpus": [{"gpu": "0", "utilization_ratio": 1.7}]}', "bad_document"),   # ratio > 1
    (200, '{"gpus": [{"gpu": "0", "power_watts": -3}]}', "bad_document"),
    (200, '{"gpus": [{"gpu": "0", "memory_used_bytes": "lots"}]}', "bad_document"),
    (200, '{"gpus": [{"gpu": "0"}, {"gpu": "0"}]}', "bad_document"),
    (200, '{"gpus": {"0": {}}}', "bad_document"),
    (200, '[1, 2]', "bad_document"),
    (200, '{"gpus": [{"utilization_ratio": 0.5}]}', "bad_document"),                # no label
    (200, '{"gpus": [{"gpu": "0", "utilization_ratio": NaN}]}', "bad_document"),
    (200, '{"gpus": [{"gpu": "0", "sm_activity_ratio": true}]}', "bad_document"),
])
async def test_bad_answers_give_nothing_and_count_the_reason(page, status, body, reason):
    page.status, page.body = status, body
    reader = EmulatorGpuReader(page.url)
    try:
        assert await reader.read() == ()
        assert reader.errors_total == {reason: 1}
        page.status, page.body = 200, json.dumps(GOOD_PAGE)     # and it recovers
        assert len(await reader.read()) == 2
    finally:
        await reader.close()


async def test_refused_connection_counts_connect():
    reader = EmulatorGpuReader(f"http://127.0.0.1:{free_port()}/emulator/gpu")
    try:
        assert await reader.read() == ()
        assert await reader.read() == ()
        assert reader.errors_total == {"connect": 2}
    finally:
        await reader.close()


async def test_hanging_emulator_times_out(page):
    page.hanging = True
    reader = EmulatorGpuReader(page.url, timeout_s=0.05)
    try:
        assert await reader.read() == ()
        assert reader.errors_total == {"timeout": 1}
        assert page.requests == 1
    finally:
        page.hang.set()
        await reader.close()


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError):
        EmulatorGpuReader("127.0.0.1:9000/emulator/gpu")
    with pytest.raises(ValueError):
        EmulatorGpuReader("http://127.0.0.1:9000/emulator/gpu", timeout_s=0)


async def test_close_without_read_and_twice():
    reader = EmulatorGpuReader("http://127.0.0.1:9/emulator/gpu")
    await reader.close()
    await reader.close()


# --------------------------------------------------------------------------- parser fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
gpu_items = st.fixed_dictionaries({}, optional={
    "gpu": st.one_of(st.text(max_size=4), st.integers(), st.none(), st.booleans()),
    "utilization_ratio": json_values, "sm_activity_ratio": json_values,
    "memory_used_bytes": json_values, "power_watts": json_values,
})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.fixed_dictionaries({"gpus": st.lists(gpu_items, max_size=4)})))
def test_parser_accepts_only_sound_pages_and_raises_nothing_else(doc):
    try:
        readings = parse_emulator_gpu_page(doc)
    except EmulatorPageError:
        return
    for r in readings:
        for name in ("utilization_ratio", "sm_activity_ratio"):
            value = getattr(r, name)
            assert value is None or (math.isfinite(value) and 0.0 <= value <= 1.0)
        for name in ("memory_used_bytes", "power_watts"):
            value = getattr(r, name)
            assert value is None or (math.isfinite(value) and value >= 0.0)
    assert len({r.gpu for r in readings}) == len(readings)


# --------------------------------------------------------------------------- the real emulator


@pytest.fixture
def emulator_process():
    """A real ``heteroscale emulate-engine`` (decode, H200, TP 2) on 127.0.0.1."""
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.conftest import REPO

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "heteroscale", "emulate-engine", "--role", "decode", "--gpu", "H200",
         "--model", "8b", "--tp", "2", "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(100):
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/emulator/gpu"
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


async def test_reads_a_real_engine_emulator(emulator_process):
    reader = EmulatorGpuReader(emulator_process)
    try:
        readings = await reader.read()
        assert reader.errors_total == {}
        assert [r.gpu for r in readings] == ["0", "1"]          # one per GPU of the TP 2 instance
        for r in readings:
            assert 0.0 <= r.utilization_ratio <= 1.0 and 0.0 <= r.sm_activity_ratio <= 1.0
            assert r.memory_used_bytes > 0 and r.power_watts > 0
    finally:
        await reader.close()
