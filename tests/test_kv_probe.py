"""The active probe on loopback: real server, real client, real TCP; auth refusals, caps, and
denial of service (idle floods, a slot holder, one greedy peer). Several tests connect from
other loopback addresses (127.0.0.2...): Linux routes all of 127/8 to ``lo``, so each is a
distinct peer to the server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random

import pytest

from heteroscale.kv_transfer.probe import (MAGIC, MAGIC_V1, MIB, NONCE_BYTES, STATUS_AUTH, STATUS_BUSY, STATUS_CUT,
                                           STATUS_OK, ByteBudget, Peer, ProbeClientSettings, ProbeError,
                                           ProbeResult, ProbeRunner, ProbeServer, ProbeServerSettings, _mac,
                                           busy_frame, load_secret, outcome_to_dict, parse_peer, probe_peer)
from heteroscale.errors import ConfigError

SECRET = b"s3cret-shared-by-prefill-and-decode"


@pytest.fixture
async def server():
    srv = ProbeServer(ProbeServerSettings(name="decode-0", max_bytes_per_probe=8 * MIB, burst_bytes=64 * MIB,
                                          max_bytes_per_s=64 * MIB, peer_bytes_per_s=64 * MIB,
                                          auth_timeout_s=0.3),
                      secret=SECRET, host="127.0.0.1", port=0)
    await srv.start()
    yield srv
    await srv.close()


async def test_probe_measures_and_authenticates(server):
    result = await probe_peer("127.0.0.1", server.port, secret=SECRET, payload_bytes=4 * MIB, pings=3)
    assert result.peer == "decode-0"                     # the name the server announced
    assert result.payload_bytes == 4 * MIB
    assert result.bytes_per_second > 0 and result.sender_bytes_per_second > 0
    assert result.rtt_s is not None and 0 < result.rtt_min_s <= result.rtt_s < 1
    assert server.counters.probes == 1 and server.counters.bytes_received == 4 * MIB
    assert server.counters.refusals == {}


async def test_wrong_secret_is_refused_and_moves_no_bytes(server):
    with pytest.raises(ProbeError) as err:
        await probe_peer("127.0.0.1", server.port, secret=b"not-the-secret-at-all", payload_bytes=4 * MIB)
    assert err.value.reason == "auth"
    assert server.counters.refusals == {"auth": 1}
    assert server.counters.bytes_received == 0
    # The server keeps serving honest clients.
    await probe_peer("127.0.0.1", server.port, secret=SECRET, payload_bytes=MIB, pings=0)
    assert server.counters.probes == 1


async def test_oversized_probe_is_refused_not_trimmed(server):
    with pytest.raises(ProbeError) as err:
        await probe_peer("127.0.0.1", server.port, secret=SECRET, payload_bytes=16 * MIB)
    assert err.value.reason == "too_big"
    assert server.counters.refusals == {"too_big": 1} and server.counters.bytes_received == 0


async def test_rate_budget_refuses_when_spent():
    now = [0.0]
    srv = ProbeServer(ProbeServerSettings(name="d", max_bytes_per_probe=4 * MIB, burst_bytes=4 * MIB,
                                          max_bytes_per_s=MIB, peer_bytes_per_s=64 * MIB),
                      secret=SECRET, host="127.0.0.1", port=0, clock=lambda: now[0])
    await srv.start()
    try:
        await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=4 * MIB, pings=0)
        with pytest.raises(ProbeError) as err:           # the bucket is empty at t = 0
            await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=4 * MIB, pings=0)
        assert err.value.reason == "busy"
        assert err.value.retry_after_s == 4.0            # 4 MiB missing, refilled at 1 MiB/s
        now[0] = 4.0                                     # 4 s x 1 MiB/s refilled the bucket
        await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=4 * MIB, pings=0)
        assert srv.counters.probes == 2 and srv.counters.refusals == {"budget": 1}
    finally:
        await srv.close()


async def _challenge(port: int, source: str = "127.0.0.1"):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return reader, writer, await reader.readexactly(NONCE_BYTES)


def _request(challenge: bytes, *, size: int, pings: int = 0, secret: bytes = SECRET) -> bytes:
    nonce, size_raw, pings_raw = os.urandom(NONCE_BYTES), size.to_bytes(8, "big"), bytes([pings])
    return MAGIC + nonce + size_raw + pings_raw + _mac(secret, b"client", MAGIC, challenge, nonce, size_raw,
                                                       pings_raw)


async def test_garbage_and_silent_clients_are_dropped(server):
    reader, writer, _ = await _challenge(server.port)
    writer.write(os.urandom(len(MAGIC) + NONCE_BYTES + 8 + 1 + 32))   # a well-sized request, random MAC
    await writer.drain()
    assert await reader.read() == bytes([STATUS_AUTH])   # the refusal, then EOF: nothing else
    writer.close()
    await writer.wait_closed()
    # A client that says nothing is cut off by the auth deadline (0.3 s here).
    reader, writer, _ = await _challenge(server.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await writer.wait_closed()
    assert server.counters.refusals == {"auth": 1, "auth_timeout": 1}


async def test_nothing_but_random_bytes_before_authentication(server):
    # Unauthenticated, a client gets 32 random bytes and then, at the auth deadline, EOF:
    # no magic, no version, no pod name.
    seen = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        seen.append(await asyncio.wait_for(reader.read(), 5))
        writer.close()
        await writer.wait_closed()
    assert [len(b) for b in seen] == [NONCE_BYTES, NONCE_BYTES] and seen[0] != seen[1]
    assert not any(b"decode-0" in b or b"HSKVP" in b for b in seen)
    # With the secret, the server proves itself and only then names its pod (inside its MAC).
    reader, writer, challenge = await _challenge(server.port)
    writer.write(_request(challenge, size=MIB, pings=0))
    await writer.drain()
    answer = await reader.readexactly(1 + 32 + 1 + len(b"decode-0"))
    assert answer[0] == STATUS_OK and answer.endswith(bytes([8]) + b"decode-0")
    writer.close()
    await writer.wait_closed()


async def test_an_idle_flood_does_not_stop_an_authenticated_probe():
    srv = ProbeServer(ProbeServerSettings(name="decode-0", max_pending=16, max_pending_per_peer=4,
                                          auth_timeout_s=60),      # the flood would stay for a minute
                      secret=SECRET, host="127.0.0.1", port=0)
    await srv.start()
    flood = []
    try:
        # 4 x the pre-auth pool, from four other addresses and from the prober's own one.
        for i in range(64):
            source = "127.0.0.1" if i % 8 == 0 else f"127.0.0.{2 + i % 4}"
            flood.append(await _challenge(srv.port, source))
        assert srv.pending <= 16
        result = await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=MIB, pings=1)
        assert result.peer == "decode-0" and srv.counters.probes == 1
        assert srv.counters.refusals["evicted"] >= 64 - 16
        # The dropped connections were told so: busy, retry after 1 s, then EOF.
        reader, _, _ = flood[0]
        assert await asyncio.wait_for(reader.read(), 5) == busy_frame(1.0)
        assert busy_frame(1.0) == bytes([STATUS_BUSY]) + (1000).to_bytes(4, "big")
    finally:
        for _, writer, _ in flood:
            writer.close()
        await srv.close()


async def _hold_slot(port: int, *, size: int, trickle: bool) -> bytes:
    """Authenticate from 127.0.0.2, then send one byte per 0.05 s (or nothing); returns what the
    server sent after its OK frame, up to EOF."""
    reader, writer, challenge = await _challenge(port, "127.0.0.2")
    writer.write(_request(challenge, size=size))
    await writer.drain()
    ok = await reader.readexactly(1 + 32 + 1)
    assert ok[0] == STATUS_OK
    await reader.readexactly(ok[-1])

    async def drip():
        with contextlib.suppress(OSError):
            while trickle:
                writer.write(b"\0")
                await writer.drain()
                await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
        writer.close()


async def test_an_authenticated_client_holding_its_slot_is_cut_at_its_deadline():
    # slot = 1 s + 1 MiB / 1 MiB/s = 2 s; silence allowed 1 s.
    settings = ProbeServerSettings(name="decode-0", max_bytes_per_probe=4 * MIB, min_bytes_per_s=MIB,
                                   idle_timeout_s=1.0)
    assert settings.slot_s(MIB) == 2.0
    srv = ProbeServer(settings, secret=SECRET, host="127.0.0.1", port=0)
    await srv.start()
    try:
        holder = asyncio.create_task(_hold_slot(srv.port, size=MIB, trickle=True))
        while srv.active == 0:
            await asyncio.sleep(0.01)
        # Meanwhile an honest probe is told the slot is taken, and until when at most.
        with pytest.raises(ProbeError) as err:
            await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=MIB, pings=0)
        assert err.value.reason == "busy" and 0 < err.value.retry_after_s <= 2.0
        assert await holder == bytes([STATUS_CUT])     # alive but too slow: cut, then EOF
        assert srv.counters.refusals == {"slot": 1, "cut_deadline": 1} and srv.active == 0
        # A holder that falls silent is cut sooner, at the idle limit.
        assert await _hold_slot(srv.port, size=MIB, trickle=False) == bytes([STATUS_CUT])
        assert srv.counters.refusals["cut_idle"] == 1
        await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=MIB, pings=0)
        assert srv.counters.probes == 1
    finally:
        await srv.close()


async def test_one_peer_gets_its_share_and_is_told_when_to_come_back():
    now = [0.0]
    srv = ProbeServer(ProbeServerSettings(name="d", max_bytes_per_probe=2 * MIB, peer_bytes_per_s=MIB),
                      secret=SECRET, host="127.0.0.1", port=0, clock=lambda: now[0])
    await srv.start()
    try:
        await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=2 * MIB, pings=0,
                         source_host="127.0.0.2")
        with pytest.raises(ProbeError) as err:           # its bucket (burst 2 MiB) is empty
            await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=2 * MIB, pings=0,
                             source_host="127.0.0.2")
        assert err.value.reason == "busy" and err.value.retry_after_s == 2.0   # 2 MiB at 1 MiB/s
        # Another peer still has its own share (the server's budget, 128 MiB burst, is far from spent).
        await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=2 * MIB, pings=0,
                         source_host="127.0.0.3")
        now[0] = 2.0
        await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=2 * MIB, pings=0,
                         source_host="127.0.0.2")
        assert srv.counters.probes == 3 and srv.counters.refusals == {"peer_budget": 1}
    finally:
        await srv.close()


async def test_a_server_without_the_secret_is_detected():
    # An impostor that speaks the protocol and says OK but cannot produce the MAC.
    async def impostor(reader, writer):
        writer.write(os.urandom(NONCE_BYTES))
        await reader.readexactly(len(MAGIC) + NONCE_BYTES + 8 + 1 + 32)
        writer.write(bytes([STATUS_OK]) + os.urandom(32) + bytes([4]) + b"evil")
        await writer.drain()
        await reader.read()
        writer.close()

    srv = await asyncio.start_server(impostor, "127.0.0.1", 0)
    try:
        with pytest.raises(ProbeError) as err:
            await probe_peer("127.0.0.1", srv.sockets[0].getsockname()[1], secret=SECRET, payload_bytes=MIB)
        assert err.value.reason == "peer_auth"
    finally:
        srv.close()
        await srv.wait_closed()


async def test_a_version_1_server_is_named_as_such():
    async def v1_server(reader, writer):
        writer.write(MAGIC_V1 + os.urandom(NONCE_BYTES) + bytes([8]) + b"decode-0")
        await writer.drain()
        await reader.read()
        writer.close()

    srv = await asyncio.start_server(v1_server, "127.0.0.1", 0)
    try:
        with pytest.raises(ProbeError) as err:
            await probe_peer("127.0.0.1", srv.sockets[0].getsockname()[1], secret=SECRET, payload_bytes=MIB)
        assert err.value.reason == "version"
    finally:
        srv.close()
        await srv.wait_closed()


async def test_connect_failure_and_not_a_probe_server(unused_port):
    with pytest.raises(ProbeError) as err:
        await probe_peer("127.0.0.1", unused_port, secret=SECRET, payload_bytes=MIB)
    assert err.value.reason == "connect"

    async def http_like(reader, writer):
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(http_like, "127.0.0.1", 0)
    try:
        with pytest.raises(ProbeError) as err:
            await probe_peer("127.0.0.1", srv.sockets[0].getsockname()[1], secret=SECRET, payload_bytes=MIB)
        assert err.value.reason == "protocol"
    finally:
        srv.close()
        await srv.wait_closed()


def test_byte_budget_worked_example():
    b = ByteBudget(rate_per_s=100, burst=1000, now_s=0)
    assert b.try_take(800, 0)           # 1000 -> 200
    assert not b.try_take(300, 0)       # 200 < 300
    assert b.wait_s(300, 0) == 1.0      # 100 missing at 100/s
    assert b.try_take(300, 1)           # 200 + 100 = 300 -> 0
    assert not b.try_take(1, 1)
    assert b.wait_s(1001, 1) == float("inf")   # above the burst: never
    assert b.try_take(1000, 100)        # refilled, capped at the burst


def test_server_settings_validation():
    with pytest.raises(ConfigError) as err:
        ProbeServerSettings(name="", max_bytes_per_probe=10, max_bytes_per_s=0, burst_bytes=1)
    assert len(err.value.problems) >= 3
    with pytest.raises(ConfigError) as err:
        ProbeServerSettings(name="d", max_pending=4, max_pending_per_peer=8, auth_timeout_s=0, min_bytes_per_s=-1)
    assert len(err.value.problems) == 3
    # A slot is bounded by the probe size at the minimum rate, and never past the hard cap:
    # 64 MiB at 4 MiB/s -> 1 + 16 = 17 s; at 1 MiB/s it would be 65 s -> 30 s.
    assert ProbeServerSettings(name="d").slot_s(64 * MIB) == 17.0
    assert ProbeServerSettings(name="d", min_bytes_per_s=MIB).slot_s(64 * MIB) == 30.0


def test_client_settings_enforce_the_rate_cap():
    peers = (Peer("10.0.0.2", 9401), Peer("10.0.0.3", 9401))
    # 2 peers x 16 MiB every 60 s = 0.53 MiB/s: within the 4 MiB/s default.
    ProbeClientSettings(peers=peers)
    with pytest.raises(ConfigError) as err:
        # 2 x 64 MiB every 10 s = 12.8 MiB/s > 4 MiB/s.
        ProbeClientSettings(peers=peers, payload_bytes=64 * MIB, interval_s=10)
    assert "exceeds the probe rate cap" in err.value.problems[0]
    with pytest.raises(ConfigError) as err:
        ProbeClientSettings(peers=(), payload_bytes=10, interval_s=0.1, pings=99)
    assert len(err.value.problems) == 4


def test_parse_peer():
    assert parse_peer("decode-1=10.0.0.2:9401") == Peer("10.0.0.2", 9401, "decode-1")
    assert parse_peer("[::1]:9401") == Peer("::1", 9401, None)
    for bad in ("10.0.0.2", "=h:1", "h:0", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_peer(bad)


def test_load_secret(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"  0123456789abcdef-xyz \n")
    assert load_secret(str(path)) == b"0123456789abcdef-xyz"
    path.write_bytes(b"short")
    with pytest.raises(ConfigError):
        load_secret(str(path))
    with pytest.raises(ConfigError):
        load_secret(str(tmp_path / "missing"))


def _fake_result(peer: Peer) -> ProbeResult:
    return ProbeResult(peer=f"name-of-{peer.port}", address=peer.address, payload_bytes=MIB,
                       bytes_per_second=1e8, sender_bytes_per_second=1e8, rtt_s=1e-4, rtt_min_s=1e-4,
                       duration_s=0.01)


async def test_runner_probes_each_peer_once_per_round_and_respects_the_gate():
    calls = []

    async def fake_probe(host, port, **kwargs):
        calls.append((host, port, kwargs["payload_bytes"]))
        if port == 2:
            raise ProbeError("busy", "refused")
        return _fake_result(Peer(host, port))

    allowed = [True]
    settings = ProbeClientSettings(peers=(Peer("a", 1), Peer("b", 2)), payload_bytes=MIB, interval_s=60)
    runner = ProbeRunner(settings, secret=SECRET, probe=fake_probe, gate=lambda: (allowed[0], "saturated"),
                         rng=random.Random(1), clock=lambda: 10.0, wall_clock=lambda: 1_700_000_000.0)
    await runner.probe_all()
    assert calls == [("a", 1, MIB), ("b", 2, MIB)]
    assert runner.outcomes["a:1"].result.bytes_per_second == 1e8
    assert runner.outcomes["b:2"].error.reason == "busy"
    assert runner.errors == {("b:2", "busy"): 1}
    doc = outcome_to_dict(runner.outcomes["a:1"], now_mono_s=12.0)
    assert doc["peer"] == "name-of-1" and doc["age_s"] == 2.0 and doc["measured_at"] == 1_700_000_000.0
    assert outcome_to_dict(runner.outcomes["b:2"], now_mono_s=12.0)["error"] == "busy"
    allowed[0] = False
    await runner.probe_all()
    assert len(calls) == 2 and runner.skipped == "saturated"


async def test_runner_task_starts_and_closes_cleanly():
    settings = ProbeClientSettings(peers=(Peer("a", 1),), payload_bytes=MIB, interval_s=60)

    async def fake_probe(host, port, **kwargs):
        return _fake_result(Peer(host, port))

    runner = ProbeRunner(settings, secret=SECRET, probe=fake_probe, rng=random.Random(0))
    runner.start()
    await asyncio.sleep(0)
    await runner.close()                    # interrupts the first (random) sleep at once
    assert runner._task is None


async def test_server_refuses_while_its_engine_is_saturated():
    saturated = [True]
    srv = ProbeServer(ProbeServerSettings(name="d", busy_retry_after_s=7), secret=SECRET, host="127.0.0.1",
                      port=0, gate=lambda: (not saturated[0], "engine_saturated"))
    await srv.start()
    try:
        with pytest.raises(ProbeError) as err:
            await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=MIB, pings=0)
        assert err.value.reason == "busy" and srv.counters.refusals == {"saturated": 1}
        assert err.value.retry_after_s == 7.0
        saturated[0] = False
        await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=MIB, pings=0)
        assert srv.counters.probes == 1
    finally:
        await srv.close()


async def test_best_recent_is_the_upper_envelope_of_the_last_probes():
    rates = iter([80e6, 100e6, 60e6, 50e6, 40e6])
    now = [0.0]

    async def fake_probe(host, port, **kwargs):
        r = _fake_result(Peer(host, port))
        return ProbeResult(**{**r.to_dict(), "peer": r.peer, "bytes_per_second": next(rates)})

    settings = ProbeClientSettings(peers=(Peer("a", 1),), payload_bytes=MIB, interval_s=10)
    runner = ProbeRunner(settings, secret=SECRET, probe=fake_probe, clock=lambda: now[0])
    seen = []
    for _ in range(5):
        await runner.probe_all()
        o = runner.outcomes["a:1"]
        seen.append((o.result.bytes_per_second, o.best_recent_bytes_per_second, o.recent_probes))
        now[0] += 10.0
    # Best of the last 3 probes: 80 | 100 | 100 | 100 (100, 60, 50) | 60 (60, 50, 40).
    assert seen == [(80e6, 80e6, 1), (100e6, 100e6, 2), (60e6, 100e6, 3), (50e6, 100e6, 3), (40e6, 60e6, 3)]


async def test_best_recent_forgets_probes_older_than_three_intervals():
    now = [0.0]
    fail = [False]

    async def fake_probe(host, port, **kwargs):
        if fail[0]:
            raise ProbeError("timeout", "slow")
        return _fake_result(Peer(host, port))

    settings = ProbeClientSettings(peers=(Peer("a", 1),), payload_bytes=MIB, interval_s=10)
    runner = ProbeRunner(settings, secret=SECRET, probe=fake_probe, clock=lambda: now[0])
    await runner.probe_all()
    fail[0] = True
    now[0] = 20.0
    await runner.probe_all()                 # failed, but the success 20 s ago still counts
    assert runner.outcomes["a:1"].error.reason == "timeout"
    assert runner.outcomes["a:1"].best_recent_bytes_per_second == 1e8
    now[0] = 31.0
    await runner.probe_all()                 # the success is now 31 s > 3 x 10 s old
    assert runner.outcomes["a:1"].best_recent_bytes_per_second is None
    assert "best_recent_bytes_per_second" not in outcome_to_dict(runner.outcomes["a:1"], now_mono_s=31.0)


async def test_runner_retries_a_busy_peer_once_after_the_wait_it_names():
    answers = [ProbeError("busy", "slot", retry_after_s=0.01), None,            # retried: success
               ProbeError("busy", "slot", retry_after_s=40.0)]                  # > interval / 2: not retried
    calls = []

    async def fake_probe(host, port, **kwargs):
        calls.append(port)
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return _fake_result(Peer(host, port))

    settings = ProbeClientSettings(peers=(Peer("a", 1),), payload_bytes=MIB, interval_s=60)
    runner = ProbeRunner(settings, secret=SECRET, probe=fake_probe, clock=lambda: 0.0)
    await runner.probe_all()
    assert calls == [1, 1] and runner.outcomes["a:1"].result is not None
    await runner.probe_all()
    assert calls == [1, 1, 1] and runner.outcomes["a:1"].error.retry_after_s == 40.0
    assert runner.errors == {("a:1", "busy"): 2}
