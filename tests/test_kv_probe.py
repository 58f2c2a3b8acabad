"""The active probe on loopback: real server, real client, real TCP; auth refusals and caps."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from heteroscale.kv_transfer.probe import (MAGIC, MIB, NONCE_BYTES, STATUS_OK, ByteBudget, Peer, ProbeClientSettings,
                               ProbeError, ProbeResult, ProbeRunner, ProbeServer, ProbeServerSettings,
                               load_secret, outcome_to_dict, parse_peer, probe_peer)
from heteroscale.errors import ConfigError

SECRET = b"s3cret-shared-by-prefill-and-decode"


@pytest.fixture
async def server():
    srv = ProbeServer(ProbeServerSettings(name="decode-0", max_bytes_per_probe=8 * MIB, burst_bytes=64 * MIB,
                                          max_bytes_per_s=64 * MIB, handshake_timeout_s=0.3),
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
                                          max_bytes_per_s=MIB),
                      secret=SECRET, host="127.0.0.1", port=0, clock=lambda: now[0])
    await srv.start()
    try:
        await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=4 * MIB, pings=0)
        with pytest.raises(ProbeError) as err:           # the bucket is empty at t = 0
            await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=4 * MIB, pings=0)
        assert err.value.reason == "busy"
        now[0] = 4.0                                     # 4 s x 1 MiB/s refilled the bucket
        await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=4 * MIB, pings=0)
        assert srv.counters.probes == 2 and srv.counters.refusals == {"busy": 1}
    finally:
        await srv.close()


async def test_garbage_and_silent_clients_are_dropped(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    hello = await reader.readexactly(len(MAGIC) + NONCE_BYTES + 1)
    assert hello.startswith(MAGIC)
    await reader.readexactly(hello[-1])
    writer.write(os.urandom(NONCE_BYTES + 8 + 1 + 32))   # a well-sized request with a random MAC
    await writer.drain()
    assert await reader.read(1) == bytes([1])            # STATUS_AUTH
    writer.close()
    await writer.wait_closed()
    # A client that says nothing is cut off by the handshake timeout (0.3 s here).
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await asyncio.wait_for(reader.read(), 5)             # EOF once the server gives up
    writer.close()
    await writer.wait_closed()
    assert server.counters.refusals.get("auth") == 1 and server.counters.refusals.get("timeout") == 1


async def test_a_server_without_the_secret_is_detected():
    # An impostor that speaks the protocol and says OK but cannot produce the MAC.
    async def impostor(reader, writer):
        writer.write(MAGIC + os.urandom(NONCE_BYTES) + bytes([4]) + b"evil")
        await reader.readexactly(NONCE_BYTES + 8 + 1 + 32)
        writer.write(bytes([STATUS_OK]) + os.urandom(32))
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


async def test_connect_failure_and_not_a_probe_server(unused_port):
    with pytest.raises(ProbeError) as err:
        await probe_peer("127.0.0.1", unused_port, secret=SECRET, payload_bytes=MIB)
    assert err.value.reason == "connect"

    async def http_like(reader, writer):
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64))
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
    assert b.try_take(300, 1)           # 200 + 100 = 300 -> 0
    assert not b.try_take(1, 1)
    assert b.try_take(1000, 100)        # refilled, capped at the burst


def test_server_settings_validation():
    with pytest.raises(ConfigError) as err:
        ProbeServerSettings(name="", max_bytes_per_probe=10, max_bytes_per_s=0, burst_bytes=1)
    assert len(err.value.problems) >= 3


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
    srv = ProbeServer(ProbeServerSettings(name="d"), secret=SECRET, host="127.0.0.1", port=0,
                      gate=lambda: (not saturated[0], "engine_saturated"))
    await srv.start()
    try:
        with pytest.raises(ProbeError) as err:
            await probe_peer("127.0.0.1", srv.port, secret=SECRET, payload_bytes=MIB, pings=0)
        assert err.value.reason == "busy" and srv.counters.refusals == {"saturated": 1}
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
