"""The simulated P/D cluster (pure): instances, queues, KV transfer, measurements."""
