"""Building blocks the simulator tests share."""

from __future__ import annotations

from typing import Any

from heteroscale.simulator import perfmodel as pm
from heteroscale.simulator.model.cluster import ClusterSpec

M8 = pm.model("8b")


def spec_8b(*, decode_gpu: str = "H20", **overrides: Any) -> ClusterSpec:
    """An 8B service on 1×L40S prefill and 1×``decode_gpu`` decode instances, 60 s start-up,
    0.5 s fluid ticks; any ``ClusterSpec`` field can be overridden."""
    fields: dict[str, Any] = dict(prefill=pm.InstanceSpec(M8, pm.gpu("L40S"), 1),
                                  decode=pm.InstanceSpec(M8, pm.gpu(decode_gpu), 1), startup_s=60.0, tick_s=0.5)
    fields.update(overrides)
    return ClusterSpec(**fields)
