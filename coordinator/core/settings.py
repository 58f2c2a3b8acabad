"""The coordinator's settings: frozen dataclasses, one docstring per field (pure).

``heteroscale.coordinator.config`` builds them from YAML and checks every rule, so a
settings object that exists is valid; nothing downstream re-checks a field or rewrites
one. The decision code (``policy``, ``aggregate``, placement) and the simulator read
them. docs/configuration.md is the user's view of the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Mapping

BACKENDS = ("kubernetes", "local", "static")
METRICS_SOURCES = ("sidecars", "prometheus")
AFFINITIES = ("s1", "s2", "none")
PD_RATIO_MODES = ("fixed", "advise", "adapt")


@dataclass(frozen=True)
class LeaseConfig:
    """Leader-election lease (client-go semantics; ARCHITECTURE §3.4)."""

    name: str = "heteroscale-coordinator"
    """Lease object name (a DNS label)."""
    namespace: str = "default"
    """Namespace of the Lease."""
    duration_s: float = 15.0
    """How long followers wait after last seeing the lease change before taking over.
    Longer: slower failover, fewer false takeovers during API hiccups."""
    renew_deadline_s: float = 10.0
    """How long the leader keeps trying to renew before it steps down (< ``duration_s``)."""
    retry_period_s: float = 2.0
    """Renew/acquire interval; ``renew_deadline_s > 1.2 × retry_period_s``."""
    path: str | None = None
    """Lock file of the local lease (backends ``local``/``static``); ``None``: a file named
    after the lease in the system temp directory."""


@dataclass(frozen=True)
class ApiConfig:
    """The Kubernetes API client (backend ``kubernetes``)."""

    timeout_s: float = 10.0
    """Bound on one read (connect + answer)."""
    write_timeout_s: float = 4.0
    """Bound on one write attempt. A write still in flight when the lease is lost must
    land before a rival can take over: ``lease.duration_s − lease.renew_deadline_s``
    must exceed it (checked; unless set, it is 4 s or half that margin, whichever is
    shorter), and each attempt is further cut to the time left before the renew
    deadline."""


@dataclass(frozen=True)
class CollectConfig:
    """How reports are pulled from sidecars each tick."""

    timeout_s: float = 2.0
    """Per request, connect + read. Shorter than ``interval_s``; unless set, 2 s or half
    the interval, whichever is shorter."""
    concurrency: int = 64
    """Requests in flight at once, all services together."""
    sidecar_port: int = 9400
    """Port used for discovered pod IPs (kubernetes backend)."""


@dataclass(frozen=True)
class MetricsSourceConfig:
    """Where per-instance signals come from: ``sidecars`` (pull ``/v1/report``) or
    ``prometheus`` (instant PromQL queries over the sidecars' metrics; docs/prometheus.md)."""

    type: str = "sidecars"
    """``sidecars`` or ``prometheus``."""
    url: str | None = None
    """Prometheus base URL (type ``prometheus``)."""
    timeout_s: float = 2.0
    """Bound on one tick's queries, all together (shorter than ``interval_s``; unless set,
    2 s or half the interval, whichever is shorter)."""
    selector: str = ""
    """Extra label matchers added to every query, e.g. ``job="heteroscale"``."""
    lookback_s: float = 300.0
    """Instances seen this recently but gone now count as ``vanished`` (never as load)."""


@dataclass(frozen=True)
class PlacementConfig:
    """Topology-aware placement for services run as Deployment Groups (role ``template``)."""

    gpu_type_label: str = "nvidia.com/gpu.product"
    """Node label naming the GPU model."""
    s1_label: str = "heteroscale.io/s1"
    """Node label naming the S1 (mini-pod) switch."""
    s2_label: str = "heteroscale.io/s2"
    """Node label naming the S2 (big-pod) switch. The three labels differ."""
    gpu_resource: str = "nvidia.com/gpu"
    """Extended resource counted in node allocatable and pod requests."""
    ratio_tolerance: float = 0.25
    """The ready-ratio gate: how far (relative) a DG's admitted P:D may stray from its
    spec ratio before the over-represented role waits outside traffic."""
    drain_window_s: float = 60.0
    """Soft scale-in: a released instance stays out of traffic this long before deletion."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """The coordinator process: loop, backend, lease, signal source, placement keys."""

    interval_s: float = 5.0
    """Time between ticks. Shorter reacts faster and costs more API calls and pulls."""
    backend: str = "kubernetes"
    """``kubernetes`` writes scale subresources or Deployment Groups; ``local`` starts
    processes on this machine (the demo); ``static`` is advisory and never writes."""
    dry_run: bool = False
    """Decide and report, never write."""
    listen: str = "0.0.0.0:9500"
    """Status page, API and ``/metrics``."""
    lease: LeaseConfig = LeaseConfig()
    """Leader election."""
    api: ApiConfig = ApiConfig()
    """The Kubernetes API client's timeouts."""
    collect: CollectConfig = CollectConfig()
    """Report pulls (``metrics_source.type: sidecars``)."""
    history_s: float = 3600.0
    """How much per-tick history the status page keeps (per service, in memory)."""
    decisions_kept: int = 50
    """Recent decisions kept per service (a ring buffer)."""
    observe_timeout_s: float = 10.0
    """Bound on one actuator observe call; a hung API skips the service for the tick."""
    metrics_source: MetricsSourceConfig = MetricsSourceConfig()
    """Where signals come from."""
    placement: PlacementConfig = PlacementConfig()
    """Node labels and Deployment Group settings."""


@dataclass(frozen=True)
class Tolerance:
    """Asymmetric band around the target, as a fraction of it (hysteresis)."""

    scale_out: float = 0.10
    """Scale out only above ``(1 + scale_out) × τ × decode``."""
    scale_in: float = 0.15
    """Scale in only below ``(1 − scale_in) × τ × decode``; wider, since a wrong
    scale-in costs SLO and a wrong scale-out only money."""


@dataclass(frozen=True)
class LatencyNet:
    """Latency safety net: p90 over ``moderate``×SLO adds ``moderate_step`` to both
    pools, over ``severe``×SLO adds ``severe_step``. Never scales in."""

    enabled: bool = True
    """The net is on."""
    moderate: float = 1.0
    """Breach threshold, × SLO."""
    severe: float = 1.2
    """Severe threshold, × SLO (>= ``moderate``)."""
    moderate_step: float = 0.10
    """Step on a moderate breach, fraction of both pools (at least +1)."""
    severe_step: float = 0.20
    """Step on a severe breach (>= ``moderate_step``)."""
    use_ttft: bool = True
    """TBT always counts; TTFT too unless disabled (it is noisier)."""


@dataclass(frozen=True)
class DemandEstimate:
    """Demand, not only service: served decode tokens/s saturates at capacity, so while
    requests queue the load is read as served × (running + waiting) / running — each
    waiting request would be served at the running ones' per-request rate."""

    enabled: bool = True
    """Use the estimate for scale-out (never for scale-in)."""
    max_factor: float = 3.0
    """The estimate is at most this multiple of the served tokens/s."""
    include_prefill_queue: bool = True
    """Count the requests queued on prefill as well as decode's: each will want decode
    next. Off, only decode's own queue counts (a prefill-only shortage then reaches the
    pools through the latency net)."""
    drain_horizon_s: float = 60.0
    """A queue shrinking fast enough to be gone within this long is a backlog the fleet
    already out-serves: no scale-out on the estimate or on the served rate (which counts
    the backlog's flush). Longer, and the backlog still asks for capacity."""


@dataclass(frozen=True)
class AdaptiveTarget:
    """One controller, not two: when the latency net fires while the decode tokens/s is
    below target, τ is too high for today's traffic. The policy then lowers an effective
    τ (so the proportional rule keeps the capacity latency asked for, instead of giving it
    back) and lets it recover slowly while latency stays well inside the SLO."""

    enabled: bool = True
    """Adapt the effective τ."""
    floor: float = 0.5
    """The effective τ never goes below ``floor × τ``."""
    step: float = 0.15
    """Largest cut of the effective τ per breach (a fraction of it)."""
    calm_ratio: float = 0.7
    """Latency is "well inside" the SLO below this share of it."""
    recover_after_s: float = 900.0
    """After this long well inside the SLO the effective τ rises by ``recover_step``."""
    recover_step: float = 0.05
    """The rise, a fraction of τ, each ``recover_after_s`` of calm."""


@dataclass(frozen=True)
class KvPressure:
    """An early, moderate step before TBT breaks: decode KV cache nearly full, or the
    engines preempting (vLLM ``num_preemptions``, SGLang retractions)."""

    enabled: bool = True
    """Act on KV pressure."""
    usage: float = 0.95
    """Decode KV-cache usage (the fullest instance) at or above which decode is short."""
    preemptions_per_s: float = 0.5
    """Preemptions per second over the decode pool at or above which decode is short."""


@dataclass(frozen=True)
class RatioDrift:
    """P/D ratio drift: compare the prefill:decode demand with the configured ratio over a
    long window. Demand per decode token is ``uncached prefill tokens/s ÷ decode
    tokens/s`` against its reference (given, or learnt over the first window), nudged by
    which side's latency is tighter (TTFT against TBT)."""

    window_s: float = 1800.0
    """The long window the demand ratio is averaged over."""
    threshold: float = 0.2
    """Advise (or adapt) when the needed ratio is off the ratio in use by more than this."""
    step: float = 0.15
    """``adapt``: the largest change of the ratio per move (a fraction of it)."""
    dwell_s: float = 900.0
    """``adapt``: least time between two ratio moves."""
    min_ratio: float = 0.25
    """``adapt``: the ratio (prefill per decode instance) never goes below this..."""
    max_ratio: float = 8.0
    """...nor above this."""
    reference_prefill_per_decode: float | None = None
    """Uncached prefill tokens per decode token at which ``pd_ratio`` was curated
    (``heteroscale curate`` prints it); ``None``: learnt over the first window."""


@dataclass(frozen=True)
class Forecast:
    """Predictive lead: scale out ahead of demand that is forecast to arrive within the
    start-up horizon (the current trend, and yesterday's shape once a day of history is
    kept). Never scales in on a forecast."""

    enabled: bool = False
    """Off unless the benchmarks show it helps (docs/control.md)."""
    horizon_s: float = 120.0
    """How far ahead: about an instance's start-up time."""
    trend_window_s: float = 600.0
    """The window the trend is fitted over."""


@dataclass(frozen=True)
class PolicyConfig:
    """The scaling policy of one service (``core.policy``)."""

    tolerance: Tolerance = Tolerance()
    """The asymmetric band."""
    scale_out_cooldown_s: float = 30.0
    """Least time between scale-outs (and after a human's manual change)."""
    scale_in_stabilization_s: float = 300.0
    """Scale-in uses the highest recommendation over this window (as HPA does)."""
    scale_in_backoff_window_s: float = 600.0
    """A scale-in followed within this long by a latency-driven scale-out was a mistake:
    the policy then keeps at least the size latency restored for ``scale_in_backoff_s``
    (doubling on each repeat, up to ``scale_in_backoff_max_s``; back to the start after
    a calm of twice the backoff). 0: off."""
    reversal_window_s: float = 1200.0
    """A tokens/s scale-out within this long of a scale-in (the load came back: a flap)
    backs scale-in off the same way. Load that swings on a scale shorter than this is
    carried at its highs instead of followed down and up. 0: off."""
    scale_in_backoff_s: float = 900.0
    """The first backoff."""
    scale_in_backoff_max_s: float = 14400.0
    """The longest backoff."""
    kv_transfer_hold_max_s: float = 120.0
    """``hold_kv_transfer`` holds a latency-driven scale-out for at most this long in one
    episode; past it the scale-out goes ahead (placement prefers domains whose measured
    KV links have headroom). 0: never hold."""
    max_scale_out_factor: float = 2.0
    """One step grows decode to at most ``current × factor`` (at least +1)."""
    max_scale_in_factor: float = 0.5
    """One step shrinks decode to at least ``current × factor`` (at least −1)."""
    latency_net: LatencyNet = LatencyNet()
    """The safety net."""
    smoothing_window_s: float = 60.0
    """Decode tokens/s is the mean of the ticks within this window."""
    min_fresh_reports_ratio: float = 0.5
    """Hold unless this share of the expected decode sidecars reported fresh data."""
    report_max_age_s: float = 30.0
    """A report older than this (against the coordinator's clock) is ``too_old``."""
    warmup_s: float = 60.0
    """Instances younger than this count as load, not as capacity."""
    pending_timeout_s: float = 600.0
    """No scale-out while instances are pending, unless pending longer than this."""
    consolidation_margin: float = 0.9
    """Before scale-in the survivors must carry the load within this share of target."""
    prefill_busy_utilization: float | None = 0.7
    """Prefill never shrinks below the instances that carry the prefill pool's measured GPU
    load (mean utilisation × ready instances) at no more than this utilisation each; decode
    still follows its own signal (``hold_prefill_busy`` when nothing else would move). With
    the ratio fixed on traffic whose prompts outgrew it, the ratio alone would shrink
    prefill into a TTFT breach. ``None``: off."""
    prefill_staffing_beta: float = 1.5
    """Small pools need more headroom than large ones (requests queue behind fewer
    servers): the floor is also at least ``R + β·√R`` instances for a measured load of
    ``R`` busy instances (square-root staffing). With the default 0.7 and 1.5 it binds below
    R ≈ 12 (about 17 instances); 0: off."""
    gpu_budget: int | None = None
    """Cap on the GPUs of both pools together; ``None``: no cap."""
    demand: DemandEstimate = DemandEstimate()
    """Demand estimate while decode is saturated."""
    adaptive_target: AdaptiveTarget = AdaptiveTarget()
    """The effective τ the latency net teaches."""
    kv_pressure: KvPressure = KvPressure()
    """KV-cache pressure as an early step."""
    ratio_drift: RatioDrift = RatioDrift()
    """P/D ratio drift detection (``pd_ratio_mode``)."""
    forecast: Forecast = Forecast()
    """Predictive lead."""


@dataclass(frozen=True)
class Slo:
    """p90 latency objectives the safety net compares with."""

    ttft_s: float | None = None
    """Time to first token, seconds."""
    tbt_s: float | None = None
    """Time between tokens, seconds."""


@dataclass(frozen=True)
class RoleConfig:
    """Where one role's instances live and what they need.

    Exactly one of ``deployment``/``statefulset`` (a workload scaled in place) or
    ``template`` (Deployment Groups) for the kubernetes backend; both roles of a service
    use the same mode.
    """

    deployment: str | None = None
    """Deployment scaled in place."""
    statefulset: str | None = None
    """StatefulSet scaled in place."""
    sidecars: tuple[str, ...] = ()
    """Report URLs (``http://host:9400/v1/report``; an address alone, ``http://host:9400``,
    means its ``/v1/report``); the static backend's pool."""
    selector: str | None = None
    """Pod label selector for discovery."""
    gpu_types: tuple[str, ...] = ()
    """Ordered GPU-type preference with fallbacks (placement)."""
    gpus_per_instance: int = 1
    """GPUs per instance (placement and the GPU budget)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Backend-specific, opaque (the local backend's launch options)."""
    template: str | None = None
    """A Deployment, kept at 0 replicas, whose pod template the DGs are stamped from."""

    @property
    def group_template(self) -> tuple[str, str] | None:
        """The Deployment Groups' template workload, if this role is run as DGs."""
        return ("Deployment", self.template) if self.template else None

    @property
    def workload(self) -> tuple[str, str] | None:
        if self.deployment:
            return ("Deployment", self.deployment)
        if self.statefulset:
            return ("StatefulSet", self.statefulset)
        return None


@dataclass(frozen=True)
class ScheduleEntry:
    """A time-of-day window: fixed counts (``prefill`` + ``decode``) or bound overrides
    (``min_decode``/``max_decode``)."""

    start_min: int
    """Start, minutes of the day in the entry's offset (inclusive)."""
    end_min: int
    """End, minutes of the day (exclusive); ``end < start`` wraps past midnight."""
    days: tuple[int, ...] = tuple(range(7))
    """Days the window starts on; 0 = Monday."""
    utc_offset_min: int = 0
    """The window's time zone as an offset from UTC."""
    prefill: int | None = None
    """Fixed prefill count."""
    decode: int | None = None
    """Fixed decode count."""
    min_decode: int | None = None
    """Bound override."""
    max_decode: int | None = None
    """Bound override."""
    name: str = ""
    """Shown in decision details."""

    @property
    def fixed(self) -> bool:
        return self.decode is not None


@dataclass(frozen=True)
class ServiceConfig:
    """One P/D service: its ratio, target, bounds, SLO, policy and where its roles live."""

    name: str
    """Service name (DNS label); matches the sidecars' ``--service``."""
    pd_ratio: tuple[int, int]
    """(prefill, decode) instances, from curation."""
    target_decode_tps_per_instance: float
    """τ: decode tokens/s one decode instance carries at the SLO-feasible point."""
    prefill: RoleConfig
    """The prefill role."""
    decode: RoleConfig
    """The decode role."""
    namespace: str = "default"
    """Kubernetes namespace of the role workloads."""
    min_decode: int = 1
    """Lower bound of the decode pool."""
    max_decode: int = 64
    """Upper bound of the decode pool."""
    min_prefill: int | None = None
    """Optional lower bound of the prefill pool (can break the ratio)."""
    max_prefill: int | None = None
    """Optional upper bound of the prefill pool (can break the ratio)."""
    slo: Slo = Slo()
    """Latency objectives."""
    policy: PolicyConfig = PolicyConfig()
    """The scaling policy."""
    schedules: tuple[ScheduleEntry, ...] = ()
    """Time-of-day schedules; the first that matches wins."""
    priority: int = 0
    """Placement serves higher priorities first."""
    affinity: str = "none"
    """The network domain a Deployment Group shares: ``s1``, ``s2`` or ``none``."""
    pd_ratio_mode: str = "advise"
    """``fixed``: the ratio as configured; ``advise``: also watch for drift and recommend
    a ratio (status, metric, Kubernetes Event); ``adapt``: move the ratio in use, in
    bounded steps within ``policy.ratio_drift``'s limits."""

    @property
    def uses_groups(self) -> bool:
        """Run as Deployment Groups (role ``template``) rather than scaled in place."""
        return self.prefill.template is not None and self.decode.template is not None

    @property
    def ratio(self) -> Fraction:
        return Fraction(self.pd_ratio[0], self.pd_ratio[1])

    @property
    def pd_ratio_text(self) -> str:
        return f"{self.pd_ratio[0]}:{self.pd_ratio[1]}"

    def role(self, role: str) -> RoleConfig:
        if role == "prefill":
            return self.prefill
        if role == "decode":
            return self.decode
        raise KeyError(role)


@dataclass(frozen=True)
class Config:
    """A whole coordinator configuration."""

    coordinator: CoordinatorConfig
    """The process."""
    services: tuple[ServiceConfig, ...]
    """Every service it scales."""

    def service(self, name: str) -> ServiceConfig:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)
