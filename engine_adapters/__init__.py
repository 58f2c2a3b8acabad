"""Engine adapters: turn a vLLM or SGLang Prometheus page into engine-neutral samples.

Parsing, rates and quantiles are pure; ``scrape`` is the only I/O module here. The
engine emulator that speaks vLLM's metric names lives in ``heteroscale.demo.emulator``.
"""
