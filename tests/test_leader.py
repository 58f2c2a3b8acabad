"""Leader election, fast tier: client-go semantics over the in-memory API fake and the
local lease file, driven tick by tick with a fake clock (no real sleeps)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from heteroscale.coordinator.kube import LEASES, Kube, format_micro_time
from heteroscale.coordinator.leader import (ElectionTiming, FileLeaseStore, KubernetesLeaseElection,
                                        LeaseConflict, LeaseRecord, LocalLeaseElection)
from heteroscale.errors import ConfigError
from tests.k8s_fake import FakeClock, FakeKube

NS, NAME = "system", "heteroscale-coordinator"
LEASE_PATH = LEASES.path(namespace=NS, name=NAME)
TIMING = dict(duration_s=15, renew_deadline_s=10, retry_period_s=2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock) -> FakeKube:
    fake = FakeKube(clock=clock.time)
    fake.add_namespace(NS)
    return fake


def candidate(fake: FakeKube, clock: FakeClock, identity: str, **kw):
    params = dict(TIMING, **kw)
    return KubernetesLeaseElection(api=Kube(fake), name=NAME, namespace=NS, identity=identity,
                                   clock=clock, rng=random.Random(identity), **params)


def lease_spec(fake: FakeKube) -> dict:
    return next(o for o in fake.objects("leases", NS) if o["metadata"]["name"] == NAME)["spec"]


# ---------------------------------------------------------------- settings

def test_timing_rules_report_every_problem():
    ElectionTiming()                                   # client-go defaults are valid
    ElectionTiming(duration_s=2, renew_deadline_s=1.5, retry_period_s=0.5)
    with pytest.raises(ConfigError) as info:
        ElectionTiming(duration_s=10, renew_deadline_s=10, retry_period_s=9)
    assert len(info.value.problems) == 2              # duration <= deadline, deadline <= 1.2 × retry
    with pytest.raises(ConfigError):
        ElectionTiming(duration_s=-1)
    with pytest.raises(ConfigError):
        KubernetesLeaseElection(api=Kube(FakeKube()), name="l", namespace="n", identity="")


# ---------------------------------------------------------------- one step at a time

async def test_first_candidate_creates_and_holds(fake, clock):
    a = candidate(fake, clock, "a")
    assert not a.is_leader and not await a.still_leader()
    assert await a.tick()
    assert a.is_leader and await a.still_leader() and a.leader_identity == "a"
    spec = lease_spec(fake)
    assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0
    assert spec["renewTime"] == format_micro_time(clock.time())


async def test_follower_waits_for_expiry_then_takes_over(fake, clock):
    a, b = candidate(fake, clock, "a"), candidate(fake, clock, "b")
    assert await a.tick()
    assert not await b.tick()                          # held, not expired
    assert b.leader_identity == "a" and not b.is_leader
    await clock.advance(14.9)                          # a silent for 14.9 s < 15 s
    assert not await b.tick()
    await clock.advance(0.2)                           # 15.1 s since b saw the record change
    assert await b.tick()
    assert b.is_leader and lease_spec(fake)["holderIdentity"] == "b"
    assert lease_spec(fake)["leaseTransitions"] == 1   # holder changed once
    # a, back from a pause, sees b and does not renew over it
    assert not await a.tick()
    assert not a.is_leader and not await a.still_leader()


async def test_renewing_keeps_acquire_time_and_transitions(fake, clock):
    a, b = candidate(fake, clock, "a"), candidate(fake, clock, "b")
    assert await a.tick()
    acquired = lease_spec(fake)["acquireTime"]
    for _ in range(20):                                # 40 s of renewals every 2 s
        await clock.advance(2)
        assert await a.tick()
        assert not await b.tick()                      # every renew restarts b's wait
    spec = lease_spec(fake)
    assert spec["acquireTime"] == acquired and spec["leaseTransitions"] == 0
    assert spec["renewTime"] == format_micro_time(clock.time())


async def test_expiry_is_judged_on_local_observation_not_remote_clock(fake, clock):
    # A record whose renewTime is an hour old (say, the holder's clock is behind): a new
    # candidate must still wait a full lease duration after FIRST SEEING it.
    fake.concurrent_write("POST", LEASES.path(namespace=NS), {
        "metadata": {"name": NAME},
        "spec": {"holderIdentity": "skewed", "leaseDurationSeconds": 15, "leaseTransitions": 3,
                 "acquireTime": format_micro_time(clock.time() - 3600),
                 "renewTime": format_micro_time(clock.time() - 3600)}}, "application/json")
    b = candidate(fake, clock, "b")
    assert not await b.tick()
    await clock.advance(14)
    assert not await b.tick()
    await clock.advance(1.5)
    assert await b.tick()
    assert lease_spec(fake)["leaseTransitions"] == 4


async def test_lost_race_is_not_an_error(fake, clock):
    a, b = candidate(fake, clock, "a"), candidate(fake, clock, "b")
    assert await a.tick()
    c = candidate(fake, clock, "c")
    assert not await b.tick() and not await c.tick()
    await clock.advance(16)                            # a crashed; b and c both see it expired
    fake.inject(409, method="PUT", path_contains=LEASE_PATH)   # b's write loses to c's
    assert not await b.tick()
    assert b.last_error == "" and not b.is_leader
    assert await c.tick()
    assert lease_spec(fake)["holderIdentity"] == "c"


async def test_real_stale_resource_version_race(fake, clock):
    # Two candidates read the same expired record; the second writer hits a true 409.
    store_b = candidate(fake, clock, "b").store
    a = candidate(fake, clock, "a")
    assert await a.tick()
    record, version = await store_b.get()
    await clock.advance(2)
    assert await a.tick()                              # a renews: version moves on
    with pytest.raises(LeaseConflict):
        await store_b.update(LeaseRecord("b", 15, clock.time(), clock.time(), 1), version)


async def test_release_hands_over_at_once(fake, clock):
    a, b = candidate(fake, clock, "a"), candidate(fake, clock, "b")
    assert await a.tick()
    assert not await b.tick()
    assert await a.release()
    assert not a.is_leader and not await a.still_leader()
    spec = lease_spec(fake)
    assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1
    assert await b.tick()                              # no waiting: holder is empty
    assert lease_spec(fake)["leaseTransitions"] == 1


async def test_api_errors_keep_the_follower_a_follower(fake, clock):
    a = candidate(fake, clock, "a")
    fake.inject(500, path_contains=LEASE_PATH, times=1)
    assert not await a.tick()
    assert "500" in a.last_error and not a.is_leader
    assert await a.tick()
    assert a.last_error == ""


# ---------------------------------------------------------------- the fence

async def test_fence_closes_when_renewals_stop(fake, clock):
    a = candidate(fake, clock, "a")
    assert await a.tick()
    await clock.advance(9.9)
    assert await a.still_leader()
    await clock.advance(0.2)                           # 10.1 s since the last renew > deadline
    assert not a.is_leader and not await a.still_leader()


async def test_fence_reads_the_lease_back(fake, clock):
    a = candidate(fake, clock, "a")
    assert await a.tick()
    fake.inject(503, method="GET", path_contains=LEASE_PATH)
    assert not await a.still_leader()                  # cannot confirm → do not write
    assert await a.still_leader()
    # someone deletes and recreates the lease for themselves behind a's back
    fake.concurrent_write("DELETE", LEASE_PATH)
    fake.concurrent_write("POST", LEASES.path(namespace=NS), {
        "metadata": {"name": NAME}, "spec": {"holderIdentity": "intruder", "leaseDurationSeconds": 15}},
        "application/json")
    assert a.is_leader                                 # local view not updated yet...
    assert not await a.still_leader()                  # ...but the fence reads the truth


# ---------------------------------------------------------------- run() loops on the fake clock

async def _run(election) -> asyncio.Task:
    task = asyncio.create_task(election.run(), name=f"election-{election.identity}")
    await asyncio.sleep(0)
    return task


async def _stop(*tasks: asyncio.Task) -> None:
    for task in tasks:
        task.cancel()
    async with asyncio.timeout(5):      # a cancel that is swallowed must fail, not hang
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_run_renews_and_steps_down_when_the_api_fails(fake, clock):
    changes = []
    a = candidate(fake, clock, "a", on_change=changes.append)
    task = await _run(a)
    try:
        await clock.advance(0.1)
        assert a.is_leader
        await clock.advance(30)
        assert a.is_leader and changes == [True]
        renewals = len(fake.writes(LEASE_PATH))
        assert renewals == 15                           # one renew per 2 s retry period
        fake.inject(500, path_contains=LEASE_PATH, times=1000)
        await clock.advance(11)                         # no renew for > renew_deadline
        assert not a.is_leader and changes == [True, False]
        fake.clear_faults()
        await clock.advance(16)                         # lease expired; a re-acquires
        assert a.is_leader and changes == [True, False, True]
    finally:
        await _stop(task)


async def test_crash_takeover_within_duration_plus_two_intervals(fake, clock):
    a = candidate(fake, clock, "a", release_on_cancel=False)
    b = candidate(fake, clock, "b")
    ta = await _run(a)
    await clock.advance(0.1)
    tb = await _run(b)
    try:
        await clock.advance(7.3)
        assert a.is_leader and not b.is_leader
        await _stop(ta)                                 # a crash: no release
        assert lease_spec(fake)["holderIdentity"] == "a"
        waited = 0.0
        while not b.is_leader:
            await clock.advance(0.1)
            waited += 0.1
            assert waited < 60, "b never took over"
        # documented bound: duration + 2 acquire intervals (retry × (1 + jitter 1.2))
        assert waited <= 15 + 2 * 2 * 2.2
        assert waited >= 15 - 2                         # not before the lease could expire
        assert lease_spec(fake)["leaseTransitions"] == 1
    finally:
        await _stop(tb)


async def test_clean_shutdown_releases_and_the_other_takes_over_fast(fake, clock):
    a, b = candidate(fake, clock, "a"), candidate(fake, clock, "b")
    ta = await _run(a)
    await clock.advance(0.1)
    tb = await _run(b)
    try:
        await clock.advance(5)
        await _stop(ta)
        assert lease_spec(fake)["holderIdentity"] == ""
        waited = 0.0
        while not b.is_leader:
            await clock.advance(0.1)
            waited += 0.1
        assert waited <= 2 * 2.2 + 0.1                 # one acquire interval, not a lease duration
    finally:
        await _stop(tb)


# ---------------------------------------------------------------- the local lease file

async def test_local_lease_same_protocol(tmp_path, clock):
    path = tmp_path / "lease.json"
    a = LocalLeaseElection(path=path, identity="a", clock=clock, **TIMING)
    b = LocalLeaseElection(path=path, identity="b", clock=clock, **TIMING)
    assert await a.tick() and not await b.tick()
    data = json.loads(path.read_text())
    assert data["holderIdentity"] == "a" and data["leaseTransitions"] == 0
    await clock.advance(15.5)
    assert await b.tick() and json.loads(path.read_text())["leaseTransitions"] == 1
    assert not await a.tick() and not await a.still_leader()
    assert await b.release()
    assert await a.tick()
    assert json.loads(path.read_text())["leaseTransitions"] == 2


def test_file_store_compare_and_swap_is_atomic_across_threads(tmp_path):
    # 8 writers read the same version and race to update it: exactly one may win.
    store = FileLeaseStore(tmp_path / "lease.json")
    asyncio.run(store.create(LeaseRecord("", 1, None, None, 0)))
    _, version = asyncio.run(store.get())
    barrier = threading.Barrier(8)
    results: list[str] = []

    def writer(i: int) -> None:
        barrier.wait()
        try:
            asyncio.run(store.update(LeaseRecord(f"w{i}", 15, 1.0, 1.0, 1), version))
            results.append(f"w{i}")
        except LeaseConflict:
            results.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results if r != "lost"]
    assert len(winners) == 1 and len(results) == 8
    record, _ = asyncio.run(store.get())
    assert record.holder == winners[0]


async def test_garbled_lease_file_is_treated_as_released(tmp_path, clock):
    path = tmp_path / "lease.json"
    path.write_text("{not json")
    a = LocalLeaseElection(path=path, identity="a", clock=clock, **TIMING)
    assert await a.tick()
    assert json.loads(path.read_text())["holderIdentity"] == "a"


@pytest.mark.slow
async def test_local_lease_across_real_processes(tmp_path):
    """Three processes share one lease file: one leads; SIGKILL it and another takes over;
    SIGINT the new one and it releases. Real time, short lease (1 s / 0.6 s / 0.2 s)."""
    from tests.k8s_envtest import REPO

    path = tmp_path / "lease.json"
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "tests.k8s_envtest", "candidate", "--lease-file", str(path),
         "--identity", name, "--duration", "1", "--renew-deadline", "0.6", "--retry", "0.2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1")) for name in ("l1", "l2", "l3")}
    out: dict[str, list[str]] = {name: [] for name in procs}

    async def read(name: str) -> None:
        while line := await asyncio.to_thread(procs[name].stdout.readline):
            out[name].append(line.strip())

    readers = [asyncio.create_task(read(n), name=f"read-{n}") for n in procs]

    async def until(predicate, limit_s: float = 20) -> None:
        deadline = time.monotonic() + limit_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; output so far: {out}"
            await asyncio.sleep(0.05)

    def leaders() -> list[str]:
        return [n for n, lines in out.items() if lines and lines[-1] == f"LEADER {n}"]

    try:
        await until(lambda: len(leaders()) == 1)
        first = leaders()[0]
        await asyncio.sleep(1.5)                       # more than a lease duration
        assert leaders() == [first]                    # still exactly one
        assert json.loads(path.read_text())["holderIdentity"] == first
        procs[first].send_signal(signal.SIGKILL)
        await until(lambda: any(n != first for n in leaders()))
        second = next(n for n in leaders() if n != first)
        record = json.loads(path.read_text())
        assert record["holderIdentity"] == second and record["leaseTransitions"] == 1
        procs[second].send_signal(signal.SIGINT)
        await asyncio.to_thread(procs[second].wait, 10)
        await until(lambda: json.loads(path.read_text())["holderIdentity"] not in ("", first, second))
        assert json.loads(path.read_text())["leaseTransitions"] == 2
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        await asyncio.gather(*readers, return_exceptions=True)


class GatedStore:
    """Wraps a store; while ``gate`` is armed, ``get`` waits for it to open."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.description = inner.description
        self.gate: asyncio.Event | None = None
        self.waiting = asyncio.Event()

    async def get(self):
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        return await self.inner.get()

    async def create(self, record):
        return await self.inner.create(record)

    async def update(self, record, version):
        return await self.inner.update(record, version)


async def test_cancel_racing_a_finishing_renew_still_stops_the_loop(fake, clock):
    # Regression: with asyncio.wait_for (Python 3.11) a cancel that arrives in the same
    # loop step as the renew call finishing was swallowed, and the "stopped" election
    # kept renewing forever. The cancel must win, and the lease must be released.
    from heteroscale.coordinator.leader import LeaseElection

    store = GatedStore(candidate(fake, clock, "a").store)
    a = LeaseElection(store=store, identity="a", timing=ElectionTiming(**TIMING), clock=clock)
    task = await _run(a)
    await clock.advance(0.1)
    assert a.is_leader
    store.gate = asyncio.Event()
    await clock.advance(2)                     # the next renew starts and blocks in get()
    assert store.waiting.is_set()
    store.gate.set()                           # the renew can finish...
    task.cancel()                              # ...in the same step as the cancel
    store.gate = None
    await clock.settle()
    assert task.done() and task.cancelled()
    assert lease_spec(fake)["holderIdentity"] == ""   # released on the way out
