"""KV-cache transfer throughput: engine connector metrics, RDMA NIC counters, an active probe.

* ``stats``       - pure: counter deltas (64-bit wrap, reset), windowed rates, histogram deltas
* ``connectors``  - pure: vLLM NIXL / SGLang / NIXL telemetry / Mooncake TENT pages -> readings
* ``rdma``        - sysfs port counters (configurable root)
* ``probe``       - the authenticated, capped bulk-TCP probe (server, client, schedule)
* ``sidecar_ext`` - the sidecar extension (flags, sources, report sample, metrics)
* ``bandwidth_metrics`` - Prometheus families for the coordinator's bandwidth map

See docs/kv-transfer.md.
"""
