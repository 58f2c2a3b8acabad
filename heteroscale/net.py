"""Addresses and ports: the one HOST:PORT parser, free ports for our own children, and a
size-capped HTTP body read.

``parse_host_port`` reads ``HOST:PORT`` (IPv6 as ``[::1]:PORT``) for every flag and
config key that takes an address (sidecar and coordinator ``--listen``, the demo, the
KV probe's listen address and peers).

Free ports: asking the kernel for port 0 and releasing it is racy: the number comes from the
ephemeral range, and before our child binds it the kernel may hand the same number
to any other socket that binds port 0 or connects out (seen: an emulator's KV
listener took the port reserved for its sidecar). Ports *below* the ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``) are never assigned automatically, so
picking there leaves only explicit binders to race with; each pick is checked with
a real bind.
"""

from __future__ import annotations

import random
import socket
from typing import TYPE_CHECKING

from heteroscale.errors import ScrapeError

if TYPE_CHECKING:
    import aiohttp

_SPAN = 12_000              # how far below the ephemeral range to pick from
_FALLBACK_EPHEMERAL_LOW = 32_768


def ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def free_ports(count: int, host: str = "127.0.0.1", *, rng: random.Random | None = None) -> list[int]:
    """``count`` distinct ports, below the ephemeral range, that ``host`` can bind now."""
    rng = rng or random.SystemRandom()
    high = ephemeral_low()
    low = max(1024, high - _SPAN)
    if high - low < count:
        raise RuntimeError(f"no room below the ephemeral port range ({high}) for {count} ports")
    picked: list[int] = []
    for _ in range(200 * count):
        if len(picked) == count:
            break
        port = rng.randrange(low, high)
        if port in picked:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        picked.append(port)
    if len(picked) < count:
        raise RuntimeError(f"found only {len(picked)} of {count} free ports on {host}")
    return picked


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def parse_host_port(text: str, *, default_host: str = "0.0.0.0", allow_port_zero: bool = True,
                    require_host: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` -> ``(host, port)``; ``ValueError`` naming the problem otherwise.

    An empty host (``:9400``) means ``default_host`` unless ``require_host``; port 0
    ("any free port") is refused unless ``allow_port_zero``.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"must be HOST:PORT, got {text!r}")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"must be HOST:PORT with a port in {lowest}..65535, got {text!r}")
    host = host.strip("[]")
    if not host:
        if require_host:
            raise ValueError(f"must be HOST:PORT with a host, got {text!r}")
        host = default_host
    return host, port


async def read_capped(response: "aiohttp.ClientResponse", max_bytes: int) -> bytes:
    """The whole body of a metrics page, or ``ScrapeError("too_large")`` as soon as it passes
    ``max_bytes`` (checked against ``Content-Length`` first, then while reading)."""
    if response.content_length is not None and response.content_length > max_bytes:
        raise ScrapeError("too_large", f"page of {response.content_length} bytes exceeds the {max_bytes}-byte cap")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise ScrapeError("too_large", f"page exceeds the {max_bytes}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)
