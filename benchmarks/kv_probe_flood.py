"""Does the KV probe server keep serving honest probes under a flood? Records
benchmarks/results/kv_probe_flood.json (a new file under benchmarks/results/runs/ unless
``--replace`` or ``--out``: see ``record.py``).

    .venv/bin/python benchmarks/kv_probe_flood.py [--idle 512] [--probes 20] [--scenarios ...] [--replace]

Three processes on loopback: the real probe server (``python -m heteroscale.kv_transfer
serve``), a flooder (this file, ``flood`` subcommand) and the honest prober (this
process, the package's own ``probe_peer``). Scenarios:

* ``no_flood``: honest probes alone, the reference.
* ``idle_flood``: ``--idle`` unauthenticated connections that connect and never say a
  word, spread over the source addresses 127.0.0.2-127.0.0.9 (other pods); every
  connection the server drops is reopened at once, so the flood never thins out.
* ``idle_flood_own_address``: the same over 127.0.0.1-127.0.0.8, the honest prober's own
  address included (another container of its pod): the case the server cannot tell apart.
* ``slot_holder``: a client that knows the secret authenticates from 127.0.0.2, asks for
  the largest probe the server takes and then sends one byte per 0.2 s, for ever; it
  reconnects when it is cut. Protocol 2 only (it speaks the handshake itself).

The honest prober behaves like the sidecar's runner: one probe per round, and a ``busy``
answer is retried once after the wait it names when that is at most 30 s (half the
default interval). Per scenario: rounds attempted and completed, failure reasons of the
last attempt of each round, the ``retry_after_s`` of busy answers, round durations
(handshake and any wait included), how many connections the flooder opened, and the
server's own counters (``serve`` prints them on exit). Nothing here fails on timing: the
figures are recorded, the verdict is the share of rounds that completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

REPO = Path(__file__).resolve().parents[1]
OTHER_SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]
OWN_SOURCES = [f"127.0.0.{n}" for n in range(1, 9)]
SECRET = "benchmark-shared-secret-0123456789"
PROBE_BYTES = 1024 * 1024


# ---------------------------------------------------------------- the flooder process

async def _idle(host: str, port: int, source: str, stats: dict) -> None:
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        except OSError:
            stats["connect_errors"] += 1
            await asyncio.sleep(0.05)
            continue
        stats["opened"] += 1
        try:
            while await reader.read(4096):      # read whatever the server says, never answer
                pass
        except OSError:
            pass
        writer.close()
        stats["closed_by_server"] += 1


async def _holder(host: str, port: int, secret: bytes, stats: dict) -> None:
    from heteroscale.kv_transfer import probe

    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
        except OSError:
            await asyncio.sleep(0.05)
            continue
        stats["opened"] += 1
        try:
            challenge = await reader.readexactly(probe.NONCE_BYTES)
            nonce = os.urandom(probe.NONCE_BYTES)
            size_raw, pings_raw = (64 * 1024 * 1024).to_bytes(8, "big"), bytes([0])
            writer.write(probe.MAGIC + nonce + size_raw + pings_raw
                         + probe._mac(secret, b"client", probe.MAGIC, challenge, nonce, size_raw, pings_raw))
            status = (await reader.readexactly(1))[0]
            if status == probe.STATUS_OK:
                stats["slot_taken"] += 1
                held = time.monotonic()
                try:
                    while True:             # one byte per 0.2 s: alive, but far below any real link
                        writer.write(b"\0")
                        await writer.drain()
                        await asyncio.sleep(0.2)
                except OSError:
                    stats["held_s"].append(round(time.monotonic() - held, 3))
            else:
                await asyncio.sleep(0.05)
        except (OSError, asyncio.IncompleteReadError):
            pass
        writer.close()


async def _flood(args: argparse.Namespace) -> None:
    stats: dict = {"opened": 0, "closed_by_server": 0, "connect_errors": 0, "slot_taken": 0, "held_s": []}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.kind in ("idle", "idle_own"):
        sources = OTHER_SOURCES if args.kind == "idle" else OWN_SOURCES
        tasks = [asyncio.create_task(_idle(args.host, args.port, sources[i % len(sources)], stats))
                 for i in range(args.count)]
    else:
        tasks = [asyncio.create_task(_holder(args.host, args.port, SECRET.encode(), stats))]
    print("flooding", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(stats), flush=True)


# ---------------------------------------------------------------- the honest prober

async def _honest(port: int, count: int) -> dict:
    from heteroscale.kv_transfer.probe import ProbeError, probe_peer

    done, failed, durations, retry_after, attempts = 0, {}, [], [], 0
    for _ in range(count):
        started = time.perf_counter()
        for attempt in range(2):
            attempts += 1
            try:
                await probe_peer("127.0.0.1", port, secret=SECRET.encode(), payload_bytes=PROBE_BYTES, pings=2,
                                 timeout_s=10)
                done += 1
                durations.append(time.perf_counter() - started)
                break
            except ProbeError as exc:
                wait = getattr(exc, "retry_after_s", None)
                if wait is not None:
                    retry_after.append(wait)
                if attempt == 0 and exc.reason == "busy" and wait is not None and wait <= 30:
                    await asyncio.sleep(wait)
                    continue
                failed[exc.reason] = failed.get(exc.reason, 0) + 1
                break
        await asyncio.sleep(0.25)
    out = {"rounds": count, "attempts": attempts, "completed": done, "failed_by_reason": failed,
           "completed_ratio": done / count if count else None}
    if durations:
        out["round_duration_s"] = {"median": statistics.median(durations), "max": max(durations)}
    if retry_after:
        out["busy_retry_after_s"] = {"count": len(retry_after), "min": min(retry_after), "max": max(retry_after)}
    return out


def _start(cmd: list[str], first_line: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith(first_line):
        proc.kill()
        raise SystemExit(f"{cmd[:4]} did not start: {line!r}")
    return proc, line


def _stop(proc: subprocess.Popen) -> dict | None:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    for line in reversed(out.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    flood = sub.add_parser("flood", help="(internal) the flooder process")
    flood.add_argument("--host", default="127.0.0.1")
    flood.add_argument("--port", type=int, required=True)
    flood.add_argument("--kind", choices=("idle", "idle_own", "holder"), required=True)
    flood.add_argument("--count", type=int, default=512)
    parser.add_argument("--idle", type=int, default=512, help="idle unauthenticated connections (default 512)")
    parser.add_argument("--probes", type=int, default=20, help="honest probes per scenario (default 20)")
    parser.add_argument("--scenarios", default="no_flood,idle_flood,idle_flood_own_address,slot_holder")
    parser.add_argument("--ramp-s", type=float, default=3.0, help="flood time before the first honest probe")
    record.add_output_arguments(parser, "kv_probe_flood")
    args = parser.parse_args()
    if args.command == "flood":
        asyncio.run(_flood(args))
        return 0
    load_at_start = os.getloadavg()[0]
    secret = Path(tempfile.mkstemp(prefix="hs-flood-", suffix=".secret")[1])
    secret.write_text(SECRET + "\n")
    results = {}
    server, line = _start([sys.executable, "-m", "heteroscale.kv_transfer", "serve", "--pod", "decode-0",
                           "--no-rdma", "--probe-listen", "127.0.0.1:0", "--probe-secret-file", str(secret)],
                          "listening")
    port = int(line.strip().rsplit(":", 1)[1])
    try:
        for scenario in args.scenarios.split(","):
            flooder = None
            if scenario != "no_flood":
                kind = {"idle_flood": "idle", "idle_flood_own_address": "idle_own", "slot_holder": "holder"}[scenario]
                flooder, _ = _start([sys.executable, __file__, "flood", "--port", str(port), "--kind", kind,
                                     "--count", str(args.idle)], "flooding")
                time.sleep(args.ramp_s)
            honest = asyncio.run(_honest(port, args.probes))
            entry = {"honest": honest}
            if flooder is not None:
                entry["flooder"] = _stop(flooder)
            results[scenario] = entry
            print(f"{scenario:24s} honest rounds completed {honest['completed']}/{honest['rounds']}"
                  f" failed {honest['failed_by_reason']}", flush=True)
    finally:
        counters = _stop(server)
        secret.unlink(missing_ok=True)
    from heteroscale.kv_transfer import probe
    out = record.write(record.output_path(args, "kv_probe_flood"), {
        "protocol_version": getattr(probe, "PROTOCOL_VERSION", 1),
        "command": "python benchmarks/kv_probe_flood.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1m_at_start": load_at_start, "load_average_1m_at_end": os.getloadavg()[0]},
        "idle_connections": args.idle, "probe_bytes": PROBE_BYTES, "scenarios": results,
        "server_counters": counters})
    return record.verdict({}, out)


if __name__ == "__main__":
    sys.exit(main())
