"""The sidecar's HTTP face: ``/metrics``, ``/v1/report``, ``/healthz``, ``/readyz`` (ARCHITECTURE §3.2).

The handlers only read the agent's cached state; nothing here scrapes or
decides. ``/metrics`` renders the injected ``CollectorRegistry`` in Prometheus
text format 0.0.4. ``/readyz`` answers 503 until the first successful engine
scrape (so a pod is not marked ready before it has data) and 200 afterwards,
even while the engine is down later: readiness of the *sidecar*, whose
``engine_up`` and ``stale`` say the rest. ``/healthz`` answers while the
process and its scrape loop are alive.

With ``manage_agent=True`` the app starts the agent's loop on startup and
stops it on cleanup (aiohttp ``cleanup_ctx``), so the two live and die together.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest


class ReportingAgent(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def alive(self) -> bool: ...

    def report_dict(self) -> dict: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


AGENT = web.AppKey("agent", object)
REGISTRY = web.AppKey("registry", CollectorRegistry)


def make_app(agent: ReportingAgent, registry: CollectorRegistry, *, manage_agent: bool = True) -> web.Application:
    app = web.Application()
    app[AGENT] = agent
    app[REGISTRY] = registry
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/report", _report)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    if manage_agent:
        app.cleanup_ctx.append(_agent_lifetime)
    return app


async def _agent_lifetime(app: web.Application) -> AsyncIterator[None]:
    agent = app[AGENT]
    await agent.start()
    try:
        yield
    finally:
        await agent.stop()


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


async def _report(request: web.Request) -> web.Response:
    # Strict JSON: the agent's report holds no non-finite number, and this makes sure
    # that a bug can only ever give an error answer, never a body with 'Infinity'.
    return web.json_response(request.app[AGENT].report_dict(), dumps=_strict_dumps)


def _strict_dumps(doc: object) -> str:
    return json.dumps(doc, allow_nan=False)


async def _healthz(request: web.Request) -> web.Response:
    if not request.app[AGENT].alive:
        return web.Response(status=503, text="scrape loop is not running\n")
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    if not request.app[AGENT].ready:
        return web.Response(status=503, text="no successful engine scrape yet\n")
    return web.Response(text="ready\n")
