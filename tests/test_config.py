"""Config loading: defaults, every problem at once with its path, cross-field rules,
and ``heteroscale validate`` through the real CLI entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from heteroscale.cli import main as cli_main
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.settings import Config, LeaseConfig
from heteroscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("coordinator-*.yaml"))

MINIMAL = """
services:
  - name: chat
    pd_ratio: "9:7"
    target_decode_tps_per_instance: 2400
    slo: {tbt_s: 0.04}
    prefill: {deployment: chat-prefill}
    decode: {deployment: chat-decode}
"""


def problems_of(text_or_doc) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text_or_doc)
    return list(info.value.problems)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path):
    config = load_config(path.read_text())
    assert isinstance(config, Config) and config.services


def test_defaults_are_documented_values():
    config = load_config(MINIMAL)
    c = config.coordinator
    assert (c.interval_s, c.backend, c.dry_run, c.listen) == (5.0, "kubernetes", False, "0.0.0.0:9500")
    assert c.lease == LeaseConfig()
    assert (c.lease.duration_s, c.lease.renew_deadline_s, c.lease.retry_period_s) == (15.0, 10.0, 2.0)
    svc = config.services[0]
    assert svc.pd_ratio == (9, 7) and svc.pd_ratio_text == "9:7"
    assert (svc.min_decode, svc.max_decode, svc.namespace, svc.affinity) == (1, 64, "default", "none")
    p = svc.policy
    assert (p.tolerance.scale_out, p.tolerance.scale_in) == (0.10, 0.15)
    assert (p.scale_out_cooldown_s, p.scale_in_stabilization_s) == (30.0, 300.0)
    assert (p.max_scale_out_factor, p.max_scale_in_factor) == (2.0, 0.5)
    ln = p.latency_net
    assert (ln.moderate, ln.severe, ln.moderate_step, ln.severe_step) == (1.0, 1.2, 0.10, 0.20)
    assert svc.prefill.workload == ("Deployment", "chat-prefill")
    assert p.gpu_budget is None


def test_every_problem_is_reported_at_once_with_its_path():
    text = """
coordinator:
  backend: k8s
  interval_s: -1
  lease: {duration_s: 5, renew_deadline_s: 10, retry_period_s: 2}
  surprise: 1
services:
  - name: Chat
    pd_ratio: "9-7"
    target_decode_tps_per_instance: 0
    min_decode: 5
    max_decode: 2
    prefill: {deployment: a, statefulset: b}
    decode: {}
    policy:
      tolerance: {scale_out: 0.1, scale_in: 2, extra: 1}
      latency_net: {moderate: 1.5, severe: 1.2}
    colour: blue
"""
    problems = problems_of(text)
    expected_fragments = [
        "coordinator.backend: must be one of kubernetes, local, static",
        "coordinator.interval_s: must be > 0",
        "coordinator.lease.duration_s: must be greater than renew_deadline_s",
        "coordinator.surprise: unknown key",
        "services[0].name: must be a lowercase DNS label",
        "services[0].pd_ratio: must be \"P:D\"",
        "services[0].target_decode_tps_per_instance: must be > 0",
        "services[0].min_decode: must be <= max_decode (5 > 2)",
        "services[0].prefill: give either deployment or statefulset, not both",
        # (no "decode: backend kubernetes needs a deployment": the backend itself is invalid)
        "services[0].policy.tolerance.scale_in: must be <= 0.99",
        "services[0].policy.tolerance.extra: unknown key",
        "services[0].policy.latency_net.severe: must be >= moderate",
        "services[0].colour: unknown key",
        "services[0].slo: the latency safety net needs",
    ]
    for fragment in expected_fragments:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == len(expected_fragments)


def test_lease_timing_rule_renew_deadline_vs_retry():
    # 10 <= 1.2 * 9 = 10.8: the renew deadline does not leave room for one retry.
    problems = problems_of(MINIMAL + "coordinator: {lease: {retry_period_s: 9}}\n")
    assert problems == ["coordinator.lease.renew_deadline_s: must be greater than 1.2 x retry_period_s (10 <= 10.8)"]


@pytest.mark.parametrize("snippet,fragment", [
    ("coordinator: {collect: {timeout_s: 6}}", "coordinator.collect.timeout_s: must be shorter than interval_s"),
    ("coordinator: {listen: nowhere}", "coordinator.listen: must be HOST:PORT"),
    ("coordinator: {dry_run: 'yes'}", "coordinator.dry_run: must be true or false"),
])
def test_coordinator_field_rules(snippet, fragment):
    problems = problems_of(MINIMAL + snippet + "\n")
    assert any(fragment in p for p in problems), problems


def service_doc(**over):
    doc = {"name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 100,
           "slo": {"tbt_s": 0.05}, "prefill": {"sidecars": ["http://127.0.0.1:1/r"]},
           "decode": {"sidecars": ["http://127.0.0.1:2/r"]}}
    doc.update(over)
    return {"coordinator": {"backend": "static"}, "services": [doc]}


def test_static_backend_needs_sidecar_urls_and_checks_them():
    problems = problems_of(service_doc(prefill={}, decode={"sidecars": ["ftp://x"]}))
    assert "services[0].prefill.sidecars: backend static needs at least one sidecar report URL" in problems
    assert "services[0].decode.sidecars[0]: must be an http(s) URL, got 'ftp://x'" in problems


def test_gpu_budget_must_hold_the_minimum_pools():
    # min_decode 4 at 1:1 with 2 GPUs per instance needs 4*2 + 4*2 = 16 > 10.
    problems = problems_of(service_doc(min_decode=4, policy={"gpu_budget": 10},
                                       prefill={"sidecars": ["http://a/r"], "gpus_per_instance": 2},
                                       decode={"sidecars": ["http://b/r"], "gpus_per_instance": 2}))
    assert problems == ["services[0].policy.gpu_budget: 10 GPUs cannot hold the minimum pools (4P + 4D need 16)"]


def test_schedules_parse_and_validate():
    config = load_config(service_doc(schedules=[
        {"start": "08:30", "end": "20:00", "days": ["Mon", "fri"], "prefill": 4, "decode": 3},
        {"start": 510, "end": "09:00", "min_decode": 2},  # YAML 1.1 reads 08:30 as 510
    ]))
    first, second = config.services[0].schedules
    assert (first.start_min, first.end_min, first.days, first.fixed) == (510, 1200, (0, 4), True)
    assert (second.start_min, second.min_decode, second.fixed) == (510, 2, False)
    problems = problems_of(service_doc(schedules=[
        {"start": "25:00", "end": "09:00", "decode": 2},
        {"start": "01:00", "end": "02:00"},
        {"start": "01:00", "end": "02:00", "decode": 1, "prefill": 1, "min_decode": 1},
        {"start": "01:00", "end": "02:00", "days": ["someday"], "decode": 1, "prefill": 1},
    ]))
    assert "services[0].schedules[0].start: must be a time of day HH:MM, got '25:00'" in problems
    assert "services[0].schedules[0]: fixed counts need both prefill and decode" in problems
    assert "services[0].schedules[1]: needs fixed counts (prefill, decode) or bounds (min_decode, max_decode)" in problems
    assert any(p.startswith("services[0].schedules[2]: give either fixed counts") for p in problems)
    assert any(p.startswith("services[0].schedules[3].days: unknown day 'someday'") for p in problems)


def test_duplicate_service_names():
    doc = service_doc()
    doc["services"].append(dict(doc["services"][0]))
    assert problems_of(doc) == ["services: duplicate service name 'chat'"]


@pytest.mark.parametrize("text,fragment", [
    ("", "the file is empty"),
    ("services: [\n", "not valid YAML at line 2"),
    ("- just\n- a list\n", "(top level): must be a mapping"),
    ("coordinator: {}\n", "services: is required"),
    ("services: []\n", "services: must be a non-empty list"),
])
def test_structural_problems(text, fragment):
    problems = problems_of(text)
    assert any(fragment in p for p in problems), problems


def test_booleans_are_not_numbers():
    problems = problems_of(service_doc(min_decode=True, target_decode_tps_per_instance="fast"))
    assert "services[0].min_decode: must be an integer, got True" in problems
    assert "services[0].target_decode_tps_per_instance: must be a number, got 'fast'" in problems


# ---------------------------------------------------------------- the CLI

def test_validate_ok(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL)
    assert cli_main(["validate", "--config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 1 service"


def test_validate_prints_each_problem_on_its_own_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL.replace("9:7", "nine") + "coordinator: {interval_s: 0}\nextra: 1\n")
    assert cli_main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"{path}: coordinator.interval_s: must be > 0, got 0",
        f"{path}: services[0].pd_ratio: must be \"P:D\" with two positive integers, got 'nine'",
        f"{path}: extra: unknown key",
    ]


@pytest.mark.parametrize("content", [None, "services: [\n"])
def test_validate_missing_or_unparseable_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    assert cli_main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]


def test_coordinator_with_a_bad_config_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("services: []\n")
    assert cli_main(["coordinator", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "services: must be a non-empty list" in err[0]


# ---------------------------------------------------------------- defaults that follow other settings

def test_a_short_interval_brings_its_timeouts_down_with_it():
    # interval_s 1: the collect and PromQL timeouts the user never wrote follow it (half of it).
    cfg = load_config(MINIMAL + "coordinator: {interval_s: 1}\n")
    assert cfg.coordinator.collect.timeout_s == 0.5 and cfg.coordinator.metrics_source.timeout_s == 0.5
    # ...but a timeout the user did write is checked against the interval.
    problems = problems_of(MINIMAL + "coordinator: {interval_s: 1, collect: {timeout_s: 2}}\n")
    assert problems == ["coordinator.collect.timeout_s: must be shorter than interval_s (2 >= 1)"]


def test_a_short_lease_brings_the_write_timeout_down_with_it():
    lease = "coordinator: {lease: {duration_s: 6, renew_deadline_s: 4, retry_period_s: 1}"
    cfg = load_config(MINIMAL + lease + "}\n")
    assert cfg.coordinator.api.write_timeout_s == 1.0          # half the 2 s margin
    problems = problems_of(MINIMAL + lease + ", api: {write_timeout_s: 4}}\n")
    assert len(problems) == 1 and "must exceed renew_deadline_s by more than api.write_timeout_s" in problems[0]


@pytest.mark.parametrize("given,meant", [
    ("http://10.0.0.1:9400", "http://10.0.0.1:9400/v1/report"),
    ("http://10.0.0.1:9400/", "http://10.0.0.1:9400/v1/report"),
    ("https://sidecar.llm:9400", "https://sidecar.llm:9400/v1/report"),
    ("http://10.0.0.1:9400/v1/report", "http://10.0.0.1:9400/v1/report"),
    ("http://proxy/pods/d0/report", "http://proxy/pods/d0/report"),        # a path given is kept
])
def test_a_sidecar_address_means_its_report(given, meant):
    cfg = load_config({"coordinator": {"backend": "static"}, "services": [{
        "name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 100, "slo": {"tbt_s": 0.05},
        "prefill": {"sidecars": [given]}, "decode": {"sidecars": [given]}}]})
    assert cfg.services[0].decode.sidecars == (meant,)


def test_no_follow_on_problems():
    # A bad backend is one problem, not also "backend kubernetes needs a deployment" per role.
    problems = problems_of({"coordinator": {"backend": "staticc"}, "services": [{
        "name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 100, "slo": {"tbt_s": 0.05},
        "prefill": {}, "decode": {}}]})
    assert problems == ["coordinator.backend: must be one of kubernetes, local, static, got 'staticc'"]
    # A malformed SLO is one problem, not also "the latency net needs an SLO".
    problems = problems_of(MINIMAL.replace("slo: {tbt_s: 0.04}", "slo: {tbt_s: fast}"))
    assert problems == ["services[0].slo.tbt_s: must be a number, got 'fast'"]
    # A missing SLO is still reported.
    assert any("the latency safety net needs" in p for p in problems_of(MINIMAL.replace("slo: {tbt_s: 0.04}", "")))
    # A missing role block is "is required", not also that role's backend rules.
    problems = problems_of({"coordinator": {"backend": "kubernetes"}, "services": [{
        "name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 100, "slo": {"tbt_s": 0.05},
        "decode": {"deployment": "chat-decode"}}]})
    assert problems == ["services[0].prefill: is required (the prefill role block)"]


SIM_CONFIG = REPO / "docs" / "reproductions" / "dialogue.yaml"


def test_validate_checks_a_simulator_config_whole(tmp_path, capsys):
    assert cli_main(["validate", "--config", str(SIM_CONFIG)]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 service")
    bad = tmp_path / "sim.yaml"
    bad.write_text(SIM_CONFIG.read_text().replace("simulation:", "simulation:\n  frobnicate: 1", 1))
    assert cli_main(["validate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith(f"{bad}: ") for line in err) and any("frobnicate" in line for line in err)
