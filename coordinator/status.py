"""The coordinator's HTTP face: status page, status API, metrics, health (aiohttp).

Routes (ARCHITECTURE §3.3): ``/`` the page (static HTML + plain JS, no CDN: charts
are drawn client-side on <canvas> from ``/api/v1/status``, which it polls);
``/static/*`` its files; ``/api/v1/status`` the JSON (``?history=0`` leaves out the
chart series); ``/metrics`` Prometheus text from an injected registry; ``/healthz``.
Everything here renders the reconciler's latest published ``Snapshot``: a non-leader
serves the same pages read-only, and nothing on this surface can change a pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from heteroscale.coordinator.metrics import registry_for
from heteroscale.coordinator.snapshot import render_status

if TYPE_CHECKING:
    from heteroscale.coordinator.reconciler import Reconciler

STATIC_DIR = Path(__file__).resolve().parent / "static"
RECONCILER_KEY = web.AppKey("reconciler", object)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


def make_status_app(reconciler: "Reconciler", *, registry: CollectorRegistry | None = None) -> web.Application:
    app = web.Application()
    app[RECONCILER_KEY] = reconciler
    app[REGISTRY_KEY] = registry_for(reconciler, registry)
    app.router.add_get("/", _index)
    app.router.add_get("/api/v1/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_static("/static/", STATIC_DIR, show_index=False)
    return app


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _status(request: web.Request) -> web.Response:
    snapshot = request.app[RECONCILER_KEY].snapshot
    history = request.query.get("history", "1") not in ("0", "false", "no")
    return web.json_response(render_status(snapshot, history=history), headers={"Cache-Control": "no-store"})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    snapshot = request.app[RECONCILER_KEY].snapshot
    return web.json_response({"ok": True, "leader": snapshot.leader, "ticks": snapshot.ticks})
