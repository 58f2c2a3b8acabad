"""``heteroscale place``: show where placement would put a service's instances (an operator's tool).

    heteroscale place --nodes NODES.yaml --config CONFIG --service NAME --prefill P --decode D
                      [--pods PODS.yaml] [--state FILE] [--output text|json]

It reads a NodeList exactly as ``kubectl get nodes -o yaml`` prints it, the coordinator
config (for the service's priority, affinity, P:D ratio and per-role GPU types), and
optionally the service's current Deployment Groups (``--state``: YAML or JSON, a list of
groups or ``{groups: [...]}``, in the shape ``DeploymentGroup.to_dict`` writes, as
``--output json`` prints under ``groups``). It then runs the very same
``topology.build_view`` + ``placement.plan`` the live coordinator runs and prints the
allocations that would bring the service to P prefill and D decode instances: for each,
role, node, s1, s2, gpu_type, tier, dg, count and why; the releases on scale-in; and
any shortfall. It changes nothing anywhere.

Free GPUs: node ``allocatable`` minus, with ``--pods`` (``kubectl get pods -A -o yaml``),
the requests of bound live pods; without ``--pods``, minus the instances the state file
pins to nodes (``nodes:`` of each group role). Exit status 0 when a plan was printed
(even with a shortfall, which is printed); 2 on bad input, with one line naming it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from heteroscale.coordinator.config import read_config, read_text
from heteroscale.coordinator.core.placement import DeploymentGroup, PlacementPlan, demand_from_service, plan
from heteroscale.coordinator.core.topology import (
    DEFAULT_GPU_RESOURCE, DEFAULT_GPU_TYPE_LABEL, DEFAULT_S1_LABEL, DEFAULT_S2_LABEL, ClusterView,
    TopologyKeys, build_view, nodes_from_document)
from heteroscale.coordinator.core.types import PoolCounts
from heteroscale.errors import ConfigError, UsageError

COLUMNS = ("role", "node", "s1", "s2", "gpu_type", "tier", "dg", "count", "why")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", required=True, metavar="NODES.yaml",
                        help="a NodeList as 'kubectl get nodes -o yaml' prints it")
    parser.add_argument("--config", required=True, metavar="CONFIG", help="coordinator config (YAML)")
    parser.add_argument("--service", required=True, metavar="NAME", help="a service of the config")
    parser.add_argument("--prefill", required=True, type=_count, metavar="P", help="desired prefill instances")
    parser.add_argument("--decode", required=True, type=_count, metavar="D", help="desired decode instances")
    parser.add_argument("--state", metavar="FILE", help="the service's current Deployment Groups (YAML/JSON)")
    parser.add_argument("--pods", metavar="PODS.yaml",
                        help="a PodList ('kubectl get pods -A -o yaml'): GPUs of bound pods are taken")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.add_argument("--gpu-type-label", default=DEFAULT_GPU_TYPE_LABEL, metavar="KEY")
    parser.add_argument("--s1-label", default=DEFAULT_S1_LABEL, metavar="KEY")
    parser.add_argument("--s2-label", default=DEFAULT_S2_LABEL, metavar="KEY")
    parser.add_argument("--gpu-resource", default=DEFAULT_GPU_RESOURCE, metavar="NAME")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def _read_yaml(path: str, what: str) -> Any:
    text = read_text(path, what=what)
    try:
        return yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path}: not valid YAML{where}") from None


def _read_state(path: str, service: str) -> list[DeploymentGroup]:
    doc = _read_yaml(path, "state")
    if isinstance(doc, dict) and "groups" in doc:
        doc = doc["groups"]
    if isinstance(doc, dict) and service in doc:
        doc = doc[service]  # the "groups" mapping of a full --output json
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise UsageError(f"{path}: expected a list of deployment groups (or {{groups: [...]}})")
    groups = []
    for i, item in enumerate(doc):
        try:
            dg = DeploymentGroup.from_dict(item, service=service)
        except ValueError as exc:
            raise UsageError(f"{path}: groups[{i}]: {exc}") from None
        if dg.service != service:
            continue
        groups.append(dg)
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise UsageError(f"{path}: a deployment group name appears twice")
    return groups


def _pinned(groups: list[DeploymentGroup], gpus: dict[str, int]) -> dict[str, int]:
    used: dict[str, int] = {}
    for dg in groups:
        for role in ("prefill", "decode"):
            for node, count in dg.role(role).nodes.items():
                used[node] = used.get(node, 0) + count * gpus[role]
    return used


def build_plan(args: argparse.Namespace) -> tuple[ClusterView, PlacementPlan, Any, list[DeploymentGroup]]:
    """Everything but the printing; raises ``UsageError`` for any bad input."""
    config = read_config(args.config)
    try:
        service = config.service(args.service)
    except KeyError:
        names = ", ".join(s.name for s in config.services)
        raise UsageError(f"no service {args.service!r} in {args.config} (services: {names})") from None
    try:
        keys = TopologyKeys(gpu_type_label=args.gpu_type_label, s1_label=args.s1_label,
                            s2_label=args.s2_label, gpu_resource=args.gpu_resource)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source="--gpu-type-label/--s1-label/--s2-label") from None
    try:
        nodes = nodes_from_document(_read_yaml(args.nodes, "nodes"))
    except ValueError as exc:
        raise UsageError(f"{args.nodes}: {exc}") from None
    groups = _read_state(args.state, service.name) if args.state else []
    pods: list[Any] = []
    if args.pods:
        doc = _read_yaml(args.pods, "pods")
        pods = doc.get("items") if isinstance(doc, dict) else doc
        if not isinstance(pods, list) or not all(isinstance(p, dict) for p in pods):
            raise UsageError(f"{args.pods}: expected a PodList ('kubectl get pods -A -o yaml')")
    gpus = {"prefill": service.prefill.gpus_per_instance, "decode": service.decode.gpus_per_instance}
    try:
        view = build_view(nodes, pods=pods, keys=keys,
                          reserved=None if args.pods else _pinned(groups, gpus))
        demand = demand_from_service(service, cluster_types={n.gpu_type for n in view.nodes})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    result = plan(view=view, services=[demand], current={service.name: groups},
                  desired={service.name: PoolCounts(args.prefill, args.decode)})
    return view, result, service, groups


def run(args: argparse.Namespace) -> int:
    view, result, service, groups = build_plan(args)
    before = PoolCounts(sum(g.prefill.count for g in groups), sum(g.decode.count for g in groups))
    if args.output == "json":
        print(json.dumps(_as_json(view, result, service, before), indent=2))
    else:
        print(_as_text(view, result, service, before))
    return 0


def _as_json(view: ClusterView, result: PlacementPlan, service: Any, before: PoolCounts) -> dict[str, Any]:
    name = service.name
    short = result.shortfall.get(name, PoolCounts(0, 0))
    unrel = result.unreleased.get(name, PoolCounts(0, 0))
    return {
        "service": name,
        "affinity": service.affinity,
        "pd_ratio": f"{service.pd_ratio[0]}:{service.pd_ratio[1]}",
        "current": before.as_dict(),
        "placed": result.placed(name).as_dict(),
        "allocations": [{k: a.to_dict()[k] for k in COLUMNS} | {"gpus": a.gpus, "new_dg": a.new_dg}
                        for a in result.allocations],
        "releases": [r.to_dict() for r in result.releases],
        "shortfall": short.as_dict(),
        "unreleased": unrel.as_dict(),
        "groups": [g.to_dict() for g in result.groups.get(name, ())],
        "reasons": list(result.reasons.get(name, ())),
        "excluded_nodes": [{"node": n, "reason": r} for n, r in view.excluded],
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]


def _as_text(view: ClusterView, result: PlacementPlan, service: Any, before: PoolCounts) -> str:
    name = service.name
    placed = result.placed(name)
    lines = [f"service {name}: {before.prefill}P/{before.decode}D -> {placed.prefill}P/{placed.decode}D "
             f"(pd_ratio {service.pd_ratio[0]}:{service.pd_ratio[1]}, affinity {service.affinity}); "
             f"{len(view.nodes)} candidate nodes, {view.total_free_gpus()} free GPUs"]
    if result.allocations:
        rows = [[c.upper() for c in COLUMNS]]
        rows += [[str(a.to_dict()[c]) for c in COLUMNS] for a in result.allocations]
        lines += ["allocations:"] + ["  " + line for line in _table(rows)]
    else:
        lines.append("allocations: none")
    if result.releases:
        rows = [["ROLE", "DG", "COUNT", "TIER", "WHY"]]
        rows += [[r.role, r.dg, str(r.count), r.tier, r.why] for r in result.releases]
        lines += ["releases:"] + ["  " + line for line in _table(rows)]
    short = result.shortfall.get(name)
    lines.append(f"shortfall: {short.prefill} prefill, {short.decode} decode" if short else "shortfall: none")
    unrel = result.unreleased.get(name)
    if unrel:
        lines.append(f"not removed: {unrel.prefill} prefill, {unrel.decode} decode")
    lines += [f"note: {text}" for text in result.reasons.get(name, ())]
    for node, reason in view.excluded:
        lines.append(f"skipped node {node}: {reason}")
    return "\n".join(lines)
