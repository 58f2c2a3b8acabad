"""KV-cache transfer throughput: engine connector metrics, RDMA NIC counters, an active probe.

* ``stats``       - pure: counter deltas (64-bit wrap, reset), windowed rates, histogram deltas
* ``connectors``  - pure: vLLM NIXL / SGLang / NIXL telemetry / Mooncake TENT pages -> readings
* ``rdma``        - sysfs port counters (configurable root)
* ``probe``       - the authenticated, capped bulk-TCP probe (server, client, schedule)
* ``extension``   - the sidecar extension (flags, sources, report sample, metrics)

The coordinator's bandwidth map (pure) is ``heteroscale.coordinator.core.bandwidth``.
See docs/kv-transfer.md.
"""
