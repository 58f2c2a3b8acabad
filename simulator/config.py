"""The simulator's configuration: a coordinator config plus a ``simulation:`` block (pure).

One YAML file serves both the live coordinator and the simulator: the ``services``
(and optional ``coordinator``) sections are read by the coordinator's own
``load_config`` — so the simulated policy runs with exactly the settings the live
one would — and ``simulation:`` describes the hardware and the replay. Every
problem in either part is reported at once in one ``ConfigError``.

    simulation:
      model: 8b                      # 8b | 32b | 70b (heteroscale.simulator.perfmodel.MODELS)
      prefill: {gpu: L40S, tp: 1}    # GPU type from the catalog, tensor parallelism
      decode:  {gpu: H20,  tp: 1}
      startup_s: 120                 # scale-out to ready
      kv_link_gbps: 400              # P→D KV bandwidth under one switch
      cross_switch_ratio: 0.8        # share left across switches
      cross_switch_share: 0.0        # share of transfers crossing switches (0 = DG placement)
      decode_max_batch: 256
      kv_watermark: 0.95
      tick_s: 0.5                    # fluid decode step
      # fidelity (issue #13; docs/simulator.md "Mechanisms"): per-role start-up in the role
      # blocks (prefill: {gpu: A100, tp: 2, startup_s: 90}), and
      startup_jitter_s: 15           # ± uniform on every start-up
      gpu_capacity: {H20: 64}        # GPUs per type; an instance that cannot be placed stays pending
      kv_uplink_gbps: 3200           # inter-switch uplink all cross-switch transfers share
      kv_switches: 1                 # switches the prefill NICs are spread over
      degraded_links: {0: 0.5}       # switch -> bandwidth share left
      prefill_kv_buffer_ratio: 1.0   # prefill KV memory that may hold KV waiting for decode
      preemption: recompute          # recompute | swap
      swap_gbps: 200                 # host<->GPU for swap
      router: least-loaded           # least-loaded | round-robin | cache-aware
      prefix_cache_ratio: 0.5        # prefill KV memory kept as its own prefix cache
      report_loss: 0.0               # share of sidecar pulls lost (seeded)
      window_s: 30                   # sidecar rate/quantile window
      seed: 0
      slo_goal: 0.99                 # curation: required SLO attainment
      diurnal: {peak_rps: 20, start_hour: 0, profile: [24 relative rates], order: keep}  # keep|shuffle
      drift: [{hour: 0, prompt_scale: 1, output_scale: 1, cache_share: 0.2}, ...]   # optional
      sizes: {prompt_mean: 3000, output_mean: 350, spread_ratio: 0.25}   # optional
      initial: {prefill: 9, decode: 7}                                    # optional
      pressure: {instances: 16, low_prefill: 7, high_prefill: 12, duration_s: 240,
                 iterations: 9, margin: 0.9}
      baselines: {target_utilization: 0.7, hpa_tolerance: 0.1, scale_in_stabilization_s: 300,
                  latency_target: 0.8, peak_headroom: 1.1,
                  independent-tps: {prefill_target_tps_per_instance: 9000},   # from curate
                  static-peak: {prefill: 10, decode: 6}, periodic: {hourly_decode_tps: [24]}}
      topology: {s2: 2, s1_per_s2: 2, nodes_per_s1: 8, gpus_per_node: 8, mix: s1}   # optional:
                                     # place through the coordinator's planner (simulator/placement.py);
                                     # kv_switches is then its S1 count (s2 x s1_per_s2), degraded_links
                                     # keys are S1 switches in node order
      bandwidth_aware: true          # placement steered by the measured KV map, and the policy sees
                                     # requests waiting for KV (false: both blind; heteroscale-blind)

The policy tick is the coordinator's ``interval_s``. ``coordinator.backend`` defaults
to ``local`` here (no Kubernetes names are needed to simulate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from heteroscale.coordinator.config import load_config

from heteroscale.coordinator.core.settings import Config
from heteroscale.errors import ConfigError
from heteroscale.simulator import perfmodel as pm
from heteroscale.simulator.curate import PressureSettings
from heteroscale.simulator.model.cluster import ClusterSpec
from heteroscale.simulator.placement import MIXES, TopologySpec
from heteroscale.simulator.policies import BaselineSettings, parse_baselines
from heteroscale.simulator.traces import DEFAULT_PROFILE, ORDERS, Drift, parse_drift


@dataclass(frozen=True)
class DiurnalSettings:
    peak_rps: float = 20.0
    start_hour: float = 0.0
    profile: tuple[float, ...] = DEFAULT_PROFILE
    order: str = "keep"          # keep | shuffle: which trace request each arrival gets (traces.py)


@dataclass(frozen=True)
class SizeSettings:
    prompt_mean: int
    output_mean: int
    spread_ratio: float = 0.25


@dataclass(frozen=True)
class SimConfig:
    coordinator: Config
    cluster: ClusterSpec
    window_s: float = 30.0
    seed: int = 0
    slo_goal: float = 0.99
    diurnal: DiurnalSettings = DiurnalSettings()
    sizes: SizeSettings | None = None
    initial: tuple[int, int] | None = None
    pressure: PressureSettings = PressureSettings()
    pressure_instances: int = 16
    pressure_low_prefill: int | None = None
    pressure_high_prefill: int | None = None
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    topology: TopologySpec | None = None
    report_loss: float = 0.0
    drift: Drift | None = None   # hourly shift of the request mix (traces.apply_drift)
    bandwidth_aware: bool = True  # placement uses the measured KV map; the policy sees KV waits

    @property
    def interval_s(self) -> float:
        return self.coordinator.coordinator.interval_s


def load_sim_config(text: str, *, origin: str = "config") -> SimConfig:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {str(exc).splitlines()[0]}"], source=origin) from exc
    if not isinstance(doc, Mapping):
        raise ConfigError(["must be a mapping with services: and simulation:"], source=origin)
    doc = dict(doc)
    sim = doc.pop("simulation", None)
    problems: list[str] = []
    coord_doc = dict(doc.get("coordinator") or {})
    coord_doc.setdefault("backend", "local")
    doc["coordinator"] = coord_doc
    coordinator: Config | None = None
    try:
        coordinator = load_config(doc, origin=origin)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if not isinstance(sim, Mapping):
        problems.append("simulation: is required (a mapping: model, prefill, decode, ...)")
        raise ConfigError(problems, source=origin)
    parsed = _simulation(sim, problems)
    if problems or coordinator is None:
        raise ConfigError(problems, source=origin)
    return SimConfig(coordinator=coordinator, **parsed)


_KNOWN = {"model", "prefill", "decode", "startup_s", "kv_link_gbps", "cross_switch_ratio",
          "cross_switch_share", "decode_max_batch", "kv_watermark", "tick_s", "window_s", "seed",
          "slo_goal", "diurnal", "sizes", "initial", "pressure", "baselines", "topology", "drift",
          "bandwidth_aware"}
_FIDELITY = {"startup_jitter_s", "gpu_capacity", "kv_uplink_gbps", "kv_switches", "degraded_links",
             "prefill_kv_buffer_ratio", "preemption", "swap_gbps", "router", "prefix_cache_ratio",
             "report_loss"}
_KNOWN |= _FIDELITY


def _num(sim: Mapping[str, Any], key: str, default: float, problems: list[str], *, lo: float | None = None,
         hi: float | None = None, where: str = "simulation") -> float:
    value = sim.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{where}.{key}: must be a number, got {value!r}")
        return default
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        problems.append(f"{where}.{key}: must be in [{lo}, {hi}], got {value!r}")
        return default
    return float(value)


def _instance(sim: Mapping[str, Any], role: str, model: pm.ModelSpec | None,
              problems: list[str]) -> pm.InstanceSpec | None:
    node = sim.get(role)
    if not isinstance(node, Mapping):
        problems.append(f"simulation.{role}: is required ({{gpu: H20, tp: 1}})")
        return None
    unknown = set(node) - {"gpu", "tp", "startup_s"}
    problems.extend(f"simulation.{role}.{k}: unknown key" for k in sorted(unknown))
    try:
        gpu = pm.gpu(str(node.get("gpu", "")))
    except KeyError as exc:
        problems.append(f"simulation.{role}.gpu: {exc.args[0]}")
        return None
    tp = node.get("tp", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or tp & (tp - 1):
        problems.append(f"simulation.{role}.tp: must be a power of two >= 1, got {tp!r}")
        return None
    if model is None:
        return None
    try:
        return pm.InstanceSpec(model, gpu, tp)
    except ValueError as exc:
        problems.append(f"simulation.{role}: {exc}")
        return None


def _simulation(sim: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    problems.extend(f"simulation.{k}: unknown key" for k in sorted(set(sim) - _KNOWN))
    try:
        model = pm.model(str(sim.get("model", "8b")))
    except KeyError as exc:
        problems.append(f"simulation.model: {exc.args[0]}")
        model = None
    prefill = _instance(sim, "prefill", model, problems)
    decode = _instance(sim, "decode", model, problems)
    cluster_kw = dict(
        startup_s=_num(sim, "startup_s", 120.0, problems, lo=0),
        kv_link_gbps=_num(sim, "kv_link_gbps", 400.0, problems, lo=1e-3),
        cross_switch_ratio=_num(sim, "cross_switch_ratio", 0.8, problems, lo=1e-3, hi=1),
        cross_switch_share=_num(sim, "cross_switch_share", 0.0, problems, lo=0, hi=1),
        decode_max_batch=int(_num(sim, "decode_max_batch", 256, problems, lo=1)),
        kv_watermark=_num(sim, "kv_watermark", 0.95, problems, lo=0.01, hi=1),
        tick_s=_num(sim, "tick_s", 0.5, problems, lo=0.01, hi=5),
        **_fidelity(sim, problems),
    )
    out: dict[str, Any] = {
        "window_s": _num(sim, "window_s", 30.0, problems, lo=1),
        "seed": int(_num(sim, "seed", 0, problems, lo=0)),
        "slo_goal": _num(sim, "slo_goal", 0.99, problems, lo=0, hi=1),
        "report_loss": _num(sim, "report_loss", 0.0, problems, lo=0, hi=0.99),
    }
    out["cluster"] = ClusterSpec(prefill=prefill, decode=decode, **cluster_kw) if prefill and decode else None
    out.update(_diurnal(sim.get("diurnal"), problems))
    out.update(_sizes(sim.get("sizes"), problems))
    out.update(_initial(sim.get("initial"), problems))
    out.update(_pressure(sim.get("pressure"), problems))
    out.update(_baselines(sim.get("baselines"), problems))
    out.update(_topology(sim.get("topology"), problems))
    aware = sim.get("bandwidth_aware", True)
    if not isinstance(aware, bool):
        problems.append(f"simulation.bandwidth_aware: must be true or false, got {aware!r}")
    else:
        out["bandwidth_aware"] = aware
    topo = out.get("topology")
    if topo is not None and "degraded_links" in sim and "kv_switches" in sim \
            and out["cluster"] is not None and out["cluster"].kv_switches != topo.s2 * topo.s1_per_s2:
        problems.append(f"simulation.kv_switches: with a topology the switches are its S1 switches "
                        f"(s2 x s1_per_s2 = {topo.s2 * topo.s1_per_s2}), got {out['cluster'].kv_switches}")
    drift = parse_drift(sim.get("drift"), problems)
    if drift is not None:
        out["drift"] = drift
    return out


def _fidelity(sim: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The ``ClusterSpec`` fields of the fidelity mechanisms (defaults: ``ClusterSpec``'s)."""
    from heteroscale.simulator.model.cluster import PREEMPTION_MODES, ROUTERS
    d = ClusterSpec.__dataclass_fields__
    out: dict[str, Any] = {}
    for role in ("prefill", "decode"):
        node = sim.get(role)
        if isinstance(node, Mapping) and "startup_s" in node:
            out[f"{role}_startup_s"] = _num(node, "startup_s", 120.0, problems, lo=0, where=f"simulation.{role}")
    for key, lo, hi in (("startup_jitter_s", 0, None), ("prefill_kv_buffer_ratio", 0.01, 1),
                        ("swap_gbps", 1e-3, None), ("prefix_cache_ratio", 0, 0.9)):
        if key in sim:
            out[key] = _num(sim, key, d[key].default, problems, lo=lo, hi=hi)
    if "kv_uplink_gbps" in sim:
        out["kv_uplink_gbps"] = _num(sim, "kv_uplink_gbps", 1.0, problems, lo=1e-3)
    switches = int(_num(sim, "kv_switches", 1, problems, lo=1, hi=10_000))
    out["kv_switches"] = switches
    for key, choices in (("preemption", PREEMPTION_MODES), ("router", ROUTERS)):
        if key in sim:
            if sim[key] not in choices:
                problems.append(f"simulation.{key}: must be one of {', '.join(choices)}, got {sim[key]!r}")
            else:
                out[key] = sim[key]
    caps = sim.get("gpu_capacity")
    if caps is not None:
        if not isinstance(caps, Mapping):
            problems.append("simulation.gpu_capacity: must be a mapping {GPU type: GPUs}")
        else:
            out["gpu_capacity"] = {}
            for name, count in caps.items():
                try:
                    key = pm.gpu(str(name)).name
                except KeyError as exc:
                    problems.append(f"simulation.gpu_capacity.{name}: {exc.args[0]}")
                    continue
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    problems.append(f"simulation.gpu_capacity.{name}: must be an integer >= 0, got {count!r}")
                    continue
                out["gpu_capacity"][key] = count
    links = sim.get("degraded_links")
    if links is not None:
        if not isinstance(links, Mapping):
            problems.append("simulation.degraded_links: must be a mapping {switch index: bandwidth share}")
        else:
            out["degraded_links"] = {}
            for k, v in links.items():
                if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < switches:
                    problems.append(f"simulation.degraded_links.{k}: switch must be an integer in [0, {switches})")
                elif isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                    problems.append(f"simulation.degraded_links.{k}: bandwidth share must be in (0, 1], got {v!r}")
                else:
                    out["degraded_links"][k] = float(v)
    return out


def _topology(raw: Any, problems: list[str]) -> dict[str, Any]:
    node = _section(raw, "topology", {"s2", "s1_per_s2", "nodes_per_s1", "gpus_per_node", "mix"}, problems)
    if node is None:
        return {}
    w = "simulation.topology"
    mix = node.get("mix", "s1")
    if mix not in MIXES:
        problems.append(f"{w}.mix: must be one of {', '.join(MIXES)}, got {mix!r}")
        mix = "s1"
    counts = {k: int(_num(node, k, d, problems, lo=1, hi=10_000, where=w))
              for k, d in (("s2", 2), ("s1_per_s2", 2), ("nodes_per_s1", 8), ("gpus_per_node", 8))}
    return {"topology": TopologySpec(mix=mix, **counts)}


def _section(raw: Any, name: str, keys: set[str], problems: list[str]) -> Mapping[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"simulation.{name}: must be a mapping")
        return None
    problems.extend(f"simulation.{name}.{k}: unknown key" for k in sorted(set(raw) - keys))
    return raw


def _diurnal(raw: Any, problems: list[str]) -> dict[str, Any]:
    node = _section(raw, "diurnal", {"peak_rps", "start_hour", "profile", "order"}, problems)
    if node is None:
        return {}
    w = "simulation.diurnal"
    profile = node.get("profile", list(DEFAULT_PROFILE))
    if (not isinstance(profile, list) or len(profile) < 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in profile)
            or max(profile) <= 0):
        problems.append(f"{w}.profile: must be a list of >= 2 non-negative numbers, one positive")
        profile = list(DEFAULT_PROFILE)
    order = node.get("order", "keep")
    if order not in ORDERS:
        problems.append(f"{w}.order: must be one of {', '.join(ORDERS)}, got {order!r}")
        order = "keep"
    return {"diurnal": DiurnalSettings(order=order,
        peak_rps=_num(node, "peak_rps", 20.0, problems, lo=1e-6, where=w),
        start_hour=_num(node, "start_hour", 0.0, problems, lo=0, hi=24, where=w),
        profile=tuple(float(x) for x in profile))}


def _sizes(raw: Any, problems: list[str]) -> dict[str, Any]:
    node = _section(raw, "sizes", {"prompt_mean", "output_mean", "spread_ratio"}, problems)
    if node is None:
        return {}
    w = "simulation.sizes"
    return {"sizes": SizeSettings(
        prompt_mean=int(_num(node, "prompt_mean", 1000, problems, lo=1, where=w)),
        output_mean=int(_num(node, "output_mean", 200, problems, lo=1, where=w)),
        spread_ratio=_num(node, "spread_ratio", 0.25, problems, lo=0, hi=0.99, where=w))}


def _initial(raw: Any, problems: list[str]) -> dict[str, Any]:
    node = _section(raw, "initial", {"prefill", "decode"}, problems)
    if node is None:
        return {}
    w = "simulation.initial"
    return {"initial": (int(_num(node, "prefill", 1, problems, lo=1, where=w)),
                        int(_num(node, "decode", 1, problems, lo=1, where=w)))}


def _pressure(raw: Any, problems: list[str]) -> dict[str, Any]:
    node = _section(raw, "pressure", {"instances", "low_prefill", "high_prefill", "duration_s",
                                      "iterations", "margin"}, problems)
    if node is None:
        return {}
    w = "simulation.pressure"
    d = PressureSettings()
    out: dict[str, Any] = {
        "pressure": PressureSettings(
            duration_s=_num(node, "duration_s", d.duration_s, problems, lo=60, where=w),
            iterations=int(_num(node, "iterations", d.iterations, problems, lo=1, hi=30, where=w)),
            margin=_num(node, "margin", d.margin, problems, lo=0.05, hi=1, where=w),
            warmup_s=min(d.warmup_s, _num(node, "duration_s", d.duration_s, problems, lo=60, where=w) / 4)),
        "pressure_instances": int(_num(node, "instances", 16, problems, lo=2, where=w)),
    }
    for key in ("low_prefill", "high_prefill"):
        if key in node:
            out[f"pressure_{key}"] = int(_num(node, key, 1, problems, lo=1, where=w))
    return out


def _baselines(raw: Any, problems: list[str]) -> dict[str, Any]:
    parsed = parse_baselines(raw, problems)
    return {} if parsed is None else {"baselines": parsed}
