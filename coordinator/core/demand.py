"""Demand, not only service; and KV-cache pressure (pure).

Served decode tokens/s is the policy's primary signal, but it saturates at capacity:
during an overload it reads the fleet's ceiling, not the demand, and a 3× step looks
like a 1.2× one. While decode requests queue, ``demand_tps`` reads the demand as the
served rate times the requests in the system over the requests being served — each
waiting request would be served at the running ones' per-request rate (Little's law at
the current per-request speed). It is bounded (``max_factor``), used for scale-out only,
and shown in the decision's inputs.

KV pressure: a decode KV cache that is nearly full, or engines preempting (vLLM
``num_preemptions``, SGLang ``num_retracted_reqs``), precede a TBT breach; ``kv_pressure``
says so, for a moderate early step.
"""

from __future__ import annotations

from heteroscale.coordinator.core.settings import DemandEstimate, KvPressure
from heteroscale.coordinator.core.types import Observation


def demand_tps(observation: Observation, *, served_tps: float, settings: DemandEstimate) -> float | None:
    """The decode demand while requests queue for decode; ``None`` when nothing queues
    (then the served rate is the demand) or the queue state is not measured."""
    if not settings.enabled or served_tps <= 0:
        return None
    running, waiting = observation.decode_running, observation.decode_waiting
    if running is None or waiting is None or waiting <= 0 or running <= 0:
        return None
    factor = min(settings.max_factor, (running + waiting) / running)
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
