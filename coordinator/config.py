"""YAML → ``core.settings``: the one configuration reader (coordinator, place, simulate).

``load_config`` turns a YAML text (or an already parsed mapping) into a ``Config``;
``read_config`` reads a file first (an unreadable file is one ``UsageError`` line).
It never stops at the first mistake: it walks the whole document, collects every
problem with its path (``services[0].policy.tolerance.scale_in: ...``), unknown keys
included, checks the cross-field rules, and raises one ``ConfigError`` listing them
all. A ``Config`` that exists is valid; nothing downstream re-checks or silently
rewrites a field. Every field, its unit and default is documented in
docs/configuration.md.

``load_config`` reads no file and no clock; ``read_config`` is its file front.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from heteroscale.coordinator.core.ratio import prefill_for_ratio
from heteroscale.coordinator.core.settings import (
    AFFINITIES, BACKENDS, METRICS_SOURCES, PD_RATIO_MODES, AdaptiveTarget, ApiConfig, CollectConfig, DemandEstimate,
    Forecast, KvPressure, RatioDrift, Config, CoordinatorConfig, LatencyNet, LeaseConfig,
    MetricsSourceConfig, PlacementConfig, PolicyConfig, RoleConfig, ScheduleEntry, ServiceConfig, Slo, Tolerance)
from heteroscale.errors import ConfigError, UsageError
from heteroscale.net import parse_host_port
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
REPORT_PATH = "/v1/report"                                 # the sidecar's report (ARCHITECTURE §3.2)
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")   # a Kubernetes DNS label
_RATIO_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_HHMM_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_MATCHER = r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR_RE = re.compile(rf"^({_MATCHER})(,{_MATCHER})*,?\s*$")   # PromQL label matchers, no braces
_LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


# ---------------------------------------------------------------- the reader

_MISSING = object()


class _Node:
    """One mapping of the document, its path, and the shared problem list."""

    def __init__(self, doc: Any, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()
        if doc is None:
            doc = {}
        if not isinstance(doc, Mapping):
            self.problem("", f"must be a mapping, got {_kind(doc)}")
            doc = {}
        self.doc: Mapping[str, Any] = doc

    def at(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str, text: str) -> None:
        where = self.at(key) if key else (self.path or "(top level)")
        self.problems.append(f"{where}: {text}")

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.doc.get(key, _MISSING)

    def number(self, key: str, default: float | None, *, minimum: float | None = None,
               exclusive_min: bool = False, maximum: float | None = None,
               required: bool = False, allow_null: bool = False) -> Any:
        value = self.raw(key)
        if value is _MISSING or (value is None and allow_null):
            if required and value is _MISSING:
                self.problem(key, "is required")
            return None if value is None else default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.problem(key, f"must be a number, got {value!r}")
            return default
        if minimum is not None and (value < minimum or (exclusive_min and value == minimum)):
            self.problem(key, f"must be {'>' if exclusive_min else '>='} {minimum:g}, got {value:g}")
            return default
        if maximum is not None and value > maximum:
            self.problem(key, f"must be <= {maximum:g}, got {value:g}")
            return default
        return float(value)

    def integer(self, key: str, default: int | None, *, minimum: int | None = None,
                required: bool = False, allow_null: bool = False) -> Any:
        value = self.raw(key)
        if value is _MISSING or (value is None and allow_null):
            if required and value is _MISSING:
                self.problem(key, "is required")
            return None if value is None else default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"must be an integer, got {value!r}")
            return default
        if minimum is not None and value < minimum:
            self.problem(key, f"must be >= {minimum}, got {value}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, got {value!r}")
            return default
        return value

    def string(self, key: str, default: str | None, *, choices: tuple[str, ...] | None = None,
               required: bool = False, check: Callable[[str], str | None] | None = None) -> Any:
        value = self.raw(key)
        if value is _MISSING or value is None:
            if required:
                self.problem(key, "is required")
            return default
        if not isinstance(value, str) or not value:
            self.problem(key, f"must be a non-empty string, got {value!r}")
            return default
        if choices is not None and value not in choices:
            self.problem(key, f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        if check is not None:
            bad = check(value)
            if bad:
                self.problem(key, bad)
                return default
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.raw(key)
        if value is _MISSING or value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(key, "must be a list of non-empty strings")
            return ()
        return tuple(value)

    def child(self, key: str) -> "_Node":
        value = self.raw(key)
        return _Node(None if value is _MISSING else value, self.at(key), self.problems)

    def finish(self) -> None:
        for key in self.doc:
            if key not in self.seen:
                self.problem(str(key), "unknown key")


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _dns_label(value: str) -> str | None:
    if len(value) > 63 or not _NAME_RE.match(value):
        return f"must be a lowercase DNS label (a-z, 0-9, '-'), got {value!r}"
    return None


def _listen(value: str) -> str | None:
    try:
        parse_host_port(value, require_host=True, allow_port_zero=False)
    except ValueError as exc:
        return str(exc)
    return None


def _report_url(value: str) -> str:
    """A sidecar given by its address (``http://host:9400``) means its report there."""
    scheme, sep, rest = value.partition("://")
    if scheme in ("http", "https") and sep and rest and "/" not in rest.rstrip("/"):
        return f"{scheme}://{rest.rstrip('/')}{REPORT_PATH}"
    return value


def _url(value: str) -> str | None:
    if not (value.startswith("http://") or value.startswith("https://")):
        return f"must be an http(s) URL, got {value!r}"
    return None


# ---------------------------------------------------------------- sections

def _lease(node: _Node) -> LeaseConfig:
    d = LeaseConfig()
    lease = LeaseConfig(
        name=node.string("name", d.name, check=_dns_label),
        namespace=node.string("namespace", d.namespace, check=_dns_label),
        duration_s=node.number("duration_s", d.duration_s, minimum=0, exclusive_min=True),
        renew_deadline_s=node.number("renew_deadline_s", d.renew_deadline_s, minimum=0, exclusive_min=True),
        retry_period_s=node.number("retry_period_s", d.retry_period_s, minimum=0, exclusive_min=True),
        path=node.string("path", d.path),
    )
    node.finish()
    # client-go's rule: the lease must outlive a renew attempt, which must outlive
    # a few retries; otherwise two leaders can overlap.
    if not lease.duration_s > lease.renew_deadline_s:
        node.problem("duration_s", f"must be greater than renew_deadline_s "
                     f"({lease.duration_s:g} <= {lease.renew_deadline_s:g})")
    if not lease.renew_deadline_s > 1.2 * lease.retry_period_s:
        node.problem("renew_deadline_s", f"must be greater than 1.2 x retry_period_s "
                     f"({lease.renew_deadline_s:g} <= {1.2 * lease.retry_period_s:g})")
    return lease


def _api(node: _Node, *, lease_margin_s: float) -> ApiConfig:
    d = ApiConfig()
    # Unless given, a write attempt may take half the lease margin (4 s with the defaults).
    write_default = min(d.write_timeout_s, 0.5 * lease_margin_s) if lease_margin_s > 0 else d.write_timeout_s
    out = ApiConfig(
        timeout_s=node.number("timeout_s", d.timeout_s, minimum=0, exclusive_min=True),
        write_timeout_s=node.number("write_timeout_s", write_default, minimum=0, exclusive_min=True),
    )
    node.finish()
    return out


def _follows_interval(default_s: float, interval_s: float) -> float:
    """A per-tick timeout nobody set: its default, but never more than half the interval."""
    return min(default_s, 0.5 * interval_s)


def _collect(node: _Node, *, interval_s: float) -> CollectConfig:
    d = CollectConfig()
    out = CollectConfig(
        timeout_s=node.number("timeout_s", _follows_interval(d.timeout_s, interval_s), minimum=0,
                              exclusive_min=True),
        concurrency=node.integer("concurrency", d.concurrency, minimum=1),
        sidecar_port=node.integer("sidecar_port", d.sidecar_port, minimum=1),
    )
    if out.sidecar_port > 65535:
        node.problem("sidecar_port", f"must be <= 65535, got {out.sidecar_port}")
    node.finish()
    return out


def _selector(value: str) -> str | None:
    if not _SELECTOR_RE.match(value):
        return ("must be PromQL label matchers without braces, like 'job=\"heteroscale\", cluster=~\"a|b\"', "
                f"got {value!r}")
    return None


def _metrics_source(node: _Node, *, interval_s: float) -> MetricsSourceConfig:
    d = MetricsSourceConfig()
    out = MetricsSourceConfig(
        type=node.string("type", d.type, choices=METRICS_SOURCES),
        url=node.string("url", d.url, check=_url),
        timeout_s=node.number("timeout_s", _follows_interval(d.timeout_s, interval_s), minimum=0,
                              exclusive_min=True),
        selector=node.string("selector", None, check=_selector) or d.selector,
        lookback_s=node.number("lookback_s", d.lookback_s, minimum=0, exclusive_min=True),
    )
    node.finish()
    if out.type == "prometheus" and out.url is None:
        node.problem("url", "is required with type: prometheus (e.g. http://prometheus:9090)")
    if out.type == "sidecars":
        for key in ("url", "selector", "lookback_s"):
            if key in node.doc:
                node.problem(key, "is only used with type: prometheus")
    return out


def _label_key(value: str) -> str | None:
    if len(value) > 316 or not _LABEL_KEY_RE.match(value):
        return f"must be a Kubernetes label key like example.com/name, got {value!r}"
    return None


def _placement(node: _Node) -> PlacementConfig:
    d = PlacementConfig()
    out = PlacementConfig(
        gpu_type_label=node.string("gpu_type_label", d.gpu_type_label, check=_label_key),
        s1_label=node.string("s1_label", d.s1_label, check=_label_key),
        s2_label=node.string("s2_label", d.s2_label, check=_label_key),
        gpu_resource=node.string("gpu_resource", d.gpu_resource, check=_label_key),
        ratio_tolerance=node.number("ratio_tolerance", d.ratio_tolerance, minimum=0, maximum=9.99),
        drain_window_s=node.number("drain_window_s", d.drain_window_s, minimum=0),
    )
    node.finish()
    labels = [out.gpu_type_label, out.s1_label, out.s2_label]
    if len(set(labels)) != len(labels):
        node.problem("", "gpu_type_label, s1_label and s2_label must be three different labels")
    return out


def _coordinator(node: _Node) -> CoordinatorConfig:
    d = CoordinatorConfig()
    interval_s = node.number("interval_s", d.interval_s, minimum=0, exclusive_min=True)
    lease = _lease(node.child("lease"))
    out = CoordinatorConfig(
        interval_s=interval_s,
        backend=node.string("backend", d.backend, choices=BACKENDS),
        dry_run=node.boolean("dry_run", d.dry_run),
        listen=node.string("listen", d.listen, check=_listen),
        lease=lease,
        api=_api(node.child("api"), lease_margin_s=lease.duration_s - lease.renew_deadline_s),
        collect=_collect(node.child("collect"), interval_s=interval_s),
        history_s=node.number("history_s", d.history_s, minimum=0, exclusive_min=True),
        decisions_kept=node.integer("decisions_kept", d.decisions_kept, minimum=1),
        observe_timeout_s=node.number("observe_timeout_s", d.observe_timeout_s, minimum=0, exclusive_min=True),
        metrics_source=_metrics_source(node.child("metrics_source"), interval_s=interval_s),
        placement=_placement(node.child("placement")),
    )
    node.finish()
    margin = out.lease.duration_s - out.lease.renew_deadline_s
    if out.backend == "kubernetes" and margin > 0 and margin <= out.api.write_timeout_s:
        # A deposed leader's last write may still be on the wire for write_timeout_s after
        # its renew deadline; a rival may take over duration_s - renew_deadline_s later.
        node.problem("lease.duration_s", f"must exceed renew_deadline_s by more than api.write_timeout_s "
                     f"({out.lease.duration_s:g} - {out.lease.renew_deadline_s:g} = {margin:g} <= "
                     f"{out.api.write_timeout_s:g}), or a write can land after a takeover")
    if out.metrics_source.type == "sidecars" and out.collect.timeout_s >= out.interval_s:
        node.problem("collect.timeout_s", f"must be shorter than interval_s "
                     f"({out.collect.timeout_s:g} >= {out.interval_s:g})")
    if out.metrics_source.type == "prometheus" and out.metrics_source.timeout_s >= out.interval_s:
        node.problem("metrics_source.timeout_s", f"must be shorter than interval_s "
                     f"({out.metrics_source.timeout_s:g} >= {out.interval_s:g})")
    return out


def _policy(node: _Node) -> PolicyConfig:
    d = PolicyConfig()
    tol_node = node.child("tolerance")
    tolerance = Tolerance(
        scale_out=tol_node.number("scale_out", d.tolerance.scale_out, minimum=0, maximum=1),
        scale_in=tol_node.number("scale_in", d.tolerance.scale_in, minimum=0, maximum=0.99),
    )
    tol_node.finish()
    lat_node = node.child("latency_net")
    dl = d.latency_net
    latency = LatencyNet(
        enabled=lat_node.boolean("enabled", dl.enabled),
        moderate=lat_node.number("moderate", dl.moderate, minimum=0, exclusive_min=True),
        severe=lat_node.number("severe", dl.severe, minimum=0, exclusive_min=True),
        moderate_step=lat_node.number("moderate_step", dl.moderate_step, minimum=0, exclusive_min=True),
        severe_step=lat_node.number("severe_step", dl.severe_step, minimum=0, exclusive_min=True),
        use_ttft=lat_node.boolean("use_ttft", dl.use_ttft),
    )
    lat_node.finish()
    if latency.severe < latency.moderate:
        lat_node.problem("severe", f"must be >= moderate ({latency.severe:g} < {latency.moderate:g})")
    if latency.severe_step < latency.moderate_step:
        lat_node.problem("severe_step", f"must be >= moderate_step "
                         f"({latency.severe_step:g} < {latency.moderate_step:g})")
    dd = node.child("demand")
    demand = DemandEstimate(enabled=dd.boolean("enabled", d.demand.enabled),
                            max_factor=dd.number("max_factor", d.demand.max_factor, minimum=1),
                            include_prefill_queue=dd.boolean("include_prefill_queue",
                                                             d.demand.include_prefill_queue),
                            drain_horizon_s=dd.number("drain_horizon_s", d.demand.drain_horizon_s, minimum=0))
    dd.finish()
    at = node.child("adaptive_target")
    da = d.adaptive_target
    adaptive = AdaptiveTarget(
        enabled=at.boolean("enabled", da.enabled),
        floor=at.number("floor", da.floor, minimum=0, exclusive_min=True, maximum=1),
        step=at.number("step", da.step, minimum=0, exclusive_min=True, maximum=0.9),
        calm_ratio=at.number("calm_ratio", da.calm_ratio, minimum=0, exclusive_min=True, maximum=1),
        recover_after_s=at.number("recover_after_s", da.recover_after_s, minimum=0, exclusive_min=True),
        recover_step=at.number("recover_step", da.recover_step, minimum=0, exclusive_min=True, maximum=1))
    at.finish()
    kp = node.child("kv_pressure")
    kv = KvPressure(enabled=kp.boolean("enabled", d.kv_pressure.enabled),
                    usage=kp.number("usage", d.kv_pressure.usage, minimum=0, exclusive_min=True, maximum=1),
                    preemptions_per_s=kp.number("preemptions_per_s", d.kv_pressure.preemptions_per_s, minimum=0))
    kp.finish()
    rd = node.child("ratio_drift")
    dr = d.ratio_drift
    drift = RatioDrift(
        window_s=rd.number("window_s", dr.window_s, minimum=0, exclusive_min=True),
        threshold=rd.number("threshold", dr.threshold, minimum=0, exclusive_min=True, maximum=10),
        step=rd.number("step", dr.step, minimum=0, exclusive_min=True, maximum=1),
        dwell_s=rd.number("dwell_s", dr.dwell_s, minimum=0),
        min_ratio=rd.number("min_ratio", dr.min_ratio, minimum=0, exclusive_min=True),
        max_ratio=rd.number("max_ratio", dr.max_ratio, minimum=0, exclusive_min=True),
        reference_prefill_per_decode=rd.number("reference_prefill_per_decode", None, minimum=0,
                                               exclusive_min=True, allow_null=True))
    rd.finish()
    if drift.min_ratio > drift.max_ratio:
        rd.problem("min_ratio", f"must be <= max_ratio ({drift.min_ratio:g} > {drift.max_ratio:g})")
    fc = node.child("forecast")
    df = d.forecast
    forecast = Forecast(enabled=fc.boolean("enabled", df.enabled),
                        horizon_s=fc.number("horizon_s", df.horizon_s, minimum=0, exclusive_min=True),
                        trend_window_s=fc.number("trend_window_s", df.trend_window_s, minimum=0, exclusive_min=True))
    fc.finish()
    out = PolicyConfig(
        demand=demand, adaptive_target=adaptive, kv_pressure=kv, ratio_drift=drift, forecast=forecast,
        tolerance=tolerance,
        scale_out_cooldown_s=node.number("scale_out_cooldown_s", d.scale_out_cooldown_s, minimum=0),
        scale_in_stabilization_s=node.number("scale_in_stabilization_s", d.scale_in_stabilization_s, minimum=0),
        scale_in_backoff_window_s=node.number("scale_in_backoff_window_s", d.scale_in_backoff_window_s, minimum=0),
        reversal_window_s=node.number("reversal_window_s", d.reversal_window_s, minimum=0),
        scale_in_backoff_s=node.number("scale_in_backoff_s", d.scale_in_backoff_s, minimum=0),
        scale_in_backoff_max_s=node.number("scale_in_backoff_max_s", d.scale_in_backoff_max_s, minimum=0),
        kv_transfer_hold_max_s=node.number("kv_transfer_hold_max_s", d.kv_transfer_hold_max_s, minimum=0),
        max_scale_out_factor=node.number("max_scale_out_factor", d.max_scale_out_factor, minimum=1),
        max_scale_in_factor=node.number("max_scale_in_factor", d.max_scale_in_factor,
                                        minimum=0, exclusive_min=True, maximum=1),
        latency_net=latency,
        smoothing_window_s=node.number("smoothing_window_s", d.smoothing_window_s, minimum=0),
        min_fresh_reports_ratio=node.number("min_fresh_reports_ratio", d.min_fresh_reports_ratio,
                                            minimum=0, exclusive_min=True, maximum=1),
        report_max_age_s=node.number("report_max_age_s", d.report_max_age_s, minimum=0, exclusive_min=True),
        warmup_s=node.number("warmup_s", d.warmup_s, minimum=0),
        pending_timeout_s=node.number("pending_timeout_s", d.pending_timeout_s, minimum=0, exclusive_min=True),
        consolidation_margin=node.number("consolidation_margin", d.consolidation_margin,
                                         minimum=0, exclusive_min=True, maximum=1),
        prefill_busy_utilization=node.number("prefill_busy_utilization", d.prefill_busy_utilization,
                                             minimum=0, exclusive_min=True, maximum=1, allow_null=True),
        prefill_staffing_beta=node.number("prefill_staffing_beta", d.prefill_staffing_beta, minimum=0),
        gpu_budget=node.integer("gpu_budget", d.gpu_budget, minimum=1, allow_null=True),
    )
    node.finish()
    return out


def _role(node: _Node, *, backend: str | None, needs_sidecars: bool = True) -> RoleConfig:
    """``backend`` is ``None`` when the backend itself was invalid: its rules are not checked."""
    options = node.raw("options")
    if options is _MISSING or options is None:
        options = {}
    elif not isinstance(options, Mapping):
        node.problem("options", "must be a mapping")
        options = {}
    sidecars = tuple(_report_url(url) for url in node.strings("sidecars"))
    for i, url in enumerate(sidecars):
        bad = _url(url)
        if bad:
            node.problem(f"sidecars[{i}]", bad)
    role = RoleConfig(
        deployment=node.string("deployment", None, check=_dns_label),
        statefulset=node.string("statefulset", None, check=_dns_label),
        sidecars=sidecars,
        selector=node.string("selector", None),
        gpu_types=node.strings("gpu_types"),
        gpus_per_instance=node.integer("gpus_per_instance", 1, minimum=1),
        options=dict(options),
        template=node.string("template", None, check=_dns_label),
    )
    node.finish()
    if role.deployment and role.statefulset:
        node.problem("", "give either deployment or statefulset, not both")
    if role.template and (role.deployment or role.statefulset):
        node.problem("template", "a Deployment Group template replaces deployment/statefulset: give one")
    if backend == "kubernetes" and not (role.deployment or role.statefulset or role.template):
        node.problem("", "backend kubernetes needs a deployment or statefulset name "
                     "(scaled in place), or a template (Deployment Groups)")
    if backend == "static" and needs_sidecars and not role.sidecars:
        node.problem("sidecars", "backend static needs at least one sidecar report URL")
    return role


def _hhmm(node: _Node, key: str) -> int | None:
    value = node.raw(key)
    if value is _MISSING:
        node.problem(key, "is required (HH:MM)")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 08:30 as the sexagesimal integer 510.
        if 0 <= value < 24 * 60:
            return value
    if isinstance(value, str) and _HHMM_RE.match(value):
        hours, minutes = value.split(":")
        return int(hours) * 60 + int(minutes)
    node.problem(key, f"must be a time of day HH:MM, got {value!r}")
    return None


def _schedule(node: _Node) -> ScheduleEntry | None:
    start = _hhmm(node, "start")
    end = _hhmm(node, "end")
    days_raw = node.strings("days")
    days: list[int] = []
    for day in days_raw:
        if day.lower()[:3] not in DAYS:
            node.problem("days", f"unknown day {day!r} (use {', '.join(DAYS)})")
        else:
            days.append(DAYS.index(day.lower()[:3]))
    entry = dict(
        utc_offset_min=node.integer("utc_offset_min", 0),
        prefill=node.integer("prefill", None, minimum=0),
        decode=node.integer("decode", None, minimum=1),
        min_decode=node.integer("min_decode", None, minimum=1),
        max_decode=node.integer("max_decode", None, minimum=1),
        name=node.string("name", "") or "",
    )
    node.finish()
    if entry["utc_offset_min"] is not None and abs(entry["utc_offset_min"]) > 14 * 60:
        node.problem("utc_offset_min", "must be within -840..840 minutes")
    fixed = entry["decode"] is not None or entry["prefill"] is not None
    bounds = entry["min_decode"] is not None or entry["max_decode"] is not None
    if fixed and bounds:
        node.problem("", "give either fixed counts (prefill, decode) or bounds (min_decode, max_decode), not both")
    elif fixed and (entry["decode"] is None or entry["prefill"] is None):
        node.problem("", "fixed counts need both prefill and decode")
    elif not fixed and not bounds:
        node.problem("", "needs fixed counts (prefill, decode) or bounds (min_decode, max_decode)")
    if (entry["min_decode"] is not None and entry["max_decode"] is not None
            and entry["min_decode"] > entry["max_decode"]):
        node.problem("min_decode", "must be <= max_decode")
    if start is None or end is None:
        return None
    if start == end:
        node.problem("end", "must differ from start")
    return ScheduleEntry(start_min=start, end_min=end, days=tuple(sorted(set(days))) or tuple(range(7)),
                         **entry)


def _ratio(node: _Node) -> tuple[int, int]:
    value = node.raw("pd_ratio")
    if value is _MISSING:
        node.problem("pd_ratio", "is required (\"P:D\", e.g. \"9:7\")")
        return (1, 1)
    match = _RATIO_RE.match(value) if isinstance(value, str) else None
    if not match or int(match.group(1)) <= 0 or int(match.group(2)) <= 0:
        node.problem("pd_ratio", f"must be \"P:D\" with two positive integers, got {value!r}")
        return (1, 1)
    return (int(match.group(1)), int(match.group(2)))


def _service(node: _Node, *, backend: str | None, needs_sidecars: bool = True) -> ServiceConfig:
    pd = _ratio(node)
    schedules_raw = node.raw("schedules")
    schedules: list[ScheduleEntry] = []
    if schedules_raw not in (_MISSING, None):
        if not isinstance(schedules_raw, list):
            node.problem("schedules", "must be a list")
        else:
            for i, item in enumerate(schedules_raw):
                entry = _schedule(_Node(item, node.at("schedules") + f"[{i}]", node.problems))
                if entry is not None:
                    schedules.append(entry)
    slo_node = node.child("slo")
    known = len(node.problems)
    slo = Slo(ttft_s=slo_node.number("ttft_s", None, minimum=0, exclusive_min=True, allow_null=True),
              tbt_s=slo_node.number("tbt_s", None, minimum=0, exclusive_min=True, allow_null=True))
    slo_node.finish()
    slo_ok = len(node.problems) == known
    svc = ServiceConfig(
        name=node.string("name", "?", required=True, check=_dns_label),
        namespace=node.string("namespace", "default", check=_dns_label),
        pd_ratio=pd,
        target_decode_tps_per_instance=node.number("target_decode_tps_per_instance", 1.0, minimum=0,
                                                   exclusive_min=True, required=True),
        # A missing role block is one problem ("is required", below), not also each of its rules.
        prefill=_role(node.child("prefill"), backend=backend if "prefill" in node.doc else None,
                      needs_sidecars=needs_sidecars and "prefill" in node.doc),
        decode=_role(node.child("decode"), backend=backend if "decode" in node.doc else None,
                     needs_sidecars=needs_sidecars and "decode" in node.doc),
        min_decode=node.integer("min_decode", 1, minimum=1),
        max_decode=node.integer("max_decode", 64, minimum=1),
        min_prefill=node.integer("min_prefill", None, minimum=0, allow_null=True),
        max_prefill=node.integer("max_prefill", None, minimum=1, allow_null=True),
        slo=slo,
        policy=_policy(node.child("policy")),
        schedules=tuple(schedules),
        priority=node.integer("priority", 0),
        affinity=node.string("affinity", "none", choices=AFFINITIES),
        pd_ratio_mode=node.string("pd_ratio_mode", "advise", choices=PD_RATIO_MODES),
    )
    if (svc.prefill.template is None) != (svc.decode.template is None):
        node.problem("", "both roles must give a template (Deployment Groups) or neither")
    if "prefill" not in node.doc:
        node.problem("prefill", "is required (the prefill role block)")
    if "decode" not in node.doc:
        node.problem("decode", "is required (the decode role block)")
    node.finish()
    _service_rules(node, svc, slo_ok=slo_ok)
    return svc


def _service_rules(node: _Node, svc: ServiceConfig, *, slo_ok: bool) -> None:
    """Cross-field rules. A rule that depends on a field already reported as wrong is not
    checked (it would only repeat that problem in other words)."""
    if svc.min_decode > svc.max_decode:
        node.problem("min_decode", f"must be <= max_decode ({svc.min_decode} > {svc.max_decode})")
    if svc.min_prefill is not None and svc.max_prefill is not None and svc.min_prefill > svc.max_prefill:
        node.problem("min_prefill", f"must be <= max_prefill ({svc.min_prefill} > {svc.max_prefill})")
    budget = svc.policy.gpu_budget
    if budget is not None:
        floor_p = prefill_for_ratio(svc.min_decode, svc.pd_ratio)
        need = floor_p * svc.prefill.gpus_per_instance + svc.min_decode * svc.decode.gpus_per_instance
        if need > budget:
            node.problem("policy.gpu_budget", f"{budget} GPUs cannot hold the minimum pools "
                         f"({floor_p}P + {svc.min_decode}D need {need})")
    if slo_ok and svc.policy.latency_net.enabled and svc.slo.tbt_s is None and svc.slo.ttft_s is None:
        node.problem("slo", "the latency safety net needs slo.tbt_s or slo.ttft_s "
                     "(or set policy.latency_net.enabled: false)")


def load_config(source: str | Mapping[str, Any], *, origin: str = "config") -> Config:
    """Parse and validate; raise ``ConfigError`` listing every problem found."""
    if isinstance(source, str):
        try:
            doc = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError([f"not valid YAML{where}: {problem}"], source=origin) from exc
    else:
        doc = source
    problems: list[str] = []
    if doc is None:
        raise ConfigError(["the file is empty"], source=origin)
    root = _Node(doc, "", problems)
    coordinator_doc = root.doc.get("coordinator")
    raw_backend = coordinator_doc.get("backend") if isinstance(coordinator_doc, Mapping) else None
    coordinator = _coordinator(root.child("coordinator"))
    backend = coordinator.backend if raw_backend is None or raw_backend in BACKENDS else None
    services: list[ServiceConfig] = []
    raw_services = root.raw("services")
    if raw_services is _MISSING or raw_services is None:
        problems.append("services: is required (a list of at least one service)")
    elif not isinstance(raw_services, list) or not raw_services:
        problems.append("services: must be a non-empty list")
    else:
        for i, item in enumerate(raw_services):
            # With the Prometheus source the static backend reads instances from PromQL, not URLs.
            services.append(_service(_Node(item, f"services[{i}]", problems), backend=backend,
                                     needs_sidecars=coordinator.metrics_source.type == "sidecars"))
    root.finish()
    names = [s.name for s in services]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"services: duplicate service name {name!r}")
    if problems:
        raise ConfigError(problems, source=origin)
    return Config(coordinator=coordinator, services=tuple(services))


def read_text(path: str | Path, *, what: str = "config") -> str:
    """A file's text, or one ``UsageError`` line saying why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such {what} file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{what} file {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc}") from None


def read_config(path: str | Path) -> Config:
    """Read and validate a coordinator config: ``UsageError`` if unreadable, ``ConfigError``
    listing every problem otherwise."""
    return load_config(read_text(path), origin=str(path))
