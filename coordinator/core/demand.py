"""Demand, not only service; and KV-cache pressure (pure).

Served decode tokens/s is the policy's primary signal, but it saturates at capacity:
during an overload it reads the fleet's ceiling, not the demand, and a 3× step looks
like a 1.2× one. While requests queue, ``demand_tps`` reads the demand as the served
rate times the requests in the system over the requests being served — each waiting
request would be served at the running ones' per-request rate (Little's law at the
current per-request speed). The queue is decode's own (waiting for a batch slot or KV
room) and, with ``include_prefill_queue``, the prefill instances' queue: every request
waiting for prefill will want decode next, and under a sudden rise prefill is where the
backlog shows first (decode is fed only as fast as prefill drains it). It is bounded
(``max_factor``), used for scale-out only, and shown in the decision's inputs.

KV pressure: a decode KV cache that is nearly full, or engines preempting (vLLM
``num_preemptions``, SGLang ``num_retracted_reqs``), precede a TBT breach; ``kv_pressure``
says so, for a moderate early step.
"""

from __future__ import annotations

from heteroscale.coordinator.core.settings import DemandEstimate, KvPressure
from heteroscale.coordinator.core.types import Observation


def queued_requests(observation: Observation, *, settings: DemandEstimate) -> float | None:
    """The requests waiting for decode (and, with ``include_prefill_queue``, for
    prefill), summed; ``None`` when no queue is measured."""
    parts = [observation.decode_waiting]
    if settings.include_prefill_queue:
        parts.append(observation.prefill_waiting)
    known = [max(0.0, w) for w in parts if w is not None]
    return sum(known) if known else None


def draining(queued: float | None, *, previous: tuple[float, float] | None, now_s: float,
             settings: DemandEstimate, was_backlog: bool = False) -> str | None:
    """Why the queue needs no more capacity, or ``None``: it is shrinking fast enough to be
    gone within ``drain_horizon_s`` (``previous``: the queue and when it was seen). Such a
    backlog is being served faster than requests arrive; reading it as demand again would
    buy instances for traffic that has passed. A queue that shrinks too slowly still counts.
    The tick a backlog empties (``was_backlog``: the last tick drained one, see
    ``is_backlog``) counts as draining too: its served rate and latency window still carry
    the flush."""
    if queued is None or previous is None:
        return None
    before, at = previous
    if queued == 0:
        # Just emptied: this tick's served rate and latency window still hold the flush.
        return f"{before:.0f} -> 0 requests queued, drained" if before > 0 and was_backlog else None
    elapsed = now_s - at
    if elapsed <= 0 or queued >= before:
        return None
    rate = (before - queued) / elapsed
    if queued / rate > settings.drain_horizon_s:
        return None
    return f"{before:.0f} -> {queued:.0f} requests queued, gone in ~{queued / rate:.0f}s"


def is_backlog(queued_before: float, running: float | None) -> bool:
    """A queue worth calling a backlog: at least as many requests waiting as being served.
    A few requests queued for a moment on a small fleet are noise, not a backlog whose
    flush explains a latency breach."""
    return running is not None and queued_before >= max(1.0, running)


def demand_tps(observation: Observation, *, served_tps: float, settings: DemandEstimate) -> float | None:
    """The decode demand while requests queue; ``None`` when nothing queues (then the
    served rate is the demand) or the queue is not measured."""
    if not settings.enabled or served_tps <= 0:
        return None
    running = observation.decode_running
    queued = queued_requests(observation, settings=settings)
    if running is None or running <= 0 or not queued:
        return None
    factor = min(settings.max_factor, (running + queued) / running)
    return served_tps * factor


def kv_pressure(observation: Observation, *, settings: KvPressure) -> str | None:
    """Why decode is short of KV cache, or ``None``."""
    if not settings.enabled:
        return None
    usage = observation.decode_kv_usage_max
    if usage is not None and usage >= settings.usage:
        return f"decode KV cache at {usage:.0%} (>= {settings.usage:.0%})"
    rate = observation.decode_preemptions_per_s
    if rate is not None and settings.preemptions_per_s > 0 and rate >= settings.preemptions_per_s:
        return f"decode preempting {rate:.2g}/s (>= {settings.preemptions_per_s:g}/s)"
    return None
