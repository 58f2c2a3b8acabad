"""Roofline performance model of LLM prefill and decode per GPU type (pure).

This module owns the numbers every timed thing in HeteroScale derives from: the
simulator's discrete-event cluster and the demo's engine emulator both time
requests with it, so the two agree. It never reads the clock and does no I/O.

The model (ARCHITECTURE §4):

* **Prefill** is compute-bound. A forward pass over ``n`` new prompt tokens with
  ``c`` already-cached tokens costs ``2 × params × n`` FLOPs for the dense layers
  plus ``4 × layers × heads × head_dim × (n × c + n² / 2)`` for causal attention.
  Time = FLOPs / (TP × datasheet TFLOP/s × ``prefill_mfu`` × TP efficiency), but
  never less than one read of the weights from HBM, plus a fixed per-pass
  overhead (scheduler, kernel launches).
* **Decode** is memory-bound. One step of a continuous batch of ``b`` sequences
  holding ``k`` KV tokens in total moves ``weights + k × kv_bytes_per_token``
  bytes; time = bytes / (TP × datasheet bandwidth × ``decode_bandwidth_eff`` ×
  TP efficiency). The step is the larger of that and its compute time
  (``2 × params × b``; attention is bandwidth-bound, so it sits in the bytes), plus
  the per-step overhead.
* **KV bytes per token** = 2 (K and V) × layers × kv_heads × head_dim × dtype bytes.
* **KV capacity** of an instance = TP × HBM × ``memory_fraction`` − weights,
  divided by the KV bytes per token.

Modelled GPU utilisation and SM activity follow what the paper measured (PAPER
§4.2, Fig. 2): NVML "GPU utilisation" is the share of time *any* kernel runs, so

* prefill utilisation is its busy share of wall time (linear in load);
* decode utilisation is the share of time it has at least one running sequence
  times the kernel share of a step — high and flat, because a decode instance
  with any traffic runs kernels back to back;
* prefill SM activity is busy share × ``prefill_sm_occupancy``;
* decode SM activity is active share × (``decode_sm_floor`` + ``decode_sm_gain``
  × compute share of the step): memory-bound kernels leave SMs stalled, more so
  at small batches, so it moves with load but sluggishly.

Latency's cliff near saturation is not a formula here: it emerges from queueing
in the simulator (and the emulator) when arrival work exceeds these service times.

Public API:

* ``GpuSpec``, ``CATALOG`` (H20, L20, H100, H200, A100, L40S), ``gpu(name)``
* ``ModelSpec``, ``MODELS`` (``8b``, ``32b``, ``70b`` dense), ``model(name)``
* ``Efficiency``, ``DEFAULT_EFFICIENCY`` — the documented fudge factors
* ``kv_bytes_per_token(model)``, ``weight_bytes(model)``,
  ``kv_capacity_tokens(model, gpu, tp, ...)``
* ``prefill_flops(model, prompt_tokens, *, cached_tokens=0)``
* ``prefill_time_s(model, gpu, tp, prompt_tokens, *, cached_tokens=0, eff=...)``
* ``prefill_batch_time_s(model, gpu, tp, *, new_tokens, attention_pairs, eff=...)``
  for a batched/chunked pass (sum of per-sequence attention pairs ``n×c + n²/2``)
* ``decode_step_time_s(model, gpu, tp, batch_size, context_tokens, *, eff=...)``
* ``prefill_times_s(...)`` (vectorised over numpy arrays) and ``decode_coefficients(...)``
  (the decode step as ``max(a + b·context, c·batch) + overhead``) for the simulator's hot loops
* ``decode_compute_share(model, gpu, tp, batch_size, context_tokens, *, eff=...)``
* ``kv_transfer_time_s(model, tokens, *, bandwidth_gbps)``
* ``gpu_utilization(role, *, busy_fraction, ...)``, ``sm_activity(role, *, busy_fraction, ...)``
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # numpy is imported where the vectorised forms run
    import numpy as np

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU (dense bf16, no sparsity)."""

    name: str
    bf16_tflops: float          # peak dense bf16 TFLOP/s
    mem_bandwidth_tbps: float   # HBM/GDDR bandwidth, TB/s
    mem_gb: float               # device memory, GB (1e9 bytes)
    nvlink: bool = True         # False for PCIe cards: TP all-reduce is slower

    def __post_init__(self) -> None:
        if min(self.bf16_tflops, self.mem_bandwidth_tbps, self.mem_gb) <= 0:
            raise ValueError(f"GpuSpec {self.name}: figures must be positive")


CATALOG: dict[str, GpuSpec] = {
    "H20": GpuSpec("H20", 148.0, 4.0, 96.0),
    "L20": GpuSpec("L20", 119.5, 0.864, 48.0, nvlink=False),
    "H100": GpuSpec("H100", 989.0, 3.35, 80.0),
    "H200": GpuSpec("H200", 989.0, 4.8, 141.0),
    "A100": GpuSpec("A100", 312.0, 2.0, 80.0),
    "L40S": GpuSpec("L40S", 362.0, 0.864, 48.0, nvlink=False),
}


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder-only transformer. ``params`` counts all weights."""

    name: str
    params: float               # number of parameters
    layers: int
    hidden: int                 # model width = heads × head_dim
    heads: int
    kv_heads: int               # grouped-query attention heads for K/V
    head_dim: int
    dtype_bytes: int = 2        # bf16 weights and KV

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelSpec {self.name}: heads must be a multiple of kv_heads")


MODELS: dict[str, ModelSpec] = {
    # Llama-3.1-8B: 32 layers, 4096 wide, 32 heads, 8 KV heads.
    "8b": ModelSpec("8b", 8.03e9, 32, 4096, 32, 8, 128),
    # Qwen2.5-32B: 64 layers, 5120 wide, 40 heads, 8 KV heads.
    "32b": ModelSpec("32b", 32.8e9, 64, 5120, 40, 8, 128),
    # Llama-3.1-70B: 80 layers, 8192 wide, 64 heads, 8 KV heads.
    "70b": ModelSpec("70b", 70.6e9, 80, 8192, 64, 8, 128),
}


@dataclass(frozen=True)
class Efficiency:
    """The fudge factors between datasheet and achieved speed. All unitless unless named.

    prefill_mfu: achieved share of peak FLOP/s in prefill (0.4–0.6 typical for bf16 GEMMs).
    decode_mfu: achieved share of peak FLOP/s for decode's small GEMMs.
    decode_bandwidth_eff: achieved share of datasheet bandwidth in decode (0.6–0.85).
    tp_comm_fraction: lost share per doubling of TP on NVLink (all-reduce); PCIe cards
        lose ``pcie_tp_penalty`` times as much.
    pass_overhead_s: fixed host-side cost of one forward pass/step (scheduling, launch).
    memory_fraction: share of HBM the engine may use (vLLM's gpu_memory_utilization).
    prefill_kernel_share / decode_kernel_share: share of a busy interval in which a kernel
        is running (what NVML counts); decode's host gaps between steps lower it.
    prefill_sm_occupancy: SM activity of a compute-bound prefill pass.
    decode_sm_floor / decode_sm_gain: SM activity of decode = floor + gain × compute share.
    """

    prefill_mfu: float = 0.55
    decode_mfu: float = 0.35
    decode_bandwidth_eff: float = 0.75
    tp_comm_fraction: float = 0.05
    pcie_tp_penalty: float = 3.0
    pass_overhead_s: float = 0.004
    memory_fraction: float = 0.90
    prefill_kernel_share: float = 0.95
    decode_kernel_share: float = 0.90
    prefill_sm_occupancy: float = 0.78
    decode_sm_floor: float = 0.30
    decode_sm_gain: float = 0.60

    def __post_init__(self) -> None:
        shares = {k: v for k, v in self.__dict__.items()
                  if k not in ("pcie_tp_penalty", "pass_overhead_s")}
        bad = [k for k, v in shares.items() if not 0.0 <= v <= 1.0]
        if self.pcie_tp_penalty < 1.0:
            bad.append("pcie_tp_penalty")
        if self.pass_overhead_s < 0:
            bad.append("pass_overhead_s")
        if bad:
            raise ValueError(f"Efficiency: out of range: {', '.join(sorted(bad))}")


DEFAULT_EFFICIENCY = Efficiency()


def gpu(name: str) -> GpuSpec:
    """The catalog entry for ``name`` (case-insensitive; ``H100-SXM``/``A100-80G`` accepted)."""
    key = name.upper().replace("-SXM", "").replace("-80G", "").replace("_", "")
    if key not in CATALOG:
        raise KeyError(f"unknown GPU type {name!r}; known: {', '.join(CATALOG)}")
    return CATALOG[key]


def model(name: str) -> ModelSpec:
    """The model config for ``name`` (``8b``, ``32b``, ``70b``; case-insensitive)."""
    key = name.lower()
    if key not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key]


def kv_bytes_per_token(m: ModelSpec) -> int:
    """2 (K and V) × layers × kv_heads × head_dim × dtype bytes.

    8b: 2 × 32 × 8 × 128 × 2 = 131,072 bytes (128 KiB) per token.
    """
    return 2 * m.layers * m.kv_heads * m.head_dim * m.dtype_bytes


def weight_bytes(m: ModelSpec) -> float:
    return m.params * m.dtype_bytes


def kv_capacity_tokens(m: ModelSpec, g: GpuSpec, tp: int, *,
                       eff: Efficiency = DEFAULT_EFFICIENCY) -> int:
    """KV tokens one instance (``tp`` GPUs) can hold; 0 if the weights do not fit."""
    _check_tp(tp)
    free = tp * g.mem_gb * 1e9 * eff.memory_fraction - weight_bytes(m)
    return max(0, int(free // kv_bytes_per_token(m)))


def tp_efficiency(g: GpuSpec, tp: int, *, eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    """Share of linear TP speed-up kept after all-reduce costs: 1 / (1 + f × log2 tp)."""
    _check_tp(tp)
    loss = eff.tp_comm_fraction * (1.0 if g.nvlink else eff.pcie_tp_penalty)
    return 1.0 / (1.0 + loss * math.log2(tp))


def attention_pairs(prompt_tokens: int, cached_tokens: int = 0) -> float:
    """Query-key pairs of causal attention over ``n`` new tokens after ``c`` cached: n·c + n²/2."""
    n = max(0, prompt_tokens - cached_tokens)
    return n * cached_tokens + n * n / 2.0


def prefill_flops(m: ModelSpec, prompt_tokens: int, *, cached_tokens: int = 0) -> float:
    """Dense 2 × params × new tokens, plus 4 × layers × width × attention pairs."""
    new = max(0, prompt_tokens - cached_tokens)
    return 2.0 * m.params * new + _attn_flops(m, attention_pairs(prompt_tokens, cached_tokens))


def prefill_batch_time_s(m: ModelSpec, g: GpuSpec, tp: int, *, new_tokens: float,
                         attention_pairs: float,
                         eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    """One batched (or chunked) prefill pass over ``new_tokens`` uncached tokens in total.

    ``attention_pairs`` is the sum over sequences of ``n·c + n²/2`` (see
    ``attention_pairs()``). Returns 0 for an empty pass.
    """
    if new_tokens <= 0:
        return 0.0
    flops = 2.0 * m.params * new_tokens + _attn_flops(m, attention_pairs)
    scale = tp * tp_efficiency(g, tp, eff=eff)
    compute_s = flops / (scale * g.bf16_tflops * 1e12 * eff.prefill_mfu)
    weights_s = weight_bytes(m) / (scale * g.mem_bandwidth_tbps * 1e12 * eff.decode_bandwidth_eff)
    return max(compute_s, weights_s) + eff.pass_overhead_s


def prefill_time_s(m: ModelSpec, g: GpuSpec, tp: int, prompt_tokens: int, *,
                   cached_tokens: int = 0, eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    """Time of one prompt's prefill alone on an idle instance (no queueing)."""
    cached = min(max(0, cached_tokens), prompt_tokens)
    return prefill_batch_time_s(m, g, tp, new_tokens=prompt_tokens - cached,
                                attention_pairs=attention_pairs(prompt_tokens, cached), eff=eff)


def prefill_times_s(m: ModelSpec, g: GpuSpec, tp: int, prompt_tokens: "np.ndarray",
                    cached_tokens: "np.ndarray", *, eff: Efficiency = DEFAULT_EFFICIENCY) -> "np.ndarray":
    """``prefill_time_s`` for arrays of prompts at once (same formula, vectorised)."""
    import numpy as np
    prompt = np.asarray(prompt_tokens, dtype=np.float64)
    cached = np.clip(np.asarray(cached_tokens, dtype=np.float64), 0.0, prompt)
    new = prompt - cached
    flops = 2.0 * m.params * new + _attn_flops(m, new * cached + new * new / 2.0)
    scale = tp * tp_efficiency(g, tp, eff=eff)
    compute_s = flops / (scale * g.bf16_tflops * 1e12 * eff.prefill_mfu)
    weights_s = weight_bytes(m) / (scale * g.mem_bandwidth_tbps * 1e12 * eff.decode_bandwidth_eff)
    return np.where(new > 0, np.maximum(compute_s, weights_s) + eff.pass_overhead_s, 0.0)


@dataclass(frozen=True)
class DecodeCoefficients:
    """The decode step in linear form, for hot loops:
    ``step_s = max(weights_s + kv_token_s × context, seq_compute_s × batch) + overhead_s``."""

    weights_s: float
    kv_token_s: float
    seq_compute_s: float
    overhead_s: float

    def step_s(self, batch_size: int, context_tokens: float) -> float:
        if batch_size <= 0:
            return 0.0
        mem = self.weights_s + self.kv_token_s * context_tokens
        comp = self.seq_compute_s * batch_size
        return (mem if mem > comp else comp) + self.overhead_s


def decode_coefficients(m: ModelSpec, g: GpuSpec, tp: int, *,
                        eff: Efficiency = DEFAULT_EFFICIENCY) -> DecodeCoefficients:
    """The constants of ``decode_step_time_s`` for one instance type."""
    scale = tp * tp_efficiency(g, tp, eff=eff)
    bw = scale * g.mem_bandwidth_tbps * 1e12 * eff.decode_bandwidth_eff
    return DecodeCoefficients(weights_s=weight_bytes(m) / bw, kv_token_s=kv_bytes_per_token(m) / bw,
                              seq_compute_s=2.0 * m.params / (scale * g.bf16_tflops * 1e12 * eff.decode_mfu),
                              overhead_s=eff.pass_overhead_s)


def decode_step_time_s(m: ModelSpec, g: GpuSpec, tp: int, batch_size: int,
                       context_tokens: float, *, eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    """One continuous-batching decode step: every running sequence emits one token.

    ``context_tokens`` is the KV held by the whole batch. 0 for an empty batch.
    """
    if batch_size <= 0:
        return 0.0
    mem_s, compute_s = _decode_parts(m, g, tp, batch_size, context_tokens, eff)
    return max(mem_s, compute_s) + eff.pass_overhead_s


def decode_compute_share(m: ModelSpec, g: GpuSpec, tp: int, batch_size: int,
                         context_tokens: float, *,
                         eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    """Compute time / step time in [0, 1]: how compute-heavy a decode step is."""
    if batch_size <= 0:
        return 0.0
    mem_s, compute_s = _decode_parts(m, g, tp, batch_size, context_tokens, eff)
    return min(1.0, compute_s / (max(mem_s, compute_s) + eff.pass_overhead_s))


def kv_transfer_time_s(m: ModelSpec, tokens: int, *, bandwidth_gbps: float) -> float:
    """Seconds to move ``tokens`` tokens of KV over a link of ``bandwidth_gbps`` Gbit/s."""
    if bandwidth_gbps <= 0:
        raise ValueError("bandwidth_gbps must be positive")
    return tokens * kv_bytes_per_token(m) * 8.0 / (bandwidth_gbps * 1e9)


def gpu_utilization(role: str, *, busy_fraction: float,
                    eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    """Modelled NVML GPU utilisation in [0, 1].

    ``busy_fraction``: prefill — share of wall time spent in forward passes;
    decode — share of wall time with at least one running sequence.
    """
    busy = _clamp01(busy_fraction)
    if role == "prefill":
        return busy * eff.prefill_kernel_share
    if role == "decode":
        return busy * eff.decode_kernel_share
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def sm_activity(role: str, *, busy_fraction: float, compute_share: float = 0.0,
                eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    """Modelled DCGM SM activity in [0, 1] (see module docstring).

    ``compute_share`` matters for decode only (``decode_compute_share()`` averaged over steps).
    """
    busy = _clamp01(busy_fraction)
    if role == "prefill":
        return busy * eff.prefill_sm_occupancy
    if role == "decode":
        return busy * min(1.0, eff.decode_sm_floor + eff.decode_sm_gain * _clamp01(compute_share))
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


@dataclass(frozen=True)
class InstanceSpec:
    """One engine instance: a model on ``tp`` GPUs of one type. Convenience bundle."""

    model: ModelSpec
    gpu: GpuSpec
    tp: int
    eff: Efficiency = field(default=DEFAULT_EFFICIENCY)

    def __post_init__(self) -> None:
        _check_tp(self.tp)
        if kv_capacity_tokens(self.model, self.gpu, self.tp, eff=self.eff) <= 0:
            raise ValueError(f"{self.model.name} does not fit on {self.tp}×{self.gpu.name}")

    @property
    def kv_capacity_tokens(self) -> int:
        return kv_capacity_tokens(self.model, self.gpu, self.tp, eff=self.eff)

    def prefill_time_s(self, prompt_tokens: int, *, cached_tokens: int = 0) -> float:
        return prefill_time_s(self.model, self.gpu, self.tp, prompt_tokens,
                              cached_tokens=cached_tokens, eff=self.eff)

    def decode_step_time_s(self, batch_size: int, context_tokens: float) -> float:
        return decode_step_time_s(self.model, self.gpu, self.tp, batch_size,
                                  context_tokens, eff=self.eff)


def _decode_parts(m: ModelSpec, g: GpuSpec, tp: int, batch_size: int,
                  context_tokens: float, eff: Efficiency) -> tuple[float, float]:
    scale = tp * tp_efficiency(g, tp, eff=eff)
    moved = weight_bytes(m) + max(0.0, context_tokens) * kv_bytes_per_token(m)
    mem_s = moved / (scale * g.mem_bandwidth_tbps * 1e12 * eff.decode_bandwidth_eff)
    # Decode attention reads the KV at ~8 FLOP/byte (GQA) — below every catalog GPU's
    # ridge point — so its cost is in ``mem_s``; compute is the dense GEMMs only.
    flops = 2.0 * m.params * batch_size
    compute_s = flops / (scale * g.bf16_tflops * 1e12 * eff.decode_mfu)
    return mem_s, compute_s


def _attn_flops(m: ModelSpec, pairs: float) -> float:
    # QK^T and AV: 2 matmuls × 2 FLOPs per MAC × heads × head_dim per pair, per layer.
    return 4.0 * m.layers * m.heads * m.head_dim * pairs


def _check_tp(tp: int) -> None:
    if tp < 1 or tp & (tp - 1):
        raise ValueError(f"tp must be a power of two >= 1, got {tp}")


def _clamp01(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x
