"""KV-transfer links with capacity (pure).

Every P→D transfer leaves through its prefill instance's NIC and arrives through its decode
instance's NIC (``kv_link_gbps`` each); the transfers of one instance share its NIC first
come, first served, so a burst of finished prefills (or many prefills feeding one decode
instance) queues on the wire. A transfer that crosses switches (``cross_share`` of
them, drawn per transfer; placement sets the share from the Deployment Groups) runs
at ``cross_switch_ratio`` of the NIC's bandwidth and also needs the one inter-switch
uplink (``kv_uplink_gbps``) that every crossing transfer of the service shares, so
the cost of crossing grows with the load that crosses. ``degraded_links`` lowers the
NIC bandwidth of the prefill instances under one switch (instances are spread over
``kv_switches`` round robin by serial number) — a bandwidth map a policy can be blind to.
With a topology, placement labels each instance with the S1 switch of its node
(``switch``) and a transfer runs at the lower share of its two ends' switches. Each
instance counts the KV bytes through its NIC and their time on the wire: its sidecar
reports the per-transfer speed from them (``engine_connector`` in the bandwidth map).

FIFO on a shared link gives each transfer the completion time it would have under
fair sharing on average, at O(1) per transfer (no per-tick rate bookkeeping).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from heteroscale.simulator.model.cluster import ClusterSpec


class KvLinks:
    """The service's KV links: per-prefill-instance NIC FIFOs and the shared uplink."""

    def __init__(self, spec: "ClusterSpec", *, kv_bytes_per_token: float, rng: random.Random) -> None:
        self.rng = rng
        self.kv_bytes_per_token = kv_bytes_per_token
        self.s_per_token = kv_bytes_per_token * 8.0 / (spec.kv_link_gbps * 1e9)
        uplink = spec.kv_uplink_gbps if spec.kv_uplink_gbps is not None else 8.0 * spec.kv_link_gbps
        self.uplink_s_per_token = kv_bytes_per_token * 8.0 / (uplink * 1e9)
        self.ratio = spec.cross_switch_ratio
        self.cross_share = spec.cross_switch_share
        self.switches = spec.kv_switches
        self.degraded = {int(k): float(v) for k, v in dict(spec.degraded_links).items()}
        self.uplink_free_s = 0.0
        self.transfers = 0
        self.cross_transfers = 0
        self.wire_s = 0.0            # Σ time on the wire (transfer time at full speed would be less)
        self.queued_s = 0.0          # Σ time transfers waited for a busy link
        self.degraded_transfers = 0  # transfers that ran at a degraded switch's share

    def share(self, owner: Any, dest: Any) -> float:
        """Bandwidth share left for a transfer between the two (1.0 = healthy)."""
        share = self.degraded.get(self.switch_of(owner), 1.0)
        if dest.switch is not None:      # placed instances: the receiving end's switch counts too
            other = self.degraded.get(dest.switch, 1.0)
            if other < share:
                share = other
        return share

    def switch_of(self, owner: Any) -> int:
        return owner.switch if owner.switch is not None else owner.index % self.switches

    def transfer(self, owner: Any, dest: Any, tokens: float, ready_s: float) -> float:
        """Move ``tokens`` of KV out of prefill instance ``owner`` into decode instance
        ``dest`` once ``ready_s``; the time it lands. Both NICs carry it (FIFO each)."""
        dur = tokens * self.s_per_token
        if self.degraded:
            share = self.share(owner, dest)
            if share < 1.0:
                dur /= share
                self.degraded_transfers += 1
        start = owner.link_free_s if owner.link_free_s > ready_s else ready_s
        if dest.link_free_s > start:
            start = dest.link_free_s
        self.transfers += 1
        share = self.cross_share
        if share > 0 and self.rng.random() < share:
            self.cross_transfers += 1
            dur /= self.ratio
            up_start = self.uplink_free_s if self.uplink_free_s > ready_s else ready_s
            up_end = up_start + tokens * self.uplink_s_per_token
            self.uplink_free_s = up_end
            end = start + dur
            if up_end > end:
                end = up_end
        else:
            end = start + dur
        owner.link_free_s = end
        dest.link_free_s = end
        moved = tokens * self.kv_bytes_per_token
        owner.c_kv_bytes += moved
        dest.c_kv_bytes += moved
        owner.c_kv_wire_s += end - start
        dest.c_kv_wire_s += end - start
        self.queued_s += start - ready_s
        self.wire_s += end - start
        return end
