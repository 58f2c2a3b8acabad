"""Collection against real HTTP servers on 127.0.0.1 speaking the sidecar's /v1/report.

``ReportServer`` is a small aiohttp server that answers many paths, each with a
configurable behaviour (a report, garbage, an HTTP error, a hang), so one process
stands in for many sidecars. The reconciler tests and the benchmark reuse it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from heteroscale.coordinator.collect import ChainSource, Collector, PodSource, StaticSource

from heteroscale.coordinator.seams import ReportTarget
from heteroscale.coordinator.config import load_config
from tests.conftest import free_port


def report_doc(*, service: str = "chat", role: str = "decode", pod: str = "p", observed_at: float = 0.0,
               decode_tps: float | None = 1000.0, **extra: Any) -> dict[str, Any]:
    doc = {"service": service, "role": role, "pod": pod, "engine": "vllm", "engine_up": True,
           "stale": False, "observed_at": observed_at, "window_s": 30.0, "started_at": observed_at - 3600,
           "decode_tps": decode_tps if role == "decode" else None,
           "prefill_tps": 5000.0 if role == "prefill" else None,
           "tbt_p90_s": 0.03 if role == "decode" else None, "ttft_p90_s": 0.4, "gpus": [], "kv_transfer": {}}
    doc.update(extra)
    return doc


class ReportServer:
    """One loopback HTTP server; ``routes[path]`` is a dict (served as JSON), a callable
    returning one (evaluated per request), or one of ``"garbage"``, ``"hang"``, an int
    (HTTP status), or ``"badreport"``. Unknown paths answer 404."""

    def __init__(self) -> None:
        self.routes: dict[str, Any] = {}
        self.hits: dict[str, int] = {}
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] = self.hits.get(path, 0) + 1
        spec = self.routes.get(path)
        if spec is None:
            return web.Response(status=404, text="no such sidecar")
        if callable(spec):
            spec = spec()
        if spec == "garbage":
            return web.Response(text="<html>not json", content_type="text/html")
        if spec == "badreport":
            return web.json_response({"service": "chat", "role": "decode"})   # misses required fields
        if spec == "hang":
            try:
                await asyncio.wait_for(self._release.wait(), timeout=30)
            except asyncio.TimeoutError:
                pass
            return web.json_response({})
        if isinstance(spec, int):
            return web.Response(status=spec, text="error")
        return web.Response(body=json.dumps(spec).encode(), content_type="application/json")

    async def start(self) -> "ReportServer":
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server():
    srv = await ReportServer().start()
    yield srv
    await srv.stop()


def static_service(prefill: list[str], decode: list[str]):
    return load_config({"coordinator": {"backend": "static"}, "services": [{
        "name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 1000,
        "slo": {"tbt_s": 0.05}, "prefill": {"sidecars": prefill}, "decode": {"sidecars": decode}}]}).services[0]


async def test_collects_every_sidecar_and_classifies_failures(server):
    server.routes = {
        "/d0": report_doc(pod="d0"), "/d1": report_doc(pod="d1", decode_tps=250.0),
        "/p0": report_doc(role="prefill", pod="p0"),
        "/garbage": "garbage", "/bad": "badreport", "/500": 500, "/hang": "hang",
    }
    dead = f"http://127.0.0.1:{free_port()}/v1/report"     # nothing listens there
    svc = static_service([server.url("/p0")],
                         [server.url(p) for p in ("/d0", "/d1", "/garbage", "/bad", "/500", "/hang", "/missing")]
                         + [dead])
    collector = Collector(source=StaticSource(), timeout_s=0.5, concurrency=4)
    try:
        result = await collector.collect(svc)
    finally:
        await collector.close()
    by_url = {f.url: f for f in result.fetched}
    assert by_url[server.url("/d0")].report.decode_tps == 1000.0
    assert by_url[server.url("/d1")].report.pod == "d1"
    assert by_url[server.url("/p0")].role == "prefill"
    assert by_url[server.url("/garbage")].error == "invalid_json"
    assert by_url[server.url("/bad")].error == "invalid_report"
    assert by_url[server.url("/500")].error == "http_status"
    assert by_url[server.url("/missing")].error == "http_status"
    assert by_url[server.url("/hang")].error == "timeout"
    assert by_url[dead].error == "connect"
    assert result.errors == {"invalid_json": 1, "invalid_report": 1, "http_status": 2, "timeout": 1, "connect": 1}
    assert collector.errors_total[("chat", "timeout")] == 1
    assert collector.latest["chat"] is result


async def test_concurrency_is_bounded(server):
    in_flight = 0
    peak = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)           # let the others pile up if the bound is broken
        await asyncio.sleep(0.01)
        in_flight -= 1
        return web.json_response(report_doc(pod=request.path))

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    svc = static_service([f"http://127.0.0.1:{port}/p"], [f"http://127.0.0.1:{port}/d{i}" for i in range(30)])
    collector = Collector(source=StaticSource(), timeout_s=2, concurrency=3)
    try:
        result = await collector.collect(svc)
    finally:
        await collector.close()
        await runner.cleanup()
    assert sum(1 for f in result.fetched if f.report) == 31
    assert 1 <= peak <= 3


async def test_pod_source_builds_report_urls_and_chain_falls_back():
    calls = []

    async def lister(service, role):
        calls.append(role)
        return [(f"{role}-0", "10.0.0.1"), (f"{role}-1", "fd00::2")] if role == "decode" else []

    svc = static_service(["http://127.0.0.1:1/r"], ["http://127.0.0.1:2/r"])
    pods = PodSource(lister, port=9400)
    targets = await pods.targets(svc)
    assert targets == [ReportTarget(url="http://10.0.0.1:9400/v1/report", role="decode", pod="decode-0"),
                       ReportTarget(url="http://[fd00::2]:9400/v1/report", role="decode", pod="decode-1")]
    # Config URLs win when present; the pod lister is not even asked.
    calls.clear()
    chained = await ChainSource(StaticSource(), pods).targets(svc)
    assert [t.url for t in chained] == ["http://127.0.0.1:1/r", "http://127.0.0.1:2/r"] and calls == []


async def test_discovery_failure_is_counted_not_raised():
    class Broken:
        async def targets(self, service):
            raise RuntimeError("apiserver said no")

    svc = static_service(["http://127.0.0.1:1/r"], ["http://127.0.0.1:2/r"])
    collector = Collector(source=Broken(), timeout_s=1)
    result = await collector.collect(svc)
    await collector.close()
    assert result.fetched == () and result.discovery_error == "apiserver said no"
    assert collector.errors_total[("chat", "discovery")] == 1


async def test_keeps_connections_between_collections(server):
    server.routes = {f"/d{i}": report_doc(pod=f"d{i}") for i in range(5)}
    svc = static_service([server.url("/d0")], [server.url(f"/d{i}") for i in range(5)])
    collector = Collector(source=StaticSource(), timeout_s=1, concurrency=8)
    try:
        first = await collector.collect(svc)
        second = await collector.collect(svc)
    finally:
        await collector.close()
    assert all(f.report for f in first.fetched + second.fetched)
    assert server.hits["/d0"] == 4        # prefill + decode target, twice


# ---------------------------------------------------------------- the keep-alive client

class RawServer:
    """A loopback TCP server that answers each request with ``answer(n)`` bytes (n counts
    requests on that connection) and then keeps or closes the connection as told.
    Counts connections, so keep-alive is checked from the server's side."""

    def __init__(self, answer, *, close_after: bool = False) -> None:
        self.answer, self.close_after = answer, close_after
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        n = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                n += 1
                writer.write(self.answer(n))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def drop_all(self) -> None:
        for w in self._writers:
            w.close()

    async def stop(self) -> None:
        self.drop_all()
        self._server.close()
        await self._server.wait_closed()


BODY = json.dumps(report_doc(pod="raw")).encode()


def fixed(n: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


def chunked(n: int) -> bytes:
    half = len(BODY) // 2
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x;ext=1\r\n%s\r\n" % (half, BODY[:half])
            + b"%x\r\n%s\r\n" % (len(BODY) - half, BODY[half:]) + b"0\r\nX-Trailer: 1\r\n\r\n")


async def collect_from(port: int, paths: list[str], **kw) -> tuple[Collector, list]:
    svc = static_service([f"http://127.0.0.1:{port}/p"], [f"http://127.0.0.1:{port}{p}" for p in paths])
    collector = Collector(source=StaticSource(), timeout_s=kw.pop("timeout_s", 2), **kw)
    result = await collector.collect(svc)
    return collector, list(result.fetched)


@pytest.mark.parametrize("answer", [fixed, chunked], ids=["content-length", "chunked"])
async def test_keep_alive_reuses_connections(answer):
    raw = RawServer(answer)
    port = await raw.start()
    try:
        collector, first = await collect_from(port, ["/a"], concurrency=1)
        svc = static_service([f"http://127.0.0.1:{port}/p"], [f"http://127.0.0.1:{port}/a"])
        second = (await collector.collect(svc)).fetched
        await collector.close()
    finally:
        await raw.stop()
    assert all(f.report is not None and f.report.pod == "raw" for f in first + list(second))
    assert raw.connections == 1            # 4 requests, one connection


async def test_connection_close_and_eof_delimited_bodies():
    raw = RawServer(lambda n: b"HTTP/1.0 200 OK\r\n\r\n" + BODY, close_after=True)
    port = await raw.start()
    try:
        collector, fetched = await collect_from(port, ["/a", "/b"], concurrency=1)
        await collector.close()
    finally:
        await raw.stop()
    assert all(f.report is not None for f in fetched)
    assert raw.connections == 3            # no reuse after a close-delimited body


async def test_server_dropping_an_idle_connection_is_retried_once():
    raw = RawServer(fixed)
    port = await raw.start()
    try:
        collector, _ = await collect_from(port, ["/a"], concurrency=1)
        raw.drop_all()                     # keep-alive timeout on the server side
        await asyncio.sleep(0.05)
        svc = static_service([f"http://127.0.0.1:{port}/p"], [f"http://127.0.0.1:{port}/a"])
        again = (await collector.collect(svc)).fetched
        await collector.close()
    finally:
        await raw.stop()
    assert all(f.report is not None for f in again)


@pytest.mark.parametrize("answer,reason", [
    (lambda n: b"SMTP ready\r\n\r\n", "protocol"),
    (lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "protocol"),
    (lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", "protocol"),
    (lambda n: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "protocol"),
    (lambda n: b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", "http_status"),
    (lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", "connect"),
], ids=["not-http", "huge", "bad-length", "bad-chunk", "503", "truncated"])
async def test_malformed_answers_are_classified(answer, reason):
    raw = RawServer(answer, close_after=True)
    port = await raw.start()
    try:
        collector, fetched = await collect_from(port, ["/a"], concurrency=1, timeout_s=1)
        await collector.close()
    finally:
        await raw.stop()
    assert {f.error for f in fetched} == {reason}


async def test_https_urls_go_through_aiohttp(server):
    # TLS to a plain-http port fails the handshake: classified, not raised.
    svc = static_service([server.url("/p").replace("http://", "https://")],
                         [server.url("/d").replace("http://", "https://")])
    collector = Collector(source=StaticSource(), timeout_s=1)
    try:
        result = await collector.collect(svc)
    finally:
        await collector.close()
    assert {f.error for f in result.fetched} == {"connect"}
