"""The sidecar's HTTP endpoints on a real 127.0.0.1 socket, read back with a real HTTP
client and the real prometheus_client text parser."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from heteroscale.sidecar.agent import Agent, AgentSettings
from heteroscale.sidecar.http import make_app
from heteroscale.sidecar.metrics import SCRAPE_ERROR_REASONS, MetricsView, SidecarCollector
from heteroscale.report import GpuReading
from tests.test_sidecar_fakes import FakeEngine, vllm_page

SECTION_3_2 = {
    "heteroscale_engine_up", "heteroscale_decode_tokens_per_second", "heteroscale_prefill_tokens_per_second",
    "heteroscale_prefill_uncached_tokens_per_second", "heteroscale_requests_running",
    "heteroscale_requests_waiting", "heteroscale_kv_cache_usage_ratio", "heteroscale_ttft_seconds",
    "heteroscale_tbt_seconds", "heteroscale_gpu_utilization_ratio", "heteroscale_gpu_sm_activity_ratio",
    "heteroscale_gpu_memory_used_bytes", "heteroscale_gpu_power_watts", "heteroscale_kv_transfer_bytes_per_second",
    "heteroscale_scrape_errors", "heteroscale_scrape_duration_seconds",
}


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


class OneGpu:
    mode = "nvml"

    async def read(self):
        return (GpuReading(gpu="GPU-abc", utilization_ratio=0.86, sm_activity_ratio=None,
                           memory_used_bytes=7.0e10, power_watts=512.0),)

    async def close(self) -> None:
        return None


@pytest.fixture
async def stack():
    engine = await FakeEngine(page=vllm_page(gen=0.0)).start()
    clock = Clock()
    session = aiohttp.ClientSession()
    agent = Agent(AgentSettings(engine="vllm", engine_url=engine.url, role="prefill", service="chat", pod="p0",
                                gpu_source="none", scrape_timeout_s=0.3),
                  session=session, clock=clock, gpu_reader=OneGpu())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(agent.metrics_view))
    runner = web.AppRunner(make_app(agent, registry, manage_agent=False), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield engine, agent, clock, session, base
    await runner.cleanup()
    await session.close()
    await engine.close()


async def get(session, url):
    async with session.get(url) as r:
        return r.status, r.headers.get("Content-Type"), await r.text()


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, name, **labels):
    """Value of the sample named ``name`` (sample name: counters end in _total) with ``labels``."""
    for s in (s for f in fams.values() for s in f.samples if s.name == name):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


async def test_readyz_then_metrics_and_report(stack):
    engine, agent, clock, session, base = stack
    assert (await get(session, base + "/readyz"))[0] == 503
    status, ctype, text = await get(session, base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    fams = families(text)
    assert SECTION_3_2 <= set(fams)
    assert value(fams, "heteroscale_engine_up") == 0.0
    assert fams["heteroscale_decode_tokens_per_second"].samples == []      # unknown, not 0
    for i in range(4):
        engine.page = vllm_page(gen=150.0 * i, prompt=1000.0 * i, local_compute=250.0 * i,
                                ttft_buckets=(0.0, 20.0 * i, 0.0), running=4.0)
        await agent.cycle()
        clock.t += 1.0
    clock.t -= 1.0
    assert (await get(session, base + "/readyz"))[0] == 200
    status, _, text = await get(session, base + "/metrics")
    fams = families(text)
    const = {"service": "chat", "role": "prefill"}
    for fam in fams.values():
        for s in fam.samples:
            assert {k: s.labels.get(k) for k in const} == const, s
    assert value(fams, "heteroscale_engine_up") == 1.0
    assert value(fams, "heteroscale_decode_tokens_per_second") == pytest.approx(150.0)
    assert value(fams, "heteroscale_prefill_tokens_per_second") == pytest.approx(1000.0)
    assert value(fams, "heteroscale_prefill_uncached_tokens_per_second") == pytest.approx(250.0)
    assert value(fams, "heteroscale_requests_running") == 4.0
    assert value(fams, "heteroscale_kv_cache_usage_ratio") == 0.25
    # 60 observations in (0.1, 1.0]: p50 = 0.1 + 0.9 * 30/60 = 0.55
    assert value(fams, "heteroscale_ttft_seconds", quantile="0.5") == pytest.approx(0.55)
    assert value(fams, "heteroscale_gpu_power_watts", gpu="GPU-abc") == 512.0
    assert value(fams, "heteroscale_gpu_sm_activity_ratio", gpu="GPU-abc") is None     # unsupported: absent
    assert value(fams, "heteroscale_gpu_mode", mode="nvml") == 1.0
    assert fams["heteroscale_kv_transfer_bytes_per_second"].samples == []    # no KV extension: absent
    assert value(fams, "heteroscale_report_stale") == 0.0
    for reason in SCRAPE_ERROR_REASONS:
        assert value(fams, "heteroscale_scrape_errors_total", reason=reason) == 0.0
    status, ctype, _ = await get(session, base + "/v1/report")
    async with session.get(base + "/v1/report") as r:
        doc = await r.json()
    assert status == 200 and ctype.startswith("application/json")
    for key in ("service", "role", "pod", "engine_up", "decode_tps", "prefill_tps", "prefill_uncached_tps",
                "ttft_p90_s", "tbt_p90_s", "observed_at", "window_s"):
        assert key in doc
    assert doc["decode_tps"] == pytest.approx(150.0) and doc["engine_up"] is True and doc["stale"] is False
    # the same start time as the report, for the coordinator's warm-up rule over PromQL
    assert value(fams, "heteroscale_engine_started_at_seconds") == pytest.approx(doc["started_at"])


def test_kv_transfer_is_one_series_per_measured_source():
    view = MetricsView(service="chat", role="prefill", kv_direction="send",
                       kv_sources=(("engine", 4.0e9), ("probe", 9.5e9)))
    registry = CollectorRegistry()
    registry.register(SidecarCollector(lambda: view))
    fams = families(generate_latest(registry).decode())
    samples = {(s.labels["direction"], s.labels["source"]): s.value
               for s in fams["heteroscale_kv_transfer_bytes_per_second"].samples}
    assert samples == {("send", "engine"): 4.0e9, ("send", "probe"): 9.5e9}    # rdma did not measure: absent


async def test_faults_show_in_metrics(stack):
    engine, agent, clock, session, base = stack
    await agent.cycle()
    engine.mode = "500"
    for _ in range(4):
        clock.t += 1.0
        await agent.cycle()
    engine.mode = "garbage"
    await agent.cycle()
    fams = families((await get(session, base + "/metrics"))[2])
    assert value(fams, "heteroscale_engine_up") == 0.0
    assert value(fams, "heteroscale_scrape_errors_total", reason="http_status") == 4.0
    assert value(fams, "heteroscale_scrape_errors_total", reason="parse") == 1.0
    assert value(fams, "heteroscale_report_stale") == 1.0
    assert (await get(session, base + "/readyz"))[0] == 200     # was ready once; staleness is reported instead
    async with session.get(base + "/v1/report") as r:
        doc = await r.json()
    assert doc["stale"] is True and doc["engine_up"] is False and doc["scrape_errors"]["http_status"] == 4


async def test_healthz_follows_the_loop(stack):
    engine, agent, clock, session, base = stack
    assert (await get(session, base + "/healthz"))[0] == 503      # loop not started
    await agent.start()
    try:
        assert (await get(session, base + "/healthz"))[0] == 200
    finally:
        await agent.stop()


async def test_healthz_and_metrics_answer_while_a_page_is_being_parsed():
    # Pages are parsed in a worker thread: with the parser held inside a parse, the event loop
    # still serves every endpoint (the timing of this is a benchmark, benchmarks/sidecar_robustness_bench.py).
    import asyncio
    import threading

    from heteroscale.engine_adapters import vllm

    inside, release = threading.Event(), threading.Event()

    def held_parser(text: str):
        inside.set()
        release.wait(30)
        return vllm.parse(text)

    engine = await FakeEngine(page=vllm_page(gen=0.0)).start()
    agent = Agent(AgentSettings(engine="vllm", engine_url=engine.url, role="decode", service="chat", pod="p0",
                                gpu_source="none", interval_s=0.5, window_s=2.0, scrape_timeout_s=0.3),
                  page_parser=held_parser)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(agent.metrics_view))
    runner = web.AppRunner(make_app(agent, registry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        assert await asyncio.to_thread(inside.wait, 30)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
            for path, status in (("/healthz", 200), ("/metrics", 200), ("/v1/report", 200), ("/readyz", 503)):
                async with client.get(base + path) as resp:
                    assert resp.status == status, path
            assert not agent.ready and inside.is_set() and not release.is_set()   # still inside the parse
            release.set()
            for _ in range(200):
                if agent.ready:
                    break
                await asyncio.sleep(0.05)
            async with client.get(base + "/readyz") as resp:
                assert resp.status == 200
    finally:
        release.set()
        await runner.cleanup()
        await engine.close()
