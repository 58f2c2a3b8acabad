"""The per-pod sidecar: scrape the engine and its GPUs, serve ``/metrics`` and ``/v1/report``."""
