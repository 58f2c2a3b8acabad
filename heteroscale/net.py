"""Free TCP ports for processes we start ourselves (the demo's instances, tests).

Asking the kernel for port 0 and releasing it is racy: the number comes from the
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
