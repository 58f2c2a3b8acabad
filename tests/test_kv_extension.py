"""The KV-transfer sidecar extension: flags, engine pages, exporter and self-scrape over real HTTP, probe, metrics."""

from __future__ import annotations

import argparse

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from heteroscale.kv_transfer import extension
from heteroscale.kv_transfer.extension import KvSettings, KvTransferExtension
from heteroscale.kv_transfer.probe import MIB
from heteroscale.errors import ConfigError
from heteroscale.sidecar.extensions import SidecarExtension, build_extensions, observe_engine_page
from heteroscale.sidecar.metrics import view_kv


def nixl_page(*, bytes_sum: float, count: int, time_sum: float, failed: int, waiting: int = 0,
              fast: int | None = None) -> str:
    """A vLLM page with the NIXL connector's families (names and buckets from ENGINES.md §2.3)."""
    fast = count if fast is None else fast
    labels = 'engine="0",model_name="m"'
    return "\n".join([
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{labels}}} {waiting}",
        "# TYPE vllm:nixl_bytes_transferred histogram",
        f'vllm:nixl_bytes_transferred_bucket{{engine="0",le="8.388608e+06",model_name="m"}} {count}',
        f'vllm:nixl_bytes_transferred_bucket{{engine="0",le="+Inf",model_name="m"}} {count}',
        f"vllm:nixl_bytes_transferred_count{{{labels}}} {count}",
        f"vllm:nixl_bytes_transferred_sum{{{labels}}} {bytes_sum}",
        "# TYPE vllm:nixl_xfer_time_seconds histogram",
        f'vllm:nixl_xfer_time_seconds_bucket{{engine="0",le="0.01",model_name="m"}} {fast}',
        f'vllm:nixl_xfer_time_seconds_bucket{{engine="0",le="0.1",model_name="m"}} {count}',
        f'vllm:nixl_xfer_time_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {count}',
        f"vllm:nixl_xfer_time_seconds_count{{{labels}}} {count}",
        f"vllm:nixl_xfer_time_seconds_sum{{{labels}}} {time_sum}",
        "# TYPE vllm:nixl_num_failed_transfers_total counter",
        f"vllm:nixl_num_failed_transfers_total{{{labels}}} {failed}",
    ]) + "\n"


def ext_for(direction: str = "receive", **kw) -> KvTransferExtension:
    return KvTransferExtension(KvSettings(direction=direction, window_s=30, rdma=None, **kw))


def metrics_of(ext: KvTransferExtension) -> dict[str, list]:
    registry = CollectorRegistry()

    class _C:
        def collect(self):
            return ext.collect()

    registry.register(_C())
    text = generate_latest(registry).decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def agent_parser() -> argparse.ArgumentParser:
    from heteroscale.sidecar import agent
    parser = argparse.ArgumentParser()
    agent.add_arguments(parser)
    return parser


async def test_engine_page_rates_latency_and_failures():
    ext = ext_for("receive")
    ext.observe_engine_page(nixl_page(bytes_sum=1e9, count=100, time_sum=2.0, failed=1), 100.0)
    ext.observe_engine_page(nixl_page(bytes_sum=1.5e9, count=150, time_sum=3.0, failed=3, fast=140), 110.0)
    sample = await ext.sample(110.0)
    engine = sample["sources"]["engine"]
    # 0.5e9 bytes in 10 s = 5e7 B/s; 50 transfers took 1.0 s in all: 5e8 B/s while transferring.
    assert engine["bytes_per_second"] == pytest.approx(5e7)
    assert engine["transfer_speed_bytes_per_second"] == pytest.approx(5e8)
    assert engine["transfers_per_second"] == pytest.approx(5.0)
    assert engine["latency_mean_s"] == pytest.approx(0.02)          # 1.0 s / 50
    # Bucket deltas (0.01: 40, 0.1: 50): p90 rank 45 -> 0.01 + 0.09 * 5/10 = 0.055.
    assert engine["latency_p90_s"] == pytest.approx(0.055)
    assert engine["failures_in_window"] == 2 and engine["failures_total"] == 2
    assert (sample["bytes_per_second"], sample["direction"], sample["source"]) == (pytest.approx(5e7), "receive",
                                                                                   "engine")
    # the sidecar exports it as heteroscale_kv_transfer_bytes_per_second{direction,source}
    assert view_kv(sample, default_direction="receive") == ((("engine", pytest.approx(5e7)),), "receive")
    m = metrics_of(ext)
    assert ({"stat": "mean"}, pytest.approx(0.02)) in m["heteroscale_kv_transfer_latency_seconds"]
    assert m["heteroscale_kv_transfer_failures_total"] == [({"connector": "vllm_nixl"}, 2.0)]


def sglang_kv_page(*, transfers: int, mb: float, ms: float, speed_gb_s: float, bootstrap_ms: float,
                   retries: int) -> str:
    """An SGLang 0.5.23 prefill page's KV-transfer histograms (names, buckets as in metrics_collector.py)."""
    labels = 'engine_type="prefill",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
    lines = []
    for name, le, total in (("kv_transfer_total_mb", "5.0", mb), ("kv_transfer_latency_ms", "25.0", ms),
                            ("kv_transfer_speed_gb_s", "1.0", speed_gb_s),
                            ("kv_transfer_bootstrap_ms", "5.0", bootstrap_ms), ("kv_transfer_alloc_ms", "1.0", 0.0)):
        lines += [f"# TYPE sglang:{name} histogram",
                  f"sglang:{name}_sum{{{labels}}} {total}",
                  f'sglang:{name}_bucket{{{labels},le="{le}"}} {transfers}',
                  f'sglang:{name}_bucket{{{labels},le="+Inf"}} {transfers}',
                  f"sglang:{name}_count{{{labels}}} {transfers}"]
    lines += ["# TYPE sglang:num_prefill_retries_total counter", f"sglang:num_prefill_retries_total{{{labels}}} {retries}"]
    return "\n".join(lines) + "\n"


async def test_sglang_per_transfer_histograms_reach_the_report():
    ext = ext_for("send")
    ext.observe_engine_page(sglang_kv_page(transfers=10, mb=30, ms=100, speed_gb_s=3.0, bootstrap_ms=20,
                                           retries=1), 0.0)
    ext.observe_engine_page(sglang_kv_page(transfers=30, mb=90, ms=300, speed_gb_s=9.0, bootstrap_ms=80,
                                           retries=4), 10.0)
    engine = (await ext.sample(10.0))["sources"]["engine"]
    assert engine["connector"] == "sglang"
    # 60 MB in 10 s; the 20 transfers took 200 ms: 60 MB / 0.2 s while busy
    assert engine["bytes_per_second"] == pytest.approx(60 * 2 ** 20 / 10)
    assert engine["transfer_speed_bytes_per_second"] == pytest.approx(60 * 2 ** 20 / 0.2)
    # the per-transfer speed histogram: (9 - 3) GB/s summed over 20 transfers -> 0.3 GB/s mean
    assert engine["transfer_speed_mean_bytes_per_second"] == pytest.approx(0.3 * 2 ** 30)
    assert engine["bootstrap_mean_s"] == pytest.approx(0.060 / 20)
    assert engine["alloc_wait_mean_s"] == 0.0
    assert engine["retries_in_window"] == 3


async def test_a_byte_counter_that_never_moved_is_absent_not_zero():
    ext = ext_for("send")
    ext.observe_engine_page(nixl_page(bytes_sum=0, count=0, time_sum=0, failed=0), 0.0)
    ext.observe_engine_page(nixl_page(bytes_sum=0, count=0, time_sum=0, failed=0), 5.0)
    sample = await ext.sample(5.0)
    assert "bytes_per_second" not in sample["sources"]["engine"]
    assert sample["bytes_per_second"] is None
    assert view_kv(sample, default_direction="send") == ((), "send")


async def test_garbage_and_engine_without_connector_give_no_engine_source():
    ext = ext_for()
    ext.observe_engine_page("vllm:nixl_bytes_transferred_sum{ 1\n", 0.0)
    ext.observe_engine_page("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\n", 1.0)
    sample = await ext.sample(1.0)
    assert "engine" not in sample["sources"] and sample["errors"] == {"parse": 1}
    assert sample["bytes_per_second"] is None


async def test_engine_source_goes_stale_after_the_window():
    ext = ext_for()
    ext.observe_engine_page(nixl_page(bytes_sum=0, count=1, time_sum=0.1, failed=0), 0.0)
    ext.observe_engine_page(nixl_page(bytes_sum=1e6, count=2, time_sum=0.2, failed=0), 1.0)
    assert (await ext.sample(1.0))["bytes_per_second"] == pytest.approx(1e6)
    assert (await ext.sample(100.0))["bytes_per_second"] is None         # engine vanished: absent


async def test_probe_gate_follows_engine_saturation():
    ext = ext_for("send")
    assert ext.probe_gate() == (True, None)                              # nothing known yet
    ext.observe_engine_page(nixl_page(bytes_sum=0, count=1, time_sum=0.1, failed=0, waiting=4), 10.0)
    await ext.sample(10.0)
    assert ext.probe_gate() == (False, "engine_saturated:requests_waiting")
    await ext.sample(100.0)                                              # engine page long gone
    assert ext.probe_gate() == (True, None)


async def _serve(text_of):
    app = web.Application()

    async def metrics(request):
        return web.Response(text=text_of(), content_type="text/plain")

    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def test_self_scrape_when_the_agent_hands_no_pages():
    pages = iter([nixl_page(bytes_sum=0, count=1, time_sum=0.1, failed=0),
                  nixl_page(bytes_sum=4e6, count=2, time_sum=0.2, failed=0)])
    served = []
    runner, url = await _serve(lambda: served.append(1) or next(pages))
    ext = ext_for("receive", engine_metrics_url=url + "/metrics")
    try:
        await ext.start()
        await ext.sample(0.0)
        await ext.sample(2.0)                                            # within 5 s of the last read: no request
        assert len(served) == 1
        sample = await ext.sample(5.0)
        assert len(served) == 2
        assert sample["bytes_per_second"] == pytest.approx(8e5)          # 4e6 B / 5 s
    finally:
        await ext.close()
        await runner.cleanup()


async def test_nixl_telemetry_exporter_over_http(data_dir):
    base = (data_dir / "kv_nixl_telemetry.txt").read_text()
    texts = [base, base.replace("agent_tx_bytes_total{agent_name=\"prefill-0\",hostname=\"node-a\"} 5.0e+09",
                                "agent_tx_bytes_total{agent_name=\"prefill-0\",hostname=\"node-a\"} 5.3e+09")]
    runner, url = await _serve(lambda: texts.pop(0) if texts else "")
    ext = ext_for("send", connector_url=url + "/metrics")
    try:
        await ext.start()
        await ext.sample(0.0)
        sample = await ext.sample(3.0)
        engine = sample["sources"]["engine"]
        assert engine["connector"] == "nixl_telemetry"
        assert engine["bytes_per_second"] == pytest.approx(1e8)          # 3e8 B / 3 s
        assert engine["send_bytes_per_second"] == pytest.approx(1e8)
        assert engine["receive_bytes_per_second"] == pytest.approx(0.0)  # moved before: a real 0
        await ext.sample(4.0)                                            # empty page: counted, not fatal
        assert (await ext.sample(4.5))["errors"]["empty"] >= 1
    finally:
        await ext.close()
        await runner.cleanup()


async def test_unreachable_exporter_is_counted(unused_port):
    ext = ext_for("send", connector_url=f"http://127.0.0.1:{unused_port}/metrics")
    try:
        await ext.start()
        sample = await ext.sample(0.0)
        assert sample["errors"] == {"connect": 1} and "engine" not in sample["sources"]
    finally:
        await ext.close()


def test_flags_through_the_real_agent_parser(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123\n")
    args = agent_parser().parse_args([
        "--engine", "vllm", "--engine-url", "http://127.0.0.1:8000", "--role", "prefill", "--service", "chat",
        "--pod", "p0", "--probe-peers", "d0=10.0.0.2:9401,10.0.0.3:9401", "--probe-secret-file", str(secret),
        "--probe-bytes", "1048576", "--rdma-devices", "mlx5_0,mlx5_1", "--kv-window-s", "20"])
    s = extension.settings_from_args(args)
    assert s.direction == "send" and s.window_s == 20
    assert [p.address for p in s.probe_client.peers] == ["10.0.0.2:9401", "10.0.0.3:9401"]
    assert s.probe_client.peers[0].name == "d0"
    assert s.rdma.devices == ("mlx5_0", "mlx5_1")
    assert s.engine_metrics_url == "http://127.0.0.1:8000/metrics"
    assert s.probe_secret == b"0123456789abcdef0123" and s.probe_server is None
    (ext,) = build_extensions(args)
    assert isinstance(ext, SidecarExtension) and ext.name == "kv_transfer"


def test_every_flag_problem_at_once(tmp_path):
    args = agent_parser().parse_args([
        "--engine", "vllm", "--engine-url", "http://x", "--role", "decode", "--service", "s",
        "--probe-listen", "nonsense", "--probe-peers", "bad-peer", "--kv-window-s", "0",
        "--kv-connector-url", "ftp://x"])
    with pytest.raises(ConfigError) as err:
        extension.settings_from_args(args)
    text = " | ".join(err.value.problems)
    assert "--kv-window-s" in text and "--kv-connector-url" in text and "--probe-secret-file" in text
    assert "--probe-peers" in text and "--probe-listen" in text


def test_probe_server_flags_reach_its_settings_and_are_checked(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123\n")
    common = ["--engine", "vllm", "--engine-url", "http://x", "--role", "decode", "--service", "s",
              "--probe-listen", "0.0.0.0:9401", "--probe-secret-file", str(secret), "--pod", "decode-3"]
    s = extension.settings_from_args(agent_parser().parse_args(common + [
        "--probe-server-max-rate", "16777216", "--probe-server-min-rate", "1048576", "--probe-auth-timeout-s", "1.5",
        "--probe-server-max-pending", "32", "--probe-server-max-pending-per-peer", "2"]))
    server = s.probe_server
    assert (server.name, server.max_bytes_per_s, server.peer_bytes_per_s) == ("decode-3", 16 * MIB, 4 * MIB)  # 1/4
    assert (server.min_bytes_per_s, server.auth_timeout_s, server.max_pending, server.max_pending_per_peer) == (
        MIB, 1.5, 32, 2)
    assert extension.settings_from_args(agent_parser().parse_args(
        common + ["--probe-server-peer-rate", "1000"])).probe_server.peer_bytes_per_s == 1000
    with pytest.raises(ConfigError) as err:
        extension.settings_from_args(agent_parser().parse_args(common + [
            "--probe-server-max-pending", "4", "--probe-server-max-pending-per-peer", "8",
            "--probe-auth-timeout-s", "0"]))
    text = " | ".join(err.value.problems)
    assert "max_pending_per_peer cannot exceed max_pending" in text and "timeouts" in text


def test_observe_engine_page_helper_skips_extensions_without_the_hook():
    seen = []

    class Observer:
        name = "o"

        def observe_engine_page(self, text, now_s):
            seen.append((text, now_s))

    class Broken:
        name = "b"

        def observe_engine_page(self, text, now_s):
            raise RuntimeError("bug")

    observe_engine_page([object(), Broken(), Observer()], "page\n", 3.0)
    assert seen == [("page\n", 3.0)]


async def test_probe_server_and_client_extensions_on_loopback(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("a-long-enough-shared-secret\n")
    decode_args = agent_parser().parse_args([
        "--engine", "vllm", "--engine-url", "http://127.0.0.1:1", "--role", "decode", "--service", "s",
        "--pod", "decode-7", "--probe-listen", "127.0.0.1:0", "--probe-secret-file", str(secret), "--no-rdma"])
    decode = extension.build(decode_args)
    await decode.start()
    try:
        prefill_args = agent_parser().parse_args([
            "--engine", "vllm", "--engine-url", "http://127.0.0.1:1", "--role", "prefill", "--service", "s",
            "--pod", "prefill-1", "--probe-peers", f"127.0.0.1:{decode.probe_server_port}",
            "--probe-secret-file", str(secret), "--probe-bytes", str(2 * 1024 * 1024), "--no-rdma"])
        prefill = extension.build(prefill_args, schedule_probes=False)
        await prefill.start()
        try:
            await prefill.probe_runner.probe_all()
            sample = await prefill.sample(1.0)
            (peer,) = sample["probe"]["peers"]
            assert peer["peer"] == "decode-7" and peer["bytes_per_second"] > 0 and peer["rtt_s"] > 0
            assert sample["sources"]["probe"]["bytes_per_second"] == peer["bytes_per_second"]
            assert sample["bytes_per_second"] is None      # the probe is capacity, never the headline
            m = metrics_of(prefill)
            assert m["heteroscale_kv_transfer_probe_bytes_per_second"][0][0] == {"peer": "decode-7"}
            assert ("probe", peer["bytes_per_second"]) in view_kv(sample, default_direction="send")[0]
        finally:
            await prefill.close()
        server_doc = (await decode.sample(2.0))["probe"]["server"]
        assert server_doc == {"name": "decode-7", "probes": 1, "bytes_received": 2 * 1024 * 1024, "refusals": {},
                              "pending": 0, "active": 0}
    finally:
        await decode.close()


async def test_inside_the_real_agent_against_a_real_engine_server():
    """The real Agent, its real extension seam and a real engine page server on 127.0.0.1."""
    import aiohttp

    from heteroscale.sidecar.agent import Agent, settings_from_args as agent_settings
    from tests.test_sidecar_fakes import FakeEngine, vllm_page

    engine = await FakeEngine(page=vllm_page(gen=0.0)).start()
    t = [1000.0]
    try:
        args = agent_parser().parse_args(["--engine", "vllm", "--engine-url", engine.url, "--role", "decode",
                                          "--service", "chat", "--pod", "decode-0", "--gpu-source", "none",
                                          "--no-rdma", "--interval", "60", "--window", "120"])
        # (a long interval: the agent's own loop runs its first cycle at start and no other,
        # so the cycles below are the only ones that stamp pages on the test's clock)
        (ext,) = build_extensions(args)
        async with aiohttp.ClientSession() as session:
            agent = Agent(agent_settings(args), session=session, clock=lambda: t[0], extensions=[ext])
            await agent.start()
            try:
                for i in range(3):
                    # 5e6 bytes of KV received per second, on top of an ordinary vLLM page.
                    engine.page = vllm_page(gen=100.0 * i) + nixl_page(bytes_sum=5e6 * i, count=1 + i,
                                                                       time_sum=0.01 * (1 + i), failed=0)
                    await agent.cycle()
                    t[0] += 1.0
                t[0] -= 1.0
                # The agent handed its pages over: no second scrape of the engine.
                assert ext.engine_pages_from_agent
                # Only the very first cycle can race ahead of the first handed page.
                assert ext.self_scrapes <= 1
                report = agent.report()
                assert report.kv_transfer["bytes_per_second"] == pytest.approx(5e6)
                assert report.kv_transfer["source"] == "engine" and report.kv_transfer["direction"] == "receive"
                view = agent.metrics_view()
                assert (view.kv_sources, view.kv_direction) == ((("engine", pytest.approx(5e6)),), "receive")
            finally:
                await agent.stop()
    finally:
        await engine.close()
