"""RDMA NIC port counters from sysfs (blocking file reads; call through ``asyncio.to_thread``).

Reads, for every selected ``<device>/ports/<n>``, the kernel's PMA counters
(ENGINES.md §5.1):

* ``counters/port_xmit_data`` and ``counters/port_rcv_data`` - data octets
  **divided by 4** (lanes), 64-bit: bytes = value × 4;
* ``counters/port_xmit_wait`` - ticks with data queued but not sent, the
  congestion signal.

The root (default ``/sys/class/infiniband``) is a setting so tests, and pods
that mount sysfs elsewhere, can point it at a directory tree. A device or port
that is missing, unreadable or holds garbage is left out of the reading (absent,
never 0); the caller differences readings with ``heteroscale.kv_transfer.stats``, which
handles wrap and reset.

Port counters are port-wide (every QP, every process on that port): they
measure the NIC, not only KV transfer. The docs say so next to the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_SYSFS_ROOT = "/sys/class/infiniband"
DATA_WORD_BYTES = 4                      # port_*_data count 4-byte words (octets / 4 lanes)
XMIT_DATA = "port_xmit_data"
RCV_DATA = "port_rcv_data"
XMIT_WAIT = "port_xmit_wait"


@dataclass(frozen=True)
class PortCounters:
    """One port at one read. ``None`` = that counter file is missing or unreadable."""

    device: str
    port: str
    xmit_words: int | None               # raw port_xmit_data (4-byte words, 64-bit counter)
    rcv_words: int | None                # raw port_rcv_data
    xmit_wait: int | None                # raw port_xmit_wait ticks
    link_layer: str | None = None        # "InfiniBand" | "Ethernet" (RoCE)
    rate: str | None = None              # e.g. "400 Gb/sec (4X NDR)"

    @property
    def key(self) -> str:
        return f"{self.device}/{self.port}"

    @property
    def xmit_bytes(self) -> int | None:
        return self.xmit_words * DATA_WORD_BYTES if self.xmit_words is not None else None

    @property
    def rcv_bytes(self) -> int | None:
        return self.rcv_words * DATA_WORD_BYTES if self.rcv_words is not None else None


@dataclass(frozen=True)
class RdmaSettings:
    """Where and what to read.

    ``root``: the infiniband class directory (tests point it at a tmp tree).
    ``devices``: device names to read (empty = every device found at each read,
    so a hot-plugged VF appears without a restart). ``ports``: port numbers as
    strings (empty = every port of each device).
    """

    root: str = DEFAULT_SYSFS_ROOT
    devices: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()


class SysfsRdmaReader:
    """Reads port counters under ``settings.root``; never raises for a missing device."""

    def __init__(self, settings: RdmaSettings) -> None:
        self.settings = settings
        self.root = Path(settings.root)

    def available(self) -> bool:
        """True when at least one selected port has a readable data counter."""
        return any(p.xmit_words is not None or p.rcv_words is not None for p in self.read())

    def read(self) -> list[PortCounters]:
        out = []
        for device in self._devices():
            ports_dir = self.root / device / "ports"
            for port in self._ports(ports_dir):
                out.append(self._read_port(device, port, ports_dir / port))
        return out

    def _devices(self) -> list[str]:
        if self.settings.devices:
            return [d for d in self.settings.devices if (self.root / d).is_dir()]
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        except OSError:
            return []

    def _ports(self, ports_dir: Path) -> list[str]:
        if self.settings.ports:
            return [p for p in self.settings.ports if (ports_dir / p).is_dir()]
        try:
            return sorted((p.name for p in ports_dir.iterdir() if p.is_dir()), key=_port_order)
        except OSError:
            return []

    def _read_port(self, device: str, port: str, port_dir: Path) -> PortCounters:
        counters = port_dir / "counters"
        return PortCounters(
            device=device, port=port,
            xmit_words=_read_number(counters / XMIT_DATA),
            rcv_words=_read_number(counters / RCV_DATA),
            xmit_wait=_read_number(counters / XMIT_WAIT),
            link_layer=_read_text(port_dir / "link_layer"),
            rate=_read_text(port_dir / "rate"))


def _port_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip() or None
    except OSError:
        return None


def _read_number(path: Path) -> int | None:
    """A non-negative integer counter file; ``None`` when missing, unreadable or garbage."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = int(text, 10)
    except ValueError:
        return None
    return value if value >= 0 else None
