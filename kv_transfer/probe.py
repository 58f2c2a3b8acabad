"""The active KV-transfer probe: a bounded, authenticated bulk TCP transfer (I/O).

A prefill sidecar measures what its links to the decode peers can carry: it
pushes ``payload_bytes`` to each peer's probe server (the direction KV caches
travel: prefill -> decode) and reads back how fast they arrived, plus the
round-trip time of a few small pings before the bulk. Engines' own metrics say
what *was* moved; the probe says what *could* be moved, which is what the
coordinator needs to compare same-switch and cross-switch pairs.

Why it cannot be abused as a traffic generator:

* **Authentication.** HMAC-SHA256 challenge-response with a shared secret,
  both ways. The server opens with a random nonce and its name; the client
  answers with its own nonce, the requested size and a MAC over all of it; the
  server checks it with ``hmac.compare_digest`` and answers with its own MAC
  (so a client knows it measured the real peer). No secret, no bytes.
* **Caps on the server** (``ProbeServerSettings``): a per-probe size cap, an
  average-rate budget (token bucket in bytes/s with a burst), one probe at a
  time, a bounded number of unauthenticated connections, and timeouts on the
  handshake and the transfer. A request over a cap is refused, never trimmed.
* **Caps on the client** (``ProbeClientSettings``): probe size, interval, and
  ``peers × bytes / interval`` must stay under an average-rate cap, checked
  when the settings are built; probes run one at a time; and by default no
  probe runs while the engine is saturated (the gate is a callable the sidecar
  extension provides).

Wire format (all integers big-endian)::

    S->C  MAGIC(6) server_nonce(32) name_len(1) name
    C->S  client_nonce(32) payload_bytes(8) pings(1) mac(32)
    S->C  status(1) [server_mac(32) when status == OK]
    ping  C->S seq(8), S->C seq(8)           x pings
    bulk  C->S payload_bytes of zeros
    S->C  received(8) first_read(8) span_ns(8) result_mac(32)

The throughput is measured where the bytes arrive: ``(received - first_read) /
span``, from the end of the first read to the end of the last, so the sender's
socket buffer (megabytes, with autotuning) cannot inflate it. The sender's own
view (``bytes / time to the result``) is reported beside it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import random
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping

from heteroscale.errors import ConfigError, TransientError
from heteroscale.kv_transfer.stats import median
from heteroscale.net import parse_host_port

log = logging.getLogger("heteroscale.kv_transfer.probe")

MAGIC = b"HSKVP1"
NONCE_BYTES = 32
MAC_BYTES = 32
CHUNK_BYTES = 256 * 1024
READ_LIMIT_BYTES = 4 * 1024 * 1024      # server StreamReader buffer (pauses reading at 2x)
WRITE_BUFFER_BYTES = 4 * 1024 * 1024    # client transport buffer: keeps the socket fed across stalls
_ZEROS = bytes(CHUNK_BYTES)

STATUS_OK = 0
STATUS_AUTH = 1
STATUS_TOO_BIG = 2
STATUS_BUSY = 3
STATUS_BAD_REQUEST = 4
_STATUS_REASON = {STATUS_AUTH: "auth", STATUS_TOO_BIG: "too_big", STATUS_BUSY: "busy",
                  STATUS_BAD_REQUEST: "bad_request"}

MIB = 1024 * 1024
HARD_MAX_PROBE_BYTES = 1024 * MIB      # no setting may ask for more than this per probe
MIN_PROBE_BYTES = 64 * 1024            # below this a transfer is one read: no throughput to see
MAX_PINGS = 32


class ProbeError(TransientError):
    """A probe that did not produce a measurement; ``reason`` labels the metric.

    Reasons: ``connect``, ``timeout``, ``protocol``, ``auth`` (the peer refused our
    MAC: secrets differ), ``peer_auth`` (the peer's MAC is wrong: not our peer),
    ``too_big``, ``busy``, ``bad_request`` (refused by the peer's caps).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# -- secrets and MACs ----------------------------------------------------------------

def load_secret(path: str) -> bytes:
    """The shared secret from a file (surrounding whitespace dropped); at least 16 bytes."""
    try:
        with open(path, "rb") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        raise ConfigError([f"cannot read probe secret file {path}: {exc.strerror or exc}"],
                          source="--probe-secret-file") from exc
    if len(secret) < 16:
        raise ConfigError([f"probe secret in {path} is shorter than 16 bytes"], source="--probe-secret-file")
    return secret


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


# -- server ------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeServerSettings:
    """The probe server's identity and caps.

    ``name``: what the server announces (the decode pod's name), so a client
    reports pairs by pod. ``max_bytes_per_probe``: larger requests are refused.
    ``max_bytes_per_s`` / ``burst_bytes``: the average-rate budget over all
    clients (token bucket); a probe that does not fit is refused as ``busy``.
    ``max_concurrent``: probes served at once (1: two probes would share the link
    and both read low). ``max_connections``: connections in the handshake at once.
    Timeouts bound a silent or slow client.
    """

    name: str
    max_bytes_per_probe: int = 64 * MIB
    max_bytes_per_s: float = 8.0 * MIB
    burst_bytes: int = 128 * MIB
    max_concurrent: int = 1
    max_connections: int = 16
    handshake_timeout_s: float = 5.0
    transfer_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        problems = []
        if not self.name or len(self.name.encode()) > 255:
            problems.append("probe server name must be 1..255 bytes")
        if not MIN_PROBE_BYTES <= self.max_bytes_per_probe <= HARD_MAX_PROBE_BYTES:
            problems.append(f"max_bytes_per_probe must be within {MIN_PROBE_BYTES}..{HARD_MAX_PROBE_BYTES}")
        if not self.max_bytes_per_s > 0:
            problems.append("max_bytes_per_s must be positive")
        if self.burst_bytes < self.max_bytes_per_probe:
            problems.append("burst_bytes must be at least max_bytes_per_probe (else no probe ever fits)")
        if self.max_concurrent < 1 or self.max_connections < 1:
            problems.append("max_concurrent and max_connections must be at least 1")
        if not (self.handshake_timeout_s > 0 and self.transfer_timeout_s > 0):
            problems.append("timeouts must be positive")
        if problems:
            raise ConfigError(problems, source="probe server")


class ByteBudget:
    """Token bucket in bytes: ``rate_per_s`` refill, ``burst`` capacity. Time is an argument."""

    def __init__(self, *, rate_per_s: float, burst: float, now_s: float) -> None:
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated_s = float(now_s)

    def try_take(self, amount: float, now_s: float) -> bool:
        elapsed = max(0.0, now_s - self.updated_s)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
        self.updated_s = max(self.updated_s, now_s)
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


@dataclass
class ServerCounters:
    """What the server did, for metrics: probes served, bytes received, refusals by reason."""

    probes: int = 0
    bytes_received: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    last_peer: str | None = None

    def refuse(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1


class ProbeServer:
    """The decode side: answers authenticated probes within its caps.

    ``start()`` binds (``port`` 0 picks a free one, see ``port``); ``close()``
    stops accepting and cancels connections in flight.
    """

    def __init__(self, settings: ProbeServerSettings, *, secret: bytes, host: str, port: int,
                 clock: Callable[[], float] = time.monotonic, gate: "Gate | None" = None) -> None:
        self.settings = settings
        # The decode side's own "not now" (its engine is saturated): refused as busy.
        self._gate = gate
        self._secret = secret
        self._host = host
        self._port = port
        self._clock = clock
        self._budget = ByteBudget(rate_per_s=settings.max_bytes_per_s, burst=settings.burst_bytes,
                                  now_s=clock())
        self._server: asyncio.base_events.Server | None = None
        self._active = 0
        self._connections = 0
        self._handlers: set[asyncio.Task] = set()
        self.counters = ServerCounters()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        try:
            # A large reader limit: the transport is paused only past 2 x limit, so a
            # briefly descheduled server does not throttle the link it is measuring.
            self._server = await asyncio.start_server(self._handle, self._host, self._port,
                                                      reuse_address=True, limit=READ_LIMIT_BYTES)
        except OSError as exc:
            raise ConfigError([f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}"],
                              source="--probe-listen") from exc

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await asyncio.shield(self._server.wait_closed())
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            if self._connections >= self.settings.max_connections:
                self.counters.refuse("connections")
                return
            self._connections += 1
            try:
                await self._serve_one(reader, writer)
            finally:
                self._connections -= 1
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            self.counters.refuse("timeout" if isinstance(exc, asyncio.TimeoutError) else "protocol")
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.CancelledError):
                pass
            if task is not None:
                self._handlers.discard(task)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        name = s.name.encode()
        server_nonce = os.urandom(NONCE_BYTES)
        writer.write(MAGIC + server_nonce + bytes([len(name)]) + name)
        await writer.drain()
        request = await asyncio.wait_for(reader.readexactly(NONCE_BYTES + 8 + 1 + MAC_BYTES),
                                         s.handshake_timeout_s)
        client_nonce = request[:NONCE_BYTES]
        size_raw = request[NONCE_BYTES:NONCE_BYTES + 8]
        pings_raw = request[NONCE_BYTES + 8:NONCE_BYTES + 9]
        mac = request[NONCE_BYTES + 9:]
        expected = _mac(self._secret, b"client", MAGIC, server_nonce, client_nonce, size_raw, pings_raw, name)
        if not hmac.compare_digest(mac, expected):
            await self._refuse(writer, STATUS_AUTH)
            return
        payload_bytes = struct.unpack(">Q", size_raw)[0]
        pings = pings_raw[0]
        if payload_bytes < MIN_PROBE_BYTES or pings > MAX_PINGS:
            await self._refuse(writer, STATUS_BAD_REQUEST)
            return
        if payload_bytes > s.max_bytes_per_probe:
            await self._refuse(writer, STATUS_TOO_BIG)
            return
        if self._gate is not None and not self._gate()[0]:
            self.counters.refuse("saturated")
            writer.write(bytes([STATUS_BUSY]))
            await writer.drain()
            return
        if self._active >= s.max_concurrent or not self._budget.try_take(payload_bytes, self._clock()):
            await self._refuse(writer, STATUS_BUSY)
            return
        self._active += 1
        try:
            writer.write(bytes([STATUS_OK]) + _mac(self._secret, b"server", MAGIC, client_nonce,
                                                   server_nonce, size_raw))
            await writer.drain()
            await asyncio.wait_for(self._transfer(reader, writer, payload_bytes, pings,
                                                  client_nonce, server_nonce),
                                   s.transfer_timeout_s)
        finally:
            self._active -= 1

    async def _transfer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        payload_bytes: int, pings: int, client_nonce: bytes, server_nonce: bytes) -> None:
        for _ in range(pings):
            writer.write(await reader.readexactly(8))
            await writer.drain()
        received = 0
        first_read = 0
        first_ns = last_ns = 0
        while received < payload_bytes:
            chunk = await reader.read(min(CHUNK_BYTES, payload_bytes - received))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", payload_bytes - received)
            now_ns = time.perf_counter_ns()
            if received == 0:
                first_read, first_ns = len(chunk), now_ns
            received += len(chunk)
            last_ns = now_ns
        fields_raw = struct.pack(">QQQ", received, first_read, last_ns - first_ns)
        writer.write(fields_raw + _mac(self._secret, b"result", MAGIC, client_nonce, server_nonce, fields_raw))
        await writer.drain()
        self.counters.probes += 1
        self.counters.bytes_received += received

    async def _refuse(self, writer: asyncio.StreamWriter, status: int) -> None:
        self.counters.refuse(_STATUS_REASON[status])
        writer.write(bytes([status]))
        await writer.drain()


# -- client ------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeResult:
    """One successful probe of one peer."""

    peer: str                          # the name the peer announced (authenticated)
    address: str                       # host:port probed
    payload_bytes: int
    bytes_per_second: float            # measured at the receiver
    sender_bytes_per_second: float     # bytes / (first write .. result received)
    rtt_s: float | None                # median ping round trip; None with no pings
    rtt_min_s: float | None
    duration_s: float                  # the whole probe, handshake included

    def to_dict(self) -> dict[str, object]:
        return {"peer": self.peer, "address": self.address, "payload_bytes": self.payload_bytes,
                "bytes_per_second": self.bytes_per_second,
                "sender_bytes_per_second": self.sender_bytes_per_second,
                "rtt_s": self.rtt_s, "rtt_min_s": self.rtt_min_s, "duration_s": self.duration_s}


async def probe_peer(host: str, port: int, *, secret: bytes, payload_bytes: int, pings: int = 5,
                     timeout_s: float = 30.0) -> ProbeResult:
    """Probe one peer; raises ``ProbeError`` (never returns a partial number)."""
    if not MIN_PROBE_BYTES <= payload_bytes <= HARD_MAX_PROBE_BYTES or not 0 <= pings <= MAX_PINGS:
        raise ValueError("payload_bytes or pings out of range")
    started = time.perf_counter()
    try:
        return await asyncio.wait_for(_probe(host, port, secret=secret, payload_bytes=payload_bytes,
                                             pings=pings, started=started), timeout_s)
    except asyncio.TimeoutError as exc:
        raise ProbeError("timeout", f"{host}:{port} did not finish within {timeout_s:g} s") from exc


async def _probe(host: str, port: int, *, secret: bytes, payload_bytes: int, pings: int,
                 started: float) -> ProbeResult:
    address = f"{host}:{port}"
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise ProbeError("connect", f"{address}: {exc.strerror or exc}") from exc
    try:
        try:
            return await _exchange(reader, writer, address, secret=secret, payload_bytes=payload_bytes,
                                   pings=pings, started=started)
        except asyncio.IncompleteReadError as exc:
            raise ProbeError("protocol", f"{address} closed the connection early") from exc
        except ConnectionError as exc:
            raise ProbeError("protocol", f"{address}: {exc}") from exc
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str, *,
                    secret: bytes, payload_bytes: int, pings: int, started: float) -> ProbeResult:
    hello = await reader.readexactly(len(MAGIC) + NONCE_BYTES + 1)
    if hello[:len(MAGIC)] != MAGIC:
        raise ProbeError("protocol", f"{address} is not a HeteroScale probe server")
    server_nonce = hello[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    name = await reader.readexactly(hello[-1])
    client_nonce = os.urandom(NONCE_BYTES)
    size_raw = struct.pack(">Q", payload_bytes)
    pings_raw = bytes([pings])
    writer.write(client_nonce + size_raw + pings_raw
                 + _mac(secret, b"client", MAGIC, server_nonce, client_nonce, size_raw, pings_raw, name))
    await writer.drain()
    status = (await reader.readexactly(1))[0]
    if status != STATUS_OK:
        raise ProbeError(_STATUS_REASON.get(status, "protocol"), f"refused by {address}")
    server_mac = await reader.readexactly(MAC_BYTES)
    if not hmac.compare_digest(server_mac, _mac(secret, b"server", MAGIC, client_nonce, server_nonce, size_raw)):
        raise ProbeError("peer_auth", f"{address} does not know the shared secret")
    rtts = []
    for seq in range(pings):
        sent = time.perf_counter()
        writer.write(struct.pack(">Q", seq))
        await writer.drain()
        if struct.unpack(">Q", await reader.readexactly(8))[0] != seq:
            raise ProbeError("protocol", f"{address} echoed the wrong ping")
        rtts.append(time.perf_counter() - sent)
    writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
    bulk_started = time.perf_counter()
    remaining = payload_bytes
    view = memoryview(_ZEROS)
    while remaining > 0:
        n = min(CHUNK_BYTES, remaining)
        writer.write(view[:n])
        await writer.drain()
        remaining -= n
    result = await reader.readexactly(24 + MAC_BYTES)
    finished = time.perf_counter()
    fields_raw, mac = result[:24], result[24:]
    if not hmac.compare_digest(mac, _mac(secret, b"result", MAGIC, client_nonce, server_nonce, fields_raw)):
        raise ProbeError("peer_auth", f"{address} sent an unauthenticated result")
    received, first_read, span_ns = struct.unpack(">QQQ", fields_raw)
    if received != payload_bytes:
        raise ProbeError("protocol", f"{address} received {received} of {payload_bytes} bytes")
    sender_bps = payload_bytes / max(finished - bulk_started, 1e-9)
    receiver_bps = (received - first_read) / (span_ns / 1e9) if span_ns > 0 and received > first_read else sender_bps
    return ProbeResult(peer=name.decode(errors="replace"), address=address, payload_bytes=payload_bytes,
                       bytes_per_second=receiver_bps, sender_bytes_per_second=sender_bps,
                       rtt_s=median(rtts), rtt_min_s=min(rtts) if rtts else None,
                       duration_s=finished - started)


# -- the prefill side's schedule ---------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """A decode peer to probe. ``name`` is only a hint; the server's announced name wins."""

    host: str
    port: int
    name: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    """``[name=]host:port`` (IPv6 as ``[::1]:port``) -> ``Peer``; ``ValueError`` on bad input."""
    name = None
    if "=" in text:
        name, text = text.split("=", 1)
        if not name:
            raise ValueError("empty peer name before '='")
    host, port = parse_host_port(text, require_host=True, allow_port_zero=False)
    return Peer(host=host, port=port, name=name)


@dataclass(frozen=True)
class ProbeClientSettings:
    """What the prefill side probes, how much and how often.

    ``payload_bytes``: bytes per probe (bigger = steadier number, more traffic).
    ``interval_s``: seconds between two probes of the same peer. ``pings``: RTT
    samples per probe. ``max_average_bytes_per_s``: the cap on
    ``len(peers) * payload_bytes / interval_s``, checked here. ``timeout_s``:
    one probe's bound. ``when_saturated``: probe even while the engine is
    saturated (off by default: the probe would steal the link from real KV
    traffic and read low). ``jitter_ratio``: spread of the interval so many
    prefill pods do not probe one decode pod in lockstep.
    """

    peers: tuple[Peer, ...]
    payload_bytes: int = 16 * MIB
    interval_s: float = 60.0
    pings: int = 5
    timeout_s: float = 30.0
    max_average_bytes_per_s: float = 4.0 * MIB
    when_saturated: bool = False
    jitter_ratio: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if not self.peers:
            problems.append("at least one probe peer is needed")
        if not MIN_PROBE_BYTES <= self.payload_bytes <= HARD_MAX_PROBE_BYTES:
            problems.append(f"probe bytes must be within {MIN_PROBE_BYTES}..{HARD_MAX_PROBE_BYTES}")
        if not self.interval_s >= 1.0:
            problems.append("probe interval must be at least 1 s")
        if not 0 <= self.pings <= MAX_PINGS:
            problems.append(f"pings must be within 0..{MAX_PINGS}")
        if not self.timeout_s > 0:
            problems.append("probe timeout must be positive")
        if self.interval_s >= 1.0 and self.peers:
            average = len(self.peers) * self.payload_bytes / self.interval_s
            if average > self.max_average_bytes_per_s:
                problems.append(
                    f"{len(self.peers)} peers x {self.payload_bytes} bytes every {self.interval_s:g} s "
                    f"= {average:.0f} B/s exceeds the probe rate cap {self.max_average_bytes_per_s:.0f} B/s")
        if not 0 <= self.jitter_ratio < 1:
            problems.append("jitter ratio must be within [0, 1)")
        if problems:
            raise ConfigError(problems, source="probe")


@dataclass(frozen=True)
class ProbeOutcome:
    """The latest word on one peer: a result (with the wall time it was taken) or an error."""

    peer: Peer
    result: ProbeResult | None
    error: ProbeError | None
    measured_at: float                 # unix seconds
    measured_mono_s: float             # monotonic seconds, for ages
    best_recent_bytes_per_second: float | None = None   # max of the last RECENT_PROBES successes
    recent_probes: int = 0             # how many successes that max is over


# Capacity is the upper envelope of what a link carried: one probe can read low
# because real KV traffic or a busy CPU got in its way, never high. The best of the
# last few probes (all within 3 intervals) is what the coordinator judges pairs by.
RECENT_PROBES = 3

Gate = Callable[[], tuple[bool, str | None]]
ProbeFn = Callable[..., Awaitable[ProbeResult]]


class ProbeRunner:
    """Probes every peer once per interval, one at a time, while the gate allows.

    The loop is one named task, started and closed in pairs; its sleep is
    interruptible (``close`` ends it at once). ``outcomes`` holds the latest
    outcome per peer address; ``skipped`` the gate's last refusal reason.
    """

    def __init__(self, settings: ProbeClientSettings, *, secret: bytes, gate: Gate | None = None,
                 rng: random.Random | None = None, probe: ProbeFn = probe_peer,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._secret = secret
        self._gate = gate or (lambda: (True, None))
        self._rng = rng or random.Random()
        self._probe = probe
        self._clock = clock
        self._wall = wall_clock
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self.outcomes: dict[str, ProbeOutcome] = {}
        self.skipped: str | None = None
        self.errors: dict[tuple[str, str], int] = {}
        self.probes = 0
        self._recent: dict[str, deque[tuple[float, float]]] = {}

    def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._loop(), name="kv-transfer-probe")

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def probe_all(self) -> None:
        """One round over every peer (the gate is asked before each)."""
        for peer in self.settings.peers:
            if self._stop.is_set():
                return
            allowed, reason = self._gate()
            if not allowed:
                self.skipped = reason
                return
            self.skipped = None
            await self._probe_one(peer)

    async def _probe_one(self, peer: Peer) -> None:
        s = self.settings
        recent = self._recent.setdefault(peer.address, deque(maxlen=RECENT_PROBES))
        result: ProbeResult | None = None
        error: ProbeError | None = None
        try:
            result = await self._probe(peer.host, peer.port, secret=self._secret, payload_bytes=s.payload_bytes,
                                       pings=s.pings, timeout_s=s.timeout_s)
            self.probes += 1
        except ProbeError as exc:
            log.warning("kv-transfer probe of %s failed: %s", peer.address, exc)
            key = (peer.name or peer.address, exc.reason)
            self.errors[key] = self.errors.get(key, 0) + 1
            error = exc
        now = self._clock()
        if result is not None:
            recent.append((now, result.bytes_per_second))
        fresh = [bps for t, bps in recent if now - t <= 3 * s.interval_s]
        self.outcomes[peer.address] = ProbeOutcome(
            peer, result, error, self._wall(), now,
            best_recent_bytes_per_second=max(fresh) if fresh else None, recent_probes=len(fresh))

    async def _loop(self) -> None:
        # A random first offset spreads many prefill pods over the interval.
        delay = self._rng.uniform(0, min(self.settings.interval_s, 5.0))
        while not self._stop.is_set():
            if await self._sleep(delay):
                return
            started = self._clock()
            await self.probe_all()
            jitter = 1 + self._rng.uniform(-self.settings.jitter_ratio, self.settings.jitter_ratio)
            delay = max(0.0, self.settings.interval_s * jitter - (self._clock() - started))

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopped."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False


def outcome_to_dict(outcome: ProbeOutcome, *, now_mono_s: float) -> Mapping[str, object]:
    """The report form of an outcome (see docs/kv-transfer.md for the fields)."""
    doc: dict[str, object] = {
        "address": outcome.peer.address,
        "peer": outcome.result.peer if outcome.result else outcome.peer.name,
        "measured_at": outcome.measured_at,
        "age_s": max(0.0, now_mono_s - outcome.measured_mono_s),
    }
    if outcome.result is not None:
        doc.update({k: v for k, v in outcome.result.to_dict().items() if k not in ("peer", "address")})
    if outcome.best_recent_bytes_per_second is not None:
        doc["best_recent_bytes_per_second"] = outcome.best_recent_bytes_per_second
        doc["recent_probes"] = outcome.recent_probes
    if outcome.error is not None:
        doc["error"] = outcome.error.reason
    return doc
