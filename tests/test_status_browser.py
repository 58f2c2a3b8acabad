"""The status page in a real headless Chromium: the JavaScript runs, fetches
/api/v1/status from the live server, and renders pools, decisions and both charts."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest
from aiohttp import web

from sidecar.coordinator.status import make_status_app
from tests.test_reconciler import World, world  # noqa: F401  (fixture)

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_page_renders_services_decisions_and_charts(world: World, tmp_path):
    world.load["chat"] = 6000.0
    await world.ticks(3)
    runner = web.AppRunner(make_status_app(world.reconciler), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
            f"http://127.0.0.1:{port}/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=90)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    finally:
        await runner.cleanup()
    dom = out.decode()
    assert 'id="svc-chat"' in dom and 'id="svc-code"' in dom
    assert "leader: me" in dom
    assert "scale_out_tps" in dom                      # the decisions table
    assert "3P 2D" in dom and "6P 4D" in dom           # from -> to of the scale-out
    drawn = [int(n) for n in re.findall(r'data-points="(\d+)"', dom)]
    assert len(drawn) == 4 and all(n > 0 for n in drawn), drawn   # 2 charts x 2 services
