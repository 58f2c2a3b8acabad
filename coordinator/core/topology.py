"""The cluster's GPU resource view, built from Kubernetes Node and Pod objects (pure).

This module owns the first step of the placement cycle (PAPER.md §3.5 "topology
discovery"): turning ``kubectl get nodes -o yaml`` (and, optionally, the bound pods)
into a :class:`ClusterView` the placement code can reserve against. It reads plain
dicts, exactly as the API server serialises them, so the live coordinator, the
``heteroscale place`` tool, the simulator and the tests all share it; it never talks
to Kubernetes itself.

Per node it keeps the GPU type (label ``nvidia.com/gpu.product`` by default), the
S1 and S2 switch it hangs under (``heteroscale.io/s1``, ``heteroscale.io/s2``), and
the free GPUs: allocatable ``nvidia.com/gpu`` minus what bound, non-terminated pods
request. Label keys and the resource name are configurable (:class:`TopologyKeys`).
A node is left out, with the reason kept in ``ClusterView.excluded``, when it is
cordoned (``spec.unschedulable``), not Ready, has no allocatable GPUs, or lacks one of
the labels.

RDMA subgroup tiers (PAPER.md §3.3) say how valuable a node's pool is:

* ``low``    – the node's S2 holds one GPU type only (S2 homogeneous subgroup);
* ``medium`` – the S2 holds several GPU types but the node's S1 is uniform
  (S2 heterogeneous subgroup: e.g. prefill on one S1, decode on another);
* ``high``   – the node's S1 itself mixes GPU types (S1 heterogeneous subgroup, the
  only place where a heterogeneous P/D pair shares one S1 switch).

Every node falls in exactly one tier; a domain's tier is the highest tier among its
nodes. S1 switch names are only assumed unique inside their S2, so an S1 domain is
identified by the pair ``(s2, s1)``.

Limits: taints, tolerations and node selectors other than the topology labels are
not modelled (the Kubernetes scheduler still enforces them when it binds); GPUs are
counted as whole devices (no MIG slices, no fractional sharing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from heteroscale.errors import ConfigError

TIERS = ("low", "medium", "high")
TIER_VALUE = {"low": 0, "medium": 1, "high": 2}  # higher = scarcer; consume lowest first

DEFAULT_GPU_TYPE_LABEL = "nvidia.com/gpu.product"
DEFAULT_S1_LABEL = "heteroscale.io/s1"
DEFAULT_S2_LABEL = "heteroscale.io/s2"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

TERMINATED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class TopologyKeys:
    """Where the topology lives on a Node.

    ``gpu_type_label``: node label whose value names the GPU model (NVIDIA GPU feature
    discovery sets ``nvidia.com/gpu.product``, e.g. ``NVIDIA-H20``).
    ``s1_label`` / ``s2_label``: node labels naming the S1 (mini-pod) and S2 (big-pod)
    switches; the operator (or a topology discoverer) sets them.
    ``gpu_resource``: the extended resource counted in ``status.allocatable`` and in pod
    requests.
    """

    gpu_type_label: str = DEFAULT_GPU_TYPE_LABEL
    s1_label: str = DEFAULT_S1_LABEL
    s2_label: str = DEFAULT_S2_LABEL
    gpu_resource: str = DEFAULT_GPU_RESOURCE

    def __post_init__(self) -> None:
        problems = [f"{name} must be a non-empty string"
                    for name in ("gpu_type_label", "s1_label", "s2_label", "gpu_resource")
                    if not isinstance(getattr(self, name), str) or not getattr(self, name)]
        labels = (self.gpu_type_label, self.s1_label, self.s2_label)
        if not problems and len(set(labels)) != len(labels):
            # one label cannot name both a switch and a GPU model, or both switch levels
            problems.append(f"the GPU-type, S1 and S2 labels must be three different labels, got {labels}")
        if problems:
            raise ConfigError(problems, source="topology keys")


@dataclass(frozen=True)
class NodeView:
    """One schedulable GPU node: where it is, what it has, what is still free."""

    name: str
    gpu_type: str
    s1: str
    s2: str
    allocatable_gpus: int
    free_gpus: int
    tier: str = "low"

    @property
    def s1_key(self) -> tuple[str, str]:
        return (self.s2, self.s1)


@dataclass(frozen=True)
class ClusterView:
    """The resource tree for one cycle: nodes (with tiers) and the nodes left out, with why."""

    nodes: tuple[NodeView, ...]
    excluded: tuple[tuple[str, str], ...] = ()
    keys: TopologyKeys = field(default_factory=TopologyKeys)

    def node(self, name: str) -> NodeView | None:
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    def s2_tiers(self) -> dict[str, str]:
        """The tier of each S2 domain: the highest tier among its nodes."""
        return _max_tiers((n.s2, n.tier) for n in self.nodes)

    def s1_tiers(self) -> dict[tuple[str, str], str]:
        """The tier of each S1 domain ``(s2, s1)``."""
        return _max_tiers((n.s1_key, n.tier) for n in self.nodes)

    def total_free_gpus(self) -> int:
        return sum(n.free_gpus for n in self.nodes)


def _max_tiers(pairs: Iterable[tuple[Any, str]]) -> dict[Any, str]:
    out: dict[Any, str] = {}
    for key, tier in pairs:
        if key not in out or TIER_VALUE[tier] > TIER_VALUE[out[key]]:
            out[key] = tier
    return out


# ---------------------------------------------------------------- quantities


def parse_count(value: Any) -> int:
    """A whole-device Kubernetes quantity (``8``, ``"8"``, ``"8000m"``) as an int.

    Raises ``ValueError`` for anything else: extended resources like GPUs are whole
    numbers, and guessing at ``"1.5"`` would over-allocate.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a GPU count: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative GPU count: {value}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("m") and text[:-1].isdigit():
            milli = int(text[:-1])
            if milli % 1000 == 0:
                return milli // 1000
        elif text.isdigit():
            return int(text)
    raise ValueError(f"not a whole GPU count: {value!r}")


def pod_gpu_request(pod: Mapping[str, Any], resource: str = DEFAULT_GPU_RESOURCE) -> int:
    """GPUs a pod holds on its node: the larger of the containers' sum and any init
    container's request (the scheduler's rule). For extended resources a missing
    request defaults to the limit."""
    spec = pod.get("spec") or {}

    def one(container: Mapping[str, Any]) -> int:
        res = container.get("resources") or {}
        value = (res.get("requests") or {}).get(resource)
        if value is None:
            value = (res.get("limits") or {}).get(resource)
        return parse_count(value) if value is not None else 0

    main = sum(one(c) for c in spec.get("containers") or ())
    init = max((one(c) for c in spec.get("initContainers") or ()), default=0)
    return max(main, init)


def gpus_in_use(pods: Iterable[Mapping[str, Any]], resource: str = DEFAULT_GPU_RESOURCE) -> dict[str, int]:
    """GPUs requested per node by bound pods that have not terminated."""
    used: dict[str, int] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase in TERMINATED_PHASES:
            continue
        used[node] = used.get(node, 0) + pod_gpu_request(pod, resource)
    return used


# ---------------------------------------------------------------- nodes


def _is_ready(node: Mapping[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or ():
        if cond.get("type") == "Ready":
            return str(cond.get("status")) == "True"
    return False


def _exclusion(node: Mapping[str, Any], keys: TopologyKeys) -> str | None:
    labels = (node.get("metadata") or {}).get("labels") or {}
    if (node.get("spec") or {}).get("unschedulable"):
        return "cordoned"
    if not _is_ready(node):
        return "not Ready"
    for key in (keys.gpu_type_label, keys.s1_label, keys.s2_label):
        if not labels.get(key):
            return f"no label {key}"
    return None


def classify_tiers(nodes: Iterable[NodeView]) -> tuple[NodeView, ...]:
    """Give each node its RDMA subgroup tier (see the module docstring)."""
    listed = tuple(nodes)
    s1_types: dict[tuple[str, str], set[str]] = {}
    s2_types: dict[str, set[str]] = {}
    for node in listed:
        s1_types.setdefault(node.s1_key, set()).add(node.gpu_type)
        s2_types.setdefault(node.s2, set()).add(node.gpu_type)
    out = []
    for node in listed:
        if len(s1_types[node.s1_key]) > 1:
            tier = "high"
        elif len(s2_types[node.s2]) > 1:
            tier = "medium"
        else:
            tier = "low"
        out.append(NodeView(node.name, node.gpu_type, node.s1, node.s2,
                            node.allocatable_gpus, node.free_gpus, tier))
    return tuple(out)


def build_view(nodes: Iterable[Mapping[str, Any]], *, pods: Iterable[Mapping[str, Any]] = (),
               keys: TopologyKeys | None = None,
               reserved: Mapping[str, int] | None = None) -> ClusterView:
    """Build the resource view from Node objects (and the pods bound to them).

    ``nodes``: Node objects as dicts (``items`` of a NodeList). ``pods``: Pod objects;
    bound non-terminated pods' GPU requests are subtracted. ``reserved``: extra GPUs
    per node to treat as taken (e.g. instances the caller knows are placed there but
    whose pods are not listed). Tiers are classified over the schedulable nodes only:
    a cordoned node does not make its S1 heterogeneous.

    Raises ``ValueError`` on a malformed node (no name, bad GPU quantity): a view
    built from garbage must not be acted on.
    """
    keys = keys or TopologyKeys()
    used = gpus_in_use(pods, keys.gpu_resource)
    for name, count in (reserved or {}).items():
        used[name] = used.get(name, 0) + count
    kept: list[NodeView] = []
    excluded: list[tuple[str, str]] = []
    seen: set[str] = set()
    for node in nodes:
        if not isinstance(node, Mapping):
            raise ValueError(f"a node must be a mapping, got {type(node).__name__}")
        name = (node.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("a node has no metadata.name")
        if name in seen:
            raise ValueError(f"node {name} is listed twice")
        seen.add(name)
        allocatable = ((node.get("status") or {}).get("allocatable") or {}).get(keys.gpu_resource)
        try:
            gpus = parse_count(allocatable) if allocatable is not None else 0
        except ValueError as exc:
            raise ValueError(f"node {name}: {keys.gpu_resource}: {exc}") from exc
        reason = _exclusion(node, keys)
        if reason is None and gpus == 0:
            reason = f"no allocatable {keys.gpu_resource}"
        if reason is not None:
            excluded.append((name, reason))
            continue
        labels = node["metadata"]["labels"]
        kept.append(NodeView(name=name, gpu_type=str(labels[keys.gpu_type_label]),
                             s1=str(labels[keys.s1_label]), s2=str(labels[keys.s2_label]),
                             allocatable_gpus=gpus, free_gpus=max(0, gpus - used.get(name, 0))))
    kept.sort(key=lambda n: n.name)
    return ClusterView(nodes=classify_tiers(kept), excluded=tuple(excluded), keys=keys)


def nodes_from_document(doc: Any) -> list[Mapping[str, Any]]:
    """The Node objects of a parsed ``kubectl get nodes -o yaml`` document.

    Accepts a ``NodeList``/``List`` (``items``), a single ``Node``, or a plain list.
    Raises ``ValueError`` when the document is neither.
    """
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, Mapping) and isinstance(doc.get("items"), list):
        items = doc["items"]
    elif isinstance(doc, Mapping) and doc.get("kind") == "Node":
        items = [doc]
    else:
        raise ValueError("expected a NodeList (kubectl get nodes -o yaml), a Node, or a list of Nodes")
    for item in items:
        if not isinstance(item, Mapping):
            raise ValueError("every item of the NodeList must be a Node object")
        kind = item.get("kind")
        if kind not in (None, "Node"):
            raise ValueError(f"expected Node items, found kind {kind!r}")
    return list(items)
