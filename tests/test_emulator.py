"""The engine emulator: vLLM's exact page format, the OpenAI API, the P/D KV push, modelled GPUs.

Real HTTP servers on 127.0.0.1 (aiohttp's TestServer), the real prometheus_client
parser, a real TCP KV transfer between two emulators. The emulators run with a high
speed-up so modelled seconds take milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from heteroscale.demo.emulator.model import EmulatorSettings
from heteroscale.demo.emulator.page import ITL_BUCKETS, TTFT_BUCKETS, request_token_buckets
from heteroscale.demo.emulator.server import EmulatorServer
from heteroscale.simulator import perfmodel
from heteroscale.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
FAST = dict(speedup=1000.0, tick_s=0.002, stream_interval_s=0.001, kv_wait_timeout_s=2.0)

# Families a vLLM 0.32 single-API-server page carries (ENGINES.md §1.2), by parser name.
VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_waiting_by_reason": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    "vllm:prompt_tokens_by_source": "counter", "vllm:request_success": "counter",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:iteration_tokens_total": "histogram",
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
    "vllm:nixl_bytes_transferred": "histogram", "vllm:nixl_xfer_time_seconds": "histogram",
    "vllm:nixl_num_failed_transfers": "counter",
}


def settings(role_name: str, **kw) -> EmulatorSettings:
    base = dict(role=role_name, gpu="H20", model="8b", port=0, served_model_name="demo-model", **FAST)
    base.update(kw)
    return EmulatorSettings(**base)


class Running:
    """An emulator behind a real loopback HTTP server."""

    def __init__(self, s: EmulatorSettings) -> None:
        self.emulator = EmulatorServer(s)
        self.server = TestServer(self.emulator.app(), host="127.0.0.1")

    async def __aenter__(self) -> "Running":
        await self.server.start_server()
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        await self.server.close()

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def metrics(self) -> dict[str, dict]:
        async with self.session.get(self.url("/metrics")) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
        return {f.name: f for f in text_string_to_metric_families(text)}, text


def sample(families: dict, family: str, name: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{name} {labels}")


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[list[dict], int]:
    chunks, usage = [], 0
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        saw_done = False
        async for line in resp.content:
            line = line.strip()
            if not line:
                continue
            assert line.startswith(b"data: ")
            if line == b"data: [DONE]":
                saw_done = True
                continue
            doc = json.loads(line[6:])
            if doc.get("usage") and not doc["choices"]:
                usage = doc["usage"]["completion_tokens"]
            else:
                chunks.append(doc)
        assert saw_done
    return chunks, usage


def test_request_token_buckets_match_vllm():
    # ENGINES.md §1.2: 32768 -> 1, 2, 5, ..., 20000
    assert request_token_buckets(32768) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


@pytest.mark.parametrize("bad, needle", [
    (dict(role="router"), "--role"),
    (dict(gpu="B200"), "unknown GPU type"),
    (dict(model="405b"), "unknown model"),
    (dict(model="70b", gpu="L20"), "does not fit"),
    (dict(speedup=0.0), "--speedup"),
    (dict(tick_s=0.0), "tick_s"),
])
def test_bad_settings_are_usage_errors(bad, needle):
    with pytest.raises(UsageError, match=needle):
        settings("decode", **bad)


async def test_metrics_page_is_vllm_format_before_any_request():
    async with Running(settings("decode")) as emu:
        families, text = await emu.metrics()
    for name, kind in VLLM_FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
    # Counters are exposed with _total and have _created companions (single API server).
    assert 'vllm:generation_tokens_total{engine="0",model_name="demo-model"} 0.0' in text
    assert "vllm:generation_tokens_created{" in text
    # Histogram buckets are vLLM's defaults, le formatted Go-style.
    ttft = [s.labels["le"] for s in families["vllm:time_to_first_token_seconds"].samples
            if s.name.endswith("_bucket")]
    assert ttft == [repr(float(b)) for b in TTFT_BUCKETS] + ["+Inf"]
    itl = [float(s.labels["le"]) for s in families["vllm:inter_token_latency_seconds"].samples
           if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    assert itl == list(ITL_BUCKETS)
    assert 'le="8.589934592e+09"' in text          # NIXL bytes buckets reach 2^33
    for fam in families.values():
        for s in fam.samples:
            if s.name.startswith("vllm:") and "admission" not in s.name and "cache_config" not in s.name:
                assert s.labels.get("model_name") == "demo-model" and s.labels.get("engine") == "0", s


async def test_streaming_completion_counts_every_token():
    async with Running(settings("decode")) as emu:
        chunks, usage = await stream_completion(emu.session, emu.url("/v1/completions"), {
            "model": "demo-model", "prompt": "hello " * 40, "max_tokens": 37, "stream": True,
            "stream_options": {"include_usage": True}})
        families, _ = await emu.metrics()
    text_tokens = sum(len(c["choices"][0]["text"].split()) for c in chunks)
    assert text_tokens == usage == 37
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sample(families, "vllm:generation_tokens", "vllm:generation_tokens_total") == 37
    assert sample(families, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == 40
    assert sample(families, "vllm:request_success", "vllm:request_success_total", finished_reason="length") == 1
    assert sample(families, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1
    # one inter-token latency per generated token step
    assert sample(families, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == 37
    assert sample(families, "vllm:num_requests_running", "vllm:num_requests_running") == 0


async def test_non_streaming_completion_and_models():
    async with Running(settings("prefill", gpu="L20")) as emu:
        async with emu.session.post(emu.url("/v1/completions"),
                                    json={"prompt": [5] * 12, "max_tokens": 3}) as resp:
            doc = await resp.json()
        async with emu.session.get(emu.url("/v1/models")) as resp:
            models = await resp.json()
    assert doc["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert doc["choices"][0]["finish_reason"] == "length"
    assert models["data"][0]["id"] == "demo-model"


async def test_pd_flow_moves_real_kv_bytes_over_tcp():
    """Prefill pushes the KV to decode's KV port; both count the same real bytes."""
    async with Running(settings("decode")) as dec, Running(settings("prefill", gpu="L20")) as pre:
        kv_port = dec.emulator.kv_port
        prompt = [7] * 300
        async with pre.session.post(pre.url("/v1/completions"), json={
                "prompt": prompt, "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True, "remote_host": "127.0.0.1",
                                       "remote_port": kv_port}}) as resp:
            assert resp.status == 200
            first = await resp.json()
        params = first["kv_transfer_params"]
        assert params["do_remote_prefill"] is True
        chunks, usage = await stream_completion(dec.session, dec.url("/v1/completions"), {
            "prompt": prompt, "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True},
            "kv_transfer_params": params})
        d_fam, _ = await dec.metrics()
        p_fam, _ = await pre.metrics()
    # 300 tokens × 128 KiB (8b KV per token) / 1024 = 38,400 bytes actually sent
    expected = 300 * perfmodel.kv_bytes_per_token(perfmodel.model("8b")) // 1024
    assert expected == 38400
    for fam in (d_fam, p_fam):
        assert sample(fam, "vllm:nixl_bytes_transferred", "vllm:nixl_bytes_transferred_sum") == expected
        assert sample(fam, "vllm:nixl_bytes_transferred", "vllm:nixl_bytes_transferred_count") == 1
    assert usage == 20
    assert sample(d_fam, "vllm:prompt_tokens_by_source", "vllm:prompt_tokens_by_source_total",
                  source="external_kv_transfer") == 300
    assert sample(d_fam, "vllm:prompt_tokens_by_source", "vllm:prompt_tokens_by_source_total",
                  source="local_compute") == 0
    assert sample(p_fam, "vllm:prompt_tokens_by_source", "vllm:prompt_tokens_by_source_total",
                  source="local_compute") == 300
    assert sample(d_fam, "vllm:generation_tokens", "vllm:generation_tokens_total") == 20
    assert sample(p_fam, "vllm:generation_tokens", "vllm:generation_tokens_total") == 1


@pytest.mark.parametrize("body, status, needle", [
    ("not json", 400, "not valid JSON"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "model": "other"}, 404, "does not exist"),
    ({"prompt": [1] * 40000, "max_tokens": 1}, 400, "maximum context length"),
    ({"prompt": "x", "kv_transfer_params": {"do_remote_decode": True}}, 400, "remote_host"),
    ({"prompt": "x", "kv_transfer_params": "yes"}, 400, "kv_transfer_params"),
])
async def test_bad_requests_get_openai_errors(body, status, needle):
    async with Running(settings("decode")) as emu:
        data = body if isinstance(body, str) else json.dumps(body)
        async with emu.session.post(emu.url("/v1/completions"), data=data) as resp:
            assert resp.status == status
            doc = await resp.json()
    assert needle in doc["error"]["message"]


async def test_missing_kv_transfer_fails_the_request_not_the_engine():
    async with Running(settings("decode", kv_wait_timeout_s=0.2)) as emu:
        async with emu.session.post(emu.url("/v1/completions"), json={
                "prompt": "a b c", "max_tokens": 4,
                "kv_transfer_params": {"do_remote_prefill": True, "transfer_id": "never-sent"}}) as resp:
            assert resp.status == 503
        families, _ = await emu.metrics()
        async with emu.session.get(emu.url("/health")) as resp:
            assert resp.status == 200
    assert sample(families, "vllm:request_success", "vllm:request_success_total", finished_reason="error") == 1


async def test_push_to_a_closed_kv_port_is_counted_as_failed_transfer():
    async with Running(settings("prefill", gpu="L20")) as pre:
        from tests.conftest import free_port
        async with pre.session.post(pre.url("/v1/completions"), json={
                "prompt": "a b c", "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True, "remote_host": "127.0.0.1",
                                       "remote_port": free_port()}}) as resp:
            assert resp.status == 503
        families, _ = await pre.metrics()
    assert sample(families, "vllm:nixl_num_failed_transfers", "vllm:nixl_num_failed_transfers_total") == 1


async def test_modelled_gpu_readings_follow_the_paper_signals():
    """Decode: any traffic keeps utilisation high; idle prefill reads zero."""
    async with Running(settings("decode", speedup=50.0)) as dec, \
            Running(settings("prefill", gpu="L20", speedup=50.0)) as pre:
        body = {"prompt": "w " * 100, "max_tokens": 400, "stream": True}
        await asyncio.gather(*(stream_completion(dec.session, dec.url("/v1/completions"), body)
                               for _ in range(2)))
        async with dec.session.get(dec.url("/emulator/gpu")) as resp:
            d = await resp.json()
        async with pre.session.get(pre.url("/emulator/gpu")) as resp:
            p = await resp.json()
    assert d["source"] == "emulator" and d["gpu_type"] == "H20"
    (reading,) = d["gpus"]
    assert set(reading) == {"gpu", "utilization_ratio", "sm_activity_ratio", "memory_used_bytes", "power_watts"}
    assert reading["utilization_ratio"] > 0.0
    assert reading["sm_activity_ratio"] < reading["utilization_ratio"]   # memory-bound: SMs stall
    assert reading["memory_used_bytes"] == pytest.approx(96e9 * 0.9)       # vLLM preallocates
    assert p["gpus"][0]["utilization_ratio"] == 0.0


def test_decode_ticks_follow_the_perf_model():
    """One tick of a 2-request batch makes exactly the modelled number of steps."""
    m, g = perfmodel.model("8b"), perfmodel.gpu("H20")
    pair_step = perfmodel.decode_step_time_s(m, g, 1, 2, 200)       # both at 100 tokens of context
    alone_step = perfmodel.decode_step_time_s(m, g, 1, 1, 103)      # b after 3 steps

    async def scenario():
        from heteroscale.demo.emulator.model import Request
        engine = EmulatorServer(settings("decode", speedup=1.0)).engine
        a = Request(id="a", prompt_tokens=100, max_tokens=3, arrival_s=0.0)
        b = Request(id="b", prompt_tokens=100, max_tokens=50, arrival_s=0.0)
        engine.running = [a, b]
        return engine._advance(10.5 * pair_step)

    used, _, progress = asyncio.run(scenario())
    made = {req.id: tokens for req, tokens, _ in progress}
    # a finishes after 3 steps of the pair; b then runs alone for what is left of the budget
    alone = int((10.5 - 3) * pair_step / alone_step)
    assert made == {"a": 3, "b": 3 + alone}
    assert used == pytest.approx(3 * pair_step + alone * alone_step)
    assert used <= 10.5 * pair_step


def test_cli_bad_flag_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "heteroscale", "emulate-engine", "--role", "decode", "--gpu", "B300",
                           "--model", "8b", "--port", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "unknown GPU type" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_real_process_serves_and_stops_on_sigterm(unused_port):
    proc = subprocess.Popen([sys.executable, "-m", "heteroscale", "emulate-engine", "--role", "decode", "--gpu", "H20",
                             "--model", "8b", "--port", str(unused_port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "ready on" in line, line
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{unused_port}/metrics", timeout=5) as resp:
            assert b"vllm:num_requests_running" in resp.read()
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- modelled time and buckets

def _buckets(families: dict, family: str) -> list[float]:
    return sorted(float(s.labels["le"]) for s in families[family].samples
                  if s.name == f"{family}_bucket" and s.labels["le"] != "+Inf")


async def test_latency_histograms_are_in_modelled_seconds_at_any_speedup():
    """At a speed-up of 40 the page still shows the modelled step and prefill times."""
    m, g = perfmodel.model("8b"), perfmodel.gpu("H20")
    async with Running(settings("decode", speedup=40.0, tick_s=0.01, stream_interval_s=0.01)) as emu:
        await stream_completion(emu.session, emu.url("/v1/completions"),
                                {"prompt": [1] * 4000, "max_tokens": 60, "stream": True})
        families, _ = await emu.metrics()
    itl_sum = sample(families, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_sum")
    itl_count = sample(families, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count")
    # batch 1, context 4000..4060 tokens: every modelled step lies between these two
    low, high = (perfmodel.decode_step_time_s(m, g, 1, 1, c) for c in (4000, 4060))
    assert itl_count == 60
    assert low <= itl_sum / itl_count <= high            # not ÷ 40: modelled, not wall
    # TTFT covers at least the modelled prefill of 4,000 tokens (wall time would be 1/40 of it)
    ttft = sample(families, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_sum")
    assert ttft >= perfmodel.prefill_time_s(m, g, 1, 4000)


async def test_fine_latency_buckets_keep_vllms_and_resolve_the_slo_range():
    async with Running(settings("decode")) as vllm_emu, Running(settings("decode", latency_buckets="fine")) as fine_emu:
        vllm_page, _ = await vllm_emu.metrics()
        fine_page, _ = await fine_emu.metrics()
    for family, default in (("vllm:inter_token_latency_seconds", ITL_BUCKETS),
                            ("vllm:request_time_per_output_token_seconds", ITL_BUCKETS),
                            ("vllm:time_to_first_token_seconds", TTFT_BUCKETS)):
        assert _buckets(vllm_page, family) == list(default)              # the default is vLLM's, exactly
        fine = _buckets(fine_page, family)
        assert set(default) <= set(fine)                                  # every vLLM bound kept
    itl = _buckets(fine_page, "vllm:inter_token_latency_seconds")
    near = [b for b in itl if 0.02 <= b <= 0.1]
    assert max(b - a for a, b in zip(near, near[1:])) <= 0.0025 + 1e-9    # ≤ 2.5 ms around a 50 ms SLO
    ttft = _buckets(fine_page, "vllm:time_to_first_token_seconds")
    near = [b for b in ttft if 1.0 <= b <= 10.0]
    assert max(b - a for a, b in zip(near, near[1:])) <= 0.25 + 1e-9


def test_unknown_latency_buckets_are_a_usage_error():
    with pytest.raises(UsageError, match="--latency-buckets"):
        settings("decode", latency_buckets="coarse")


async def test_continuous_usage_stats_put_the_running_count_on_every_chunk():
    async with Running(settings("decode", speedup=20.0, tick_s=0.01, stream_interval_s=0.02)) as emu:
        chunks, usage = await stream_completion(emu.session, emu.url("/v1/completions"), {
            "prompt": [1] * 100, "max_tokens": 200, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        plain, _ = await stream_completion(emu.session, emu.url("/v1/completions"), {
            "prompt": [1] * 100, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    texts = [c["choices"][0]["text"].count(" tok") for c in chunks]
    assert len(chunks) > 2 and usage == 200
    assert counts == [sum(texts[: i + 1]) for i in range(len(texts))]     # a running count, chunk by chunk
    assert all("usage" not in c for c in plain)                           # only when asked for


@pytest.mark.parametrize("gpu, expected", [("L20", 2048), ("L40S", 2048), ("A100", 2048),
                                           ("H20", 8192), ("H100", 8192), ("H200", 8192)])
def test_prefill_budget_defaults_to_vllms_per_gpu_choice(gpu, expected):
    # vLLM's API server: 8192 tokens per step on >= 70 GiB GPUs except A100, else 2048
    assert settings("prefill", gpu=gpu, model="8b").max_num_batched_tokens == expected
    assert settings("prefill", gpu=gpu, model="8b", max_num_batched_tokens=512).max_num_batched_tokens == 512


def test_lane_model_clock_makes_up_late_wake_ups_within_bounds():
    from heteroscale.demo.emulator.model import lane_start
    # a pass ended at 10.00 s, the next request arrived at 9.90 s, the loop woke at 10.03 s
    assert lane_start(now_s=10.03, free_at_s=10.0, ready_at_s=9.9, catch_up_s=0.5) == 10.0
    # the work arrived after the lane went idle: it starts at its arrival, not at the wake-up
    assert lane_start(now_s=12.02, free_at_s=10.0, ready_at_s=12.0, catch_up_s=0.5) == 12.0
    # a stall longer than the bound is lost beyond 0.5 s
    assert lane_start(now_s=13.0, free_at_s=10.0, ready_at_s=9.9, catch_up_s=0.5) == 12.5
    # never in the future, nothing to make up on a fresh lane
    assert lane_start(now_s=5.0, free_at_s=6.0, ready_at_s=6.0, catch_up_s=0.5) == 5.0
    assert lane_start(now_s=5.0, free_at_s=None, ready_at_s=5.0, catch_up_s=0.5) == 5.0


# ---------------------------------------------------------------- the KV link model

def test_degraded_links_parse_match_and_multiply():
    from heteroscale.demo.emulator.links import parse_degraded_link, parse_location, slowdown, unknown_switches
    one = parse_degraded_link("pod-b")
    assert one.ends == ("pod-b",) and one.factor == 4.0
    pair = parse_degraded_link(" a-l20 , b-h20 :2.5")
    assert pair.ends == ("a-l20", "b-h20") and pair.factor == 2.5
    a, b, b2 = ("pod-a", "a-l20"), ("pod-b", "b-h20"), ("pod-b", "b-l20")
    assert slowdown([one], a, b) == 4.0 and slowdown([one], a, ("pod-a", "a-h20")) == 1.0
    assert slowdown([pair], a, b) == slowdown([pair], b, a) == 2.5 and slowdown([pair], b2, b) == 1.0
    assert slowdown([one, pair], a, b) == 10.0                      # two slow links on the path
    assert slowdown([one], None, b) == 1.0                          # an instance without a location
    assert parse_location("pod-a/a-l20") == a
    assert unknown_switches([one, pair], [a, b]) == []
    assert unknown_switches([parse_degraded_link("pod-z,a-l20")], [a]) == ["pod-z"]


@pytest.mark.parametrize("text, needle", [
    ("", "empty"), ("pod-b:1", "above 1"), ("pod-b:x", "must be a number"), ("a,b,c", "SWITCH,SWITCH"),
    ("a,a", "two different switches"), (":3", "SWITCH"), ("pod-b:inf", "above 1"),
])
def test_bad_degraded_links_say_why(text, needle):
    from heteroscale.demo.emulator.links import parse_degraded_link
    with pytest.raises(ValueError, match=needle):
        parse_degraded_link(text)


async def test_a_degraded_link_slows_the_transfers_crossing_it_at_both_ends():
    """The decode side paces each push to the modelled link; across the degraded link the
    NIXL histograms of both ends record FACTOR times the modelled time for the same bytes."""
    from heteroscale.demo.emulator.links import parse_degraded_link
    slow = (parse_degraded_link("a-l20,b-h20:4"),)
    async with Running(settings("decode", kv_location=("pod-b", "b-h20"), degraded_links=slow)) as dec, \
            Running(settings("prefill", gpu="L20", kv_location=("pod-a", "a-l20"), degraded_links=slow)) as far, \
            Running(settings("prefill", gpu="L20", kv_location=("pod-b", "b-l20"), degraded_links=slow)) as near:
        for pre in (far, near):
            async with pre.session.post(pre.url("/v1/completions"), json={
                    "prompt": [7] * 300, "max_tokens": 1,
                    "kv_transfer_params": {"do_remote_decode": True, "remote_host": "127.0.0.1",
                                           "remote_port": dec.emulator.kv_port}}) as resp:
                assert resp.status == 200, await resp.text()
        fams = {name: (await emu.metrics())[0] for name, emu in (("dec", dec), ("far", far), ("near", near))}
    modelled_s = 300 * perfmodel.kv_bytes_per_token(perfmodel.model("8b")) * 8 / 200e9   # 1.57 ms at 200 Gbit/s

    def xfer(name: str) -> float:
        return sample(fams[name], "vllm:nixl_xfer_time_seconds", "vllm:nixl_xfer_time_seconds_sum")

    assert xfer("near") == pytest.approx(modelled_s)
    assert xfer("far") == pytest.approx(4 * modelled_s)
    assert xfer("dec") == pytest.approx(5 * modelled_s)             # the decode end saw both
    for name in fams:
        assert sample(fams[name], "vllm:nixl_bytes_transferred", "vllm:nixl_bytes_transferred_count") == \
            (2 if name == "dec" else 1)


def test_bad_kv_link_flags_are_one_line_each_exit_2():
    proc = subprocess.run([sys.executable, "-m", "heteroscale", "emulate-engine", "--role", "decode", "--gpu", "H20",
                           "--model", "8b", "--port", "1", "--kv-location", "pod-a", "--degrade-link", "x:0"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()                 # one line per problem, both at once
    assert len(lines) == 2 and "--kv-location" in lines[0] and "--degrade-link" in lines[1]
    assert "Traceback" not in proc.stderr
