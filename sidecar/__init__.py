"""HeteroScale: coordinated autoscaling for P/D-disaggregated LLM serving.

The package ``sidecar`` holds the command line, the per-pod agent and (under
``sidecar.coordinator``) the coordinator. Engine parsing lives in
``engine_adapters``, KV-transfer measurement in ``kv_transfer`` and the
discrete-event model in ``simulator``.
"""

__version__ = "0.1.0"
