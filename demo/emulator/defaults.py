"""vLLM's scheduler defaults that depend on the GPU, for the emulator and the demo's sizing (pure).

vLLM's OpenAI API server picks ``max_num_batched_tokens`` (tokens one engine step may
process, so the size of a prefill pass) from the device: 8192 on GPUs with at least
70 GiB of memory other than the A100, 2048 otherwise, with ``max_num_seqs`` 1024 and 256
(``EngineArgs.get_batch_defaults``; the A100 exception is vLLM PR #17885). A pass of
8192 prompt tokens of a 32B model on two L20s takes ~4.7 s, so the budget matters for
TTFT as much as the GPU does.
"""

from __future__ import annotations

from heteroscale.simulator import perfmodel

GIB = 2 ** 30
LARGE_DEVICE_BYTES = 70 * GIB


def vllm_max_num_batched_tokens(gpu: perfmodel.GpuSpec) -> int:
    """vLLM's API-server default for one GPU type (H20, H100, H200: 8192; L20, L40S, A100: 2048)."""
    large = gpu.mem_gb * 1e9 >= LARGE_DEVICE_BYTES and gpu.name.upper() != "A100"
    return 8192 if large else 2048
