"""Prometheus families for the coordinator's bandwidth map (built at scrape time, no state).

``sidecar.coordinator.bandwidth`` is pure and knows nothing of Prometheus; this is
its thin exporter, for the coordinator's ``/metrics``:

* ``heteroscale_kv_bandwidth_bytes_per_second{service,prefill,decode,locality}`` -
  the latest probed rate of each measured pair;
* ``heteroscale_kv_bandwidth_median_bytes_per_second{service,locality}`` -
  the same-switch and cross-switch medians (absent when a class has no pair);
* ``heteroscale_kv_bandwidth_flagged_pairs{service}`` - pairs far below their peers.

Pair series are bounded by prefill x decode pods of a service; a service with
hundreds of pods should rely on the medians and the flagged count instead.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from sidecar.coordinator.bandwidth import CROSS_SWITCH, SAME_SWITCH, BandwidthMap


def bandwidth_families(maps: BandwidthMap | Iterable[BandwidthMap]) -> list[Metric]:
    """The three families for one map or several (one per service tick)."""
    maps = [maps] if isinstance(maps, BandwidthMap) else list(maps)
    pairs = GaugeMetricFamily("heteroscale_kv_bandwidth_bytes_per_second",
                              "Achievable KV-transfer bytes/s of a prefill->decode pair (active probe).",
                              labels=["service", "prefill", "decode", "locality"])
    medians = GaugeMetricFamily("heteroscale_kv_bandwidth_median_bytes_per_second",
                                "Median probed bytes/s over same-switch or cross-switch pairs.",
                                labels=["service", "locality"])
    flagged = GaugeMetricFamily("heteroscale_kv_bandwidth_flagged_pairs",
                                "Pairs whose probed rate is far below the median of their peers.",
                                labels=["service"])
    for bmap in maps:
        for svc in bmap.services:
            for p in svc.pairs:
                if p.bytes_per_second is not None:
                    pairs.add_metric([svc.service, p.prefill, p.decode, p.locality], p.bytes_per_second)
            for locality, value in ((SAME_SWITCH, svc.same_switch_median_bytes_per_second),
                                    (CROSS_SWITCH, svc.cross_switch_median_bytes_per_second)):
                if value is not None:
                    medians.add_metric([svc.service, locality], value)
            flagged.add_metric([svc.service], float(len(svc.flagged)))
    return [pairs, medians, flagged]
