"""The agent against a real aiohttp engine server on 127.0.0.1, driven cycle by cycle
with a fake clock: rates, faults (refused, hang, 500, garbage, cut short, empty, wrong
engine, restart), staleness, readiness, extensions, GPU readers."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest

from heteroscale.sidecar.agent import Agent, AgentSettings, metrics_url, settings_from_args, add_arguments
from heteroscale.errors import ConfigError, UsageError
from heteroscale.report import GpuReading, SidecarReport
from tests.conftest import DATA, free_port
from tests.test_sidecar_fakes import FakeEngine, vllm_page


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def settings(url: str, **kw) -> AgentSettings:
    base = dict(engine="vllm", engine_url=url, role="decode", service="svc", pod="pod-0",
                interval_s=1.0, window_s=5.0, scrape_timeout_s=0.3, gpu_source="none")
    base.update(kw)
    return AgentSettings(**base)


@pytest.fixture
async def engine():
    fake = await FakeEngine(page=vllm_page(gen=0.0)).start()
    yield fake
    await fake.close()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def drive(agent: Agent, clock: Clock, engine: FakeEngine, pages, *, step_s: float = 1.0) -> None:
    for page in pages:
        engine.page = page
        await agent.cycle()
        clock.t += step_s


async def test_rates_from_a_real_server(engine, session):
    clock = Clock()
    agent = Agent(settings(engine.url), session=session, clock=clock, wall=lambda: 1.7e9 + clock.t)
    assert not agent.ready and agent.stale()
    # 300 generated tok/s; 2000 prompt tok/s of which 500/s computed locally
    await drive(agent, clock, engine, [vllm_page(gen=300.0 * i, prompt=2000.0 * i, local_compute=500.0 * i,
                                                 ttft_buckets=(10.0 * i, 0, 0)) for i in range(4)])
    clock.t -= 1.0      # report "now" = time of the last scrape
    report = agent.report()
    assert agent.ready and report.engine_up and not report.stale
    assert report.decode_tps == pytest.approx(300.0)
    assert report.prefill_tps == pytest.approx(2000.0)
    assert report.prefill_uncached_tps == pytest.approx(500.0)
    # 30 TTFT observations in the window, all in [0, 0.1]: p50 = 0.1 * 15/30 = 0.05
    assert report.ttft_p50_s == pytest.approx(0.05)
    assert report.window_s == pytest.approx(3.0)
    assert report.observed_at == pytest.approx(1.7e9 + 1003.0)
    assert engine.accept_headers[0] == "text/plain; version=0.0.4"
    assert SidecarReport.from_dict(agent.report_dict()) == report    # the JSON contract round-trips


@pytest.mark.parametrize("mode,reason", [("500", "http_status"), ("garbage", "parse"), ("empty", "empty"),
                                         ("cut", "parse"), ("hang", "timeout")])
async def test_engine_faults(engine, session, mode, reason):
    clock = Clock()
    agent = Agent(settings(engine.url, scrape_timeout_s=0.2), session=session, clock=clock)
    await drive(agent, clock, engine, [vllm_page(gen=100.0 * i) for i in range(3)])
    assert agent.engine_up and agent.report().decode_tps == pytest.approx(100.0)
    engine.mode = mode
    for _ in range(4):
        await agent.cycle()
        clock.t += 1.0
        assert not agent.engine_up
        # stale from the first failed scrape on: the last good rate is never served as fresh
        assert agent.report().stale and agent.metrics_view().stale
    assert agent.errors[reason] == 4 and sum(agent.errors.values()) == 4
    report = agent.report()
    assert report.stale and not report.engine_up        # newest good sample is > 3 intervals old
    assert agent.ready                                  # ready stays: the sidecar itself is fine
    # recovery
    engine.mode = "page"
    await drive(agent, clock, engine, [vllm_page(gen=1000.0), vllm_page(gen=1100.0)])
    clock.t -= 1.0
    assert agent.engine_up and not agent.stale()
    assert agent.report().decode_tps == pytest.approx(100.0)


async def test_a_page_over_the_cap_is_refused_and_counted_as_too_large(engine, session):
    from heteroscale.engine_adapters.scrape import DEFAULT_MAX_BYTES
    clock = Clock()
    agent = Agent(settings(engine.url, scrape_timeout_s=0.9), session=session, clock=clock)
    engine.page = vllm_page(gen=1.0) + "# padding " + "x" * DEFAULT_MAX_BYTES + "\n"
    await agent.cycle()
    assert agent.errors == {"too_large": 1} and not agent.engine_up and agent.report().stale


async def test_refused_connection_and_never_ready(session):
    clock = Clock()
    agent = Agent(settings(f"http://127.0.0.1:{free_port()}"), session=session, clock=clock)
    for _ in range(3):
        await agent.cycle()
        clock.t += 1.0
    assert agent.errors == {"connect": 3}
    report = agent.report()
    assert not agent.ready and report.stale and not report.engine_up
    assert report.decode_tps is None and report.observed_at == 0.0


async def test_wrong_engine_page(engine, session):
    engine.page = ('# TYPE sglang:num_running_reqs gauge\n'
                   'sglang:num_running_reqs{engine_type="decode",tp_rank="0"} 3.0\n')
    agent = Agent(settings(engine.url), session=session, clock=Clock())
    await agent.cycle()
    assert agent.errors == {"wrong_engine": 1} and not agent.engine_up


async def test_engine_restart_never_spikes_or_goes_negative(engine, session):
    clock = Clock()
    agent = Agent(settings(engine.url, window_s=10.0), session=session, clock=clock, wall=lambda: clock.t)
    before = [vllm_page(gen=1e6 + 200.0 * i) for i in range(3)]          # 200 tok/s
    after = [vllm_page(gen=200.0 * i) for i in range(3)]                 # restart: counter back to 0
    await drive(agent, clock, engine, before)
    started = agent.started_at
    await drive(agent, clock, engine, after)
    clock.t -= 1.0
    assert agent.report().decode_tps == pytest.approx(200.0)
    assert agent.started_at > started                    # warm-up restarts with the engine


async def test_dp_engine_leaving_is_not_a_spike(engine, session):
    clock = Clock()
    agent = Agent(settings(engine.url, window_s=10.0), session=session, clock=clock)
    two = [vllm_page(gen=2e6 + 400.0 * i, engines=("0", "1")) for i in range(3)]
    # engine 1 vanished: the sum drops to engine 0's share, then grows at 200/s
    one = [vllm_page(gen=1e6 + 200.0 * i + 400.0, engines=("0",)) for i in range(3)]
    await drive(agent, clock, engine, two + one)
    clock.t -= 1.0
    rate = agent.report().decode_tps
    # 2 good pairs at 400/s (2 s) + 2 good pairs at 200/s (2 s): (800 + 400) / 4 = 300
    assert rate == pytest.approx(300.0)


async def test_counters_near_the_float_limit_give_unknown_rates_never_infinity(engine, session):
    # Two DP engines' counters near 1e308 sum to inf: the rate is unknown, the JSON is strict,
    # /metrics carries no +Inf, and the coordinator's parser accepts the report.
    import json
    from heteroscale.report import parse_report_json
    from heteroscale.sidecar.metrics import MetricsView, SidecarCollector

    clock = Clock()
    agent = Agent(settings(engine.url), session=session, clock=clock, wall=lambda: 1.7e9 + clock.t)
    await drive(agent, clock, engine, [vllm_page(gen=3.4e308 - i * 1e300, prompt=1e308 * (i % 2) + 1e307,
                                                 engines=("0", "1")) for i in range(4)])
    report = agent.report()
    assert report.engine_up and report.decode_tps is None
    body = json.dumps(agent.report_dict(), allow_nan=False)
    assert "Infinity" not in body and "NaN" not in body
    assert parse_report_json(body.encode()) == report
    values = [s.value for m in SidecarCollector(agent.metrics_view).collect() for s in m.samples]
    assert all(math.isfinite(v) for v in values)


async def test_decode_pod_report_carries_deferred_kv_stages_and_preemptions(engine, session):
    from heteroscale.sidecar.metrics import SidecarCollector
    page = (DATA / "vllm_constructed_decode_kv_consumer.txt").read_text()
    clock = Clock()
    agent = Agent(settings(engine.url), session=session, clock=clock, wall=lambda: 1.7e9 + clock.t)
    # preemptions 2 per engine on the page; three later scrapes add 3 per second in all
    await drive(agent, clock, engine, [page.replace('vllm:num_preemptions_total{engine="1",model_name="Qwen/Qwen3-8B"} 2.0',
                                                    f'vllm:num_preemptions_total{{engine="1",model_name="Qwen/Qwen3-8B"}} '
                                                    f'{2.0 + 3 * i}') for i in range(3)])
    clock.t -= 1.0
    report = agent.report()
    assert report.requests_waiting == 1 + 2 and report.requests_deferred == 2 + 2
    assert report.requests_by_kv_stage == {"waiting_to_start": 2.0, "in_progress": 3.0, "completed_waiting": 0.0}
    assert report.preemptions_per_s == pytest.approx(3.0)
    samples = {(s.name, s.labels.get("stage")): s.value
               for m in SidecarCollector(agent.metrics_view).collect() for s in m.samples}
    assert samples[("heteroscale_requests_deferred", None)] == 4
    assert samples[("heteroscale_requests_kv_stage", "in_progress")] == 3
    assert samples[("heteroscale_preemptions_per_second", None)] == pytest.approx(3.0)


class RecordingExtension:
    name = "kv_transfer"

    def __init__(self, *, fail: bool = False) -> None:
        self.fail, self.started, self.closed, self.calls = fail, False, False, []

    async def start(self) -> None:
        self.started = True

    async def sample(self, now_s: float):
        self.calls.append(now_s)
        if self.fail:
            raise RuntimeError("boom")
        return {"bytes_per_second": 1.5e9, "transfers": 3}

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        yield GaugeMetricFamily("heteroscale_kv_transfer_probe_ok", "probe", value=1.0)

    async def close(self) -> None:
        self.closed = True


async def test_extension_sample_reaches_report_and_metrics_view(engine, session):
    ext = RecordingExtension()
    clock = Clock()
    agent = Agent(settings(engine.url, interval_s=0.05, window_s=0.5, scrape_timeout_s=0.04),
                  session=session, clock=clock, extensions=[ext])
    await agent.start()
    try:
        await agent.cycle()
    finally:
        await agent.stop()
    assert ext.started and ext.closed and clock.t in ext.calls
    assert agent.report().kv_transfer == {"bytes_per_second": 1.5e9, "transfers": 3}
    view = agent.metrics_view()
    assert (view.kv_sources, view.kv_direction) == ((("engine", 1.5e9),), "receive")  # decode receives
    assert [m.name for m in view.extension_metrics()] == []   # stopped: extensions released


async def test_failing_extension_is_contained(engine, session):
    ext = RecordingExtension(fail=True)
    agent = Agent(settings(engine.url, interval_s=0.05, window_s=0.5, scrape_timeout_s=0.04),
                  session=session, clock=Clock(), extensions=[ext])
    await agent.start()
    try:
        await agent.cycle()
        assert agent.engine_up and agent.report().kv_transfer == {}
        assert [m.name for m in agent.metrics_view().extension_metrics()] == ["heteroscale_kv_transfer_probe_ok"]
    finally:
        await agent.stop()


class SlowGpu:
    mode = "emulator"

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    async def read(self):
        if self.hang:
            await asyncio.sleep(10)
        return (GpuReading(gpu="0", utilization_ratio=0.5, power_watts=300.0),)

    async def close(self) -> None:
        return None


async def test_gpu_reader_is_bounded(engine, session):
    agent = Agent(settings(engine.url, scrape_timeout_s=0.1), session=session, clock=Clock(),
                  gpu_reader=SlowGpu(hang=False))
    await agent.cycle()
    assert agent.report().gpus[0].power_watts == 300.0 and agent.report().gpu_mode == "emulator"
    agent.gpu_reader = SlowGpu(hang=True)
    await agent.cycle()
    assert agent.report().gpus == () and agent.engine_up


async def test_loop_runs_and_stops_promptly(engine):
    agent = Agent(settings(engine.url, interval_s=0.05, window_s=0.5, scrape_timeout_s=0.04))
    await agent.start()
    try:
        for _ in range(100):
            if agent.ready:
                break
            await asyncio.sleep(0.01)
        assert agent.ready and agent.alive
    finally:
        await agent.stop()
    assert not agent.alive


# -- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,needle", [
    (dict(interval_s=-1.0), "--interval must be > 0"),
    (dict(interval_s=1.0, scrape_timeout_s=1.0), "must be below --interval"),
    (dict(window_s=1.5), "at least two scrapes"),
    (dict(engine_url="not a url"), "--engine-url"),
    (dict(engine_url="ftp://x/metrics"), "--engine-url"),
    (dict(engine_url="http://host:99999"), "--engine-url"),
    (dict(gpu_source="emulator"), "--emulator-gpu-url"),
])
def test_bad_settings(kw, needle):
    with pytest.raises(ConfigError) as err:
        settings("http://127.0.0.1:8000", **kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        settings("nope", interval_s=0.0, role="x")
    assert len(err.value.problems) >= 3


def test_metrics_url():
    assert metrics_url("http://h:8000") == "http://h:8000/metrics"
    assert metrics_url("http://h:8000/") == "http://h:8000/metrics"
    assert metrics_url("http://h:8000/custom/metrics") == "http://h:8000/custom/metrics"


def test_flags_to_settings(monkeypatch):
    import argparse
    monkeypatch.setenv("POD_NAME", "p-1")
    monkeypatch.setenv("NODE_NAME", "n-1")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--engine", "sglang", "--engine-url", "http://127.0.0.1:30000", "--role", "prefill",
                              "--service", "chat", "--interval", "2", "--listen", "127.0.0.1:0", "--gpus", "0, 1"])
    s = settings_from_args(args)
    assert (s.pod, s.node, s.listen_host, s.listen_port, s.gpus) == ("p-1", "n-1", "127.0.0.1", 0, ("0", "1"))
    assert s.scrape_timeout_s == pytest.approx(1.6) and s.stale_after_s == 6.0
    with pytest.raises(UsageError):
        settings_from_args(parser.parse_args(["--engine", "vllm", "--engine-url", "http://x", "--role", "decode",
                                              "--service", "s", "--listen", "nowhere"]))


class PageObserver(RecordingExtension):
    name = "pages"

    def __init__(self) -> None:
        super().__init__()
        self.pages = []

    def observe_engine_page(self, text: str, now_s: float) -> None:
        self.pages.append((now_s, text))


async def test_extensions_observe_each_fetched_page_once(engine, session):
    ext = PageObserver()
    clock = Clock()
    agent = Agent(settings(engine.url, interval_s=10.0, window_s=20.0, scrape_timeout_s=0.5),
                  session=session, clock=clock, extensions=[ext])
    page = vllm_page(gen=5.0)
    engine.page = page
    await agent.start()                # the loop runs its first cycle, then sleeps 10 s
    try:
        for _ in range(200):
            if agent.ready:
                break
            await asyncio.sleep(0.01)
        await agent.cycle()
        assert len(ext.pages) == engine.requests == 2      # one observation per successful fetch
        engine.mode = "500"
        await agent.cycle()
        assert len(ext.pages) == 2 and engine.requests == 3   # a failed fetch is not observed
    finally:
        await agent.stop()
    assert ext.pages == [(clock.t, page), (clock.t, page)]   # the agent's clock, the page as fetched
    assert agent.report_dict()["extensions"]["pages"] == {"bytes_per_second": 1.5e9, "transfers": 3}


async def test_sample_is_stamped_at_the_middle_of_its_request(engine, session):
    clock = Clock(100.0)

    def slow_page() -> str:
        clock.t += 0.4           # the engine takes 0.4 s (of the agent's clock) to answer
        return vllm_page(gen=1.0)

    engine.page_fn = slow_page
    agent = Agent(settings(engine.url), session=session, clock=clock, wall=lambda: 1e9 + clock.t)
    await agent.cycle()
    assert agent.window.newest_t_s == pytest.approx(100.2)
    assert agent.report().observed_at == pytest.approx(1e9 + 100.2)
    assert agent.scrape_duration_s == pytest.approx(0.4)


async def test_sglang_engine_end_to_end(engine, session):
    from tests.conftest import DATA
    base = (DATA / "sglang_pre_realtime_decode_dp2_tp2.txt").read_text()
    line = 'sglang:generation_tokens_total{engine_type="decode",model_name="Qwen/Qwen3-8B"} 1420000.0'
    assert line in base
    clock = Clock()
    agent = Agent(settings(engine.url, engine="sglang"), session=session, clock=clock)
    pages = [base.replace(line, line.replace("1420000.0", f"{1420000.0 + 800.0 * i}")) for i in range(3)]
    await drive(agent, clock, engine, pages)
    clock.t -= 1.0
    report = agent.report()
    assert report.engine == "sglang" and report.engine_up
    assert report.decode_tps == pytest.approx(800.0)
    assert report.requests_running == 64 + 65          # DP ranks summed, TP copies dropped


async def test_role_mismatch_is_logged_once(engine, session, caplog):
    from tests.conftest import DATA
    engine.page = (DATA / "sglang_pre_realtime_prefill_tp1.txt").read_text()
    agent = Agent(settings(engine.url, engine="sglang", role="decode"), session=session, clock=Clock())
    with caplog.at_level("WARNING", logger="heteroscale.sidecar"):
        await agent.cycle()
        await agent.cycle()
    warnings = [r for r in caplog.records if "says it is a prefill engine" in r.getMessage()]
    assert len(warnings) == 1 and agent.engine_up
