"""Helpers for the opt-in real-vLLM test tier: a tiny local model, the server, traffic."""
