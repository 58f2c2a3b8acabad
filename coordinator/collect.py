"""Pull ``/v1/report`` from every sidecar of every service (I/O, no decisions).

Discovery is a seam: a ``ReportSource`` says which URLs to pull for a service.
``StaticSource`` reads them from the config (``sidecars:`` lists); ``PodSource``
turns pod IPs, listed by whoever knows them (the Kubernetes actuator), into
``http://IP:PORT/v1/report``. ``ChainSource`` uses the first source that has targets.

Every request is bounded: one shared semaphore caps requests in flight across all
services (``collect.concurrency``), each request has its own total timeout
(``collect.timeout_s``), and connections are kept alive between ticks. A target that
times out (``timeout``), refuses (``connect``), answers malformed HTTP (``protocol``)
or non-200 (``http_status``), or sends something that is not JSON (``invalid_json``)
or not a valid report (``invalid_report``) becomes a ``Fetched`` with that reason; it
is counted (``errors_total``) and excluded by aggregation, never guessed at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import aiohttp

from heteroscale.coordinator.core.types import Fetched
from heteroscale.coordinator.seams import Collection, ReportSource, ReportTarget
from heteroscale.report import ReportFormatError, ReportJsonError, parse_report_json

if TYPE_CHECKING:
    from heteroscale.coordinator.core.settings import CollectConfig, ServiceConfig

log = logging.getLogger("heteroscale.coordinator.collect")


class StaticSource:
    """The ``sidecars:`` URLs from the config, per role."""

    async def targets(self, service: "ServiceConfig") -> list[ReportTarget]:
        return [ReportTarget(url=url, role=role) for role in ("prefill", "decode")
                for url in service.role(role).sidecars]


PodLister = Callable[["ServiceConfig", str], Awaitable[Sequence[tuple[str, str]]]]


class PodSource:
    """Pod IPs from a lister ``(service, role) -> [(pod_name, ip), ...]`` → report URLs."""

    def __init__(self, lister: PodLister, *, port: int = 9400, path: str = "/v1/report") -> None:
        self._lister = lister
        self._port = port
        self._path = path

    async def targets(self, service: "ServiceConfig") -> list[ReportTarget]:
        out: list[ReportTarget] = []
        for role in ("prefill", "decode"):
            for pod, ip in await self._lister(service, role):
                host = f"[{ip}]" if ":" in ip else ip
                out.append(ReportTarget(url=f"http://{host}:{self._port}{self._path}", role=role, pod=pod))
        return out


class ChainSource:
    """The first source that yields targets for a service (e.g. config, then pods)."""

    def __init__(self, *sources: ReportSource) -> None:
        self._sources = sources

    async def targets(self, service: "ServiceConfig") -> list[ReportTarget]:
        for source in self._sources:
            found = await source.targets(service)
            if found:
                return found
        return []


class ProtocolError(Exception):
    """An HTTP answer this client cannot read (malformed head, oversized body)."""


class HttpPool:
    """A lean HTTP/1.1 GET client with keep-alive, for plain-http report URLs.

    Why not aiohttp's client here: at fleet scale (10,000 reports a tick) its per-request
    machinery costs about five times the CPU of this loop (benchmarks/coordinator_bench.py,
    docs/coordinator.md). It reads exactly what a sidecar (or any HTTP/1.1 server) sends
    to a GET: a status line, headers, and a body delimited by Content-Length, chunked
    transfer coding, or connection close. Idle connections are kept per host and port,
    at most ``max_idle`` in all; a reused connection the server closed meanwhile is
    retried once on a fresh one. Timeouts are the caller's (``asyncio.timeout``).
    """

    def __init__(self, *, max_idle: int = 4096, max_body_bytes: int = 4 << 20) -> None:
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._idle_count = 0
        self._max_idle = max_idle
        self._max_body = max_body_bytes

    async def get(self, host: str, port: int, *, path: str) -> tuple[int, bytes]:
        key = (host, port)
        for attempt in (0, 1):
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await asyncio.open_connection(host, port, limit=1 << 16)
            try:
                status, body, keep = await self._exchange(conn, host, port, path)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                self._close(conn)
                if reused and attempt == 0:
                    continue            # the server dropped an idle connection: once more, fresh
                raise ConnectionError(str(exc) or type(exc).__name__) from exc
            except BaseException:
                self._close(conn)
                raise
            if keep:
                self._put(key, conn)
            else:
                self._close(conn)
            return status, body
        raise ConnectionError("unreachable")   # pragma: no cover (loop always returns or raises)

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str,
                        port: int, path: str) -> tuple[int, bytes, bool]:
        reader, writer = conn
        host_header = host if port == 80 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]:{port}"
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\n"
                     "User-Agent: heteroscale-coordinator\r\n\r\n".encode("latin-1"))
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError as exc:
                raise ProtocolError("response head too large") from exc
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ProtocolError(f"bad status line {lines[0][:80]!r}")
            status = int(parts[1])
            if status != 100:
                break
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        keep = parts[0] == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            body = await self._chunked(reader)
        elif b"content-length" in headers:
            try:
                length = int(headers[b"content-length"])
            except ValueError as exc:
                raise ProtocolError("bad Content-Length") from exc
            if length > self._max_body:
                raise ProtocolError(f"body of {length} bytes is over the limit")
            body = await reader.readexactly(length)
        else:
            body = await reader.read(self._max_body + 1)
            if len(body) > self._max_body:
                raise ProtocolError("body over the limit")
            keep = False
        return status, body, keep

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        out = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise ProtocolError("bad chunk size") from exc
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass                  # trailers
                return bytes(out)
            if len(out) + size > self._max_body:
                raise ProtocolError("body over the limit")
            out += (await reader.readexactly(size + 2))[:-2]

    def _take(self, key: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if not conn[1].is_closing() and not conn[0].at_eof():
                return conn
            self._close(conn)
        return None

    def _put(self, key: tuple[str, int], conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        if self._idle_count >= self._max_idle:
            self._close(conn)
            return
        self._idle.setdefault(key, []).append(conn)
        self._idle_count += 1

    @staticmethod
    def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        conn[1].close()

    def idle_connections(self) -> int:
        return self._idle_count

    async def close(self) -> None:
        conns = [c for idle in self._idle.values() for c in idle]
        self._idle.clear()
        self._idle_count = 0
        for conn in conns:
            conn[1].close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn[1].wait_closed()


class Collector:
    """Concurrent, bounded fetching of reports; keeps the latest result per service.

    Plain-http URLs go through ``HttpPool``; https URLs through an aiohttp session.
    """

    def __init__(self, *, source: ReportSource, timeout_s: float = 2.0, concurrency: int = 64,
                 session: aiohttp.ClientSession | None = None, max_idle: int | None = None) -> None:
        self._source = source
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limit = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._session = session
        self._own_session = session is None
        self._pool = HttpPool(max_idle=max_idle if max_idle is not None else _default_max_idle())
        self._parsed: dict[str, tuple[str, str, int, str]] = {}
        self.latest: dict[str, Collection] = {}
        self.errors_total: Counter[tuple[str, str]] = Counter()   # (service, reason) -> count

    @classmethod
    def from_config(cls, config: "CollectConfig", *, source: ReportSource) -> "Collector":
        return cls(source=source, timeout_s=config.timeout_s, concurrency=config.concurrency)

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._concurrency, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  raise_for_status=False)
            self._own_session = True
        return self._session

    async def close(self) -> None:
        await self._pool.close()
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()

    async def collect(self, service: "ServiceConfig") -> Collection:
        try:
            targets = await self._source.targets(service)
        except Exception as exc:   # a discovery failure must not stop other services
            log.warning("discovery failed for %s: %s", service.name, exc)
            self.errors_total[(service.name, "discovery")] += 1
            result = Collection(service=service.name, fetched=(), errors={"discovery": 1},
                                discovery_error=str(exc) or type(exc).__name__)
            self.latest[service.name] = result
            return result
        fetched = await self._fetch_all(targets)
        errors = Counter(f.error for f in fetched if f.error)
        for reason, count in errors.items():
            self.errors_total[(service.name, reason)] += count
        result = Collection(service=service.name, fetched=tuple(fetched), errors=dict(errors))
        self.latest[service.name] = result
        return result

    async def _fetch_all(self, targets: Sequence[ReportTarget]) -> list[Fetched]:
        # A few workers walking the list, instead of one task per target: at 10,000
        # targets a tick the task bookkeeping alone was a tenth of the CPU.
        results: list[Fetched | None] = [None] * len(targets)
        cursor = iter(range(len(targets)))

        async def worker() -> None:
            for i in cursor:
                results[i] = await self._fetch(targets[i])

        workers = min(len(targets), self._concurrency)
        if workers == 1:
            await worker()
        elif workers > 1:
            await asyncio.gather(*(worker() for _ in range(workers)))
        return [r for r in results if r is not None]

    def _split(self, url: str) -> tuple[str, str, int, str]:
        parsed = self._parsed.get(url)
        if parsed is None:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            port = parts.port or (443 if scheme == "https" else 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            parsed = (scheme, parts.hostname or "", port, path)
            if len(self._parsed) < 100_000:
                self._parsed[url] = parsed
        return parsed

    async def _fetch(self, target: ReportTarget) -> Fetched:
        async with self._limit:
            try:
                status, body = await self._get(target.url)
            except (asyncio.TimeoutError, TimeoutError):
                return Fetched(url=target.url, role=target.role, error="timeout")
            except ProtocolError:
                return Fetched(url=target.url, role=target.role, error="protocol")
            except (aiohttp.ClientError, OSError, ValueError):
                return Fetched(url=target.url, role=target.role, error="connect")
        if status != 200:
            return Fetched(url=target.url, role=target.role, error="http_status")
        try:
            report = parse_report_json(body)
        except ReportJsonError:
            return Fetched(url=target.url, role=target.role, error="invalid_json")
        except ReportFormatError as exc:
            log.debug("invalid report from %s: %s", target.url, exc)
            return Fetched(url=target.url, role=target.role, error="invalid_report")
        return Fetched(url=target.url, role=target.role, report=report)

    async def _get(self, url: str) -> tuple[int, bytes]:
        scheme, host, port, path = self._split(url)
        if scheme == "http" and host:
            async with asyncio.timeout(self._timeout_s):
                return await self._pool.get(host, port, path=path)
        session = self._session_or_new()
        async with session.get(url, timeout=self._timeout) as resp:
            return resp.status, await resp.read()


def _default_max_idle() -> int:
    """Idle keep-alive connections: up to 4096, and never more than half the fd limit."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return 256
    if soft <= 0:
        return 4096
    return max(16, min(4096, soft // 2))
