"""The resource view from Node objects: free GPUs, exclusions and RDMA subgroup tiers."""

from __future__ import annotations

import pytest
import yaml

from heteroscale.coordinator.core.topology import (
    TopologyKeys, build_view, gpus_in_use, nodes_from_document, parse_count, pod_gpu_request)


def node(name: str, gpu_type: str, s1: str, s2: str, *, gpus: object = "8", ready: str = "True",
         cordoned: bool = False, labels: dict | None = None) -> dict:
    base = {"nvidia.com/gpu.product": gpu_type, "heteroscale.io/s1": s1, "heteroscale.io/s2": s2}
    return {"metadata": {"name": name, "labels": labels if labels is not None else base},
            "spec": {"unschedulable": True} if cordoned else {},
            "status": {"allocatable": {"nvidia.com/gpu": gpus},
                       "conditions": [{"type": "MemoryPressure", "status": "False"},
                                      {"type": "Ready", "status": ready}]}}


def pod(node_name: str | None, gpus: object, *, phase: str = "Running", init: object = None,
        limits_only: bool = False) -> dict:
    res = {"limits": {"nvidia.com/gpu": gpus}} if limits_only else {"requests": {"nvidia.com/gpu": gpus}}
    spec: dict = {"containers": [{"name": "engine", "resources": res}, {"name": "sidecar"}]}
    if node_name:
        spec["nodeName"] = node_name
    if init is not None:
        spec["initContainers"] = [{"name": "warm", "resources": {"requests": {"nvidia.com/gpu": init}}}]
    return {"metadata": {"name": "p"}, "spec": spec, "status": {"phase": phase}}


def test_tiers_worked_example(data_dir):
    # s2-homo: only H20 -> low; s2-het: L20 S1 + H20 S1 -> medium; S1 "mix": L20+H20 -> high.
    doc = yaml.safe_load((data_dir / "nodes_tiers.yaml").read_text())
    view = build_view(nodes_from_document(doc))
    tiers = {n.name: n.tier for n in view.nodes}
    assert tiers["homo-a-h20-0"] == "low" and tiers["homo-b-h20-1"] == "low"
    assert tiers["het-l20-0"] == "medium" and tiers["het-h20-1"] == "medium"
    assert tiers["mix-l20-0"] == "high" and tiers["mix-h20-0"] == "high"
    assert view.s2_tiers() == {"s2-homo": "low", "s2-het": "medium", "s2-mix": "high"}
    assert view.s1_tiers()[("s2-het", "het-l20")] == "medium"
    assert dict(view.excluded) == {"homo-a-h20-cordoned": "cordoned", "mix-l40s-notready": "not Ready",
                                   "cpu-0": "no label nvidia.com/gpu.product"}
    # 4 homo + 4 het + 2 mix = 10 GPU nodes of 8 GPUs each are candidates
    assert len(view.nodes) == 10 and view.total_free_gpus() == 80


def test_s2_with_a_mixed_s1_and_uniform_s1s():
    # One S2: S1 "x" mixes types (high); S1 "y" is uniform but its S2 is mixed (medium).
    view = build_view([node("x1", "A", "x", "S"), node("x2", "B", "x", "S"), node("y1", "A", "y", "S")])
    assert {n.name: n.tier for n in view.nodes} == {"x1": "high", "x2": "high", "y1": "medium"}
    assert view.s2_tiers() == {"S": "high"}


def test_same_s1_name_under_two_s2s_is_two_domains():
    view = build_view([node("a", "A", "r1", "S"), node("b", "B", "r1", "T")])
    assert {n.name: n.tier for n in view.nodes} == {"a": "low", "b": "low"}


def test_excluded_nodes_do_not_change_tiers():
    # The NotReady B node would make S1 "x" mixed; it is not a candidate, so x stays low.
    view = build_view([node("x1", "A", "x", "S"), node("x2", "B", "x", "S", ready="False")])
    assert [(n.name, n.tier) for n in view.nodes] == [("x1", "low")]
    assert view.excluded == (("x2", "not Ready"),)


def test_free_gpus_subtract_bound_live_pods():
    nodes = [node("n1", "A", "x", "S"), node("n2", "A", "x", "S")]
    pods = [pod("n1", "2"), pod("n1", 1), pod("n1", "4", phase="Succeeded"),   # terminated: ignored
            pod(None, "8", phase="Pending"),                                    # unbound: ignored
            pod("n2", 3, limits_only=True),                                     # request defaults to limit
            pod("n2", 1, init=4)]                                               # init 4 > containers 1
    view = build_view(nodes, pods=pods)
    # n1: 8 - 2 - 1 = 5; n2: 8 - 3 - 4 = 1
    assert {n.name: n.free_gpus for n in view.nodes} == {"n1": 5, "n2": 1}
    assert gpus_in_use(pods) == {"n1": 3, "n2": 7}


def test_overcommitted_node_has_zero_free_not_negative():
    view = build_view([node("n1", "A", "x", "S", gpus="2")], pods=[pod("n1", 3)])
    assert view.nodes[0].free_gpus == 0


def test_reserved_adds_to_used():
    view = build_view([node("n1", "A", "x", "S")], reserved={"n1": 6})
    assert view.nodes[0].free_gpus == 2


def test_custom_keys():
    keys = TopologyKeys(gpu_type_label="gpu", s1_label="leaf", s2_label="spine", gpu_resource="amd.com/gpu")
    raw = node("n1", "", "", "", labels={"gpu": "MI300X", "leaf": "l1", "spine": "sp1"})
    raw["status"]["allocatable"] = {"amd.com/gpu": "8", "nvidia.com/gpu": "0"}
    view = build_view([raw], keys=keys)
    assert (view.nodes[0].gpu_type, view.nodes[0].s1, view.nodes[0].s2, view.nodes[0].free_gpus) == \
        ("MI300X", "l1", "sp1", 8)
    # with the default keys the same node has none of the labels
    assert build_view([raw]).excluded == (("n1", "no label nvidia.com/gpu.product"),)


def test_zero_gpu_and_missing_ready_condition_are_excluded():
    no_ready = node("n2", "A", "x", "S")
    no_ready["status"]["conditions"] = []
    view = build_view([node("n1", "A", "x", "S", gpus="0"), no_ready])
    assert dict(view.excluded) == {"n1": "no allocatable nvidia.com/gpu", "n2": "not Ready"}


@pytest.mark.parametrize("value,expected", [(8, 8), ("8", 8), ("8000m", 8), (" 4 ", 4), (0, 0)])
def test_parse_count(value, expected):
    assert parse_count(value) == expected


@pytest.mark.parametrize("value", ["1.5", "500m", "-1", -1, True, None, "eight", "1Ki"])
def test_parse_count_rejects(value):
    with pytest.raises(ValueError):
        parse_count(value)


def test_bad_nodes_raise():
    with pytest.raises(ValueError, match="twice"):
        build_view([node("n", "A", "x", "S"), node("n", "A", "x", "S")])
    with pytest.raises(ValueError, match="n: nvidia.com/gpu"):
        build_view([node("n", "A", "x", "S", gpus="lots")])
    with pytest.raises(ValueError, match="metadata.name"):
        build_view([{"metadata": {}}])


def test_nodes_from_document_shapes():
    one = node("n", "A", "x", "S") | {"kind": "Node"}
    assert nodes_from_document({"kind": "NodeList", "items": [one]}) == [one]
    assert nodes_from_document(one) == [one]
    assert nodes_from_document([one]) == [one]
    for bad in ({"kind": "PodList", "items": [{"kind": "Pod"}]}, "text", {"kind": "Pod"}, {"items": ["x"]}):
        with pytest.raises(ValueError):
            nodes_from_document(bad)


def test_pod_gpu_request_without_resources():
    assert pod_gpu_request({"spec": {"containers": [{"name": "c"}]}}) == 0
