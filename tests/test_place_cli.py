"""``heteroscale place`` as a user runs it: a real subprocess, real YAML files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
coordinator: {backend: kubernetes}
services:
  - name: chat
    priority: 10
    affinity: s2
    pd_ratio: "9:7"
    target_decode_tps_per_instance: 1000
    slo: {tbt_s: 0.1}
    prefill: {deployment: chat-prefill, gpu_types: [NVIDIA-L20, NVIDIA-H20], gpus_per_instance: 1}
    decode:  {deployment: chat-decode, gpu_types: [NVIDIA-H20], gpus_per_instance: 1}
  - name: batch
    affinity: s1
    pd_ratio: "1:1"
    target_decode_tps_per_instance: 500
    slo: {tbt_s: 0.2}
    prefill: {deployment: batch-prefill, gpus_per_instance: 2}
    decode:  {deployment: batch-decode, gpus_per_instance: 2}
"""


def place(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heteroscale", "place", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def files(tmp_path, data_dir):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    return {"nodes": str(data_dir / "nodes_tiers.yaml"), "config": str(cfg), "tmp": tmp_path}


def base(files, service="chat", p="9", d="7"):
    return ["--nodes", files["nodes"], "--config", files["config"], "--service", service,
            "--prefill", p, "--decode", d]


def test_text_output_lists_allocations_and_skipped_nodes(files):
    proc = place(*base(files))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("service chat: 0P/0D -> 9P/7D (pd_ratio 9:7, affinity s2)")
    assert "ROLE" in out and "TIER" in out and "WHY" in out
    # heterogeneous P/D in one S2: the medium-tier s2-het, L20 prefill, H20 decode
    assert "het-l20-0" in out and "NVIDIA-L20" in out and "medium" in out
    assert "mix-" not in out.split("shortfall")[0]
    assert "shortfall: none" in out
    assert "skipped node homo-a-h20-cordoned: cordoned" in out


def test_json_output_and_state_round_trip(files):
    proc = place(*base(files, p="18", d="14"), "--output", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["placed"] == {"prefill": 18, "decode": 14} and doc["shortfall"] == {"prefill": 0, "decode": 0}
    for alloc in doc["allocations"]:
        assert set(alloc) >= {"role", "node", "s1", "s2", "gpu_type", "tier", "dg", "count", "why"}
    # 16 L20 in s2-het fill first; the rest of the L20 prefill goes to the high-tier s2-mix
    tiers = {(a["dg"], a["tier"]) for a in doc["allocations"]}
    assert tiers == {("chat-g0", "medium"), ("chat-g1", "high")}
    # feed the output back as --state and scale in: the high-tier DG goes first
    state = files["tmp"] / "state.json"
    state.write_text(proc.stdout)
    proc = place(*base(files, p="16", d="13"), "--state", str(state), "--output", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["current"] == {"prefill": 18, "decode": 14}
    assert {(r["dg"], r["delete_dg"]) for r in doc["releases"]} == {("chat-g1", True)}
    assert [g["name"] for g in doc["groups"]] == ["chat-g0"]


def test_state_pins_capacity_without_pods(files):
    # A state whose group holds all 16 L20 GPUs of s2-het: new prefill must go elsewhere.
    state = files["tmp"] / "state.yaml"
    state.write_text(yaml.safe_dump({"groups": [{
        "name": "chat-g0", "level": "s2", "s2": "s2-het",
        "prefill": {"gpu_type": "NVIDIA-L20", "count": 16, "nodes": {"het-l20-0": 8, "het-l20-1": 8}},
        "decode": {"gpu_type": "NVIDIA-H20", "count": 1, "nodes": {"het-h20-0": 1}}}]}))
    proc = place(*base(files, p="17", d="2"), "--state", str(state), "--output", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert all(a["node"] not in ("het-l20-0", "het-l20-1") for a in doc["allocations"])
    assert doc["placed"] == {"prefill": 17, "decode": 2}


def test_pods_file_takes_gpus(files):
    pods = files["tmp"] / "pods.yaml"
    items = [{"kind": "Pod", "metadata": {"name": f"x{i}", "namespace": "default"},
              "spec": {"nodeName": n, "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
              "status": {"phase": "Running"}} for i, n in enumerate(["het-l20-0", "het-l20-1", "mix-l20-0"])]
    pods.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    proc = place(*base(files, p="2", d="2"), "--pods", str(pods), "--output", "json")
    doc = json.loads(proc.stdout)
    # every L20 is busy: prefill falls back to H20, in the low-tier all-H20 S2
    assert {(a["gpu_type"], a["tier"]) for a in doc["allocations"]} == {("NVIDIA-H20", "low")}


def test_shortfall_is_printed(files):
    proc = place(*base(files, service="batch", p="30", d="30"))
    assert proc.returncode == 0, proc.stderr
    # s1 affinity, any GPU type, 2 GPUs per instance: the biggest S1s hold 16 GPUs = 8 instances
    assert "shortfall: " in proc.stdout and "shortfall: none" not in proc.stdout
    assert "note: shortfall" in proc.stdout


def test_gpu_types_that_match_no_node_are_named(files, tmp_path):
    # "H20" instead of the label value "NVIDIA-H20": the note names the cause, not "no room".
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(CONFIG.replace("NVIDIA-H20", "H20").replace("NVIDIA-L20", "L20"))
    proc = place("--nodes", files["nodes"], "--config", str(cfg), "--service", "chat",
                 "--prefill", "2", "--decode", "1")
    assert proc.returncode == 0, proc.stderr
    assert "no schedulable node has a decode GPU type H20 (types present:" in proc.stdout
    assert "NVIDIA-H20" in proc.stdout.split("types present:")[1]


@pytest.mark.parametrize("change,message", [
    ({"--service": "nope"}, "no service 'nope'"),
    ({"--nodes": "/nonexistent/nodes.yaml"}, "no such nodes file"),
    ({"--prefill": "-1"}, "--prefill"),
    ({"--decode": "many"}, "--decode"),
    ({"--config": "/nonexistent/c.yaml"}, "no such config file"),
])
def test_bad_input_one_line_exit_2(files, change, message):
    args = base(files)
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    proc = place(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("content,message", [
    ("kind: PodList\nitems: [{kind: Pod}]\n", "expected Node items"),
    ("items: [{metadata: {name: a}, status: {allocatable: {nvidia.com/gpu: '1.5'}}}]", "not a whole GPU count"),
    ("{{{ not yaml", "not valid YAML"),
    ("just text", "expected a NodeList"),
])
def test_bad_nodes_file(files, content, message):
    bad = files["tmp"] / "nodes.yaml"
    bad.write_text(content)
    args = base(files)
    args[args.index("--nodes") + 1] = str(bad)
    proc = place(*args)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content,message", [
    ("groups: [{name: g, level: s2, prefill: {gpu_type: A, count: 1}, decode: {gpu_type: A, count: 1}}]",
     "needs s2"),
    ("groups: 5", "expected a list"),
])
def test_bad_state_file(files, content, message):
    bad = files["tmp"] / "state.yaml"
    bad.write_text(content)
    proc = place(*base(files), "--state", str(bad))
    assert proc.returncode == 2 and message in proc.stderr


def test_bad_config_is_one_line_per_problem(files):
    cfg = files["tmp"] / "bad.yaml"
    cfg.write_text("services: [{name: Chat}]\n")
    args = base(files)
    args[args.index("--config") + 1] = str(cfg)
    proc = place(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # Every problem at once, each on its own line: the name, the ratio, the target, both roles.
    assert len(lines) >= 4 and all(line.startswith(f"heteroscale place: error: {cfg}: ") for line in lines)
    assert any("services[0].name" in line for line in lines)
    assert any("services[0].pd_ratio" in line for line in lines)


def test_the_three_topology_labels_must_differ(files):
    proc = place(*base(files), "--s1-label", "example.com/switch", "--s2-label", "example.com/switch")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "heteroscale place: error: --gpu-type-label/--s1-label/--s2-label: the GPU-type, S1 and S2 labels must be "
        "three different labels, got ('nvidia.com/gpu.product', 'example.com/switch', 'example.com/switch')"]
