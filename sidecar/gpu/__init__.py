"""GPU readings for the sidecar. ``nvml`` is the only module that imports pynvml."""
