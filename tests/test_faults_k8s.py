"""The fault-injection tier (issue 12): two real coordinator processes, a real
kube-apiserver behind a fault-injecting proxy, fuzzed sidecar reports, SIGKILL and
SIGSTOP of the leader. The rig and the checks: tests/fault_rig.py; the proxy:
tests/fault_proxy.py.

``test_fault_tier_short`` is in the default suite (marker ``k8s``; skips without
k8s-envtest): 2 failovers, >= 30 API faults, >= 200 fuzzed reports, and fuzzed engine
pages scraped by a real sidecar process throughout.
``test_fault_tier_medium`` (marker ``faults``, opt-in: ``pytest -m faults``) does 10 /
150 / 2,000. The long run, with the issue's targets, is ``benchmarks/fault_bench.py``.

The proxy's tests need no cluster: a local HTTP server stands in for the API server
(plain HTTP), so what each fault does on the wire is pinned in the default suite too.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import pytest
from aiohttp import web

from heteroscale.coordinator.kube import ApiClientTransport, Kube, RetryPolicy
from heteroscale.errors import ApiError
from tests.conftest import free_port
from tests.fault_proxy import FaultPlan, FaultProxy, Upstream
from tests.fault_rig import Rig, api_faults, failover_cycles, fuzzed_reports
from tests.k8s_envtest import k8s_cluster, k8s_namespace, kube  # noqa: F401


async def _run_tier(rig: Rig, *, cycles: int, faults: int, fuzzed: int, phase_s: float) -> dict:
    seconds = {}
    started = time.monotonic()
    await rig.start()
    leader = await rig.wait_leader(timeout_s=60)
    for proc in rig.procs.values():
        await rig.wait_healthy(proc)
    seconds["start"], started = time.monotonic() - started, time.monotonic()
    done = await failover_cycles(rig, cycles)
    seconds["failover"], started = time.monotonic() - started, time.monotonic()
    injected = await api_faults(rig, faults, rate=0.3, phase_s=phase_s)
    seconds["faults"], started = time.monotonic() - started, time.monotonic()
    fuzz = await fuzzed_reports(rig, fuzzed)
    seconds["fuzz"] = time.monotonic() - started
    return {"first_leader": leader, "cycles": done, "faults": injected, "fuzz": fuzz, "verdict": rig.verdict(),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def _assert_clean(result: dict, *, cycles: int, faults: int, fuzzed: int) -> None:
    verdict = result["verdict"]
    print(json.dumps({k: v for k, v in result.items() if k != "cycles"}, indent=1, default=str))
    assert len(result["cycles"]) == cycles
    assert {c["to"] for c in result["cycles"]} <= {"coord-a", "coord-b"}
    assert result["faults"] >= faults
    assert result["fuzz"]["fuzzed_served"] >= fuzzed
    assert verdict["non_holder_writes"] == 0, verdict["first_problems"]
    assert verdict["wrong_writes"] == 0, verdict["first_problems"]
    assert verdict["crashes"] == 0 and verdict["health_failures"] == 0, verdict["first_problems"]
    assert verdict["non_finite_out"] == 0, verdict["first_problems"]
    # a real sidecar scraped fuzzed engine pages, and its reports were read back
    assert verdict["fuzzed_pages_scraped"] > 0 and verdict["sidecar_reports_checked"] > 0
    # the checks had something to check: the leaders wrote, and scaled in when allowed
    assert verdict["scale_writes_landed"] > 0 and verdict["scale_ins_landed"] > 0
    # ... and a complete low view does scale in (the partial-data check could fail)
    assert result["fuzz"]["control_scaled_in"]


@pytest.mark.k8s
async def test_fault_tier_short(k8s_cluster, kube, k8s_namespace, tmp_path):  # noqa: F811
    rig = Rig(k8s_cluster, kube, namespace=k8s_namespace, work=tmp_path, seed=12)
    try:
        result = await _run_tier(rig, cycles=2, faults=30, fuzzed=200, phase_s=3.0)
    finally:
        await rig.close()
    _assert_clean(result, cycles=2, faults=30, fuzzed=200)


@pytest.mark.k8s
@pytest.mark.faults
async def test_fault_tier_medium(k8s_cluster, kube, k8s_namespace, tmp_path):  # noqa: F811
    rig = Rig(k8s_cluster, kube, namespace=k8s_namespace, work=tmp_path, seed=13)
    try:
        result = await _run_tier(rig, cycles=10, faults=150, fuzzed=2000, phase_s=5.0)
    finally:
        await rig.close()
    _assert_clean(result, cycles=10, faults=150, fuzzed=2000)


# ---------------------------------------------------------------- the proxy on its own

class _Api:
    """A stand-in API server (plain HTTP) that counts what reached it."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append((request.method, request.path))
        if request.path.endswith("/leases/heteroscale-coordinator"):
            return web.json_response({"metadata": {"resourceVersion": "1"},
                                      "spec": {"holderIdentity": "coord-a", "leaseDurationSeconds": 4}})
        if request.path.endswith("/scale"):
            return web.json_response({"metadata": {"resourceVersion": "7"}, "spec": {"replicas": 3}})
        return web.json_response({"metadata": {"resourceVersion": "9"}, "kind": "Thing"})


@pytest.fixture
async def proxied():
    api = _Api()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    proxy = FaultProxy(Upstream(url=f"http://127.0.0.1:{port}", ssl_context=ssl.create_default_context(),
                                authorization=""), lease_namespace="ns", lease_name="heteroscale-coordinator")
    ports = await proxy.start({"coord-a": 0})
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{ports['coord-a']}"
    configuration.retries = False
    kube = Kube(ApiClientTransport(client.ApiClient(configuration), timeout_s=2, write_timeout_s=1),
                retry=RetryPolicy(attempts=1))
    yield api, proxy, kube
    await kube.close()
    await proxy.close()
    await runner.cleanup()


SCALE = "/apis/apps/v1/namespaces/ns/deployments/d/scale"


async def _put_scale(kube: Kube) -> dict:
    return await kube.request("PUT", SCALE, body={"spec": {"replicas": 4}})


@pytest.mark.parametrize("kind,status,forwarded", [
    ("409", 409, False), ("429", 429, False), ("500", 500, False), ("503", 503, False),
    ("reset_before", 0, False), ("reset_after", 0, True), ("invalid_json", 200, True), ("wrong_shape", 200, True),
])
async def test_each_fault_on_the_wire(proxied, kind, status, forwarded):
    api, proxy, kube = proxied
    proxy.set_plan(FaultPlan(rate=1.0, kinds=(kind,), seed=3))
    try:
        answer, error = await _put_scale(kube), None
    except ApiError as exc:
        answer, error = None, exc
    if kind == "wrong_shape" and error is None:
        # an object of the wrong shape passes the transport; whoever reads it must cope
        assert answer != {"metadata": {"resourceVersion": "7"}, "spec": {"replicas": 3}}
    else:
        assert error is not None and error.status == status
    assert (("PUT", SCALE) in api.hits) == forwarded
    assert [f["kind"] for f in proxy.faults] == [kind]
    if forwarded:
        (write,) = proxy.writes
        assert write["who"] == "coord-a" and write["holder_before"] == "coord-a"
        assert write["replicas_before"] == 3 and write["replicas_asked"] == 4
    else:
        assert proxy.writes == []
    if kind in ("429", "503"):
        assert error.retry_after_s is not None


async def test_slow_answer_and_clean_pass_through(proxied):
    api, proxy, kube = proxied
    assert (await _put_scale(kube))["spec"]["replicas"] == 3         # no faults: what the server said
    proxy.set_plan(FaultPlan(rate=1.0, kinds=("slow",), seed=3, slow_s=(1.5, 1.5)))
    with pytest.raises(ApiError) as info:                           # longer than the write timeout
        await _put_scale(kube)
    assert info.value.status == 0
    await asyncio.sleep(0.1)
    assert [m for m, p in api.hits if p == SCALE].count("PUT") == 2   # the slow write landed anyway
    assert len(proxy.writes) == 2 and proxy.summary()["fault_kinds"] == {"slow": 1}


async def test_late_write_lands_after_its_client_gave_up(proxied):
    """The residual window, on the wire: a request held before it reaches the server
    times out at the client (write timeout 1 s) and still lands afterwards."""
    api, proxy, kube = proxied
    proxy.set_plan(FaultPlan(rate=1.0, kinds=("late",), seed=3, slow_s=(1.5, 1.5)))
    with pytest.raises(ApiError) as info:
        await _put_scale(kube)
    assert info.value.status == 0
    assert ("PUT", SCALE) not in api.hits                            # not yet: the client gave up first
    await asyncio.sleep(1.0)
    assert ("PUT", SCALE) in api.hits
    (write,) = proxy.writes
    assert write["held_s"] == 1.5 and write["t_forward"] - write["t_arrive"] >= 1.5


def test_the_verdict_flags_what_it_should(tmp_path):
    """The checks can fail: synthetic write records, classified as the long run classifies them."""
    from pathlib import Path

    from tests.fault_rig import Phase, Proc
    from tests.k8s_envtest import Cluster

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({"clusters": [{"cluster": {"server": "http://127.0.0.1:9"}}],
                                      "users": [{"user": {"token": "t"}}]}))
    rig = Rig(Cluster(run_dir=tmp_path, kubeconfig=kubeconfig), None, namespace="ns", work=tmp_path)
    for ident in ("coord-a", "coord-b"):
        rig.procs[ident] = Proc(identity=ident, port=0, config=Path("x"), kubeconfig=Path("y"), log=Path("z"))
    rig.procs["coord-b"].resumes.append(100.0)
    rig.phases = [Phase("high", start_s=0.0, end_s=50.0), Phase("partial-low", start_s=50.0, end_s=80.0, partial=True),
                  Phase("low", start_s=80.0)]
    scale = "/apis/apps/v1/namespaces/ns/deployments/chat-decode/scale"

    def write(t, who, holder, **kw):
        return {"t_arrive": t, "who": who, "method": "PUT", "path": scale, "lease_write": False,
                "holder_at_arrival": kw.pop("at_arrival", holder), "held_s": kw.pop("held_s", 0.0),
                "holder_before": holder, "status": 200, **kw}

    rig.proxy.writes = [
        write(10.0, "coord-a", "coord-a", replicas_before=2, replicas_asked=3),      # fine
        write(20.0, "coord-b", "coord-a"),                                            # a non-holder write
        write(30.0, "coord-a", "coord-b", at_arrival="coord-a", held_s=2.0),          # held on the wire
        write(100.5, "coord-b", "coord-a"),                                           # right after SIGCONT
        write(40.0, "coord-a", "coord-a", replicas_before=6, replicas_asked=7),       # above max_decode
        write(60.0, "coord-a", "coord-a", replicas_before=4, replicas_asked=2),       # scale-in on partial data
        write(90.0, "coord-a", "coord-a", replicas_before=4, replicas_asked=2),       # scale-in, complete view
        {**write(95.0, "coord-b", "coord-a"), "lease_write": True},                   # the election's own
    ]
    verdict = rig.verdict()
    assert verdict["non_holder_writes"] == 1
    assert verdict["residual_window_writes"] == 2
    assert verdict["wrong_writes"] == 2
    assert verdict["scale_ins_landed"] == 2 and verdict["scale_writes_landed"] == 4
