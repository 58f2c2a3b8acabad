"""RDMA sysfs counters: a real directory tree in tmp_path read by the real reader; wrap and reset."""

from __future__ import annotations

from pathlib import Path

import pytest

from heteroscale.kv_transfer.rdma import RdmaSettings, SysfsRdmaReader
from heteroscale.kv_transfer.extension import KvSettings, KvTransferExtension

TOP64 = 2 ** 64


class SysfsTree:
    """/sys/class/infiniband/<dev>/ports/<n>/counters/* as plain files (what sysfs shows)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def set(self, device: str, port: str, **counters: object) -> None:
        port_dir = self.root / device / "ports" / port
        (port_dir / "counters").mkdir(parents=True, exist_ok=True)
        (port_dir / "link_layer").write_text("InfiniBand\n")
        (port_dir / "rate").write_text("400 Gb/sec (4X NDR)\n")
        for name, value in counters.items():
            (port_dir / "counters" / name).write_text(f"{value}\n")


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTree:
    return SysfsTree(tmp_path / "infiniband")


def test_reader_multiplies_data_words_by_four(tree):
    tree.set("mlx5_0", "1", port_xmit_data=1000, port_rcv_data=250, port_xmit_wait=7)
    (port,) = SysfsRdmaReader(RdmaSettings(root=str(tree.root))).read()
    assert port.key == "mlx5_0/1"
    assert port.xmit_bytes == 4000 and port.rcv_bytes == 1000 and port.xmit_wait == 7
    assert port.link_layer == "InfiniBand" and port.rate.startswith("400")


def test_missing_or_garbage_counters_are_absent(tree):
    tree.set("mlx5_0", "1", port_xmit_data="garbage", port_rcv_data=-5)
    (port,) = SysfsRdmaReader(RdmaSettings(root=str(tree.root))).read()
    assert port.xmit_words is None and port.rcv_words is None and port.xmit_wait is None


def test_no_root_means_no_ports(tmp_path):
    reader = SysfsRdmaReader(RdmaSettings(root=str(tmp_path / "nope")))
    assert reader.read() == [] and not reader.available()


def test_device_and_port_selection(tree):
    tree.set("mlx5_0", "1", port_xmit_data=1)
    tree.set("mlx5_0", "2", port_xmit_data=2)
    tree.set("mlx5_1", "1", port_xmit_data=3)
    keys = [p.key for p in SysfsRdmaReader(RdmaSettings(root=str(tree.root), devices=("mlx5_0",),
                                                        ports=("2",))).read()]
    assert keys == ["mlx5_0/2"]
    everything = [p.key for p in SysfsRdmaReader(RdmaSettings(root=str(tree.root))).read()]
    assert everything == ["mlx5_0/1", "mlx5_0/2", "mlx5_1/1"]


def _ext(tree: SysfsTree, direction: str = "send") -> KvTransferExtension:
    return KvTransferExtension(KvSettings(direction=direction, window_s=10,
                                          rdma=RdmaSettings(root=str(tree.root))))


async def test_extension_rates_from_sysfs_across_a_64_bit_wrap(tree):
    ext = _ext(tree)
    tree.set("mlx5_0", "1", port_xmit_data=TOP64 - 1_000, port_rcv_data=0, port_xmit_wait=0)
    await ext.sample(100.0)
    # 2 s later the word counter wrapped: 1000 + 24000 = 25000 words = 100000 bytes in 2 s.
    tree.set("mlx5_0", "1", port_xmit_data=24_000, port_rcv_data=500, port_xmit_wait=300)
    sample = await ext.sample(102.0)
    rdma = sample["sources"]["rdma"]
    assert rdma["send_bytes_per_second"] == 50_000
    assert rdma["receive_bytes_per_second"] == 1_000        # 500 words * 4 / 2 s
    assert rdma["xmit_wait_per_second"] == 150
    assert sample["bytes_per_second"] == 50_000 and sample["source"] == "rdma"
    assert sample["direction"] == "send"


async def test_extension_reset_is_left_out_not_negative(tree):
    ext = _ext(tree, direction="receive")
    tree.set("mlx5_0", "1", port_xmit_data=0, port_rcv_data=10_000)
    await ext.sample(0.0)
    tree.set("mlx5_0", "1", port_xmit_data=0, port_rcv_data=12_000)     # +2000 words in 1 s
    await ext.sample(1.0)
    tree.set("mlx5_0", "1", port_xmit_data=0, port_rcv_data=100)        # driver reload: reset
    sample = await ext.sample(2.0)
    # The reset interval is unknown; the rate is the known one: 8000 bytes / 1 s.
    assert sample["sources"]["rdma"]["receive_bytes_per_second"] == 8_000
    tree.set("mlx5_0", "1", port_xmit_data=0, port_rcv_data=600)        # +500 words in 1 s
    sample = await ext.sample(3.0)
    # Known intervals: 0..1 s (8000 B) and 2..3 s (2000 B): 10000 B over 2 s.
    assert sample["sources"]["rdma"]["receive_bytes_per_second"] == 5_000


async def test_extension_without_rdma_has_no_rdma_source(tmp_path):
    ext = KvTransferExtension(KvSettings(direction="send", rdma=RdmaSettings(root=str(tmp_path / "none"))))
    await ext.sample(0.0)
    sample = await ext.sample(1.0)
    assert "rdma" not in sample["sources"]
    assert sample["bytes_per_second"] is None and sample["source"] is None


async def test_a_port_that_disappears_goes_stale_not_zero(tree):
    ext = _ext(tree)
    tree.set("mlx5_0", "1", port_xmit_data=0)
    await ext.sample(0.0)
    tree.set("mlx5_0", "1", port_xmit_data=100)
    assert (await ext.sample(1.0))["sources"]["rdma"]["send_bytes_per_second"] == 400
    import shutil
    shutil.rmtree(tree.root / "mlx5_0")
    sample = await ext.sample(20.0)                                     # beyond the 10 s window
    assert "rdma" not in sample["sources"]
