"""The live status page in real headless Chromium, while a real demo runs.

Starts ``heteroscale demo`` and Debian's ``chromium`` (installed by
scripts/test-deps.sh) with the DevTools protocol on a loopback port, and drives it
over its websocket with aiohttp: the demo panel (``/demo``) and the coordinator page
embedded in it load, their canvas charts draw lines (pixels of the series colours,
not just titles), and both update while the demo runs. Saves a screenshot; set
``HETEROSCALE_SCREENSHOT=docs/status-page.png`` to refresh the one in docs/.
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


async def test_status_page_loads_draws_and_updates_in_chromium(tmp_path):
    demo_port, devtools_port = free_ports(2)
    demo = subprocess.Popen([sys.executable, "-m", "heteroscale", "demo", "--duration", "90", "--max-instances", "7",
                             "--startup-delay", "1", "--listen", f"127.0.0.1:{demo_port}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    browser = None
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving:" not in line and time.monotonic() < deadline:
            line = await asyncio.to_thread(demo.stdout.readline)
            assert line, "the demo ended before serving"
        url = f"http://127.0.0.1:{demo_port}/demo"
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
             f"--remote-debugging-port={devtools_port}", "--remote-allow-origins=*",
             "--window-size=1400,1900", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        async with aiohttp.ClientSession() as session:
            ws_url = await _page_ws(session, devtools_port, url)
            async with session.ws_connect(ws_url, max_msg_size=64 * 2**20) as ws:
                tools = DevTools(ws)
                await tools.call("Runtime.enable")
                first = await _until(tools, lambda s: s["updates"] >= 2 and s["coordinatorCards"] >= 1
                                     and s["gpuDecodePixels"] > 30 and s["instancePixels"] > 30
                                     and s["coordinatorTpsPixels"] > 30, 90)
                assert first["tiles"] == 7
                await asyncio.sleep(7)
                later = json.loads(await tools.evaluate(PAGE_STATE))
                assert later["updates"] > first["updates"]
                assert later["meta"] != first["meta"]                         # elapsed time and requests moved on
                assert later["coordinatorTicks"] != first["coordinatorTicks"]  # the embedded page refreshed too
                shot = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        png = base64.b64decode(shot["data"])
        assert png.startswith(b"\x89PNG") and len(png) > 20_000
        (tmp_path / "status-page.png").write_bytes(png)
        target = os.environ.get("HETEROSCALE_SCREENSHOT")
        if target:
            Path(target).write_bytes(png)
    finally:
        if browser is not None:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
