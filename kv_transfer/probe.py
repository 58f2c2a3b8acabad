"""The active KV-transfer probe: a bounded, authenticated bulk TCP transfer (I/O).

A prefill sidecar measures what its links to the decode peers can carry: it
pushes ``payload_bytes`` to each peer's probe server (the direction KV caches
travel: prefill -> decode) and reads back how fast they arrived, plus the
round-trip time of a few small pings before the bulk. Engines' own metrics say
what *was* moved; the probe says what *could* be moved, which is what the
coordinator needs to compare same-switch and cross-switch pairs.

Why it can be neither abused as a traffic generator nor denied to honest peers:

* **Authentication first, nothing before it.** HMAC-SHA256 challenge-response
  with a shared secret, both ways. The server opens with 32 random bytes and
  nothing else (no name, no version); the client answers with the protocol
  magic, its own nonce, the requested size and a MAC over all of it, within
  ``auth_timeout_s`` of connecting. Only then does the server prove it knows
  the secret and name its pod (inside its MAC).
* **Unauthenticated connections hold no probe slot.** They wait in a separate,
  bounded pre-auth pool (``max_pending`` in all, ``max_pending_per_peer`` per
  source address). A newcomer never waits for room: when the peer is at its
  cap, that peer's oldest pending connection is dropped; when the pool is full,
  the oldest pending connection of the peer holding the most is. A flood from
  some addresses thus displaces only itself, and an idle connection lives at
  most ``auth_timeout_s``.
* **Per-peer limits after authentication.** A probe slot (``max_concurrent``)
  is held at most ``SLOT_OVERHEAD_S + payload_bytes / min_bytes_per_s`` (capped
  by ``transfer_timeout_s``) and at most ``idle_timeout_s`` of silence; a
  client that is slower is cut (status ``cut``). Each source address has its
  own token bucket (``peer_bytes_per_s``, burst one maximal probe) beside the
  server-wide one (``max_bytes_per_s``, ``burst_bytes``), so one peer that
  holds the secret gets at most its share.
* **Every refusal says so.** Over a limit, the answer is ``busy`` with the
  milliseconds after which a retry can succeed (the slot's deadline, the
  bucket's refill), then close; ``auth``, ``too_big``, ``bad_request`` likewise.
  A request over a cap is refused, never trimmed.
* **Caps on the client** (``ProbeClientSettings``): probe size, interval, and
  ``peers × bytes / interval`` must stay under an average-rate cap, checked
  when the settings are built; probes run one at a time; a ``busy`` answer is
  retried once after its ``retry after`` when that is within half an interval;
  by default no probe runs while the engine is saturated (the gate is a
  callable the sidecar extension provides).

Wire format, protocol version 2 (all integers big-endian)::

    S->C  challenge(32)                                   random; says nothing else
    C->S  MAGIC(6) client_nonce(32) payload_bytes(8) pings(1) mac(32)
          mac = HMAC(secret, "client" MAGIC challenge client_nonce payload_bytes pings)
    S->C  OK(1) server_mac(32) name_len(1) name
          server_mac = HMAC(secret, "server" MAGIC client_nonce challenge payload_bytes pings name_len name)
       |  BUSY(1) retry_after_ms(4)                       then close
       |  AUTH(1) | TOO_BIG(1) | BAD_REQUEST(1)          then close
    ping  C->S seq(8), S->C seq(8)           x pings
    bulk  C->S payload_bytes of zeros
    S->C  OK(1) received(8) first_read(8) span_ns(8) result_mac(32)
          result_mac = HMAC(secret, "result" MAGIC client_nonce challenge received first_read span_ns)
       |  CUT(1)                                          the slot's deadline or idle limit passed

Version 1 (magic ``HSKVP1``) opened with the magic and the server's name before
any authentication. A version-2 client recognises a version-1 server by that
opening and reports ``version``; a version-1 client cannot parse a version-2
challenge and fails with ``protocol`` once the server's auth deadline closes the
connection. Roll both sides of a service to the same version.

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
import math
import os
import random
import struct
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping

from heteroscale.errors import ConfigError, TransientError
from heteroscale.kv_transfer.stats import median
from heteroscale.net import parse_host_port

log = logging.getLogger("heteroscale.kv_transfer.probe")

PROTOCOL_VERSION = 2
MAGIC = b"HSKVP2"
MAGIC_V1 = b"HSKVP1"
NONCE_BYTES = 32
MAC_BYTES = 32
REQUEST_BYTES = len(MAGIC) + NONCE_BYTES + 8 + 1 + MAC_BYTES
CHUNK_BYTES = 256 * 1024
READ_LIMIT_BYTES = 4 * 1024 * 1024      # server StreamReader buffer (pauses reading at 2x)
WRITE_BUFFER_BYTES = 4 * 1024 * 1024    # client transport buffer: keeps the socket fed across stalls
_ZEROS = bytes(CHUNK_BYTES)

STATUS_OK = 0
STATUS_AUTH = 1
STATUS_TOO_BIG = 2
STATUS_BUSY = 3
STATUS_BAD_REQUEST = 4
STATUS_CUT = 5
_STATUS_REASON = {STATUS_AUTH: "auth", STATUS_TOO_BIG: "too_big", STATUS_BUSY: "busy",
                  STATUS_BAD_REQUEST: "bad_request", STATUS_CUT: "cut"}

MIB = 1024 * 1024
HARD_MAX_PROBE_BYTES = 1024 * MIB      # no setting may ask for more than this per probe
MIN_PROBE_BYTES = 64 * 1024            # below this a transfer is one read: no throughput to see
MAX_PINGS = 32
SLOT_OVERHEAD_S = 1.0                  # pings and the result frame, on top of bytes / min rate
EVICTED_RETRY_AFTER_S = 1.0            # what a connection dropped from the pre-auth pool is told
MAX_RETRY_AFTER_S = 3600.0


class ProbeError(TransientError):
    """A probe that did not produce a measurement; ``reason`` labels the metric.

    Reasons: ``connect``, ``timeout``, ``protocol``, ``version`` (the peer speaks
    another protocol version), ``auth`` (the peer refused our MAC: secrets differ),
    ``peer_auth`` (the peer's MAC is wrong: not our peer), ``too_big``, ``busy``,
    ``bad_request`` (refused by the peer's caps), ``cut`` (the peer ended our slot:
    slower than its minimum rate). ``retry_after_s`` comes with ``busy``.
    """

    def __init__(self, reason: str, detail: str = "", *, retry_after_s: float | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.retry_after_s = retry_after_s
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


def busy_frame(retry_after_s: float) -> bytes:
    """``BUSY retry_after_ms``: whole milliseconds, rounded up, within 1 ms .. 1 h."""
    millis = math.ceil(min(max(retry_after_s, 0.001), MAX_RETRY_AFTER_S) * 1000)
    return bytes([STATUS_BUSY]) + struct.pack(">I", millis)


# -- server ------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeServerSettings:
    """The probe server's identity and caps.

    ``name``: what the server tells an authenticated client (the decode pod's
    name), so a client reports pairs by pod. ``max_bytes_per_probe``: larger
    requests are refused. ``max_bytes_per_s`` / ``burst_bytes``: the average-rate
    budget over all clients (token bucket). ``peer_bytes_per_s``: one source
    address's own budget (burst: one ``max_bytes_per_probe``); lower = fairer
    among many prefill pods, but a peer probing often is told ``busy`` sooner.
    ``max_concurrent``: probes served at once (1: two probes would share the link
    and both read low). ``max_pending`` / ``max_pending_per_peer``: connections
    not yet authenticated, in all and per source address (see the module
    docstring for who is dropped when full). ``auth_timeout_s``: from connect to a
    verified request; shorter = idle connections go sooner, but a client on a slow
    path must authenticate within it. ``min_bytes_per_s``: the slowest transfer the
    server waits for; a slot lasts at most ``SLOT_OVERHEAD_S + payload_bytes /
    min_bytes_per_s`` and never more than ``transfer_timeout_s``; set it below the
    slowest link you want measured. ``idle_timeout_s``: silence allowed inside a
    probe. ``busy_retry_after_s``: the retry advice while the engine is saturated.
    ``max_peers_tracked``: per-peer budgets kept (least recently used dropped).
    """

    name: str
    max_bytes_per_probe: int = 64 * MIB
    max_bytes_per_s: float = 8.0 * MIB
    burst_bytes: int = 128 * MIB
    peer_bytes_per_s: float = 2.0 * MIB
    max_concurrent: int = 1
    max_pending: int = 64
    max_pending_per_peer: int = 8
    auth_timeout_s: float = 2.0
    min_bytes_per_s: float = 4.0 * MIB
    idle_timeout_s: float = 2.0
    transfer_timeout_s: float = 30.0
    busy_retry_after_s: float = 5.0
    max_peers_tracked: int = 1024

    def __post_init__(self) -> None:
        problems = []
        if not self.name or len(self.name.encode()) > 255:
            problems.append("probe server name must be 1..255 bytes")
        if not MIN_PROBE_BYTES <= self.max_bytes_per_probe <= HARD_MAX_PROBE_BYTES:
            problems.append(f"max_bytes_per_probe must be within {MIN_PROBE_BYTES}..{HARD_MAX_PROBE_BYTES}")
        if not (self.max_bytes_per_s > 0 and self.peer_bytes_per_s > 0 and self.min_bytes_per_s > 0):
            problems.append("max_bytes_per_s, peer_bytes_per_s and min_bytes_per_s must be positive")
        if self.burst_bytes < self.max_bytes_per_probe:
            problems.append("burst_bytes must be at least max_bytes_per_probe (else no probe ever fits)")
        if min(self.max_concurrent, self.max_pending, self.max_pending_per_peer, self.max_peers_tracked) < 1:
            problems.append("max_concurrent, max_pending, max_pending_per_peer and max_peers_tracked "
                            "must be at least 1")
        elif self.max_pending_per_peer > self.max_pending:
            problems.append("max_pending_per_peer cannot exceed max_pending")
        if not (self.auth_timeout_s > 0 and self.idle_timeout_s > 0 and self.transfer_timeout_s > 0
                and self.busy_retry_after_s > 0):
            problems.append("timeouts and busy_retry_after_s must be positive")
        if problems:
            raise ConfigError(problems, source="probe server")

    def slot_s(self, payload_bytes: int) -> float:
        """How long one probe of ``payload_bytes`` may hold a slot.

        Worked example: 16 MiB at the default 4 MiB/s floor -> 1 + 4 = 5 s."""
        return min(self.transfer_timeout_s, SLOT_OVERHEAD_S + payload_bytes / self.min_bytes_per_s)


class ByteBudget:
    """Token bucket in bytes: ``rate_per_s`` refill, ``burst`` capacity. Time is an argument."""

    def __init__(self, *, rate_per_s: float, burst: float, now_s: float) -> None:
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated_s = float(now_s)

    def _refill(self, now_s: float) -> None:
        elapsed = max(0.0, now_s - self.updated_s)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
        self.updated_s = max(self.updated_s, now_s)

    def wait_s(self, amount: float, now_s: float) -> float:
        """Seconds until ``amount`` fits (0 when it fits now; ``inf`` above the burst)."""
        self._refill(now_s)
        if amount <= self.tokens:
            return 0.0
        if amount > self.burst:
            return math.inf
        return (amount - self.tokens) / self.rate_per_s

    def take(self, amount: float, now_s: float) -> None:
        self._refill(now_s)
        self.tokens -= amount

    def try_take(self, amount: float, now_s: float) -> bool:
        if self.wait_s(amount, now_s) > 0:
            return False
        self.tokens -= amount
        return True


@dataclass
class ServerCounters:
    """What the server did, for metrics: probes served, bytes received, refusals by reason.

    Refusal reasons: ``auth`` (wrong MAC), ``auth_timeout`` (no request within the
    deadline), ``evicted`` (dropped from a full pre-auth pool), ``protocol`` (closed
    or garbled), ``bad_request``, ``too_big``, ``saturated`` (the engine is busy),
    ``slot`` (another probe holds the slot), ``peer_budget`` (this peer used its
    share), ``budget`` (the server's budget is spent), ``cut_deadline`` and
    ``cut_idle`` (a probe outlived its slot or fell silent)."""

    probes: int = 0
    bytes_received: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    last_peer: str | None = None

    def refuse(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1


@dataclass(eq=False)
class _Pending:
    """One connection in the pre-auth pool."""

    peer: str
    writer: asyncio.StreamWriter
    evicted: bool = False


class _Ended(Exception):
    """The connection ends here; ``reason`` is counted (``None``: counted already)."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


def _peer_of(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)


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
        self._peer_budgets: OrderedDict[str, ByteBudget] = OrderedDict()
        self._server: asyncio.base_events.Server | None = None
        self._slot_ends: list[float] = []          # loop time at which each held slot ends
        self._pending: dict[str, deque[_Pending]] = {}
        self._pending_total = 0
        self._handlers: set[asyncio.Task] = set()
        self.counters = ServerCounters()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return self._server.sockets[0].getsockname()[1]

    @property
    def pending(self) -> int:
        """Connections waiting to authenticate now."""
        return self._pending_total

    @property
    def active(self) -> int:
        """Probes holding a slot now."""
        return len(self._slot_ends)

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

    # -- the pre-auth pool

    def _enter(self, peer: str, writer: asyncio.StreamWriter) -> _Pending:
        """Admit a new connection to the pre-auth pool, dropping whom the rule says."""
        s = self.settings
        mine = self._pending.get(peer)
        if mine is not None and len(mine) >= s.max_pending_per_peer:
            self._evict(mine[0])
        elif self._pending_total >= s.max_pending:
            # The peer holding the most pending connections pays, its oldest first.
            heaviest = max(self._pending.values(), key=len)
            self._evict(heaviest[0])
        entry = _Pending(peer, writer)
        self._pending.setdefault(peer, deque()).append(entry)
        self._pending_total += 1
        return entry

    def _leave(self, entry: _Pending) -> None:
        queue = self._pending.get(entry.peer)
        if queue is None or entry not in queue:
            return
        queue.remove(entry)
        self._pending_total -= 1
        if not queue:
            del self._pending[entry.peer]

    def _evict(self, entry: _Pending) -> None:
        self._leave(entry)
        entry.evicted = True
        self.counters.refuse("evicted")
        try:
            entry.writer.write(busy_frame(EVICTED_RETRY_AFTER_S))
        except (ConnectionError, RuntimeError):
            pass
        entry.writer.close()

    # -- one connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        peer = _peer_of(writer)
        try:
            challenge, request = await self._authenticate(reader, writer, self._enter(peer, writer))
            await self._serve(reader, writer, peer, challenge, request)
        except _Ended as end:
            if end.reason is not None:
                self.counters.refuse(end.reason)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            self.counters.refuse("protocol")        # closed, reset, or our answer not read
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.CancelledError):
                writer.transport.abort()
            if task is not None:
                self._handlers.discard(task)

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            entry: _Pending) -> tuple[bytes, bytes]:
        """The challenge out, a verified request in, within ``auth_timeout_s``; the
        connection leaves the pre-auth pool either way."""
        challenge = os.urandom(NONCE_BYTES)
        try:
            writer.write(challenge)
            async with asyncio.timeout(self.settings.auth_timeout_s):
                request = await reader.readexactly(REQUEST_BYTES)
        except TimeoutError:
            raise _Ended("auth_timeout") from None
        except (asyncio.IncompleteReadError, ConnectionError):
            raise _Ended(None if entry.evicted else "protocol") from None
        finally:
            self._leave(entry)
        if entry.evicted:            # the request was already buffered when the pool dropped it
            raise _Ended(None)
        magic, rest = request[:len(MAGIC)], request[len(MAGIC):]
        client_nonce, size_raw, pings_raw, mac = rest[:NONCE_BYTES], rest[NONCE_BYTES:NONCE_BYTES + 8], \
            rest[NONCE_BYTES + 8:NONCE_BYTES + 9], rest[NONCE_BYTES + 9:]
        expected = _mac(self._secret, b"client", MAGIC, challenge, client_nonce, size_raw, pings_raw)
        if not hmac.compare_digest(mac, expected) or magic != MAGIC:
            await self._answer(writer, bytes([STATUS_AUTH]))
            raise _Ended("auth")
        return challenge, request

    async def _answer(self, writer: asyncio.StreamWriter, frame: bytes) -> None:
        writer.write(frame)
        async with asyncio.timeout(self.settings.idle_timeout_s):
            await writer.drain()

    async def _busy(self, writer: asyncio.StreamWriter, reason: str, retry_after_s: float) -> None:
        await self._answer(writer, busy_frame(retry_after_s))
        raise _Ended(reason)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
                     challenge: bytes, request: bytes) -> None:
        s = self.settings
        rest = request[len(MAGIC):]
        client_nonce = rest[:NONCE_BYTES]
        size_raw, pings_raw = rest[NONCE_BYTES:NONCE_BYTES + 8], rest[NONCE_BYTES + 8:NONCE_BYTES + 9]
        payload_bytes, pings = struct.unpack(">Q", size_raw)[0], pings_raw[0]
        if payload_bytes < MIN_PROBE_BYTES or pings > MAX_PINGS:
            await self._answer(writer, bytes([STATUS_BAD_REQUEST]))
            raise _Ended("bad_request")
        if payload_bytes > s.max_bytes_per_probe:
            await self._answer(writer, bytes([STATUS_TOO_BIG]))
            raise _Ended("too_big")
        if self._gate is not None and not self._gate()[0]:
            await self._busy(writer, "saturated", s.busy_retry_after_s)
        loop = asyncio.get_running_loop()
        if len(self._slot_ends) >= s.max_concurrent:
            await self._busy(writer, "slot", min(self._slot_ends) - loop.time())
        now = self._clock()
        peer_budget = self._peer_budget(peer, now)
        wait_peer, wait_all = peer_budget.wait_s(payload_bytes, now), self._budget.wait_s(payload_bytes, now)
        if max(wait_peer, wait_all) > 0:       # advise the wait after which both buckets allow it
            await self._busy(writer, "peer_budget" if wait_peer >= wait_all else "budget",
                             max(wait_peer, wait_all))
        peer_budget.take(payload_bytes, now)
        self._budget.take(payload_bytes, now)
        slot_s = s.slot_s(payload_bytes)
        slot_end = loop.time() + slot_s
        self._slot_ends.append(slot_end)
        try:
            name = s.name.encode()
            name_raw = bytes([len(name)]) + name
            await self._answer(writer, bytes([STATUS_OK]) + _mac(
                self._secret, b"server", MAGIC, client_nonce, challenge, size_raw, pings_raw, name_raw) + name_raw)
            try:
                async with asyncio.timeout_at(slot_end):
                    received, first_read, span_ns = await self._transfer(reader, writer, payload_bytes, pings)
            except TimeoutError:
                writer.write(bytes([STATUS_CUT]))
                raise _Ended("cut_deadline") from None
        finally:
            # Free before the result goes out: the client may come back as soon as it has it.
            self._slot_ends.remove(slot_end)
        self.counters.probes += 1
        self.counters.bytes_received += received
        self.counters.last_peer = peer
        fields_raw = struct.pack(">QQQ", received, first_read, span_ns)
        await self._answer(writer, bytes([STATUS_OK]) + fields_raw
                           + _mac(self._secret, b"result", MAGIC, client_nonce, challenge, fields_raw))

    def _peer_budget(self, peer: str, now_s: float) -> ByteBudget:
        budget = self._peer_budgets.get(peer)
        if budget is None:
            s = self.settings
            budget = ByteBudget(rate_per_s=s.peer_bytes_per_s, burst=s.max_bytes_per_probe, now_s=now_s)
            self._peer_budgets[peer] = budget
            while len(self._peer_budgets) > s.max_peers_tracked:
                self._peer_budgets.popitem(last=False)
        self._peer_budgets.move_to_end(peer)
        return budget

    async def _read_some(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int,
                         exactly: bool) -> bytes:
        try:
            async with asyncio.timeout(self.settings.idle_timeout_s):
                return await (reader.readexactly(n) if exactly else reader.read(n))
        except TimeoutError:
            writer.write(bytes([STATUS_CUT]))
            raise _Ended("cut_idle") from None

    async def _transfer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        payload_bytes: int, pings: int) -> tuple[int, int, int]:
        """Echo the pings, take the bulk; (received, first read, span in ns)."""
        for _ in range(pings):
            writer.write(await self._read_some(reader, writer, 8, exactly=True))
            await writer.drain()
        received = 0
        first_read = 0
        first_ns = last_ns = 0
        while received < payload_bytes:
            chunk = await self._read_some(reader, writer, min(CHUNK_BYTES, payload_bytes - received), exactly=False)
            if not chunk:
                raise asyncio.IncompleteReadError(b"", payload_bytes - received)
            now_ns = time.perf_counter_ns()
            if received == 0:
                first_read, first_ns = len(chunk), now_ns
            received += len(chunk)
            last_ns = now_ns
        return received, first_read, last_ns - first_ns


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
                     timeout_s: float = 30.0, source_host: str | None = None) -> ProbeResult:
    """Probe one peer; raises ``ProbeError`` (never returns a partial number).
    ``source_host``: the local address to connect from (default: the system's choice)."""
    if not MIN_PROBE_BYTES <= payload_bytes <= HARD_MAX_PROBE_BYTES or not 0 <= pings <= MAX_PINGS:
        raise ValueError("payload_bytes or pings out of range")
    started = time.perf_counter()
    try:
        return await asyncio.wait_for(_probe(host, port, secret=secret, payload_bytes=payload_bytes,
                                             pings=pings, started=started, source_host=source_host), timeout_s)
    except asyncio.TimeoutError as exc:
        raise ProbeError("timeout", f"{host}:{port} did not finish within {timeout_s:g} s") from exc


async def _probe(host: str, port: int, *, secret: bytes, payload_bytes: int, pings: int,
                 started: float, source_host: str | None) -> ProbeResult:
    address = f"{host}:{port}"
    try:
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(source_host, 0) if source_host else None)
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


async def _refusal(reader: asyncio.StreamReader, status: int, address: str) -> ProbeError:
    if status == STATUS_BUSY:
        retry_after_s = struct.unpack(">I", await reader.readexactly(4))[0] / 1000
        return ProbeError("busy", f"{address} is busy: retry after {retry_after_s:g} s",
                          retry_after_s=retry_after_s)
    return ProbeError(_STATUS_REASON.get(status, "protocol"), f"refused by {address}")


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str, *,
                    secret: bytes, payload_bytes: int, pings: int, started: float) -> ProbeResult:
    challenge = await reader.readexactly(NONCE_BYTES)
    if challenge.startswith(MAGIC_V1):
        raise ProbeError("version", f"{address} speaks probe protocol 1; this client speaks "
                                    f"{PROTOCOL_VERSION}: upgrade that sidecar")
    client_nonce = os.urandom(NONCE_BYTES)
    size_raw = struct.pack(">Q", payload_bytes)
    pings_raw = bytes([pings])
    writer.write(MAGIC + client_nonce + size_raw + pings_raw
                 + _mac(secret, b"client", MAGIC, challenge, client_nonce, size_raw, pings_raw))
    await writer.drain()
    status = (await reader.readexactly(1))[0]
    if status != STATUS_OK:
        raise await _refusal(reader, status, address)
    server_mac = await reader.readexactly(MAC_BYTES)
    name_len = await reader.readexactly(1)
    name = await reader.readexactly(name_len[0])
    if not hmac.compare_digest(server_mac, _mac(secret, b"server", MAGIC, client_nonce, challenge, size_raw,
                                                pings_raw, name_len + name)):
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
    status = (await reader.readexactly(1))[0]
    if status != STATUS_OK:
        raise ProbeError(_STATUS_REASON.get(status, "protocol"), f"{address} ended the probe's slot")
    result = await reader.readexactly(24 + MAC_BYTES)
    finished = time.perf_counter()
    fields_raw, mac = result[:24], result[24:]
    if not hmac.compare_digest(mac, _mac(secret, b"result", MAGIC, client_nonce, challenge, fields_raw)):
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
    prefill pods do not probe one decode pod in lockstep. A peer that answers
    ``busy`` is tried once more after the wait it names, if that wait is at most
    half the interval.
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

    async def _attempt(self, peer: Peer) -> tuple[ProbeResult | None, ProbeError | None]:
        s = self.settings
        try:
            result = await self._probe(peer.host, peer.port, secret=self._secret, payload_bytes=s.payload_bytes,
                                       pings=s.pings, timeout_s=s.timeout_s)
        except ProbeError as exc:
            log.warning("kv-transfer probe of %s failed: %s", peer.address, exc)
            key = (peer.name or peer.address, exc.reason)
            self.errors[key] = self.errors.get(key, 0) + 1
            return None, exc
        self.probes += 1
        return result, None

    async def _probe_one(self, peer: Peer) -> None:
        s = self.settings
        recent = self._recent.setdefault(peer.address, deque(maxlen=RECENT_PROBES))
        result, error = await self._attempt(peer)
        if (error is not None and error.reason == "busy" and error.retry_after_s is not None
                and error.retry_after_s <= s.interval_s / 2):
            # The peer said when it will have room: one more try then, in this round.
            if await self._sleep(error.retry_after_s):
                return
            if self._gate()[0]:
                result, error = await self._attempt(peer)
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
