"""Sizing the demo's service from the performance model (pure).

The demo must pick, before anything runs, what a real operator gets from a pressure
test: the per-instance decode target ``τ``, the P/D ratio, and a load whose peak
needs about the fleet the machine can hold. This module derives them from
``heteroscale.simulator.perfmodel`` and the trace's mean request size, so the emulated engines,
the policy's target and the load agree whatever model or GPUs are chosen:

* decode: the largest batch whose modelled step stays within ``step_share`` of the
  TBT SLO (and whose KV fits) gives the instance's capacity ``b / step(b)`` tokens/s;
  ``τ = target_load × capacity`` (the operator's head-room);
* prefill: batched passes of mean-size prompts give requests/s per instance; the
  ratio is the prefill instances one decode instance at ``τ`` needs, at the same
  ``target_load``, as a small fraction (denominator ≤ 2);
* load: the peak request rate is ``peak_share`` (0.85) of ``max_decode × τ``, so the
  policy asks for ``max_decode`` decode instances at the peak of the profile, with a
  little head-room.

Everything is in *modelled* units; ``wall_*`` helpers convert with the speed-up
(modelled seconds per wall second): rates multiply, durations divide.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from heteroscale.simulator import perfmodel


@dataclass(frozen=True)
class ServiceSizing:
    """What the demo's service looks like, in modelled units."""

    decode_batch: int                  # batch at the decode capacity point
    decode_step_s: float               # modelled step time at that batch
    decode_capacity_tps: float         # tokens/s one decode instance sustains within the TBT SLO
    target_decode_tps: float           # τ
    prefill_capacity_rps: float        # requests/s one prefill instance computes
    pd_ratio: tuple[int, int]
    max_decode: int
    max_prefill: int
    peak_rps: float                    # modelled requests/s at the profile's peak

    def to_dict(self) -> dict[str, object]:
        return {"decode_batch": self.decode_batch, "decode_step_s": round(self.decode_step_s, 5),
                "decode_capacity_tps": round(self.decode_capacity_tps, 1),
                "target_decode_tps": round(self.target_decode_tps, 1),
                "prefill_capacity_rps": round(self.prefill_capacity_rps, 3),
                "pd_ratio": f"{self.pd_ratio[0]}:{self.pd_ratio[1]}",
                "max_decode": self.max_decode, "max_prefill": self.max_prefill,
                "peak_rps": round(self.peak_rps, 3)}


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


def prefill_capacity_rps(spec: perfmodel.InstanceSpec, *, mean_prompt: float,
                         batch_tokens: int = 8192) -> float:
    """Requests/s of back-to-back passes packing mean-size prompts into ``batch_tokens``."""
    prompt = max(1, int(round(mean_prompt)))
    per_pass = max(1, batch_tokens // prompt)
    seconds = perfmodel.prefill_batch_time_s(
        spec.model, spec.gpu, spec.tp, new_tokens=per_pass * prompt,
        attention_pairs=per_pass * perfmodel.attention_pairs(prompt), eff=spec.eff)
    return per_pass / seconds


def size_service(*, model: str, prefill_gpu: str, decode_gpu: str, mean_prompt: float,
                 mean_output: float, tbt_slo_s: float, max_instances: int,
                 target_load: float = 0.7, peak_share: float = 0.85, prefill_tp: int = 1,
                 decode_tp: int = 1) -> ServiceSizing:
    """Derive τ, the ratio and the peak load (see the module docstring)."""
    if max_instances < 2:
        raise ValueError("max_instances must be at least 2 (one prefill, one decode)")
    m = perfmodel.model(model)
    decode_spec = perfmodel.InstanceSpec(m, perfmodel.gpu(decode_gpu), decode_tp)
    prefill_spec = perfmodel.InstanceSpec(m, perfmodel.gpu(prefill_gpu), prefill_tp)
    batch, step = decode_capacity(decode_spec, mean_prompt=mean_prompt, mean_output=mean_output,
                                  tbt_slo_s=tbt_slo_s)
    capacity_tps = batch / step
    tau = target_load * capacity_tps
    prefill_rps = prefill_capacity_rps(prefill_spec, mean_prompt=mean_prompt)
    per_decode = (tau / mean_output) / (target_load * prefill_rps)
    ratio = Fraction(per_decode).limit_denominator(2)
    if ratio <= 0:
        ratio = Fraction(1, 4)
    p, d = ratio.numerator, ratio.denominator
    # The most decode instances whose pools fit in max_instances; prefill follows the
    # policy's rounding (nearest integer to D·p/d, ties up).
    max_decode = max(1, (max_instances * d) // (p + d))
    max_prefill = max(1, (2 * max_decode * p + d) // (2 * d))
    while max_decode > 1 and max_decode + max_prefill > max_instances:
        max_decode -= 1
        max_prefill = max(1, (2 * max_decode * p + d) // (2 * d))
    # Peak demand asks for max_decode instances (D = ceil(tps / τ) reaches it) with some
    # head-room left, so the fleet can catch up with a steep compressed-day ramp.
    peak_rps = peak_share * max_decode * tau / mean_output
    return ServiceSizing(decode_batch=batch, decode_step_s=step, decode_capacity_tps=capacity_tps,
                         target_decode_tps=tau, prefill_capacity_rps=prefill_rps, pd_ratio=(p, d),
                         max_decode=max_decode, max_prefill=max_prefill, peak_rps=peak_rps)


def wall_rate(modelled_per_s: float, speedup: float) -> float:
    """A modelled rate seen on the wall clock: ``speedup`` modelled seconds pass per wall second."""
    return modelled_per_s * speedup


def wall_duration(modelled_s: float, speedup: float) -> float:
    return modelled_s / speedup

