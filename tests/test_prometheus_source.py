"""The PromQL metric source, fast tier: parsing answers captured from a REAL Prometheus
(tests/data/prometheus/, written by tests/test_prometheus_real.py with
HETEROSCALE_CAPTURE_PROMQL=1), the collector against a real aiohttp server on
loopback that answers like Prometheus (captured bodies) or fails like one, and the
``coordinator.metrics_source`` config block.

fleet.json: services ``chat`` (prefill pod chat-prefill-0, decode pods chat-decode-0
and chat-decode-1) and ``code`` (one decode, no pod label: identified by instance),
under load. after_kill.json: the same after chat-decode-1's sidecar was SIGKILLed.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from heteroscale.coordinator.core.aggregate import aggregate
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.app import make_collector
from heteroscale.coordinator.collect import StaticSource
from heteroscale.coordinator.core.policy import PolicyState, decide
from heteroscale.coordinator.promql import (SIGNALS, PromCollector, PromResponseError, build_query,
                                        build_snapshot, parse_vector)
from heteroscale.coordinator.core.types import PoolCounts, PoolStatus
from heteroscale.errors import ConfigError
from tests.conftest import free_port

DATA = Path(__file__).parent / "data" / "prometheus"


def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


def _results(doc: dict[str, Any]) -> dict[str, list]:
    return {key: parse_vector(entry["answer"]) for key, entry in doc.items() if not key.startswith("_")}


def _config(**source: Any) -> Any:
    services = [{"name": name, "pd_ratio": "1:2" if name == "chat" else "1:1",
                 "target_decode_tps_per_instance": 1000, "max_decode": 8, "slo": {"tbt_s": 0.2},
                 "prefill": {}, "decode": {}, "policy": {"warmup_s": 0}} for name in ("chat", "code")]
    ms = {"type": "prometheus", "url": "http://127.0.0.1:9", **source}
    return load_config({"coordinator": {"backend": "static", "interval_s": 5, "metrics_source": ms},
                        "services": services})


POOLS = {"chat": PoolStatus(current=PoolCounts(1, 2), ready=PoolCounts(1, 2)),
         "code": PoolStatus(current=PoolCounts(0, 1), ready=PoolCounts(0, 1))}


def _observed_at(doc: dict[str, Any]) -> float:
    return max(float(r["value"][1]) for r in doc["observed_at"]["answer"]["data"]["result"])


# ---------------------------------------------------------------- parsing captured answers

def test_captured_queries_are_the_ones_the_source_sends() -> None:
    doc = _load("fleet")
    for signal in SIGNALS:
        assert doc[signal.key]["query"] == build_query(signal, selector='job=~"sidecar-.*"')


def test_every_captured_answer_parses() -> None:
    results = _results(_load("fleet"))
    assert len(results["engine_up"]) == 4 and all(s.value == 1.0 for s in results["engine_up"])
    assert len(results["ttft"]) == 4 and {s.labels["quantile"] for s in results["ttft"]} == {"0.9"}
    # every sidecar exports when its engine came up (warm-up over PromQL)
    assert len(results["started_at"]) == 4 and all(s.value > 1.7e9 for s in results["started_at"])
    # KV bytes moved are grouped by direction only (the probe's capacity series is excluded)
    assert all(s.labels["direction"] in ("send", "receive") for s in results["kv_transfer"])


def test_prometheus_error_answer_is_rejected() -> None:
    bad = _load("fleet")["_bad_syntax"]
    assert bad["http_status"] == 400
    with pytest.raises(PromResponseError, match="bad_data"):
        parse_vector(bad["answer"])


@pytest.mark.parametrize("doc, match", [
    ([], "not a JSON object"),
    ({"status": "error", "errorType": "timeout", "error": "query timed out"}, "timeout"),
    ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "vector"),
    ({"status": "success", "data": {"resultType": "vector", "result": {}}}, "not a list"),
    ({"status": "success", "data": {"resultType": "vector", "result": [{"value": [1, "2"]}]}}, "label"),
    ({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, 2]}]}}, "pair"),
    ({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": ["1", "2"]}]}},
     "time"),
    ({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "x"]}]}},
     "not a number"),
])
def test_malformed_answers_are_rejected(doc: Any, match: str) -> None:
    with pytest.raises(PromResponseError, match=match):
        parse_vector(doc)


def test_nan_and_inf_are_not_numbers() -> None:
    doc = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"a": "1"}, "value": [1.5, "NaN"]}, {"metric": {"a": "2"}, "value": [1.5, "+Inf"]},
        {"metric": {"a": "3"}, "value": [1.5, "0.25"]}]}}
    assert [s.value for s in parse_vector(doc)] == [None, None, 0.25]


# ---------------------------------------------------------------- snapshot → the same items as /v1/report

def test_snapshot_has_one_report_per_instance_with_the_captured_values() -> None:
    doc = _load("fleet")
    snap = build_snapshot(_results(doc))
    chat = {f.report.pod: f for _, f in snap.by_service["chat"]}
    assert set(chat) == {"chat-prefill-0", "chat-decode-0", "chat-decode-1"}
    code = [f for _, f in snap.by_service["code"]]
    assert len(code) == 1 and code[0].report.pod.startswith("127.0.0.1:")    # no pod label: the instance
    by_pod = {r["metric"].get("pod") or r["metric"]["instance"]: float(r["value"][1])
              for r in doc["decode_tps"]["answer"]["data"]["result"]}
    for _, item in snap.by_service["chat"] + snap.by_service["code"]:
        r = item.report
        assert item.error is None and item.role == r.role and r.engine_up and not r.stale
        assert r.decode_tps == by_pod[r.pod]
        assert r.ttft_p90_s is not None and r.window_s > 0
        assert [g.gpu for g in r.gpus] == ["0"] and r.gpus[0].power_watts > 0
    assert chat["chat-decode-0"].report.tbt_p90_s is not None
    assert snap.unattributed == 0


def test_aggregation_over_the_snapshot_and_freshness_from_timestamps() -> None:
    doc = _load("fleet")
    config = _config()
    snap = build_snapshot(_results(doc))
    t = _observed_at(doc)
    chat = config.service("chat")
    fetched = [f for _, f in snap.by_service["chat"]]
    fresh = aggregate(chat, fetched, pools=POOLS["chat"], now_s=t + 1)
    assert fresh.fresh_decode == 2 and fresh.fresh_prefill == 1 and fresh.excluded == {}
    assert fresh.decode_tps == pytest.approx(sum(f.report.decode_tps for f in fetched if f.role == "decode"))
    # A series Prometheus still returns but scraped long ago is too old: never counted.
    old = aggregate(chat, fetched, pools=POOLS["chat"], now_s=t + chat.policy.report_max_age_s + 5)
    assert old.decode_tps is None and old.excluded == {"too_old": 3}
    decision, _ = decide(service=chat, observation=old, state=PolicyState(), now_s=t + 40)
    assert decision.reason == "hold_missing_data" and decision.desired == decision.current


def test_vanished_instance_is_excluded_and_not_expected() -> None:
    doc = _load("after_kill")
    config = _config()
    snap = build_snapshot(_results(doc))
    items = [f for _, f in snap.by_service["chat"]]
    vanished = [f for f in items if f.error == "vanished"]
    assert len(vanished) == 1 and vanished[0].role is None and "chat-decode-1" in vanished[0].url
    chat = config.service("chat")
    one_decode = PoolStatus(current=PoolCounts(1, 1), ready=PoolCounts(1, 1))
    obs = aggregate(chat, items, pools=one_decode, now_s=_observed_at(doc) + 1)
    assert obs.fresh_decode == 1 and obs.expected_decode == 1 and obs.excluded == {"vanished": 1}


def test_started_at_feeds_warm_up() -> None:
    doc = copy.deepcopy(_load("fleet"))
    t = _observed_at(doc)
    up = doc["engine_up"]["answer"]["data"]["result"]
    doc["started_at"]["answer"]["data"]["result"] = [{"metric": r["metric"], "value": [t, str(t - 10)]} for r in up]
    config = _config()
    chat = config.service("chat")
    warm_chat = chat.__class__(**{**chat.__dict__, "policy": chat.policy.__class__(
        **{**chat.policy.__dict__, "warmup_s": 60.0})})
    fetched = [f for _, f in build_snapshot(_results(doc)).by_service["chat"]]
    assert all(f.report.started_at == t - 10 for f in fetched)
    obs = aggregate(warm_chat, fetched, pools=POOLS["chat"], now_s=t + 1)
    assert obs.warming_decode == 2 and obs.excluded == {"warming": 3} and obs.decode_tps   # load kept


def test_series_without_identity_are_ignored_and_bad_values_not_trusted() -> None:
    doc = copy.deepcopy(_load("fleet"))
    doc["decode_tps"]["answer"]["data"]["result"].append({"metric": {"role": "decode"}, "value": [1, "5"]})
    for r in doc["decode_tps"]["answer"]["data"]["result"]:
        if r["metric"].get("pod") == "chat-decode-0":
            r["value"][1] = "-3"
    snap = build_snapshot(_results(doc))
    assert snap.unattributed == 1
    report = next(f.report for _, f in snap.by_service["chat"] if f.report.pod == "chat-decode-0")
    assert report.decode_tps is None          # a negative rate is "not measured", never a number


async def test_instance_labelled_with_another_namespace_is_not_this_services() -> None:
    doc = copy.deepcopy(_load("fleet"))
    for key, entry in doc.items():
        for r in entry["answer"].get("data", {}).get("result", []) if not key.startswith("_") else ():
            if r["metric"].get("pod") == "chat-decode-1":
                r["metric"]["namespace"] = "elsewhere"
            elif r["metric"].get("pod") == "chat-decode-0":
                r["metric"]["namespace"] = "default"      # the service's namespace
    config = _config()
    async with FakeProm(doc) as prom:
        source = PromCollector(url=prom.url, selector='job=~"sidecar-.*"')
        try:
            chat = await source.collect(config.service("chat"))
        finally:
            await source.close()
    assert chat.errors == {"wrong_namespace": 1}
    assert sorted(f.report.pod for f in chat.fetched if f.report) == ["chat-decode-0", "chat-prefill-0"]
    obs = aggregate(config.service("chat"), chat.fetched, pools=POOLS["chat"], now_s=_observed_at(doc) + 1)
    assert obs.fresh_decode == 1 and obs.excluded == {"wrong_namespace": 1}


def test_queries_group_by_instance_and_carry_the_selector() -> None:
    q = {s.key: build_query(s, selector='job="hs", cluster=~"a|b"', lookback_s=120) for s in SIGNALS}
    assert q["decode_tps"] == ('max by (service, role, namespace, pod, instance) '
                               '(heteroscale_decode_tokens_per_second{job="hs", cluster=~"a|b"})')
    assert q["observed_at"].endswith('(timestamp(heteroscale_engine_up{job="hs", cluster=~"a|b"}))')
    assert 'present_over_time(heteroscale_engine_up{job="hs", cluster=~"a|b"}[120s])' in q["seen"]
    assert q["tbt"].startswith("max by (service, role, namespace, pod, instance, quantile)")
    assert build_query(SIGNALS[0]) == "max by (service, role, namespace, pod, instance) (heteroscale_engine_up)"


# ---------------------------------------------------------------- the collector over HTTP

class FakeProm:
    """A real HTTP server on loopback answering /api/v1/query like Prometheus did (captured)."""

    def __init__(self, doc: dict[str, Any], *, mode: str = "ok") -> None:
        self.answers = {entry["query"]: entry["answer"] for key, entry in doc.items() if not key.startswith("_")}
        self.mode = mode
        self.queries: list[str] = []
        app = web.Application()
        app.router.add_post("/api/v1/query", self.query)
        self.server = TestServer(app, host="127.0.0.1")

    async def query(self, request: web.Request) -> web.StreamResponse:
        expr = (await request.post())["query"]
        self.queries.append(str(expr))
        if self.mode == "500":
            return web.Response(status=500, text="internal error")
        if self.mode == "garbage":
            return web.Response(text="<html>not json</html>")
        if self.mode == "hang":
            await asyncio.sleep(30)
        if self.mode == "error":
            return web.json_response({"status": "error", "errorType": "timeout", "error": "query timed out"},
                                     status=503)
        return web.json_response(self.answers.get(str(expr), {"status": "success",
                                                              "data": {"resultType": "vector", "result": []}}))

    async def __aenter__(self) -> "FakeProm":
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.server.close()

    @property
    def url(self) -> str:
        return str(self.server.make_url("/"))


async def test_one_query_per_signal_per_tick_for_all_services() -> None:
    doc = _load("fleet")
    config = _config()
    clock = [100.0]
    async with FakeProm(doc) as prom:
        source = PromCollector(url=prom.url, selector='job=~"sidecar-.*"', reuse_s=0.5, clock=lambda: clock[0])
        try:
            chat, code = await asyncio.gather(*(source.collect(s) for s in config.services))
            assert len(prom.queries) == len(SIGNALS) == source.queries_total
            assert len(chat.fetched) == 3 and len(code.fetched) == 1 and chat.errors == {}
            await source.collect(config.service("chat"))          # same tick: the snapshot is reused
            assert len(prom.queries) == len(SIGNALS)
            clock[0] += 1.0                                       # next tick: asked again
            await source.collect(config.service("chat"))
            assert len(prom.queries) == 2 * len(SIGNALS)
            assert source.latest["code"].fetched[0].report.decode_tps > 0
        finally:
            await source.close()


@pytest.mark.parametrize("mode, reason", [("500", "prometheus_http_status"), ("garbage", "prometheus_invalid_json"),
                                          ("error", "prometheus_http_status"), ("hang", "prometheus_timeout")])
async def test_prometheus_failure_is_counted_and_held_never_acted_on(mode: str, reason: str) -> None:
    config = _config()
    async with FakeProm(_load("fleet"), mode=mode) as prom:
        source = PromCollector(url=prom.url, timeout_s=0.2, reuse_s=0.0)
        try:
            results = await asyncio.gather(*(source.collect(s) for s in config.services))
        finally:
            await source.close()
    for svc, collection in zip(config.services, results):
        assert collection.fetched == () and collection.errors == {reason: 1}
        assert source.errors_total[(svc.name, reason)] == 1
        obs = aggregate(svc, collection.fetched, pools=POOLS[svc.name], now_s=1000.0)
        decision, _ = decide(service=svc, observation=obs, state=PolicyState(), now_s=1000.0)
        assert decision.reason == "hold_missing_data" and decision.desired == decision.current


async def test_a_cancelled_caller_does_not_cancel_the_snapshot_for_the_others() -> None:
    config = _config()
    async with FakeProm(_load("fleet")) as prom:
        source = PromCollector(url=prom.url, selector='job=~"sidecar-.*"')
        try:
            first = asyncio.create_task(source.collect(config.service("chat")))
            second = asyncio.create_task(source.collect(config.service("code")))
            await asyncio.sleep(0)           # both are now waiting on the one snapshot
            first.cancel()
            code = await second
            assert len(code.fetched) == 1 and code.errors == {}
            assert len(prom.queries) == len(SIGNALS)
            with pytest.raises(asyncio.CancelledError):
                await first
        finally:
            await source.close()


async def test_close_cancels_a_snapshot_in_flight() -> None:
    config = _config()
    async with FakeProm(_load("fleet"), mode="hang") as prom:
        source = PromCollector(url=prom.url, timeout_s=30)
        waiter = asyncio.create_task(source.collect(config.service("chat")))
        while not prom.queries:
            await asyncio.sleep(0.01)
        inflight = source._inflight
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert inflight is not None and not inflight.done()     # owned by the collector, still running
        await source.close()
        assert inflight.cancelled()


def test_label_values_that_are_not_strings_are_not_attributed() -> None:
    doc = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"service": "chat", "role": "decode", "pod": 7}, "value": [1.0, "1"]},
        {"metric": {"service": "chat", "role": "decode", "pod": "p"}, "value": [1.0, "1"]}]}}
    up = parse_vector(doc)
    snap = build_snapshot({"engine_up": up, "observed_at": [s._replace(value=1.0) for s in up]})
    assert snap.unattributed == 2      # the pod=7 series, in each of the two signals
    assert [f.report.pod for _, f in snap.by_service["chat"]] == ["p"]


async def test_an_oversized_answer_is_refused() -> None:
    config = _config()
    async with FakeProm(_load("fleet")) as prom:
        source = PromCollector(url=prom.url, selector='job=~"sidecar-.*"', max_body_bytes=200)   # each non-empty captured answer is larger
        try:
            chat = await source.collect(config.service("chat"))
        finally:
            await source.close()
    assert chat.fetched == () and chat.errors == {"prometheus_bad_response": 1}


async def test_prometheus_down_is_a_connect_error() -> None:
    config = _config()
    source = PromCollector(url=f"http://127.0.0.1:{free_port()}", timeout_s=1.0)
    try:
        collection = await source.collect(config.service("chat"))
    finally:
        await source.close()
    assert collection.errors == {"prometheus_connect": 1} and "prometheus" in (collection.discovery_error or "")


async def test_a_lasting_failure_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    config = _config()
    source = PromCollector(url=f"http://127.0.0.1:{free_port()}", timeout_s=1.0, reuse_s=0.0)
    try:
        with caplog.at_level("INFO", logger="heteroscale.coordinator.promql"):
            for _ in range(3):
                await source.collect(config.service("chat"))
    finally:
        await source.close()
    assert source.errors_total[("chat", "prometheus_connect")] == 3
    assert [r.levelname for r in caplog.records] == ["WARNING"]


async def test_wiring_picks_the_source_from_config() -> None:
    config = _config(selector='job="x"', timeout_s=0.5)
    collector = make_collector(config, source=StaticSource())
    try:
        assert isinstance(collector, PromCollector)
        assert all('job="x"' in q for q in collector.queries.values())
    finally:
        await collector.close()


# ---------------------------------------------------------------- config

def test_config_defaults_and_keys() -> None:
    ms = _config(selector='job="hs", cluster!~"dev.*"', lookback_s=60).coordinator.metrics_source
    assert (ms.type, ms.url, ms.timeout_s, ms.selector, ms.lookback_s) == (
        "prometheus", "http://127.0.0.1:9", 2.0, 'job="hs", cluster!~"dev.*"', 60.0)


def test_config_reports_every_problem_at_once() -> None:
    services = [{"name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 10, "slo": {"tbt_s": 1},
                 "prefill": {}, "decode": {}}]
    with pytest.raises(ConfigError) as err:
        load_config({"coordinator": {"backend": "static", "interval_s": 1, "metrics_source": {
            "type": "prometheus", "timeout_s": 1, "selector": '{job="x"}', "lookback_s": 0, "extra": 1}},
            "services": services})
    text = "\n".join(err.value.problems)
    for needle in ("metrics_source.url: is required", "metrics_source.selector: must be PromQL label matchers",
                   "metrics_source.lookback_s: must be > 0", "metrics_source.extra: unknown key",
                   "metrics_source.timeout_s: must be shorter than interval_s"):
        assert needle in text, text
    assert "sidecars" not in text     # the static backend needs no URLs when Prometheus is the source
    with pytest.raises(ConfigError) as err:
        load_config({"coordinator": {"backend": "static", "metrics_source": {"url": "http://p:9090"}},
                     "services": services})
    assert any("only used with type: prometheus" in p for p in err.value.problems)
    assert any("backend static needs at least one sidecar" in p for p in err.value.problems)
