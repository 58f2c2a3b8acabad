"""KV-cache transfer throughput: engine connector metrics, RDMA NIC counters, an active probe."""
