"""The status page in real headless Chromium: with a fixed status document, and while a real demo runs.

Starts Debian's ``chromium`` (installed by scripts/test-deps.sh) with the DevTools
protocol on a loopback port and drives it over its websocket with aiohttp.

* The coordinator page against a fixed ``/api/v1/status`` document (served with the real
  static files): every source is labelled, excluded reports show their reasons, the
  Deployment Groups show tier, draining and the GPUs they hold, the KV-transfer section
  shows the engine-connector figures, and a document without those newer fields still
  renders.
* ``heteroscale demo`` for real: the demo panel (``/demo``) and the coordinator page
  embedded in it load, their canvas charts draw lines (pixels of the series colours,
  not just titles), both update on one clock (the same coordinator tick), the frame is
  as tall as its page (no blank space under it), and the demo's real KV bytes show in
  the KV-transfer section. Saves a screenshot; to refresh the one in docs/, run a default
  demo and shoot it at its peak:

      HETEROSCALE_SCREENSHOT=docs/status-page.png HETEROSCALE_SCREENSHOT_DEMO="" \
      HETEROSCALE_SCREENSHOT_AT_S=85 .venv/bin/python -m pytest tests/test_status_browser.py -k draws
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from heteroscale.net import free_ports

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test-deps.sh)")]

# How many pixels of a colour a canvas holds (series colours from demo.html / app.js).
PIXELS_OF = """
(function (canvas, rgb) {
  if (!canvas || !canvas.width || !canvas.height) return 0;
  const ctx = canvas.getContext("2d");
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (Math.abs(data[i] - rgb[0]) < 40 && Math.abs(data[i + 1] - rgb[1]) < 40
        && Math.abs(data[i + 2] - rgb[2]) < 40 && data[i + 3] > 100) n++;
  }
  return n;
})
"""

PAGE_STATE = f"""
(function () {{
 try {{
  const px = {PIXELS_OF};
  const frame = document.getElementById("coordinator");
  const inner = frame && frame.contentDocument;
  const innerCanvases = inner ? Array.from(inner.querySelectorAll("canvas")) : [];
  return JSON.stringify({{
    updates: Number(document.body.dataset.updates || 0),
    meta: document.getElementById("meta").textContent,
    gpuDecodePixels: px(document.getElementById("c-gpu"), [43, 111, 217]),
    instancePixels: px(document.getElementById("c-inst"), [217, 130, 43]),
    tiles: document.querySelectorAll("#tiles .kv").length,
    coordinatorCards: inner ? inner.querySelectorAll("#services .card").length : -1,
    coordinatorTpsPixels: innerCanvases.length ? px(innerCanvases[0], [26, 156, 91]) : -1,
    coordinatorUpdated: inner && inner.getElementById("updated") ? inner.getElementById("updated").textContent : "",
    coordinatorTicks: inner && inner.getElementById("meta") ? inner.getElementById("meta").textContent : "",
    demoTick: document.body.dataset.tick || "",
    frameTick: inner && inner.body ? (inner.body.dataset.tick || "") : "",
    poolsTile: (Array.from(document.querySelectorAll("#tiles .kv")).find((t) => t.textContent.startsWith("pools")) || {{}}).textContent || "",
    cardPools: inner ? Array.from(inner.querySelectorAll("#services .card .row .kv")).slice(0, 2).map((k) => k.textContent) : [],
    frameHeight: frame ? frame.getBoundingClientRect().height : 0,
    innerHeight: inner && inner.body ? inner.body.scrollHeight : 0,
    blankBelow: frame ? document.body.getBoundingClientRect().bottom - frame.getBoundingClientRect().bottom : -1,
    tiers: inner ? Array.from(inner.querySelectorAll("table.groups tr td:nth-child(3)")).map((td) => td.textContent) : [],
    kvRows: inner ? inner.querySelectorAll("#kv-connector tr").length - 1 : -1,
    kvText: inner && inner.getElementById("kv-connector") ? inner.getElementById("kv-connector").textContent : "",
    bandwidthText: inner && inner.getElementById("kv-bandwidth") ? inner.getElementById("kv-bandwidth").textContent : "",
    gpuNote: inner && inner.getElementById("gpu-note") ? inner.getElementById("gpu-note").textContent : "",
  }});
 }} catch (err) {{ return JSON.stringify({{error: String(err), updates: 0}}); }}
}})()
"""


class DevTools:
    """A minimal DevTools-protocol client over one page websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 30)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


async def _page_ws(session: aiohttp.ClientSession, port: int, url: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json(content_type=None)
            for target in targets:
                if target.get("type") == "page" and target.get("url", "").startswith(url):
                    return target["webSocketDebuggerUrl"]
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.3)
    raise AssertionError("chromium did not expose the page over DevTools")


async def _until(tools: DevTools, check, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    state: dict = {}
    while time.monotonic() < deadline:
        state = json.loads(await tools.evaluate(PAGE_STATE))
        if check(state):
            return state
        await asyncio.sleep(1.0)
    raise AssertionError(f"page never reached the expected state: {state}")


class Chromium:
    """Headless Debian chromium on one page, driven over DevTools (``async with``)."""

    def __init__(self, url: str, profile: Path, *, window: str = "1400,1900") -> None:
        self.url = url
        self.profile = profile
        self.window = window
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws = None

    async def __aenter__(self) -> DevTools:
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
             f"--remote-debugging-port={self.port}", "--remote-allow-origins=*",
             f"--window-size={self.window}", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.session = aiohttp.ClientSession()
        ws_url = await _page_ws(self.session, self.port, self.url)
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=64 * 2**20)
        tools = DevTools(self.ws)
        await tools.call("Runtime.enable")
        return tools

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# ---------------------------------------------------------------- a fixed status document

def _status_doc(*, newer_fields: bool) -> dict:
    group = {"name": "chat-g1", "service": "chat", "level": "s2", "s2": "pod-a", "s1": "",
             "prefill": {"gpu_type": "NVIDIA-L20", "count": 3}, "decode": {"gpu_type": "NVIDIA-H20", "count": 1}}
    svc = {
        "name": "chat", "namespace": "default",
        "prefill": {"current": 3, "desired": 3, "ready": 3, "pending": 0},
        "decode": {"current": 1, "desired": 1, "ready": 1, "pending": 0},
        "decode_tps": 420.0, "smoothed_decode_tps": 410.0, "target_decode_tps_per_instance": 497.0,
        "capacity_tps": 497.0, "pd_ratio": "3:1", "bounds": {"min_decode": 1, "max_decode": 4},
        "slo": {"ttft_s": 4.5, "tbt_s": 0.05},
        "latency": {"tbt_p90_s": 0.0381, "ttft_p90_s": 2.2, "tbt_p90_max_s": 0.04, "ttft_p90_max_s": 2.5},
        "reports": {"fresh_decode": 1, "expected_decode": 2, "fresh_prefill": 3, "expected_prefill": 3,
                    "warming_decode": 1, "excluded": {"too_old": 1, "warming": 1}},
        "last_decision": None, "decisions": [], "last_apply": None, "last_error": None,
        "manual_override": False, "placement_shortfall": None, "kv_bandwidth": None, "history": [],
        "groups": [group],
    }
    if newer_fields:
        svc["groups"] = [dict(group, tier="medium", draining=2, draining_by_role={"prefill": 1, "decode": 1},
                              gpus=10, gpus_draining=3)]
        svc["kv_transfer"] = {"send_bytes_per_second": 1.5e9, "receive_bytes_per_second": 1.5e9, "instances": [
            {"pod": "chat-p0", "role": "prefill", "direction": "send", "source": "engine", "connector": "vllm_nixl",
             "bytes_per_second": 1.5e9, "transfers_per_second": 2.0, "latency_p90_s": 0.012, "window_s": 5.0},
            {"pod": "chat-d1", "role": "decode", "direction": "receive", "source": "engine",
             "connector": "vllm_nixl", "bytes_per_second": 1.5e9, "transfers_per_second": 2.0,
             "latency_p90_s": None, "window_s": 5.0}]}

        def pair(p, d, group, bps, flagged=False):
            return {"prefill": p, "decode": d, "source": "engine_connector", "bytes_per_second": bps, "rtt_s": None,
                    "age_s": 1.0, "locality": "cross_switch", "shared_domain": "s2", "group": group, "error": None,
                    "reference_bytes_per_second": 24.4e6, "flagged": flagged,
                    "reason": "25% of the median of 2 other pair(s) (cross_switch)" if flagged else None}
        # a degraded link (heteroscale demo --degrade-link pod-b): the flagged pair is listed first
        svc["kv_bandwidth"] = {
            "service": "chat", "pairs": [pair("chat-p0", "chat-d1", "chat-g0", 24.4e6),
                                         pair("chat-p2", "chat-d1", "chat-g0", 24.4e6),
                                         pair("chat-p5", "chat-d6", "chat-g1", 6.1e6, flagged=True)],
            "same_switch_median_bytes_per_second": None, "cross_switch_median_bytes_per_second": 24.4e6,
            "cross_to_same_ratio": None,
            "groups": [{"group": "chat-g0", "pairs": 2, "median_bytes_per_second": 24.4e6},
                       {"group": "chat-g1", "pairs": 1, "median_bytes_per_second": 6.1e6}],
            "flagged": [{"prefill": "chat-p5", "decode": "chat-d6", "reason": "25% of the median"}],
            "stale": 0, "malformed": 0}
    return {"leader": True, "identity": "test", "backend": "local", "dry_run": False, "writes": True,
            "interval_s": 1.0, "ticks": 42, "last_tick_duration_s": 0.01, "now": time.time(), "services": [svc]}


CARD_STATE = """
(function () {
  const card = document.querySelector("#services .card");
  if (!card) return JSON.stringify({ready: false});
  const keys = Array.from(card.querySelectorAll(".kv")).map((k) => [k.querySelector(".k").textContent, k.title || ""]);
  return JSON.stringify({
    ready: true,
    keys,
    text: card.textContent,
    tiers: Array.from(card.querySelectorAll("table.groups tr td:nth-child(3)")).map((td) => td.textContent),
    draining: Array.from(card.querySelectorAll("table.groups tr td:nth-child(6)")).map((td) => td.textContent),
    gpuNote: (card.querySelector("#gpu-note") || {}).textContent || "",
    kvRows: card.querySelectorAll("#kv-connector tr").length - 1,
    bandwidthRows: Array.from(card.querySelectorAll("#kv-bandwidth tr")).slice(1).map((tr) =>
      [tr.className, ...Array.from(tr.querySelectorAll("td")).map((td) => td.textContent)]),
    bandwidthText: (card.querySelector("#kv-bandwidth") || {}).textContent || "",
    tick: document.body.dataset.tick || "",
  });
})()
"""


async def _card(tools: DevTools, *, after_tick: str = "") -> dict:
    deadline = time.monotonic() + 30
    state = {"ready": False}
    while time.monotonic() < deadline:
        state = json.loads(await tools.evaluate(CARD_STATE))
        if state["ready"] and state["tick"] != after_tick:
            return state
        await asyncio.sleep(0.3)
    raise AssertionError(f"the card never rendered: {state}")


async def test_status_page_labels_sources_and_explains_what_it_counts(tmp_path):
    """One browser, two documents: with the fields the local backend and the demo add, then
    an older document without them, which must still render."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from heteroscale.coordinator.status import STATIC_DIR

    served = {"doc": _status_doc(newer_fields=True)}

    async def index(request):
        return web.FileResponse(STATIC_DIR / "index.html")

    async def status(request):
        return web.json_response(served["doc"])

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/v1/status", status)
    app.router.add_static("/static/", STATIC_DIR)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with Chromium(f"http://127.0.0.1:{server.port}/", tmp_path / "profile") as tools:
            newer = await _card(tools)
            older_doc = _status_doc(newer_fields=False)
            older_doc["ticks"] = 43
            served["doc"] = older_doc
            await tools.evaluate("refresh()")
            older = await _card(tools, after_tick=newer["tick"])
    finally:
        await server.close()
    for state in (newer, older):
        keys = dict(state["keys"])
        # the coordinator's latencies say where they come from (the demo tiles say "clients")
        assert "TBT p90 (engines) / SLO" in keys and "inter-token-latency histogram" in keys["TBT p90 (engines) / SLO"]
        assert "TTFT p90 (engines) / SLO" in keys
        # "1 / 2" fresh reports, and why the other one was left out
        assert "excluded: too old 1, warming 1" in state["text"]
    assert newer["tick"] == "42" and older["tick"] == "43"
    assert newer["tiers"] == ["medium"] and newer["draining"] == ["2 (1P 1D)"]
    assert newer["gpuNote"].startswith("GPUs held: 10 = 7 by the pools + 3 by draining instances")
    assert newer["kvRows"] == 2 and "engine: vllm_nixl" in newer["text"]
    assert "1.50 GB/s sent" in newer["text"] and "12 ms" in newer["text"]
    # the bandwidth map: flagged pair first and red, its source, group and rate, the DG medians
    first, *rest = newer["bandwidthRows"]
    assert first[:7] == ["err", "chat-p5", "chat-d6", "chat-g1", "cross_switch", "engine connector", "6.10 MB/s"]
    assert "25% of the median" in first[-1] and [r[0] for r in rest] == ["", ""]
    assert "3 pair(s)" in newer["bandwidthText"] and "1 flagged" in newer["bandwidthText"]
    assert "median per Deployment Group: chat-g0 24.40 MB/s, chat-g1 6.10 MB/s" in newer["bandwidthText"]
    # a document without the newer fields still renders, with dashes where they would be
    assert older["tiers"] == ["–"] and older["draining"] == ["–"] and not older["gpuNote"]
    assert older["kvRows"] == -1
    assert "No KV-transfer probes or engine connector metrics reported." in older["text"]


# ---------------------------------------------------------------- a real demo

async def test_status_page_loads_draws_and_updates_in_chromium(tmp_path):
    demo_port = free_ports(1)[0]
    flags = os.environ.get("HETEROSCALE_SCREENSHOT_DEMO", "--duration 90 --max-instances 10 --startup-delay 1").split()
    demo = subprocess.Popen([sys.executable, "-m", "heteroscale", "demo", *flags, "--listen", f"127.0.0.1:{demo_port}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving:" not in line and time.monotonic() < deadline:
            line = await asyncio.to_thread(demo.stdout.readline)
            assert line, "the demo ended before serving"
        url = f"http://127.0.0.1:{demo_port}/demo"
        async with Chromium(url, tmp_path / "profile") as tools:
            first = await _until(tools, lambda s: s["updates"] >= 2 and s["coordinatorCards"] >= 1
                                 and s["gpuDecodePixels"] > 30 and s["instancePixels"] > 30
                                 and s["coordinatorTpsPixels"] > 30 and s["kvRows"] > 0, 90)
            assert first["tiles"] == 7
            await asyncio.sleep(7)
            later = json.loads(await tools.evaluate(PAGE_STATE))
            assert later["updates"] > first["updates"]
            assert later["meta"] != first["meta"]                         # elapsed time and requests moved on
            assert later["coordinatorTicks"] != first["coordinatorTicks"]  # the embedded page refreshed too
            for state in (first, later):
                # one clock: the tiles and the embedded card drew the same coordinator tick...
                assert state["demoTick"] and state["demoTick"] == state["frameTick"], state
                assert f"tick {state['demoTick']}" in state["poolsTile"]
                # ...so the pools tile and the card's pools agree
                prefill, decode = (k.split("desired", 1)[1].replace("→", " ").split() for k in state["cardPools"])
                assert f"{prefill[0]}P{decode[0]}D → {prefill[1]}P{decode[1]}D" in state["poolsTile"], state
                # the frame is as tall as the page it holds, with no blank space under it
                assert abs(state["frameHeight"] - state["innerHeight"]) <= 8, state
                assert 0 <= state["blankBelow"] < 40, state
                # Deployment Groups show their tier; the demo's real KV bytes show as connector figures
                assert state["tiers"] and "–" not in state["tiers"], state
                assert "engine: vllm_nixl" in state["kvText"]
            # the bandwidth map from the engines' connector metrics: the DG's pairs, all healthy
            assert "engine connector" in later["bandwidthText"] and "0 flagged" in later["bandwidthText"], later
            started = time.monotonic()
            shoot_at = float(os.environ.get("HETEROSCALE_SCREENSHOT_AT_S", "0"))
            if shoot_at:
                await asyncio.sleep(max(0.0, shoot_at - (time.monotonic() - started)))
            shot = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        png = base64.b64decode(shot["data"])
        assert png.startswith(b"\x89PNG") and len(png) > 20_000
        (tmp_path / "status-page.png").write_bytes(png)
        target = os.environ.get("HETEROSCALE_SCREENSHOT")
        if target:
            Path(target).write_bytes(png)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
