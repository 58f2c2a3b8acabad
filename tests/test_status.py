"""The coordinator's HTTP face on a real loopback server: status API shape (ARCHITECTURE
§3.3), /metrics read back through prometheus_client's own parser, the page and its files."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from heteroscale.coordinator.status import make_status_app
from heteroscale.coordinator.core.types import PoolCounts
from tests.test_reconciler import World, world  # noqa: F401  (fixture)


async def client_for(w: World) -> TestClient:
    client = TestClient(TestServer(make_status_app(w.reconciler)))
    await client.start_server()
    return client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_status_api_has_the_contract_fields(world: World):
    world.load["chat"] = 6000.0
    await world.ticks(2)
    client = await client_for(world)
    try:
        resp = await client.get("/api/v1/status")
        assert resp.status == 200
        doc = await resp.json()
        no_history = await (await client.get("/api/v1/status?history=0")).json()
    finally:
        await client.close()
    assert doc["leader"] is True and doc["identity"] == "me"
    chat = next(s for s in doc["services"] if s["name"] == "chat")
    for key in ("name", "prefill", "decode", "decode_tps", "target_decode_tps_per_instance", "pd_ratio",
                "decisions", "groups", "history"):
        assert key in chat, key
    assert chat["pd_ratio"] == "3:2" and chat["target_decode_tps_per_instance"] == 1000
    assert chat["decode"] == {"current": 4, "desired": 4, "ready": 4, "pending": 0}
    assert chat["decode_tps"] == 6000.0
    newest = chat["decisions"][0]
    assert set(newest) >= {"at", "reason", "from", "to"}
    out = next(d for d in chat["decisions"] if d["reason"] == "scale_out_tps")
    assert out["from"] == {"prefill": 3, "decode": 2} and out["to"] == {"prefill": 6, "decode": 4}
    assert len(chat["history"]) == 2 and chat["history"][-1]["decode"] == 4
    assert "history" not in no_history["services"][0]


async def test_metrics_are_the_contract_names(world: World):
    world.load["chat"] = 6000.0
    for i in range(40):
        world.server.routes[f"/code/decode/{i}"] = "garbage"
    await world.ticks(2)
    client = await client_for(world)
    try:
        resp = await client.get("/metrics")
        assert resp.status == 200
        text = await resp.text()
    finally:
        await client.close()
    got = samples(text)
    assert got[("heteroscale_coordinator_is_leader", (("identity", "me"),))] == 1.0
    assert got[("heteroscale_desired_replicas", (("role", "decode"), ("service", "chat")))] == 4.0
    assert got[("heteroscale_current_replicas", (("role", "prefill"), ("service", "chat")))] == 6.0
    assert got[("heteroscale_service_decode_tokens_per_second", (("service", "chat"),))] == 6000.0
    key = ("heteroscale_scaling_decisions_total",
           (("direction", "out"), ("reason", "scale_out_tps"), ("service", "chat")))
    assert got[key] == 1.0
    assert got[("heteroscale_coordinator_collection_errors_total",
                (("reason", "invalid_json"), ("service", "code")))] == 4.0   # 2 sidecars x 2 ticks
    assert ("heteroscale_coordinator_tick_duration_seconds", ()) in got
    assert got[("heteroscale_coordinator_ticks_total", ())] == 2.0


async def test_page_and_static_files_are_served_without_network(world: World):
    await world.ticks(1)
    client = await client_for(world)
    try:
        page = await client.get("/")
        html = await page.text()
        js = await (await client.get("/static/app.js")).text()
        css = await client.get("/static/style.css")
        health = await (await client.get("/healthz")).json()
        missing = await client.get("/static/nope.js")
    finally:
        await client.close()
    assert page.status == 200 and "/static/app.js" in html and "<canvas" not in html
    assert "http://" not in html and "https://" not in html          # no CDN, no network
    assert "/api/v1/status" in js and "getContext(\"2d\")" in js
    assert "https://" not in js
    assert css.status == 200
    assert health == {"ok": True, "leader": True, "ticks": 1}
    assert missing.status == 404


async def test_standby_serves_read_only_status(world: World):
    world.reconciler.election.leader = False
    world.load["chat"] = 6000.0
    await world.ticks(1)
    client = await client_for(world)
    try:
        doc = await (await client.get("/api/v1/status")).json()
        metrics = samples(await (await client.get("/metrics")).text())
        post = await client.post("/api/v1/status")
    finally:
        await client.close()
    assert doc["leader"] is False
    chat = doc["services"][0]
    assert chat["decode"]["current"] == 2 and chat["decode"]["desired"] == 4   # decided, not written
    assert world.actuator.pools["chat"].spec == PoolCounts(3, 2)
    assert metrics[("heteroscale_coordinator_is_leader", (("identity", "me"),))] == 0.0
    assert post.status == 405


async def test_the_effective_target_and_the_ratio_are_shown_with_their_configured_values(world: World):
    rt = world.reconciler.services["chat"]
    from dataclasses import replace as _replace
    from fractions import Fraction

    from heteroscale.coordinator.core.drift import DriftState
    from heteroscale.coordinator.core.target import TargetState
    # As the policy leaves them after a TBT breach under target and a drifted mix.
    rt.state = _replace(rt.state, target=TargetState(scale=0.85, changed_s=1.0, why="latency broke at 850"),
                        drift=DriftState(needed=Fraction(3, 1), advice=Fraction(3, 1), k_mean=8.0, k_ref=4.0))
    await world.ticks(1)
    client = await client_for(world)
    try:
        doc = await (await client.get("/api/v1/status?history=0")).json()
        metrics = samples(await (await client.get("/metrics")).text())
    finally:
        await client.close()
    chat = next(s for s in doc["services"] if s["name"] == "chat")
    assert chat["effective_target"]["decode_tps_per_instance"] == 850.0        # 0.85 x 1000
    assert chat["effective_target"]["why"] == "latency broke at 850"
    assert chat["pd_ratio_drift"]["advice"] == "3:1" and chat["pd_ratio_drift"]["in_use"] == "3:2"
    assert metrics[("heteroscale_target_decode_tokens_per_second", (("kind", "configured"), ("service", "chat")))] == 1000
    assert metrics[("heteroscale_target_decode_tokens_per_second", (("kind", "effective"), ("service", "chat")))] == 850
    assert metrics[("heteroscale_pd_ratio", (("kind", "recommended"), ("service", "chat")))] == 3.0
    assert metrics[("heteroscale_pd_ratio", (("kind", "configured"), ("service", "chat")))] == 1.5
