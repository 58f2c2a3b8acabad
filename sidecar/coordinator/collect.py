"""Pull ``/v1/report`` from every sidecar of every service (I/O, no decisions).

Discovery is a seam: a ``ReportSource`` says which URLs to pull for a service.
``StaticSource`` reads them from the config (``sidecars:`` lists); ``PodSource``
turns pod IPs, listed by whoever knows them (the Kubernetes actuator), into
``http://IP:PORT/v1/report``. ``ChainSource`` uses the first source that has targets.

Every request is bounded: one shared semaphore caps requests in flight across all
services (``collect.concurrency``), each request has its own total timeout
(``collect.timeout_s``), and the connection pool keeps connections alive between
ticks. A target that times out, refuses, answers non-200, or sends something that
is not a valid report becomes a ``Fetched`` with an ``error`` reason; it is counted
(``errors``) and excluded by aggregation, never guessed at.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol, Sequence

import aiohttp

from sidecar.coordinator.aggregate import Fetched
from sidecar.report import ReportFormatError, SidecarReport

if TYPE_CHECKING:
    from sidecar.coordinator.config import CollectConfig, ServiceConfig

log = logging.getLogger("heteroscale.coordinator.collect")


@dataclass(frozen=True)
class Target:
    url: str
    role: str | None = None        # the role we expect there; None = trust the report
    pod: str | None = None


class ReportSource(Protocol):
    async def targets(self, service: "ServiceConfig") -> list[Target]:
        ...


class StaticSource:
    """The ``sidecars:`` URLs from the config, per role."""

    async def targets(self, service: "ServiceConfig") -> list[Target]:
        return [Target(url=url, role=role) for role in ("prefill", "decode")
                for url in service.role(role).sidecars]


PodLister = Callable[["ServiceConfig", str], Awaitable[Sequence[tuple[str, str]]]]


class PodSource:
    """Pod IPs from a lister ``(service, role) -> [(pod_name, ip), ...]`` → report URLs."""

    def __init__(self, lister: PodLister, *, port: int = 9400, path: str = "/v1/report") -> None:
        self._lister = lister
        self._port = port
        self._path = path

    async def targets(self, service: "ServiceConfig") -> list[Target]:
        out: list[Target] = []
        for role in ("prefill", "decode"):
            for pod, ip in await self._lister(service, role):
                host = f"[{ip}]" if ":" in ip else ip
                out.append(Target(url=f"http://{host}:{self._port}{self._path}", role=role, pod=pod))
        return out


class ChainSource:
    """The first source that yields targets for a service (e.g. config, then pods)."""

    def __init__(self, *sources: ReportSource) -> None:
        self._sources = sources

    async def targets(self, service: "ServiceConfig") -> list[Target]:
        for source in self._sources:
            found = await source.targets(service)
            if found:
                return found
        return []


@dataclass(frozen=True)
class Collection:
    service: str
    fetched: tuple[Fetched, ...]
    errors: dict[str, int]
    discovery_error: str | None = None


class Collector:
    """Concurrent, bounded fetching of reports; keeps the latest result per service."""

    def __init__(self, *, source: ReportSource, timeout_s: float = 2.0, concurrency: int = 64,
                 session: aiohttp.ClientSession | None = None) -> None:
        self._source = source
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limit = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._session = session
        self._own_session = session is None
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
        fetched = await asyncio.gather(*(self._fetch(t) for t in targets))
        errors = Counter(f.error for f in fetched if f.error)
        for reason, count in errors.items():
            self.errors_total[(service.name, reason)] += count
        result = Collection(service=service.name, fetched=tuple(fetched), errors=dict(errors))
        self.latest[service.name] = result
        return result

    async def _fetch(self, target: Target) -> Fetched:
        session = self._session_or_new()
        async with self._limit:
            try:
                async with session.get(target.url, timeout=self._timeout) as resp:
                    if resp.status != 200:
                        return Fetched(url=target.url, role=target.role, error="http_status")
                    body = await resp.read()
            except asyncio.TimeoutError:
                return Fetched(url=target.url, role=target.role, error="timeout")
            except aiohttp.ClientError:
                return Fetched(url=target.url, role=target.role, error="connect")
        try:
            doc = json.loads(body)
        except ValueError:
            return Fetched(url=target.url, role=target.role, error="invalid_json")
        try:
            report = SidecarReport.from_dict(doc)
        except ReportFormatError as exc:
            log.debug("invalid report from %s: %s", target.url, exc)
            return Fetched(url=target.url, role=target.role, error="invalid_report")
        return Fetched(url=target.url, role=target.role, report=report)
