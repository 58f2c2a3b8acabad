"""The prefill x decode KV-transfer bandwidth map (pure).

Each prefill sidecar probes its decode peers (``heteroscale.kv_transfer.probe``) and puts
the latest outcome per peer in its report under ``kv_transfer.probe.peers``.
This module joins those outcomes with where the pods run and answers, per
service:

* every measured pair (prefill pod, decode pod): achievable bytes/s (the best
  of the peer's last few probes when the report carries it), RTT, age,
  Deployment Group, and whether the two pods share an S1 switch
  (``same_switch``), only an S2 or nothing (``cross_switch``), or cannot be
  placed (``unknown``: a node without switch labels, a peer without a report);
* the median over same-switch pairs, over cross-switch pairs, and their ratio
  (the paper's ~20% cross-switch loss, measured instead of assumed);
* the median per Deployment Group (pairs whose two pods are in the same DG);
* **flagged** pairs: a pair whose rate is below ``flag_ratio`` x the median of
  the *other* pairs of the same service (leave-one-out, so one slow pair cannot
  drag its own reference down), given at least ``min_peers`` other pairs.

Pairs come from two sources (``PairBandwidth.source``):

* ``probe``: a prefill sidecar's active probe of one decode peer - a direct
  measurement of that pair;
* ``engine_connector``: the engines' own KV-connector metrics (vLLM's NIXL
  histograms, SGLang's transfer metrics...), which carry no peer label: each sidecar
  reports its instance's per-transfer speed (bytes moved / time spent moving them,
  ``kv_transfer.sources.engine.transfer_speed_bytes_per_second``). The router pairs
  prefill and decode inside a Deployment Group, so every (prefill, decode) of one DG
  is a pair, estimated as the lower of the two ends' speeds (a slow link slows
  every transfer through it, seen at both ends). Without Deployment Groups the map
  cannot tell who sends to whom and makes no engine pairs. A probed pair wins over
  the engine estimate of the same pair.

Nothing here reads a clock or the network: ``now_s`` (unix seconds, the same
base as ``measured_at`` in the reports) is an argument, and outcomes older than
``max_age_s`` are left out and counted, never shown as current. A malformed
peer entry is skipped and counted (``malformed``), not guessed at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from heteroscale.errors import ConfigError
from heteroscale.report import SidecarReport

SAME_SWITCH = "same_switch"
PROBE = "probe"
ENGINE_CONNECTOR = "engine_connector"
CROSS_SWITCH = "cross_switch"
UNKNOWN = "unknown"

Switch = tuple[str, str]                 # (s2, s1): an S1 name is unique only inside its S2


@dataclass(frozen=True)
class BandwidthSettings:
    """How the map judges pairs.

    ``max_age_s``: older probe outcomes are left out (a few probe intervals).
    ``flag_ratio``: a pair below this share of its peers' median is flagged
    (0.85 flags the paper's ~20% cross-switch loss; lower it to flag only broken
    links). ``min_peers``: other pairs needed before a pair can be judged.
    """

    max_age_s: float = 600.0
    flag_ratio: float = 0.85
    min_peers: int = 1

    def __post_init__(self) -> None:
        problems = []
        if not self.max_age_s > 0:
            problems.append("max_age_s must be positive")
        if not 0 < self.flag_ratio < 1:
            problems.append("flag_ratio must be within (0, 1)")
        if self.min_peers < 1:
            problems.append("min_peers must be at least 1")
        if problems:
            raise ConfigError(problems, source="bandwidth map")


@dataclass(frozen=True)
class PairBandwidth:
    service: str
    prefill: str
    decode: str
    bytes_per_second: float | None       # None when the last probe failed
    rtt_s: float | None
    age_s: float
    locality: str                        # same_switch | cross_switch | unknown
    shared_domain: str | None            # "s1" | "s2" | "none" | None (unknown)
    group: str | None                    # the DG when both pods are in the same one
    error: str | None = None
    reference_bytes_per_second: float | None = None
    flagged: bool = False
    reason: str | None = None
    source: str = PROBE                  # probe | engine_connector (see the module docstring)

    def to_dict(self) -> dict[str, Any]:
        return {"prefill": self.prefill, "decode": self.decode, "source": self.source,
                "bytes_per_second": self.bytes_per_second,
                "rtt_s": self.rtt_s, "age_s": self.age_s, "locality": self.locality,
                "shared_domain": self.shared_domain, "group": self.group, "error": self.error,
                "reference_bytes_per_second": self.reference_bytes_per_second,
                "flagged": self.flagged, "reason": self.reason}


@dataclass(frozen=True)
class GroupBandwidth:
    group: str
    pairs: int
    median_bytes_per_second: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "pairs": self.pairs, "median_bytes_per_second": self.median_bytes_per_second}


@dataclass(frozen=True)
class ServiceBandwidth:
    service: str
    pairs: tuple[PairBandwidth, ...]
    same_switch_median_bytes_per_second: float | None
    cross_switch_median_bytes_per_second: float | None
    groups: tuple[GroupBandwidth, ...] = ()
    stale: int = 0
    malformed: int = 0

    @property
    def cross_to_same_ratio(self) -> float | None:
        same, cross = self.same_switch_median_bytes_per_second, self.cross_switch_median_bytes_per_second
        return cross / same if same and cross is not None else None

    @property
    def flagged(self) -> tuple[PairBandwidth, ...]:
        return tuple(p for p in self.pairs if p.flagged)

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "pairs": [p.to_dict() for p in self.pairs],
                "same_switch_median_bytes_per_second": self.same_switch_median_bytes_per_second,
                "cross_switch_median_bytes_per_second": self.cross_switch_median_bytes_per_second,
                "cross_to_same_ratio": self.cross_to_same_ratio,
                "groups": [g.to_dict() for g in self.groups],
                "flagged": [{"prefill": p.prefill, "decode": p.decode, "reason": p.reason} for p in self.flagged],
                "stale": self.stale, "malformed": self.malformed}


@dataclass(frozen=True)
class BandwidthMap:
    services: tuple[ServiceBandwidth, ...] = ()
    generated_at: float = 0.0
    settings: BandwidthSettings = field(default_factory=BandwidthSettings)

    def service(self, name: str) -> ServiceBandwidth | None:
        return next((s for s in self.services if s.service == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"generated_at": self.generated_at, "flag_ratio": self.settings.flag_ratio,
                "services": [s.to_dict() for s in self.services]}


def switches_from_nodes(nodes: Iterable[Any]) -> dict[str, Switch]:
    """node name -> (s2, s1) from topology ``NodeView``s (anything with name/s1/s2)."""
    return {n.name: (n.s2, n.s1) for n in nodes}


def locality(a: Switch | None, b: Switch | None) -> tuple[str, str | None]:
    """(locality, shared domain) of two pods' switches."""
    if a is None or b is None:
        return UNKNOWN, None
    if a == b:
        return SAME_SWITCH, "s1"
    return CROSS_SWITCH, "s2" if a[0] == b[0] else "none"


def build_bandwidth_map(reports: Iterable[SidecarReport], *, switches: Mapping[str, Switch],
                        groups: Mapping[str, str] | None = None, now_s: float,
                        settings: BandwidthSettings | None = None) -> BandwidthMap:
    """The map from the latest sidecar reports.

    ``switches``: node name -> (s2, s1). ``groups``: pod name -> Deployment Group
    (optional). A pod's node comes from its own report (``node``); a decode
    peer is matched by the name its probe server announced (its pod name).
    """
    settings = settings or BandwidthSettings()
    groups = groups or {}
    reports = list(reports)
    node_of = {r.pod: r.node for r in reports if r.node}
    by_service: dict[str, list[PairBandwidth]] = {}
    stale: dict[str, int] = {}
    malformed: dict[str, int] = {}
    for report in reports:
        if report.role != "prefill":
            continue
        peers = _peers(report)
        if peers is None:
            continue
        pairs = by_service.setdefault(report.service, [])
        for entry in peers:
            pair = _pair(report, entry, node_of=node_of, switches=switches, groups=groups, now_s=now_s)
            if pair is None:
                malformed[report.service] = malformed.get(report.service, 0) + 1
            elif pair.age_s > settings.max_age_s:
                stale[report.service] = stale.get(report.service, 0) + 1
            else:
                pairs.append(pair)
    for pair in _engine_pairs(reports, switches=switches, groups=groups, now_s=now_s):
        pairs = by_service.setdefault(pair.service, [])
        if pair.age_s > settings.max_age_s:
            stale[pair.service] = stale.get(pair.service, 0) + 1
        elif not any(p.prefill == pair.prefill and p.decode == pair.decode for p in pairs):
            pairs.append(pair)
    services = tuple(_service(name, pairs, settings, stale=stale.get(name, 0), malformed=malformed.get(name, 0))
                     for name, pairs in sorted(by_service.items()))
    return BandwidthMap(services=services, generated_at=now_s, settings=settings)


def _peers(report: SidecarReport) -> list[Any] | None:
    probe = report.kv_transfer.get("probe") if isinstance(report.kv_transfer, Mapping) else None
    if not isinstance(probe, Mapping):
        return None
    peers = probe.get("peers")
    return list(peers) if isinstance(peers, list) else None


def engine_speed(report: SidecarReport) -> float | None:
    """The instance's per-transfer KV speed from its engine connector metrics (bytes/s), or None."""
    kv = report.kv_transfer if isinstance(report.kv_transfer, Mapping) else {}
    sources = kv.get("sources")
    engine = sources.get("engine") if isinstance(sources, Mapping) else None
    value = _number(engine.get("transfer_speed_bytes_per_second")) if isinstance(engine, Mapping) else None
    return value if value is not None and value > 0 else None


def _engine_pairs(reports: list[SidecarReport], *, switches: Mapping[str, Switch],
                  groups: Mapping[str, str], now_s: float) -> list[PairBandwidth]:
    """(prefill, decode) pairs of each Deployment Group, from the ends' engine connector speeds."""
    speeds: dict[tuple[str, str, str], list[tuple[SidecarReport, float | None]]] = {}
    for r in reports:
        group = groups.get(r.pod)
        if group is None or r.role not in ("prefill", "decode"):
            continue
        speeds.setdefault((r.service, group, r.role), []).append((r, engine_speed(r)))
    out = []
    for (service, group, role), prefills in sorted(speeds.items()):
        if role != "prefill":
            continue
        for p, p_speed in prefills:
            for d, d_speed in speeds.get((service, group, "decode"), ()):
                measured = [v for v in (p_speed, d_speed) if v is not None]
                if not measured:
                    continue
                p_switch = switches.get(p.node) if p.node else None
                d_switch = switches.get(d.node) if d.node else None
                where, shared = locality(p_switch, d_switch)
                oldest = min(p.observed_at if p_speed is not None else now_s,
                             d.observed_at if d_speed is not None else now_s)
                out.append(PairBandwidth(service=service, prefill=p.pod, decode=d.pod,
                                         bytes_per_second=min(measured), rtt_s=None,
                                         age_s=max(0.0, now_s - oldest), locality=where, shared_domain=shared,
                                         group=group, source=ENGINE_CONNECTOR))
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _pair(report: SidecarReport, entry: Any, *, node_of: Mapping[str, str], switches: Mapping[str, Switch],
          groups: Mapping[str, str], now_s: float) -> PairBandwidth | None:
    if not isinstance(entry, Mapping):
        return None
    decode = entry.get("peer") or entry.get("address")
    measured_at = _number(entry.get("measured_at"))
    if not isinstance(decode, str) or not decode or measured_at is None:
        return None
    # The best of the peer's last few probes when the sidecar gives it (capacity is an
    # upper envelope: a probe reads low when traffic or a busy CPU got in its way).
    bps = _number(entry.get("best_recent_bytes_per_second"))
    if bps is None:
        bps = _number(entry.get("bytes_per_second"))
    error = entry.get("error") if isinstance(entry.get("error"), str) else None
    if bps is None and error is None or bps is not None and bps <= 0:
        return None
    p_switch = switches.get(report.node) if report.node else None
    d_node = node_of.get(decode)
    d_switch = switches.get(d_node) if d_node else None
    where, shared = locality(p_switch, d_switch)
    p_group, d_group = groups.get(report.pod), groups.get(decode)
    return PairBandwidth(service=report.service, prefill=report.pod, decode=decode, bytes_per_second=bps,
                         rtt_s=_number(entry.get("rtt_s")), age_s=max(0.0, now_s - measured_at),
                         locality=where, shared_domain=shared,
                         group=p_group if p_group is not None and p_group == d_group else None,
                         error=error if bps is None else None)


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _service(name: str, pairs: list[PairBandwidth], settings: BandwidthSettings, *,
             stale: int, malformed: int) -> ServiceBandwidth:
    measured = [p for p in pairs if p.bytes_per_second is not None]
    judged = []
    for pair in pairs:
        if pair.bytes_per_second is None:
            judged.append(pair)
            continue
        others = [p.bytes_per_second for p in measured if p is not pair]
        reference = _median(others) if len(others) >= settings.min_peers else None
        flagged = reference is not None and pair.bytes_per_second < settings.flag_ratio * reference
        reason = None
        if flagged:
            reason = (f"{pair.bytes_per_second / reference:.0%} of the median of {len(others)} other pair(s)"
                      f" ({pair.locality})")
        judged.append(replace(pair, reference_bytes_per_second=reference, flagged=flagged, reason=reason))
    judged.sort(key=lambda p: (p.prefill, p.decode))
    by_group: dict[str, list[float]] = {}
    for p in measured:
        if p.group is not None:
            by_group.setdefault(p.group, []).append(p.bytes_per_second)  # type: ignore[arg-type]
    return ServiceBandwidth(
        service=name, pairs=tuple(judged),
        same_switch_median_bytes_per_second=_median(
            [p.bytes_per_second for p in measured if p.locality == SAME_SWITCH]),  # type: ignore[misc]
        cross_switch_median_bytes_per_second=_median(
            [p.bytes_per_second for p in measured if p.locality == CROSS_SWITCH]),  # type: ignore[misc]
        groups=tuple(GroupBandwidth(group=g, pairs=len(v), median_bytes_per_second=_median(v))
                     for g, v in sorted(by_group.items())),
        stale=stale, malformed=malformed)


def transfer_summary(reports: Iterable[SidecarReport]) -> dict[str, Any] | None:
    """The service's KV-transfer throughput as moved, from its sidecars' ``kv_transfer`` samples.

    One row per instance whose sidecar measured something (engine connector metrics,
    RDMA counters), plus per-direction sums; ``None`` when no report carries a measured
    rate. This is the shape of the status document's ``services[].kv_transfer`` field.
    """
    rows = []
    for r in reports:
        kv = r.kv_transfer if isinstance(r.kv_transfer, Mapping) else {}
        rate = kv.get("bytes_per_second")
        if not isinstance(rate, (int, float)):
            continue
        source = kv.get("source") or "engine"
        detail = (kv.get("sources") or {}).get(source) or {}
        rows.append({"pod": r.pod, "role": r.role, "direction": kv.get("direction"), "source": source,
                     "connector": detail.get("connector"), "bytes_per_second": float(rate),
                     "transfers_per_second": detail.get("transfers_per_second"),
                     "latency_p90_s": detail.get("latency_p90_s", detail.get("latency_mean_s")),
                     "window_s": detail.get("window_s", kv.get("window_s"))})
    if not rows:
        return None
    rows.sort(key=lambda x: (x["role"] != "prefill", x["pod"]))

    def total(direction: str) -> float | None:
        values = [x["bytes_per_second"] for x in rows if x["direction"] == direction]
        return sum(values) if values else None

    return {"send_bytes_per_second": total("send"), "receive_bytes_per_second": total("receive"),
            "instances": rows}


@dataclass(frozen=True)
class PlacementHints:
    """What the measured map asks of placement (``ServiceDemand.slow_domains``/``new_level``)."""

    slow_domains: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    new_level: str | None = None
    new_level_reason: str = ""
    worst_pods: tuple[str, ...] = ()         # pods of flagged pairs, worst first (scale-in picks these)

    @property
    def any(self) -> bool:
        return bool(self.slow_domains or self.new_level or self.worst_pods)


def placement_hints(bandwidth: ServiceBandwidth | None, *, group_domains: Mapping[str, tuple[str, ...]],
                    affinity_level: str, slow_ratio: float = 0.7, min_groups: int = 2) -> PlacementHints:
    """Turn the measured map into bounded, explained placement preferences.

    * A Deployment Group whose pairs' median is below ``slow_ratio`` × the best group's
      (given at least ``min_groups`` measured groups) marks its domain slow.
    * For an ``affinity: none`` service (cluster-level groups, which straddle switches),
      cross-switch pairs measuring below ``slow_ratio`` × the same-switch median make new
      groups S2-level: no new group straddles the slow links.
    * Pods of flagged pairs, worst first, for scale-in to release first.
    """
    if bandwidth is None:
        return PlacementHints()
    slow: dict[tuple[str, ...], str] = {}
    measured = [g for g in bandwidth.groups if g.median_bytes_per_second is not None and g.group in group_domains]
    if len(measured) >= min_groups:
        best = max(measured, key=lambda g: g.median_bytes_per_second or 0.0)
        for g in measured:
            value = g.median_bytes_per_second or 0.0
            if value < slow_ratio * (best.median_bytes_per_second or 0.0):
                slow[group_domains[g.group]] = (
                    f"group {g.group}'s KV pairs measure {value / (best.median_bytes_per_second or 1):.0%} of "
                    f"group {best.group}'s ({_rate(value)} vs {_rate(best.median_bytes_per_second or 0.0)})")
    new_level, reason = None, ""
    ratio = bandwidth.cross_to_same_ratio
    if affinity_level == "cluster" and ratio is not None and ratio < slow_ratio:
        new_level = "s2"
        reason = (f"cross-switch KV pairs measure {ratio:.0%} of same-switch ones "
                  f"({_rate(bandwidth.cross_switch_median_bytes_per_second or 0.0)} vs "
                  f"{_rate(bandwidth.same_switch_median_bytes_per_second or 0.0)})")
    worst = sorted((p for p in bandwidth.flagged if p.bytes_per_second is not None),
                   key=lambda p: p.bytes_per_second or 0.0)
    pods: list[str] = []
    for pair in worst:
        for pod in (pair.decode, pair.prefill):
            if pod not in pods:
                pods.append(pod)
    return PlacementHints(slow_domains=slow, new_level=new_level, new_level_reason=reason, worst_pods=tuple(pods))


def _rate(bytes_per_second: float) -> str:
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_second >= scale:
            return f"{bytes_per_second / scale:.3g} {unit}"
    return f"{bytes_per_second:.3g} B/s"
