"""The coordinator's ``/metrics`` (ARCHITECTURE §3.3), built at scrape time.

A ``prometheus_client`` custom collector renders the reconciler's latest published
``Snapshot`` when Prometheus scrapes (the same object the status API renders), so there
is no second copy of the numbers to keep in step. The registry is passed in (tests
build their own and read the values back).

Families: ``heteroscale_coordinator_is_leader``, ``heteroscale_desired_replicas``,
``heteroscale_current_replicas``, ``heteroscale_ready_replicas`` {service, role};
``heteroscale_service_decode_tokens_per_second`` {service};
``heteroscale_scaling_decisions_total`` {service, direction, reason};
``heteroscale_coordinator_collection_errors_total`` {service, reason};
``heteroscale_coordinator_errors_total`` {service, op} (observe/decide/apply/fenced);
``heteroscale_coordinator_excluded_reports`` {service, reason} (last tick);
``heteroscale_coordinator_tick_duration_seconds``; ``heteroscale_coordinator_ticks_total``;
``heteroscale_target_decode_tokens_per_second`` {service, kind=configured|effective};
``heteroscale_pd_ratio`` {service, kind=configured|in_use|needed|recommended};
``heteroscale_kv_transfer_bottleneck`` {service};
``heteroscale_placement_shortfall`` {service, role} (instances the latest write could not
place; Deployment Group services); the KV bandwidth map's families
(``bandwidth_families``: ``heteroscale_kv_bandwidth_*``, see below).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from heteroscale.coordinator.core.bandwidth import CROSS_SWITCH, SAME_SWITCH, BandwidthMap
from heteroscale.coordinator.core.drift import ratio_in_use

if TYPE_CHECKING:
    from heteroscale.coordinator.reconciler import Reconciler


class CoordinatorCollector:
    def __init__(self, reconciler: "Reconciler") -> None:
        self._rec = reconciler

    def describe(self) -> list[Metric]:
        return []   # families are dynamic; skip the registry's describe-time collect

    def collect(self) -> Iterator[Metric]:
        snap = self._rec.snapshot
        leader = GaugeMetricFamily("heteroscale_coordinator_is_leader",
                                   "1 if this coordinator holds the lease", labels=["identity"])
        leader.add_metric([snap.identity], 1.0 if snap.leader else 0.0)
        yield leader
        desired = GaugeMetricFamily("heteroscale_desired_replicas",
                                    "instances the policy wants, per role", labels=["service", "role"])
        current = GaugeMetricFamily("heteroscale_current_replicas",
                                    "instances asked for now (spec), per role", labels=["service", "role"])
        ready = GaugeMetricFamily("heteroscale_ready_replicas",
                                  "instances ready for traffic, per role", labels=["service", "role"])
        tps = GaugeMetricFamily("heteroscale_service_decode_tokens_per_second",
                                "decode tokens/s summed over fresh decode reports", labels=["service"])
        excluded = GaugeMetricFamily("heteroscale_coordinator_excluded_reports",
                                     "reports dropped in the last tick, by reason", labels=["service", "reason"])
        target = GaugeMetricFamily("heteroscale_target_decode_tokens_per_second",
                                   "decode tokens/s per instance the policy aims at: configured, and effective (as "
                                   "the latency net taught it)", labels=["service", "kind"])
        ratio = GaugeMetricFamily("heteroscale_pd_ratio",
                                  "prefill instances per decode instance: configured, in_use, needed (the drift "
                                  "detector's estimate), recommended (while it advises a change)",
                                  labels=["service", "kind"])
        bottleneck = GaugeMetricFamily("heteroscale_kv_transfer_bottleneck",
                                       "1 while decode requests wait on KV arrival rather than decode capacity "
                                       "(the policy holds instead of buying decode: hold_kv_transfer)",
                                       labels=["service"])
        shortfall = GaugeMetricFamily("heteroscale_placement_shortfall",
                                      "instances the latest write asked for but placement could not place",
                                      labels=["service", "role"])
        for s in snap.services:
            name = s.name
            if s.last is not None:
                for role in ("prefill", "decode"):
                    desired.add_metric([name, role], float(getattr(s.last.desired, role)))
                    current.add_metric([name, role], float(getattr(s.last.current, role)))
            if s.status is not None:
                for role in ("prefill", "decode"):
                    ready.add_metric([name, role], float(getattr(s.status.ready, role)))
            if s.observation is not None:
                if s.observation.decode_tps is not None:
                    tps.add_metric([name], s.observation.decode_tps)
                for reason, count in sorted(s.observation.excluded.items()):
                    excluded.add_metric([name, reason], float(count))
            if s.shortfall is not None:
                for role in ("prefill", "decode"):
                    shortfall.add_metric([name, role], float(getattr(s.shortfall, role)))
            if s.last is not None:
                bottleneck.add_metric([name], 1.0 if s.last.inputs.get("kv_transfer_bottleneck") else 0.0)
            tau = s.config.target_decode_tps_per_instance
            target.add_metric([name, "configured"], tau)
            target.add_metric([name, "effective"], tau * s.target.scale)
            p, d = s.config.pd_ratio
            ratio.add_metric([name, "configured"], p / d)
            ratio.add_metric([name, "in_use"], float(ratio_in_use(s.drift, s.config.pd_ratio)))
            for kind, value in (("needed", s.drift.needed), ("recommended", s.drift.advice)):
                if value is not None:
                    ratio.add_metric([name, kind], float(value))
        yield from (desired, current, ready, tps, excluded, target, ratio, bottleneck, shortfall)
        yield from bandwidth_families(BandwidthMap(
            services=tuple(s.bandwidth for s in snap.services if s.bandwidth is not None), generated_at=snap.at))
        decisions = CounterMetricFamily("heteroscale_scaling_decisions",
                                        "policy decisions by direction and reason",
                                        labels=["service", "direction", "reason"])
        for (service, direction, reason), count in sorted(snap.decisions_total.items()):
            decisions.add_metric([service, direction, reason], float(count))
        yield decisions
        collection = CounterMetricFamily("heteroscale_coordinator_collection_errors",
                                         "instance signals that could not be fetched or parsed (sidecar reports, or "
                                         "Prometheus queries: reasons prometheus_*)",
                                         labels=["service", "reason"])
        for (service, reason), count in sorted(snap.collection_errors_total.items()):
            collection.add_metric([service, reason], float(count))
        yield collection
        errors = CounterMetricFamily("heteroscale_coordinator_errors",
                                     "failures contained in a service's tick (discovery/observe, decide, apply) "
                                     "and writes refused by the fence (fenced)", labels=["service", "op"])
        for (service, op), count in sorted(snap.errors_total.items()):
            errors.add_metric([service, op], float(count))
        yield errors
        ticks = CounterMetricFamily("heteroscale_coordinator_ticks", "reconcile ticks run")
        ticks.add_metric([], float(snap.ticks))
        yield ticks
        if snap.last_tick_duration_s is not None:
            duration = GaugeMetricFamily("heteroscale_coordinator_tick_duration_seconds",
                                         "wall time of the last tick (all services)")
            duration.add_metric([], snap.last_tick_duration_s)
            yield duration


def bandwidth_families(maps: BandwidthMap | Iterable[BandwidthMap]) -> list[Metric]:
    """The three families for one map or several (one per service tick)."""
    maps = [maps] if isinstance(maps, BandwidthMap) else list(maps)
    pairs = GaugeMetricFamily("heteroscale_kv_bandwidth_bytes_per_second",
                              "Achievable KV-transfer bytes/s of a prefill->decode pair (active probe, or estimated "
                              "from the engines' connector speeds within a Deployment Group).",
                              labels=["service", "prefill", "decode", "locality"])
    medians = GaugeMetricFamily("heteroscale_kv_bandwidth_median_bytes_per_second",
                                "Median bytes/s over same-switch or cross-switch pairs.",
                                labels=["service", "locality"])
    flagged = GaugeMetricFamily("heteroscale_kv_bandwidth_flagged_pairs",
                                "Pairs whose rate is far below the median of their peers.",
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


def registry_for(reconciler: "Reconciler", registry: CollectorRegistry | None = None) -> CollectorRegistry:
    registry = registry or CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(reconciler))
    return registry
