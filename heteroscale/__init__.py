"""HeteroScale: coordinated autoscaling for P/D-disaggregated LLM serving.

One import package. Its subpackages are the repository's top-level folders:

* ``heteroscale.sidecar``          the per-pod agent (engine scrape, NVML, ``/v1/report``)
* ``heteroscale.engine_adapters``  vLLM and SGLang pages -> engine-neutral samples (pure)
* ``heteroscale.kv_transfer``      KV-cache transfer throughput (connectors, RDMA, probe)
* ``heteroscale.coordinator``      the leader-elected coordinator; ``.core`` is its zero-I/O
                                   decision code, shared with the simulator
* ``heteroscale.simulator``        discrete-event P/D cluster driving ``coordinator.core``
* ``heteroscale.demo``             the whole loop on one machine, with the engine emulator

This module itself holds the package face: the version, the CLI (``heteroscale.cli``),
the error tree (``heteroscale.errors``), the sidecar report contract
(``heteroscale.report``) and small network helpers (``heteroscale.net``).
docs/architecture.md draws the layers.
"""

__version__ = "0.1.0"
