"""The coordinator: collect sidecar reports, aggregate per service, decide, place, act."""
