"""The reconcile loop end to end: real report servers on loopback, a fake clock, and
an in-memory actuator that behaves like a backend (spec vs ready, pending pods, manual
edits, API failures)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from heteroscale.coordinator.actuators import make_actuator
from heteroscale.coordinator.actuators.static import StaticActuator
from heteroscale.coordinator.collect import Collector, StaticSource
from heteroscale.coordinator.seams import ReportTarget
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.settings import Config
from heteroscale.coordinator.reconciler import Reconciler
from heteroscale.coordinator.core.types import ApplyResult, Decision, PoolCounts, PoolStatus
from heteroscale.errors import ApiError, NotLeaderError, UsageError
from tests.test_collect import ReportServer, report_doc


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Pools:
    spec: PoolCounts
    ready: PoolCounts
    pending_since_s: float | None = None
    manual: bool = False


class InMemoryActuator:
    """A backend in memory: ``apply`` sets the spec of both pools; instances become ready
    on the next ``observe`` unless ``ready_lag`` holds them pending; a human edit sets
    ``manual_override`` until our next write; ``fail_next`` makes calls raise ``ApiError``."""

    name = "memory"
    writes = True

    def __init__(self, config: Config, *, clock: FakeClock, start: PoolCounts = PoolCounts(3, 2)) -> None:
        self.clock = clock
        self.pools = {s.name: Pools(spec=start, ready=start) for s in config.services}
        self.applied: list[tuple[str, PoolCounts]] = []
        self.fail_next: dict[str, ApiError] = {}
        self.hold_pending = False
        self.closed = False

    def human_set(self, service: str, counts: PoolCounts) -> None:
        p = self.pools[service]
        p.spec, p.ready, p.manual = counts, counts, True

    async def observe(self, service: Any) -> PoolStatus:
        if "observe" in self.fail_next:
            raise self.fail_next.pop("observe")
        p = self.pools[service.name]
        if not self.hold_pending:
            p.ready, p.pending_since_s = p.spec, None
        pending = PoolCounts(max(0, p.spec.prefill - p.ready.prefill), max(0, p.spec.decode - p.ready.decode))
        return PoolStatus(current=p.spec, ready=p.ready, pending=pending,
                          pending_since_s=p.pending_since_s if pending.total() else None,
                          manual_override=p.manual)

    async def apply(self, service: Any, decision: Decision) -> ApplyResult:
        if "apply" in self.fail_next:
            raise self.fail_next.pop("apply")
        p = self.pools[service.name]
        p.spec, p.manual = decision.desired, False
        if decision.desired.total() > p.ready.total() and p.pending_since_s is None:
            p.pending_since_s = self.clock()
        p.ready = PoolCounts(min(p.ready.prefill, p.spec.prefill), min(p.ready.decode, p.spec.decode))
        self.applied.append((service.name, decision.desired))
        return ApplyResult(applied=decision.desired)

    async def close(self) -> None:
        self.closed = True


class ReadySource:
    """Discovery the way a backend does it: one sidecar per READY instance."""

    def __init__(self, actuator: InMemoryActuator, server: ReportServer) -> None:
        self.actuator, self.server = actuator, server

    async def targets(self, service: Any) -> list[ReportTarget]:
        ready = self.actuator.pools[service.name].ready
        return [ReportTarget(url=self.server.url(f"/{service.name}/{role}/{i}"), role=role)
                for role in ("prefill", "decode") for i in range(getattr(ready, role))]


class FakeElection:
    def __init__(self, *, leader: bool = True, fence: bool = True, identity: str = "me") -> None:
        self.identity, self.leader, self.fence = identity, leader, fence
        self.fence_checks = 0

    @property
    def is_leader(self) -> bool:
        return self.leader

    async def still_leader(self) -> bool:
        self.fence_checks += 1
        return self.fence

    async def permit(self, what: str) -> float:
        if not await self.still_leader():
            raise NotLeaderError(f"fake fence closed: refused to {what}")
        return 5.0

    async def run(self) -> None:
        await asyncio.Event().wait()


def config(names=("chat",), **policy: Any) -> Config:
    return load_config({
        "coordinator": {"backend": "static", "interval_s": 5, "decisions_kept": 20, "history_s": 600},
        "services": [{
            "name": n, "pd_ratio": "3:2", "target_decode_tps_per_instance": 1000, "min_decode": 1,
            "max_decode": 20, "slo": {"tbt_s": 0.05},
            "prefill": {"sidecars": ["http://127.0.0.1:1/unused"]},
            "decode": {"sidecars": ["http://127.0.0.1:1/unused"]},
            "policy": {"smoothing_window_s": 0, "scale_out_cooldown_s": 10, "scale_in_stabilization_s": 60,
                       "warmup_s": 0, **policy}} for n in names]})


@dataclass
class World:
    """A cluster in miniature: load per service spread over the ready decode sidecars."""

    server: ReportServer
    clock: FakeClock
    actuator: InMemoryActuator
    reconciler: Reconciler
    load: dict[str, float] = field(default_factory=dict)

    def serve(self, service: str) -> None:
        for role in ("prefill", "decode"):
            for i in range(40):
                self.server.routes[f"/{service}/{role}/{i}"] = (
                    lambda s=service, r=role, i=i: report_doc(
                        service=s, role=r, pod=f"{s}-{r}-{i}", observed_at=self.clock.now - 1,
                        decode_tps=self.load.get(s, 0.0) / max(1, self.actuator.pools[s].ready.decode)))

    async def ticks(self, n: int, *, dt_s: float = 5.0) -> list[Decision]:
        out = []
        for _ in range(n):
            self.clock.now += dt_s
            out += await self.reconciler.tick()
        return out


@pytest.fixture
async def world():
    server = await ReportServer().start()
    clock = FakeClock()
    cfg = config(("chat", "code"))
    actuator = InMemoryActuator(cfg, clock=clock)
    collector = Collector(source=ReadySource(actuator, server), timeout_s=2, concurrency=16)
    election = FakeElection()
    rec = Reconciler(config=cfg, actuator=actuator, collector=collector, election=election, clock=clock)
    w = World(server=server, clock=clock, actuator=actuator, reconciler=rec)
    w.serve("chat")
    w.serve("code")
    w.load.update(chat=2000.0, code=2000.0)
    yield w
    await collector.close()
    await server.stop()


async def test_scales_both_pools_together_as_load_moves(world: World):
    rec, act = world.reconciler, world.actuator
    decisions = await world.ticks(1)
    assert {d.reason for d in decisions} == {"hold_tolerance"}      # 2000 on 2x1000: on target
    world.load["chat"] = 6000.0
    await world.ticks(1)
    # 6000/2000 = 300% -> want 6, damped to 2*2 = 4; P = round(4*3/2) = 6.
    assert act.applied == [("chat", PoolCounts(6, 4))]
    await world.ticks(3)                                             # cooldown 10 s, then on to 6
    assert act.pools["chat"].spec == PoolCounts(9, 6)
    assert act.pools["code"].spec == PoolCounts(3, 2)                # the other service untouched
    world.load["chat"] = 1500.0
    await world.ticks(2)
    assert act.pools["chat"].spec == PoolCounts(9, 6)                # stabilisation: 60 s at 6
    await world.ticks(20)
    assert act.pools["chat"].spec == PoolCounts(3, 2)                # ceil(1500/1000) = 2
    chat = rec.services["chat"]
    reasons = [d.reason for d in chat.decisions]
    assert reasons[0] == "hold_tolerance" or reasons[0] == "scale_in_tps"
    assert "scale_out_tps" in reasons and "scale_in_tps" in reasons and "hold_stabilization" in reasons
    ats = [d.at for d in chat.decisions]
    assert ats == sorted(ats, reverse=True)                          # newest first
    assert len(chat.history) == 27 and chat.history[-1]["decode"] == 2
    assert rec.decisions_total[("chat", "out", "scale_out_tps")] == 2


async def test_missing_data_holds_and_never_writes(world: World):
    for i in range(40):
        world.server.routes[f"/chat/decode/{i}"] = 500
    world.load["chat"] = 0.0
    decisions = await world.ticks(5)
    chat = [d for d in decisions if d.service == "chat"]
    assert {d.reason for d in chat} == {"hold_missing_data"}
    assert all(name != "chat" for name, _ in world.actuator.applied)
    status = world.reconciler.status()["services"][0]
    assert status["reports"]["excluded"] == {"http_status": 2}
    assert world.reconciler.collector.errors_total[("chat", "http_status")] == 10


async def test_non_leader_decides_but_never_writes(world: World):
    world.reconciler.election.leader = False
    world.load["chat"] = 8000.0
    decisions = await world.ticks(3)
    assert any(d.reason == "scale_out_tps" for d in decisions)
    assert world.actuator.applied == []
    assert world.reconciler.election.fence_checks == 0
    assert world.reconciler.status()["leader"] is False


async def test_fence_stops_a_write_after_losing_the_lease(world: World):
    election = world.reconciler.election
    election.fence = False                   # still thinks it leads, but the lease is gone
    world.load["chat"] = 8000.0
    await world.ticks(1)
    assert world.actuator.applied == [] and election.fence_checks == 1
    assert world.reconciler.errors_total[("chat", "fenced")] == 1
    # Nothing moved, so no cooldown was started: once the fence passes, it scales at once.
    election.fence = True
    await world.ticks(1)
    assert world.actuator.applied == [("chat", PoolCounts(6, 4))]


async def test_dry_run_decides_and_reports_but_never_writes(world: World):
    world.reconciler.dry_run = True
    world.load["chat"] = 8000.0
    await world.ticks(4)
    assert world.actuator.applied == []
    status = world.reconciler.status()
    assert status["dry_run"] is True and status["writes"] is False
    chat = status["services"][0]
    assert chat["decode"]["current"] == 2
    assert any(d["reason"] == "scale_out_tps" and d["to"]["decode"] == 4 for d in chat["decisions"])


async def test_api_errors_are_survived_and_retried(world: World):
    act, rec = world.actuator, world.reconciler
    world.load["chat"] = 8000.0
    act.fail_next["apply"] = ApiError("conflict storm", status=500)
    await world.ticks(1)
    assert act.applied == [] and rec.errors_total[("chat", "apply")] == 1
    assert "ApiError" in rec.services["chat"].last_error
    await world.ticks(1)                     # not in cooldown: the failed write moved nothing
    assert act.applied == [("chat", PoolCounts(6, 4))]
    assert rec.services["chat"].last_error is None
    act.fail_next["observe"] = ApiError("timeout", status=0)
    decisions = await world.ticks(1)
    # observe failed for one service only: it is skipped (no decision on unknown counts).
    assert len(decisions) == 1
    assert rec.errors_total[("chat", "observe")] + rec.errors_total[("code", "observe")] == 1


async def test_manual_override_is_respected_not_fought(world: World):
    act = world.actuator
    act.human_set("chat", PoolCounts(12, 8))                  # a human scales up by hand
    decisions = await world.ticks(1)
    chat = next(d for d in decisions if d.service == "chat")
    assert chat.reason == "manual_override" and chat.desired == PoolCounts(12, 8)
    assert act.applied == []
    # 2000 tok/s on 8 decode would scale in, but the stabilisation window starts at the human's 8.
    await world.ticks(3)
    assert act.pools["chat"].spec == PoolCounts(12, 8)
    await world.ticks(15)
    assert act.pools["chat"].spec.decode < 8                  # the next decisions take over again


async def test_pending_pods_hold_new_scale_out(world: World):
    act = world.actuator
    act.hold_pending = True                                   # new pods never become ready
    world.load["chat"] = 8000.0
    await world.ticks(1)
    assert act.applied == [("chat", PoolCounts(6, 4))]
    # The step bound cut that one (want 8): it goes on while the pods are pending.
    decisions = await world.ticks(1)
    assert act.applied[-1] == ("chat", PoolCounts(12, 8))
    assert "continuing a scale-out the step bound cut" in next(d.detail for d in decisions if d.service == "chat")
    # A new rise waits for the pending pods.
    world.load["chat"] = 16000.0
    decisions = await world.ticks(4)
    assert {d.reason for d in decisions if d.service == "chat"} == {"hold_pending"}
    assert len(act.applied) == 2


async def test_static_backend_observes_sidecars_and_never_writes():
    server = await ReportServer().start()
    now = FakeClock()
    try:
        server.routes = {f"/d{i}": report_doc(pod=f"d{i}", observed_at=now.now, decode_tps=1500.0)
                         for i in range(2)}
        server.routes["/p0"] = report_doc(role="prefill", pod="p0", observed_at=now.now)
        server.routes["/d2"] = report_doc(pod="d2", observed_at=now.now, engine_up=False)
        cfg = load_config({"coordinator": {"backend": "static"}, "services": [{
            "name": "chat", "pd_ratio": "3:2", "target_decode_tps_per_instance": 1000,
            "slo": {"tbt_s": 0.05},
            "prefill": {"sidecars": [server.url("/p0")]},
            "decode": {"sidecars": [server.url(f"/d{i}") for i in range(3)]}}]})
        collector = Collector(source=StaticSource(), timeout_s=2)
        actuator = make_actuator(cfg, latest=collector.latest.get)
        assert isinstance(actuator, StaticActuator) and actuator.writes is False
        rec = Reconciler(config=cfg, actuator=actuator, collector=collector, clock=now)
        decisions = await rec.tick()
        await collector.close()
    finally:
        await server.stop()
    (d,) = decisions
    # The configured sidecars are the pool: 1P3D, whatever answered. The third decode
    # engine is down, so the view is partial: the load is estimated as the reporting
    # mean x 3 = 1500 x 3 = 4500 tok/s on 3 x 1000 = 150% -> want 5 (damped max 6),
    # P = round(5 x 3/2 = 7.5) = 8. A silent sidecar never shrinks "current".
    assert d.current == PoolCounts(1, 3)
    assert (d.reason, d.desired) == ("scale_out_tps", PoolCounts(8, 5))
    assert d.inputs["missing_decode"] == 1 and d.inputs["estimated_decode_tps"] == 4500
    assert rec.services["chat"].last_apply is None
    assert rec.status()["writes"] is False


async def test_run_loop_ticks_until_stopped(world: World):
    cfg = load_config({"coordinator": {"backend": "static", "interval_s": 0.02, "collect": {"timeout_s": 0.01}},
                       "services": [{"name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 1,
                                     "policy": {"latency_net": {"enabled": False}},
                                     "prefill": {"sidecars": ["http://127.0.0.1:1/x"]},
                                     "decode": {"sidecars": ["http://127.0.0.1:1/x"]}}]})
    collector = Collector(source=StaticSource(), timeout_s=0.01)
    rec = Reconciler(config=cfg, actuator=StaticActuator(latest=collector.latest.get), collector=collector)
    stop = asyncio.Event()
    task = asyncio.create_task(rec.run(stop=stop), name="test-reconcile")
    while rec.ticks < 3:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    await collector.close()
    assert rec.ticks >= 3


def test_factory_names_and_unknown_backends():
    cfg = config()
    assert isinstance(make_actuator(cfg, backend="static", latest=lambda name: None), StaticActuator)
    with pytest.raises(UsageError, match="unknown backend 'nomad'"):
        make_actuator(cfg, backend="nomad")
    with pytest.raises(UsageError, match="needs an API client"):
        make_actuator(cfg, backend="kubernetes")


async def test_a_hung_observe_skips_the_service_not_the_loop(world: World):
    class Hanging(InMemoryActuator):
        async def observe(self, service):
            if service.name == "chat":
                await asyncio.Event().wait()          # an API call that never answers
            return await super().observe(service)

    rec = world.reconciler
    hanging = Hanging(rec.config, clock=world.clock)
    rec.actuator = hanging
    rec.config = replace(rec.config, coordinator=replace(rec.config.coordinator, observe_timeout_s=0.05))
    decisions = await world.ticks(1)
    assert [d.service for d in decisions] == ["code"]
    assert rec.errors_total[("chat", "observe")] == 1
    assert "TimeoutError" in rec.services["chat"].last_error


async def test_serve_stops_cleanly_and_reports_a_crashed_loop(world: World, caplog):
    from heteroscale.coordinator.app import CoordinatorCrashed, Runtime, serve
    from heteroscale.coordinator.status import make_status_app
    from tests.conftest import free_port

    rec = world.reconciler
    runtime = Runtime(config=rec.config, reconciler=rec, app=make_status_app(rec), election=rec.election)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(runtime, host="127.0.0.1", port=free_port(), stop=stop), name="test-serve")
    while rec.ticks < 1:
        await asyncio.sleep(0.01)
    with caplog.at_level("INFO", logger="heteroscale.coordinator"):
        stop.set()
        await asyncio.wait_for(task, timeout=10)          # a normal stop returns...
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text   # ...and says no error

    async def broken_tick():
        raise RuntimeError("bug in a tick")

    rec.tick = broken_tick
    runtime = Runtime(config=rec.config, reconciler=rec, app=make_status_app(rec), election=rec.election)
    with pytest.raises(CoordinatorCrashed, match="bug in a tick"):
        await asyncio.wait_for(serve(runtime, host="127.0.0.1", port=free_port(), stop=asyncio.Event()),
                               timeout=10)


def test_build_runtime_wires_the_static_backend_with_a_local_lease(tmp_path):
    from heteroscale.coordinator.collect import StaticSource
    from heteroscale.coordinator.app import build_runtime

    cfg = load_config({"coordinator": {"backend": "static", "lease": {"path": str(tmp_path / "lease")}},
                       "services": [{"name": "chat", "pd_ratio": "1:1", "target_decode_tps_per_instance": 10,
                                     "slo": {"tbt_s": 0.1},
                                     "prefill": {"sidecars": ["http://127.0.0.1:1/r"]},
                                     "decode": {"sidecars": ["http://127.0.0.1:2/r"]}}]})
    runtime = build_runtime(cfg, identity="unit")
    rec = runtime.reconciler
    assert isinstance(rec.actuator, StaticActuator)
    assert rec.actuator._latest.__self__ is rec.collector.latest     # pools read from what was fetched
    assert isinstance(rec.collector._source, StaticSource)
    assert runtime.election.identity == "unit" and type(runtime.election).__name__ == "LeaseElection"
    assert str(runtime.election.store.path) == str(tmp_path / "lease")


async def test_an_actuator_that_knows_its_instances_is_the_report_source():
    # backend local: no sidecar URLs in the config; the actuator started the instances and
    # names their report URLs itself, so the coordinator pulls those.
    from heteroscale.coordinator.seams import ReportTarget
    from heteroscale.coordinator.config import load_config
    from heteroscale.coordinator.app import report_source

    config = load_config({"coordinator": {"backend": "local"}, "services": [{
        "name": "chat", "pd_ratio": "2:1", "target_decode_tps_per_instance": 100,
        "slo": {"tbt_s": 0.05}, "prefill": {"gpu_types": ["NVIDIA-L20"]},
        "decode": {"gpu_types": ["NVIDIA-H20"]}}]})

    class Started:
        async def targets(self, service):
            return [ReportTarget(url="http://127.0.0.1:9/v1/report", role="decode", pod=f"{service.name}-d0")]

    source = report_source(config, Started())
    assert await source.targets(config.services[0]) == [
        ReportTarget(url="http://127.0.0.1:9/v1/report", role="decode", pod="chat-d0")]


async def test_advisory_decisions_are_logged_once_per_change(world: World, caplog):
    world.reconciler.dry_run = True
    world.load["chat"] = 8000.0
    with caplog.at_level("INFO", logger="heteroscale.coordinator"):
        await world.ticks(3)                       # the same "would scale out" three times
    lines = [r.getMessage() for r in caplog.records if "chat: scale_out_tps" in r.getMessage()]
    assert len(lines) == 1 and "not written (dry run)" in lines[0] and "-> 6P4D" in lines[0]
    assert world.actuator.applied == []


async def test_ratio_advice_becomes_one_event_per_change_from_the_leader(world: World):
    told: list[tuple[str, str]] = []

    class Telling(InMemoryActuator):
        async def record_event(self, service, *, reason, message, warning=False):
            told.append((reason, message))

    rec = world.reconciler
    rec.actuator = Telling(rec.config, clock=world.clock)
    from dataclasses import replace as _replace
    from fractions import Fraction

    from heteroscale.coordinator.core.drift import DriftState
    rt = rec.services["chat"]
    # The detector has been advising 3:1 for a while (its state as the policy leaves it).
    advising = DriftState(k_mean=8.0, k_seen_s=world.clock.now, k_weight=1.0, k_ref=4.0,
                          off_since_s=world.clock.now - 4000, advice=Fraction(3, 1), needed=Fraction(3, 1))
    rt.state = _replace(rt.state, drift=advising)
    world.load["chat"] = 2000.0
    await world.ticks(3)
    assert len(told) == 1 and told[0][0] == "PdRatioDrift" and "about 3:1" in told[0][1]
    # A standby says nothing.
    rec.services["code"].state = _replace(rec.services["code"].state, drift=advising)
    rec.election.leader = False
    await world.ticks(2)
    assert len(told) == 1


async def test_a_kv_transfer_bottleneck_is_told_once_per_episode_and_shown(world: World):
    told: list[tuple[str, str]] = []

    class Telling(InMemoryActuator):
        async def record_event(self, service, *, reason, message, warning=False):
            told.append((reason, message))

    rec = world.reconciler
    rec.actuator = Telling(rec.config, clock=world.clock)
    for role in ("prefill", "decode"):
        for i in range(40):
            world.server.routes[f"/chat/{role}/{i}"] = (
                lambda r=role, i=i: report_doc(service="chat", role=r, pod=f"chat-{r}-{i}",
                                               observed_at=world.clock.now - 1, decode_tps=1000.0,
                                               ttft_p90_s=3.0, tbt_p90_s=0.01, requests_deferred=25,
                                               requests_waiting=0))
    rec.config = replace(rec.config, services=tuple(
        replace(s, slo=replace(s.slo, ttft_s=1.0)) for s in rec.config.services))
    for rt in rec.services.values():
        rt.config = next(s for s in rec.config.services if s.name == rt.config.name)
    decisions = await world.ticks(3)
    chat = [d for d in decisions if d.service == "chat"]
    assert {d.reason for d in chat} == {"hold_kv_transfer"}
    assert [r for r, _ in told] == ["KvTransferBottleneck"]
    assert "waiting for their KV to arrive" in told[0][1]
    assert rec.status(history=False)["services"][0]["kv_transfer_bottleneck"]
    assert world.actuator.applied == [] and rec.actuator.applied == []
