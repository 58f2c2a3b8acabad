"""Sizing the demo's service from the performance model: a modelled pressure test (pure).

The demo must pick, before anything runs, what a real operator gets from a pressure
test: the per-instance decode target ``τ``, the P/D ratio, and a load whose peak the
largest fleet can carry. This module derives them from ``heteroscale.simulator.perfmodel``
and the request sizes the demo will send, so the emulated engines, the policy's target
and the load agree whatever model or GPUs are chosen:

* **decode**: the largest batch whose modelled step stays within ``step_share`` of the
  TBT SLO (and whose KV fits) gives the instance's capacity ``b / step(b)`` tokens/s, its
  limit; ``τ = target_load × capacity`` (the operator's head-room).
* **prefill**: a pressure test of the emulator's own prefill lane (FIFO passes of at most
  ``batch_tokens`` prompt tokens, vLLM's budget for the GPU): Poisson arrivals with the
  demo's prompt sizes, bisection on the rate, the highest rate per instance whose p90
  time to prefill stays within ``ttft_share`` of the TTFT SLO, its limit. Prompt sizes are
  heavy-tailed (a few take seconds alone), so TTFT, not throughput, bounds prefill: on
  2×L20 for a 32B model the limit is about half of the lane's throughput.
* **ratio**: balanced, as the paper's pressure test picks it: the prefill instances one
  decode instance at *its* limit needs at *theirs*, so both pools reach their SLO at the
  same load and the head-room ``τ`` leaves on decode is head-room on prefill too (a
  ratio sized at ``τ`` instead leaves prefill at its limit while decode still has 30% to
  go). Rounded *up* to a half (more prefill protects TTFT; a shortfall of up to 5% is
  accepted rather than rounding 3.04 up to 3.5).
* **fleet and peak**: the most decode instances whose pools fit in ``max_instances``
  (and, where the caller passes ``fits``, on the cluster); the peak request rate is
  ``peak_share`` of ``max_decode × τ`` in decode tokens, so the policy asks for the
  whole fleet at the profile's peak with a little head-room.

Everything is in *modelled* units (the speed-up only compresses the wall clock).
Randomness is an input (``seed``): the same inputs always give the same sizing.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

from heteroscale.demo.emulator.defaults import vllm_max_num_batched_tokens
from heteroscale.simulator import perfmodel

Fits = Callable[[int, int], bool]        # (prefill, decode) instances -> the cluster holds them


@dataclass(frozen=True)
class ServiceSizing:
    """What the demo's service looks like, in modelled units."""

    decode_batch: int                  # batch at the decode capacity point
    decode_step_s: float               # modelled step time at that batch
    decode_capacity_tps: float         # tokens/s one decode instance sustains within the TBT SLO
    target_decode_tps: float           # τ
    prefill_capacity_rps: float        # requests/s one prefill instance computes back to back
    prefill_rate_rps: float            # its limit: requests/s with p90 time to prefill within the budget
    prefill_ttft_p90_s: float          # the pressure test's p90 time to prefill at that rate
    prefill_batch_tokens: int          # prompt tokens per prefill pass (vLLM's budget)
    pd_ratio: tuple[int, int]
    max_decode: int
    max_prefill: int
    peak_rps: float                    # modelled requests/s at the profile's peak
    mean_prompt: float
    mean_output: float

    @property
    def peak_decode_tps(self) -> float:
        return self.peak_rps * self.mean_output

    @property
    def peak_prefill_load(self) -> float:
        """Prefill requests/s per instance at the peak, as a share of its limit."""
        return self.peak_rps / (self.max_prefill * self.prefill_rate_rps)

    @property
    def peak_decode_load(self) -> float:
        """Decode tokens/s per instance at the peak, as a share of its limit."""
        return self.peak_decode_tps / (self.max_decode * self.decode_capacity_tps)

    def to_dict(self) -> dict[str, object]:
        return {"decode_batch": self.decode_batch, "decode_step_s": round(self.decode_step_s, 5),
                "decode_capacity_tps": round(self.decode_capacity_tps, 1),
                "target_decode_tps": round(self.target_decode_tps, 1),
                "prefill_capacity_rps": round(self.prefill_capacity_rps, 3),
                "prefill_rate_rps": round(self.prefill_rate_rps, 3),
                "prefill_ttft_p90_s": round(self.prefill_ttft_p90_s, 3),
                "prefill_batch_tokens": self.prefill_batch_tokens,
                "pd_ratio": f"{self.pd_ratio[0]}:{self.pd_ratio[1]}",
                "max_decode": self.max_decode, "max_prefill": self.max_prefill,
                "peak_rps": round(self.peak_rps, 3), "peak_decode_tps": round(self.peak_decode_tps, 1),
                "mean_prompt": round(self.mean_prompt, 1), "mean_output": round(self.mean_output, 1)}


def decode_capacity(spec: perfmodel.InstanceSpec, *, mean_prompt: float, mean_output: float,
                    tbt_slo_s: float, step_share: float = 0.8, max_batch: int = 512) -> tuple[int, float]:
    """(batch, step seconds) of the largest batch within ``step_share × tbt_slo_s``."""
    context = mean_prompt + mean_output / 2.0
    best = (1, spec.decode_step_time_s(1, context))
    for batch in range(1, max_batch + 1):
        if batch * (mean_prompt + mean_output) > spec.kv_capacity_tokens:
            break
        step = spec.decode_step_time_s(batch, batch * context)
        if step > step_share * tbt_slo_s:
            break
        best = (batch, step)
    return best


def _pass_s(spec: perfmodel.InstanceSpec, prompts: Sequence[int]) -> float:
    return perfmodel.prefill_batch_time_s(spec.model, spec.gpu, spec.tp, new_tokens=sum(prompts),
                                          attention_pairs=sum(perfmodel.attention_pairs(p) for p in prompts),
                                          eff=spec.eff)


def prefill_capacity_rps(spec: perfmodel.InstanceSpec, prompts: Sequence[int], *, batch_tokens: int) -> float:
    """Requests/s of back-to-back passes over ``prompts``, packed FIFO into ``batch_tokens``."""
    if not prompts:
        raise ValueError("prefill capacity needs at least one prompt")
    busy = 0.0
    batch: list[int] = []
    for p in prompts:
        if batch and sum(batch) + p > batch_tokens:
            busy += _pass_s(spec, batch)
            batch = []
        batch.append(p)
    busy += _pass_s(spec, batch)
    return len(prompts) / busy


def prefill_ttft_p90_s(spec: perfmodel.InstanceSpec, prompts: Sequence[int], *, rate_rps: float,
                       batch_tokens: int, requests: int = 3000, seed: int = 0) -> float:
    """p90 of arrival → end of prefill pass on one instance: the emulator's prefill lane.

    Poisson arrivals at ``rate_rps`` with prompt sizes drawn from ``prompts``; each pass
    takes the oldest waiting request and those behind it that fit in ``batch_tokens``
    (as ``EmulatedEngine._take_prefill_batch`` does); everyone in a pass finishes at its
    end. The first tenth of the requests is a warm-up and not counted.
    """
    rng = random.Random(seed)
    t = 0.0
    arrivals: list[tuple[float, int]] = []
    for _ in range(requests):
        t += rng.expovariate(rate_rps)
        arrivals.append((t, prompts[rng.randrange(len(prompts))]))
    waits: list[float] = []
    free_at, i = 0.0, 0
    while i < len(arrivals):
        start = max(free_at, arrivals[i][0])
        batch = [arrivals[i]]
        used = arrivals[i][1]
        i += 1
        while i < len(arrivals) and arrivals[i][0] <= start and used + arrivals[i][1] <= batch_tokens:
            batch.append(arrivals[i])
            used += arrivals[i][1]
            i += 1
        free_at = start + _pass_s(spec, [p for _, p in batch])
        waits.extend(free_at - at for at, _ in batch)
    kept = sorted(waits[requests // 10:])
    return kept[min(len(kept) - 1, int(0.9 * len(kept)))]


def prefill_rate_within(spec: perfmodel.InstanceSpec, prompts: Sequence[int], *, ttft_budget_s: float,
                        batch_tokens: int, max_rate_rps: float, iterations: int = 14,
                        seed: int = 0) -> tuple[float, float]:
    """(rate, its p90): the highest rate ≤ ``max_rate_rps`` whose p90 time to prefill is within
    ``ttft_budget_s``, by bisection (the same arrivals at every rate, so the p90 rises with it)."""
    p90 = prefill_ttft_p90_s(spec, prompts, rate_rps=max_rate_rps, batch_tokens=batch_tokens, seed=seed)
    if p90 <= ttft_budget_s:
        return max_rate_rps, p90
    lo, hi = 0.0, max_rate_rps
    best = (0.0, math.inf)
    for _ in range(iterations):
        mid = (lo + hi) / 2.0
        p90 = prefill_ttft_p90_s(spec, prompts, rate_rps=mid, batch_tokens=batch_tokens, seed=seed)
        if p90 <= ttft_budget_s:
            lo, best = mid, (mid, p90)
        else:
            hi = mid
    return best


def ratio_for(per_decode: float, *, shortfall: float = 0.05) -> tuple[int, int]:
    """Prefill:decode as a fraction with denominator ≤ 2, rounded up (less ``shortfall``).

    Worked examples: 2.25 → 5:2; 3.04 → 3:1 (3.04 / 1.05 = 2.9, up to a half: 3);
    0.3 → 1:2 (never below one prefill per two decode)."""
    halves = max(1, math.ceil(2 * per_decode / (1 + shortfall) - 1e-9))
    ratio = Fraction(halves, 2)
    return ratio.numerator, ratio.denominator


def prefill_for(decode: int, ratio: tuple[int, int]) -> int:
    """The policy's rounding: P nearest to D·p/d, ties up, at least 1 (``core.ratio``)."""
    p, d = ratio
    return max(1, (2 * decode * p + d) // (2 * d))


def fleet_bounds(ratio: tuple[int, int], *, max_instances: int, fits: Fits | None = None) -> tuple[int, int]:
    """(max_prefill, max_decode): the most decode instances whose pools fit in ``max_instances``
    and, if given, on the cluster (``fits``). ``ValueError`` if not even one decode instance
    and its prefill fit."""
    p, d = ratio

    def ok(decode: int) -> bool:
        prefill = prefill_for(decode, ratio)
        return decode + prefill <= max_instances and (fits is None or fits(prefill, decode))

    decode = max(1, (max_instances * d) // (p + d))
    while decode > 1 and not ok(decode):
        decode -= 1
    if not ok(decode):
        raise ValueError(f"the smallest fleet at {p}:{d} is {prefill_for(1, ratio)}P+1D "
                         f"({prefill_for(1, ratio) + 1} instances): "
                         + ("more than --max-instances allows" if decode + prefill_for(1, ratio) > max_instances
                            else "more than the cluster holds"))
    return prefill_for(decode, ratio), decode


def size_service(*, model: str, prefill_gpu: str, decode_gpu: str, prompts: Sequence[int],
                 outputs: Sequence[int], tbt_slo_s: float, ttft_slo_s: float, max_instances: int,
                 target_load: float = 0.7, peak_share: float = 0.85, ttft_share: float = 0.8,
                 prefill_tp: int = 1, decode_tp: int = 1, prefill_batch_tokens: int | None = None,
                 fits: Fits | None = None, seed: int = 0) -> ServiceSizing:
    """Derive τ, the ratio, the fleet and the peak load (see the module docstring)."""
    if max_instances < 2:
        raise ValueError("max_instances must be at least 2 (one prefill, one decode)")
    if not prompts or not outputs:
        raise ValueError("sizing needs request sizes")
    m = perfmodel.model(model)
    decode_spec = perfmodel.InstanceSpec(m, perfmodel.gpu(decode_gpu), decode_tp)
    prefill_spec = perfmodel.InstanceSpec(m, perfmodel.gpu(prefill_gpu), prefill_tp)
    mean_prompt, mean_output = statistics.fmean(prompts), statistics.fmean(outputs)
    batch, step = decode_capacity(decode_spec, mean_prompt=mean_prompt, mean_output=mean_output,
                                  tbt_slo_s=tbt_slo_s)
    capacity_tps = batch / step
    tau = target_load * capacity_tps
    budget = prefill_batch_tokens or vllm_max_num_batched_tokens(prefill_spec.gpu)
    prefill_rps = prefill_capacity_rps(prefill_spec, prompts, batch_tokens=budget)
    rate, p90 = prefill_rate_within(prefill_spec, prompts, ttft_budget_s=ttft_share * ttft_slo_s,
                                    batch_tokens=budget, max_rate_rps=prefill_rps, seed=seed)
    if rate <= 0:
        raise ValueError(f"no prefill rate keeps p90 TTFT within {ttft_share * ttft_slo_s:.2f}s on "
                         f"{prefill_gpu}: the TTFT SLO is below what one prompt takes")
    ratio = ratio_for((capacity_tps / mean_output) / rate)      # balanced at both limits
    max_prefill, max_decode = fleet_bounds(ratio, max_instances=max_instances, fits=fits)
    # Peak demand asks for max_decode instances (D = ceil(tps / τ) reaches it) with some
    # head-room left, so the fleet can catch up with a steep compressed-day ramp.
    peak_rps = peak_share * max_decode * tau / mean_output
    return ServiceSizing(decode_batch=batch, decode_step_s=step, decode_capacity_tps=capacity_tps,
                         target_decode_tps=tau, prefill_capacity_rps=prefill_rps, prefill_rate_rps=rate,
                         prefill_ttft_p90_s=p90, prefill_batch_tokens=budget, pd_ratio=ratio,
                         max_decode=max_decode, max_prefill=max_prefill, peak_rps=peak_rps,
                         mean_prompt=mean_prompt, mean_output=mean_output)
