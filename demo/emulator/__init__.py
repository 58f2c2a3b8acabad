"""The engine emulator: a vLLM-compatible engine process timed by the performance model (demo, tests)."""
