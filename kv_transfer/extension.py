"""The sidecar's KV-transfer extension: engine connector metrics, RDMA counters, the probe.

``add_arguments(parser)`` adds the ``--kv-*``, ``--rdma-*`` and ``--probe-*``
flags to ``heteroscale sidecar``; ``build(args)`` returns one
``KvTransferExtension`` (see ``heteroscale.sidecar.extensions`` for the protocol). Its
sample fills the report's ``kv_transfer`` object:

* ``bytes_per_second`` / ``direction`` / ``source``: the headline - bytes the
  pod actually moved, from the engine's connector metrics when it has them, else
  the RDMA port counters; ``None`` when neither is there;
* ``sources.engine`` / ``sources.rdma`` / ``sources.probe``: each source's own
  numbers, present only when that source is (absent, never zero); the sidecar
  exports each as ``heteroscale_kv_transfer_bytes_per_second{direction,source}``;
* ``probe``: on a prefill pod the latest outcome per decode peer (the
  coordinator's bandwidth map reads these), on a decode pod the probe server's
  counters.

Sources, each optional and detected at run time:

* **engine**: the agent hands every engine page it scraped to
  ``observe_engine_page`` (vLLM NIXL / SGLang metrics on it are parsed by
  ``heteroscale.kv_transfer.connectors``); ``--kv-connector-url`` adds NIXL's telemetry
  exporter or Mooncake TENT's endpoint, fetched here once per sample;
* **rdma**: ``--rdma-sysfs-root`` (default ``/sys/class/infiniband``); absent
  when no readable port is there;
* **probe**: ``--probe-listen`` runs the probe server (decode pods),
  ``--probe-peers`` the client (prefill pods); both need ``--probe-secret-file``.

By default the probe does not run while the engine is saturated: requests
waiting in the engine queue, or the engine already moving at least half of the
last probed capacity. With no engine page seen within the window the engine
state is unknown and the probe runs (the standalone/testbed case).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from heteroscale.kv_transfer import connectors as kvc
from heteroscale.kv_transfer.probe import (MIB, ProbeClientSettings, ProbeRunner, ProbeServer, ProbeServerSettings,
                               load_secret, outcome_to_dict, parse_peer)
from heteroscale.kv_transfer.rdma import DEFAULT_SYSFS_ROOT, RdmaSettings, SysfsRdmaReader
from heteroscale.kv_transfer.stats import HistogramWindow, RateWindow, median
from heteroscale.errors import ConfigError, ScrapeError, UsageError
from heteroscale.net import parse_host_port, read_capped
from heteroscale.promtext import MAX_PAGE_BYTES

log = logging.getLogger("heteroscale.kv_transfer")

NAME = "kv_transfer"
SOURCE_ENGINE = "engine"
SOURCE_RDMA = "rdma"
SOURCE_PROBE = "probe"
SATURATION_CAPACITY_RATIO = 0.5


# -- settings and flags ------------------------------------------------------------

@dataclass(frozen=True)
class KvSettings:
    """The extension's settings (validated in ``build``).

    ``window_s``: the rate window (longer = steadier, slower to follow).
    ``direction``: ``send`` (prefill) or ``receive`` (decode). ``connector_url``:
    NIXL telemetry / Mooncake TENT page, or None. ``connector_timeout_s``: bound
    on that fetch. ``rdma``: where to read port counters, or None to skip.
    ``probe_server`` / ``probe_client``: the probe roles, each optional.
    """

    direction: str
    window_s: float = 30.0
    connector_url: str | None = None
    connector_timeout_s: float = 0.5          # below the agent's per-cycle bound (0.8 s by default)
    engine_metrics_url: str | None = None      # fallback self-scrape when the agent hands no pages
    engine_scrape_interval_s: float = 5.0      # at most one fallback scrape per this many seconds
    rdma: RdmaSettings | None = field(default_factory=RdmaSettings)
    probe_server: ProbeServerSettings | None = None
    probe_listen: tuple[str, int] | None = None
    probe_client: ProbeClientSettings | None = None
    probe_secret: bytes | None = field(default=None, repr=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The KV-transfer flags of ``heteroscale sidecar``."""
    group = parser.add_argument_group("KV-cache transfer")
    group.add_argument("--kv-window-s", type=float, default=30.0, metavar="S",
                       help="rate window for KV-transfer throughput (default 30)")
    group.add_argument("--kv-connector-url", metavar="URL",
                       help="NIXL telemetry or Mooncake TENT metrics endpoint (optional)")
    group.add_argument("--rdma-sysfs-root", default=DEFAULT_SYSFS_ROOT, metavar="PATH",
                       help=f"infiniband sysfs class directory (default {DEFAULT_SYSFS_ROOT})")
    group.add_argument("--rdma-devices", default="", metavar="DEV,...",
                       help="RDMA devices to read (default: every device found)")
    group.add_argument("--no-rdma", action="store_true", help="do not read RDMA port counters")
    group.add_argument("--probe-listen", metavar="HOST:PORT",
                       help="run the probe server here (decode pods)")
    group.add_argument("--probe-name", metavar="NAME",
                       help="name the probe server announces (default: --pod, $POD_NAME or the host name)")
    group.add_argument("--probe-peers", default="", metavar="[NAME=]HOST:PORT,...",
                       help="decode peers to probe (prefill pods)")
    group.add_argument("--probe-secret-file", metavar="PATH",
                       help="shared secret for the probe (required with --probe-listen/--probe-peers)")
    group.add_argument("--probe-interval-s", type=float, default=60.0, metavar="S",
                       help="seconds between probes of one peer (default 60)")
    group.add_argument("--probe-bytes", type=int, default=16 * MIB, metavar="N",
                       help=f"bytes per probe (default {16 * MIB})")
    group.add_argument("--probe-max-rate", type=float, default=4.0 * MIB, metavar="B/S",
                       help="cap on peers x bytes / interval, bytes/s (default 4 MiB/s)")
    group.add_argument("--probe-when-saturated", action="store_true",
                       help="probe even while the engine is saturated (off by default)")
    group.add_argument("--probe-server-max-bytes", type=int, default=64 * MIB, metavar="N",
                       help="largest probe the server accepts (default 64 MiB)")
    group.add_argument("--probe-server-max-rate", type=float, default=8.0 * MIB, metavar="B/S",
                       help="average bytes/s the server accepts over all clients (default 8 MiB/s)")
    group.add_argument("--probe-server-peer-rate", type=float, default=None, metavar="B/S",
                       help="average bytes/s the server accepts from one client address "
                            "(default: a quarter of --probe-server-max-rate)")
    group.add_argument("--probe-server-min-rate", type=float, default=4.0 * MIB, metavar="B/S",
                       help="slowest transfer the server waits for: a probe holds the server at most "
                            "1 s + bytes / this (default 4 MiB/s)")
    group.add_argument("--probe-auth-timeout-s", type=float, default=2.0, metavar="S",
                       help="seconds a client has, from connecting, to authenticate (default 2)")
    group.add_argument("--probe-server-max-pending", type=int, default=64, metavar="N",
                       help="connections waiting to authenticate, all clients (default 64)")
    group.add_argument("--probe-server-max-pending-per-peer", type=int, default=8, metavar="N",
                       help="connections waiting to authenticate, per client address (default 8)")


def _host_port(text: str, flag: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise UsageError(f"{flag} {exc}") from None


def settings_from_args(args: argparse.Namespace) -> KvSettings:
    """Flags -> settings; every problem at once as a ``ConfigError``."""
    problems: list[str] = []
    role = getattr(args, "role", None) or "prefill"
    direction = "send" if role == "prefill" else "receive"
    window_s = float(getattr(args, "kv_window_s", 30.0))
    if not window_s > 0:
        problems.append("--kv-window-s must be positive")
    url = getattr(args, "kv_connector_url", None)
    if url and not url.startswith(("http://", "https://")):
        problems.append(f"--kv-connector-url must be an http(s) URL, got {url!r}")
    rdma = None
    if not getattr(args, "no_rdma", False):
        devices = tuple(d for d in (getattr(args, "rdma_devices", "") or "").split(",") if d)
        rdma = RdmaSettings(root=getattr(args, "rdma_sysfs_root", DEFAULT_SYSFS_ROOT), devices=devices)
    listen_text = getattr(args, "probe_listen", None)
    peers_text = [p for p in (getattr(args, "probe_peers", "") or "").split(",") if p.strip()]
    secret_file = getattr(args, "probe_secret_file", None)
    secret = None
    server = listen = client = None
    if (listen_text or peers_text) and not secret_file:
        problems.append("--probe-secret-file is required with --probe-listen or --probe-peers")
    elif listen_text or peers_text:
        try:
            secret = load_secret(secret_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if listen_text:
        try:
            listen = _host_port(listen_text, "--probe-listen")
        except UsageError as exc:
            problems.append(str(exc))
        name = (getattr(args, "probe_name", None) or getattr(args, "pod", None)
                or os.environ.get("POD_NAME") or socket.gethostname())
        max_bytes = int(getattr(args, "probe_server_max_bytes", 64 * MIB))
        max_rate = float(getattr(args, "probe_server_max_rate", 8.0 * MIB))
        peer_rate = getattr(args, "probe_server_peer_rate", None)
        try:
            server = ProbeServerSettings(
                name=name, max_bytes_per_probe=max_bytes, max_bytes_per_s=max_rate,
                burst_bytes=max(2 * max_bytes, 0),
                peer_bytes_per_s=float(peer_rate) if peer_rate is not None else max_rate / 4,
                min_bytes_per_s=float(getattr(args, "probe_server_min_rate", 4.0 * MIB)),
                auth_timeout_s=float(getattr(args, "probe_auth_timeout_s", 2.0)),
                max_pending=int(getattr(args, "probe_server_max_pending", 64)),
                max_pending_per_peer=int(getattr(args, "probe_server_max_pending_per_peer", 8)))
        except ConfigError as exc:
            problems.extend(f"--probe-listen: {p}" for p in exc.problems)
    if peers_text:
        peers = []
        for text in peers_text:
            try:
                peers.append(parse_peer(text.strip()))
            except ValueError as exc:
                problems.append(f"--probe-peers: {exc}")
        if peers and len(peers) == len(peers_text):
            try:
                client = ProbeClientSettings(
                    peers=tuple(peers), payload_bytes=int(getattr(args, "probe_bytes", 16 * MIB)),
                    interval_s=float(getattr(args, "probe_interval_s", 60.0)),
                    max_average_bytes_per_s=float(getattr(args, "probe_max_rate", 4.0 * MIB)),
                    when_saturated=bool(getattr(args, "probe_when_saturated", False)))
            except ConfigError as exc:
                problems.extend(f"--probe-*: {p}" for p in exc.problems)
    if problems:
        raise ConfigError(problems, source="kv-transfer flags")
    engine_url = getattr(args, "engine_url", None)
    engine_metrics_url = None
    if isinstance(engine_url, str) and engine_url.startswith(("http://", "https://")):
        # The agent's rule: a bare host gets /metrics, an explicit path is kept.
        parts = urlsplit(engine_url)
        engine_metrics_url = urlunsplit(parts._replace(path="/metrics") if parts.path in ("", "/") else parts)
    return KvSettings(direction=direction, window_s=window_s, connector_url=url or None, rdma=rdma,
                      engine_metrics_url=engine_metrics_url,
                      probe_server=server, probe_listen=listen, probe_client=client, probe_secret=secret)


def build(args: argparse.Namespace, *, schedule_probes: bool = True) -> "KvTransferExtension":
    """The extension the flags ask for (always one: engine metrics need no flag)."""
    return KvTransferExtension(settings_from_args(args), schedule_probes=schedule_probes)


# -- per-source state --------------------------------------------------------------

class _ConnectorWindows:
    """Windows over one connector's cumulative numbers (engine page or exporter)."""

    def __init__(self, window_s: float) -> None:
        self.bytes = {d: RateWindow(window_s=window_s) for d in kvc.DIRECTIONS}
        self.transfers = RateWindow(window_s=window_s)
        self.busy = RateWindow(window_s=window_s)
        self.failures = RateWindow(window_s=window_s)
        self.latency = HistogramWindow(window_s=window_s)
        self.speed = HistogramWindow(window_s=window_s)
        self.bootstrap = HistogramWindow(window_s=window_s)
        self.alloc_wait = HistogramWindow(window_s=window_s)
        self.retries = RateWindow(window_s=window_s)
        self.last: kvc.ConnectorReading | None = None
        self.failures_seen = 0.0              # monotone sum of failure increases (our own counter)

    def add(self, now_s: float, reading: kvc.ConnectorReading) -> None:
        if self.last is not None and reading.failures_total is not None and self.last.failures_total is not None:
            increase = reading.failures_total - self.last.failures_total
            if increase > 0:
                self.failures_seen += increase
        self.last = reading
        for direction, value in reading.bytes_total.items():
            self.bytes[direction].add(now_s, value)
        for window, value in ((self.transfers, reading.transfers_total), (self.busy, reading.busy_seconds_total),
                              (self.failures, reading.failures_total)):
            if value is not None:
                window.add(now_s, value)
        for window, histogram in ((self.latency, reading.latency), (self.speed, reading.speed),
                                  (self.bootstrap, reading.bootstrap), (self.alloc_wait, reading.alloc_wait)):
            if histogram is not None:
                window.add(now_s, histogram)
        if reading.retries_total is not None:
            self.retries.add(now_s, reading.retries_total)

    def summary(self, now_s: float, direction: str) -> dict[str, Any] | None:
        last = self.last
        if last is None:
            return None
        out: dict[str, Any] = {"connector": last.connector}
        moved = last.bytes_total.get(direction)
        rate = self.bytes[direction].rate(now_s)
        # A byte counter that never moved says nothing (e.g. NIXL records on the
        # reading side only): absent, not 0.
        if rate is not None and moved:
            out["bytes_per_second"] = rate.per_second
            busy = self.busy.rate(now_s)
            if busy is not None and busy.total > 0:
                out["transfer_speed_bytes_per_second"] = rate.total / busy.total
        for d in kvc.DIRECTIONS:
            r = self.bytes[d].rate(now_s)
            if r is not None and last.bytes_total.get(d):
                out[f"{d}_bytes_per_second"] = r.per_second
        transfers = self.transfers.rate(now_s)
        if transfers is not None:
            out["transfers_per_second"] = transfers.per_second
        failures = self.failures.rate(now_s)
        if failures is not None:
            out["failures_in_window"] = failures.total
        if last.failures_total is not None:
            out["failures_total"] = self.failures_seen
        delta = self.latency.delta(now_s)
        if delta is not None and delta.count > 0:
            out["latency_mean_s"] = delta.mean
            out["latency_p90_s"] = delta.quantile(0.9)
        elif last.latency_s is not None:
            out["latency_mean_s"] = last.latency_s
        if last.speed_bytes_per_s is not None:
            out["transfer_speed_bytes_per_second"] = last.speed_bytes_per_s
        # SGLang's per-transfer histograms: mean speed of the transfers in the window (not
        # weighted by size, unlike transfer_speed_bytes_per_second), bootstrap and allocation waits.
        speed = self.speed.delta(now_s)
        if speed is not None and speed.count > 0:
            out["transfer_speed_mean_bytes_per_second"] = speed.mean
        for key, window in (("bootstrap", self.bootstrap), ("alloc_wait", self.alloc_wait)):
            delta = window.delta(now_s)
            if delta is not None and delta.count > 0:
                out[f"{key}_mean_s"] = delta.mean
                out[f"{key}_p90_s"] = delta.quantile(0.9)
        retries = self.retries.rate(now_s)
        if retries is not None:
            out["retries_in_window"] = retries.total
        out["window_s"] = self.bytes[direction].window_s
        return out


class _RdmaWindows:
    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.ports: dict[str, dict[str, RateWindow]] = {}

    def add(self, now_s: float, ports: Iterable[Any]) -> None:
        for port in ports:
            windows = self.ports.setdefault(port.key, {
                "send": RateWindow(window_s=self.window_s), "receive": RateWindow(window_s=self.window_s),
                "xmit_wait": RateWindow(window_s=self.window_s)})
            for key, value in (("send", port.xmit_words), ("receive", port.rcv_words),
                               ("xmit_wait", port.xmit_wait)):
                if value is not None:
                    windows[key].add(now_s, value)

    def summary(self, now_s: float, direction: str) -> dict[str, Any] | None:
        per_port: dict[str, dict[str, float]] = {}
        totals: dict[str, float] = {}
        for key, windows in sorted(self.ports.items()):
            entry = {}
            for name, window in windows.items():
                rate = window.rate(now_s)
                if rate is None:
                    continue
                # port_*_data count 4-byte words; port_xmit_wait counts ticks.
                value = rate.per_second * (4 if name in ("send", "receive") else 1)
                label = "xmit_wait_per_second" if name == "xmit_wait" else f"{name}_bytes_per_second"
                entry[label] = value
                totals[label] = totals.get(label, 0.0) + value
            if entry:
                per_port[key] = entry
        if not per_port:
            return None
        out: dict[str, Any] = dict(totals)
        if f"{direction}_bytes_per_second" in totals:
            out["bytes_per_second"] = totals[f"{direction}_bytes_per_second"]
        out["ports"] = per_port
        out["window_s"] = self.window_s
        return out


# -- the extension -----------------------------------------------------------------

class KvTransferExtension:
    """One sidecar's KV-transfer signals (see the module docstring)."""

    name = NAME

    def __init__(self, settings: KvSettings, *, rdma_reader: SysfsRdmaReader | None = None,
                 schedule_probes: bool = True) -> None:
        self.settings = settings
        self._schedule_probes = schedule_probes     # False: the caller runs probe rounds itself
        self._engine: dict[str, _ConnectorWindows] = {}
        self._exporter = _ConnectorWindows(settings.window_s)
        self._engine_seen_s: float | None = None
        self._engine_waiting: float | None = None
        self._engine_errors: dict[str, int] = {}
        self._agent_observes = False              # set once the agent hands us a page itself
        self._self_scraped_s: float | None = None
        self.self_scrapes = 0                     # fallback reads of the engine page, for tests and logs
        self._rdma_reader = rdma_reader or (SysfsRdmaReader(settings.rdma) if settings.rdma else None)
        self._rdma = _RdmaWindows(settings.window_s)
        self._session: aiohttp.ClientSession | None = None
        self._server: ProbeServer | None = None
        self._runner: ProbeRunner | None = None
        self._last_sample: Mapping[str, Any] = {}
        self._last_now_s: float | None = None
        # Engine-page state is written from the agent's page-parsing thread (observe_engine_page)
        # and read on the event loop (sample, engine_gate): guarded by this lock.
        self._lock = threading.Lock()

    # lifecycle

    async def start(self) -> None:
        s = self.settings
        if s.connector_url or s.engine_metrics_url:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.connector_timeout_s))
        if s.probe_server is not None and s.probe_listen is not None and s.probe_secret is not None:
            self._server = ProbeServer(s.probe_server, secret=s.probe_secret, host=s.probe_listen[0],
                                       port=s.probe_listen[1], gate=self.engine_gate)
            await self._server.start()
            log.info("kv-transfer probe server on %s:%d as %r", s.probe_listen[0], self._server.port,
                     s.probe_server.name)
        if s.probe_client is not None and s.probe_secret is not None:
            self._runner = ProbeRunner(s.probe_client, secret=s.probe_secret, gate=self.probe_gate)
            if self._schedule_probes:
                self._runner.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.close()
        if self._server is not None:
            await self._server.close()
        if self._session is not None:
            await self._session.close()

    @property
    def probe_server_port(self) -> int | None:
        return self._server.port if self._server is not None else None

    @property
    def probe_runner(self) -> ProbeRunner | None:
        return self._runner

    @property
    def engine_pages_from_agent(self) -> bool:
        """True once the agent hands pages over (the fallback self-scrape then stops)."""
        return self._agent_observes

    # inputs

    def observe_engine_page(self, text: str, now_s: float) -> None:
        """The agent's hook: the engine page it just scraped (same clock as ``sample``)."""
        self._agent_observes = True
        self._observe(text, now_s)

    def _observe(self, text: str, now_s: float) -> None:
        # The agent calls this from its page-parsing thread: parse without the lock (the long
        # part), then update the windows under it, so sample() on the event loop never sees
        # them half-written and never waits for a parse.
        try:
            page = kvc.parse_engine_page(text, direction=self.settings.direction)
        except ScrapeError as exc:
            self._count_error(exc.reason)
            return
        with self._lock:
            self._engine_seen_s = now_s
            self._engine_waiting = page.requests_waiting
            for reading in page.connectors:
                self._engine.setdefault(reading.connector,
                                        _ConnectorWindows(self.settings.window_s)).add(now_s, reading)

    def probe_gate(self) -> tuple[bool, str | None]:
        """Whether this pod may start a probe now (see the module docstring for the rule)."""
        if self.settings.probe_client is not None and self.settings.probe_client.when_saturated:
            return True, None
        return self.engine_gate()

    def engine_gate(self) -> tuple[bool, str | None]:
        """(False, why) while this pod's engine is saturated; the probe server asks it too."""
        now_s = self._last_now_s
        if self._engine_seen_s is None or now_s is None or now_s - self._engine_seen_s > self.settings.window_s:
            return True, None                    # engine state unknown: nothing to protect
        if self._engine_waiting is not None and self._engine_waiting > 0:
            return False, "engine_saturated:requests_waiting"
        moving = self._last_sample.get("sources", {}).get(SOURCE_ENGINE, {}).get("bytes_per_second")
        capacity = self._last_sample.get("sources", {}).get(SOURCE_PROBE, {}).get("bytes_per_second")
        if moving is not None and capacity and moving >= SATURATION_CAPACITY_RATIO * capacity:
            return False, "engine_saturated:kv_link_busy"
        return True, None

    async def _fetch(self, url: str) -> str | None:
        """A metrics page, or None (the failure is counted by reason)."""
        assert self._session is not None
        try:
            async with self._session.get(url, headers={"Accept": "text/plain; version=0.0.4"}) as response:
                if response.status != 200:
                    raise ScrapeError("http_status", f"HTTP {response.status} from {url}")
                return (await read_capped(response, MAX_PAGE_BYTES)).decode("utf-8")
        except asyncio.TimeoutError:
            self._count_error("timeout")
        except (aiohttp.ClientError, UnicodeDecodeError):
            self._count_error("connect")
        except ScrapeError as exc:
            self._count_error(exc.reason)
        return None

    def _count_error(self, reason: str) -> None:
        with self._lock:
            self._engine_errors[reason] = self._engine_errors.get(reason, 0) + 1

    async def _read_engine(self, now_s: float) -> None:
        if not self.settings.engine_metrics_url or self._agent_observes:
            return
        # An agent without the page hook: read the engine's connector metrics ourselves,
        # at a slower pace than the agent (a 30 s window needs no 1 Hz reads, and every
        # extra read costs the engine a /metrics render).
        if self._self_scraped_s is not None and now_s - self._self_scraped_s < self.settings.engine_scrape_interval_s:
            return
        self._self_scraped_s = now_s
        self.self_scrapes += 1
        text = await self._fetch(self.settings.engine_metrics_url)
        if text is not None and not self._agent_observes:
            await asyncio.to_thread(self._observe, text, now_s)     # a large page must not stall the loop

    async def _read_rdma(self, now_s: float) -> None:
        if self._rdma_reader is not None:
            self._rdma.add(now_s, await asyncio.to_thread(self._rdma_reader.read))

    async def _read_exporter(self, now_s: float) -> None:
        if not self.settings.connector_url:
            return
        text = await self._fetch(self.settings.connector_url)
        if text is None:
            return
        try:
            reading = await asyncio.to_thread(kvc.parse_connector_page, text)
        except ScrapeError as exc:
            self._count_error(exc.reason)
            return
        self._exporter.add(now_s, reading)

    # outputs

    async def sample(self, now_s: float) -> Mapping[str, Any]:
        self._last_now_s = now_s
        # The three reads are independent and each bounded: run them side by side.
        await asyncio.gather(self._read_exporter(now_s), self._read_engine(now_s), self._read_rdma(now_s))
        self._last_sample = self.build_sample(now_s)
        return self._last_sample

    def build_sample(self, now_s: float) -> dict[str, Any]:
        direction = self.settings.direction
        sources: dict[str, Any] = {}
        with self._lock:
            engine = self._engine_summary(now_s, direction)
            errors = dict(self._engine_errors)
        if engine is not None:
            sources[SOURCE_ENGINE] = engine
        rdma = self._rdma.summary(now_s, direction)
        if rdma is not None:
            sources[SOURCE_RDMA] = rdma
        probe_doc = self._probe_summary(now_s)
        if probe_doc.get("bytes_per_second") is not None:
            sources[SOURCE_PROBE] = {"bytes_per_second": probe_doc["bytes_per_second"]}
        headline, source = None, None
        for name in (SOURCE_ENGINE, SOURCE_RDMA):
            value = sources.get(name, {}).get("bytes_per_second")
            if value is not None:
                headline, source = value, name
                break
        out: dict[str, Any] = {"bytes_per_second": headline, "direction": direction, "source": source,
                               "window_s": self.settings.window_s, "sources": sources}
        if probe_doc:
            out["probe"] = probe_doc
        if errors:
            out["errors"] = errors
        return out

    def _engine_summary(self, now_s: float, direction: str) -> dict[str, Any] | None:
        # The transfer library's own exporter is more exact (it knows the direction); then the engine page.
        candidates = [self._exporter] + [self._engine[k] for k in sorted(self._engine)]
        first = None
        for windows in candidates:
            summary = windows.summary(now_s, direction)
            if summary is None:
                continue
            if "bytes_per_second" in summary:
                return summary
            first = first or summary
        return first

    def _probe_summary(self, now_s: float) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        runner = self._runner
        if runner is not None:
            peers = [dict(outcome_to_dict(o, now_mono_s=time.monotonic()))
                     for _, o in sorted(runner.outcomes.items())]
            doc["peers"] = peers
            fresh = [p.get("best_recent_bytes_per_second", p.get("bytes_per_second")) for p in peers
                     if "best_recent_bytes_per_second" in p and p["age_s"] <= 3 * runner.settings.interval_s]
            if fresh:
                doc["bytes_per_second"] = median(fresh)
            if runner.skipped:
                doc["skipped"] = runner.skipped
        if self._server is not None:
            c = self._server.counters
            doc["server"] = {"name": self._server.settings.name, "probes": c.probes,
                             "bytes_received": c.bytes_received, "refusals": dict(c.refusals),
                             "pending": self._server.pending, "active": self._server.active}
        return doc

    def collect(self) -> Iterable[Metric]:
        """Families from the last sample. The bytes/s per source are the sidecar's own
        ``heteroscale_kv_transfer_bytes_per_second{direction,source}`` (from ``sample``)."""
        sample = self._last_sample
        sources = sample.get("sources", {})
        engine = sources.get(SOURCE_ENGINE, {})
        latency = GaugeMetricFamily("heteroscale_kv_transfer_latency_seconds",
                                    "per-transfer KV latency over the window (engine connector metrics)",
                                    labels=["stat"])
        for stat in ("mean", "p90"):
            value = engine.get(f"latency_{stat}_s")
            if value is not None:
                latency.add_metric([stat], value)
        yield latency
        failures = CounterMetricFamily("heteroscale_kv_transfer_failures",
                                       "KV transfers the engine reported as failed, since this sidecar started",
                                       labels=["connector"])
        if "failures_total" in engine:
            failures.add_metric([engine["connector"]], engine["failures_total"])
        yield failures
        rdma_wait = GaugeMetricFamily("heteroscale_kv_transfer_rdma_xmit_wait_per_second",
                                      "RDMA port_xmit_wait ticks per second (congestion)", labels=["port"])
        for port, entry in sources.get(SOURCE_RDMA, {}).get("ports", {}).items():
            if "xmit_wait_per_second" in entry:
                rdma_wait.add_metric([port], entry["xmit_wait_per_second"])
        yield rdma_wait
        probe = sample.get("probe", {})
        probe_bps = GaugeMetricFamily("heteroscale_kv_transfer_probe_bytes_per_second",
                                      "achievable bytes/s to a decode peer, last probe", labels=["peer"])
        probe_rtt = GaugeMetricFamily("heteroscale_kv_transfer_probe_rtt_seconds",
                                      "median round-trip time to a decode peer, last probe", labels=["peer"])
        for peer in probe.get("peers", ()):
            label = str(peer.get("peer") or peer.get("address"))
            if peer.get("bytes_per_second") is not None:
                probe_bps.add_metric([label], peer["bytes_per_second"])
            if peer.get("rtt_s") is not None:
                probe_rtt.add_metric([label], peer["rtt_s"])
        yield probe_bps
        yield probe_rtt
        errors = CounterMetricFamily("heteroscale_kv_transfer_probe_errors",
                                     "probes that failed, by peer and reason", labels=["peer", "reason"])
        if self._runner is not None:
            for (peer, reason), count in sorted(self._runner.errors.items()):
                errors.add_metric([peer, reason], count)
        yield errors
        refusals = CounterMetricFamily("heteroscale_kv_transfer_probe_refusals",
                                       "probe connections this server refused, by reason", labels=["reason"])
        if self._server is not None:
            for reason, count in sorted(self._server.counters.refusals.items()):
                refusals.add_metric([reason], count)
        yield refusals
