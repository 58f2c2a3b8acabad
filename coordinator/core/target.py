"""The effective decode target τ: what the latency net teaches the proportional rule (pure).

Two rules on two signals undo each other: the latency net adds instances when TBT
breaks, and proportional control on decode tokens/s, still under τ, takes them away
again — all day (dozens of reversals on traffic the target was not curated on). One
controller instead: when the net fires on a decode-side breach (TBT, or TTFT while decode
queues or its KV cache is under pressure) although the decode tokens/s per instance is
below τ, then τ is too high for today's traffic. The effective τ drops to the per-
instance rate at which latency broke (by at most ``step`` per breach, never below
``floor × τ``), so the proportional rule now asks for the capacity latency asked for.
While latency stays well inside the SLO (below ``calm_ratio`` of it) for
``recover_after_s``, the effective τ rises again by ``recover_step`` of τ, up to τ.

A TTFT breach with decode healthy is a prefill shortage: it does not teach τ (the ratio
drift detector, ``core.drift``, hears it instead).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from heteroscale.coordinator.core.settings import AdaptiveTarget


@dataclass(frozen=True)
class TargetState:
    scale: float = 1.0                  # effective τ = scale × τ
    changed_s: float | None = None      # when it last moved
    calm_since_s: float | None = None   # since when latency has been well inside the SLO
    why: str = ""                       # the last move's reason, for the status page


def learn_target(state: TargetState, *, settings: AdaptiveTarget, now_s: float, decode_breach: bool,
                 latency_ratio: float | None, per_instance_tps: float | None, tau: float,
                 cooldown_s: float) -> TargetState:
    """One tick of learning. ``decode_breach``: the net fired on a decode-side signal;
    ``latency_ratio``: worst p90 / SLO; ``per_instance_tps``: decode tokens/s per current
    decode instance."""
    if not settings.enabled:
        return state if state.scale == 1.0 else TargetState()
    effective = state.scale * tau
    if decode_breach and per_instance_tps is not None and per_instance_tps < effective:
        if state.changed_s is not None and now_s - state.changed_s < cooldown_s:
            return replace(state, calm_since_s=None)
        # Latency broke at this rate per instance: aim a little below it, by a bounded cut.
        wanted = 0.95 * per_instance_tps / tau
        scale = max(settings.floor, state.scale * (1 - settings.step), min(state.scale, wanted))
        if scale < state.scale:
            why = (f"latency broke at {per_instance_tps:.0f} tok/s per decode instance, under the effective "
                   f"target {effective:.0f}: effective target {scale * tau:.0f}")
            return TargetState(scale=scale, changed_s=now_s, calm_since_s=None, why=why)
        return replace(state, calm_since_s=None)
    calm = latency_ratio is not None and latency_ratio < settings.calm_ratio
    if not calm:
        return replace(state, calm_since_s=None) if state.calm_since_s is not None else state
    if state.scale >= 1.0:
        return state if state.calm_since_s is not None else replace(state, calm_since_s=now_s)
    since = state.calm_since_s if state.calm_since_s is not None else now_s
    if now_s - since >= settings.recover_after_s:
        scale = min(1.0, state.scale + settings.recover_step)
        why = (f"latency under {settings.calm_ratio:.0%} of the SLO for {settings.recover_after_s:g}s: "
               f"effective target back up to {scale * tau:.0f}")
        return TargetState(scale=scale, changed_s=now_s, calm_since_s=now_s, why=why)
    return replace(state, calm_since_s=since)
