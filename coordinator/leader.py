"""Leader election with client-go semantics, over a Kubernetes Lease or a local lock file.

One algorithm (``LeaseElection``, a port of client-go's ``leaderelection.go``) over a
small ``LeaseStore`` seam with optimistic concurrency:

- acquire when the lease is empty (released) or expired. Expiry is judged on the LOCAL
  monotonic time at which this candidate last saw the record change, plus the record's
  ``leaseDurationSeconds`` — never on the holder's ``renewTime`` (clocks differ).
- the leader renews every ``retry_period_s``; if no renew succeeds for
  ``renew_deadline_s`` it steps down (and goes back to trying to acquire).
- ``leaseTransitions`` is incremented when the holder changes; ``acquireTime`` is kept
  across renewals.
- a write that loses a race (409 on a stale ``resourceVersion``, or another process
  updated the file first) is a lost race, not an error.
- on cancellation the leader releases (holder cleared, duration 1 s), like client-go's
  ``ReleaseOnCancel``, so a clean shutdown hands over at once; a crash does not
  release, and the others wait out the lease.

Fencing: ``still_leader()`` is True only while this candidate holds the lease and its
last successful renew is younger than ``renew_deadline_s``; by default it also reads
the lease back and checks the holder. ``permit(what)`` is what a write asks before
EACH attempt (``Kube.fenced``): ``still_leader()``, and the seconds left until the renew
deadline measured from the last successful renewal, which bounds the attempt (client-go:
no write after the renew deadline). Because ``duration_s > renew_deadline_s``, a rival
can acquire only after ``duration_s`` of silence as it observed it, by which time the
old leader's own fence has been closed for ``duration_s - renew_deadline_s``: that
margin must exceed one write's timeout (checked by the config; docs/kubernetes.md
states the residual window of a request already on the wire).

Robustness: a Lease answer of the wrong shape (not an object, missing metadata, a
non-numeric duration...) is a ``MalformedLease`` (a ``TransientError``): the step fails
like a network error would, and the loop goes on. ``run()`` is supervised: an
unexpected exception in one step is logged (once per distinct error), counted in
``errors``, and the loop continues after a retry period; it never ends the task.

Takeover time after a crash: at most ``duration_s`` plus two acquire intervals (the
follower notices the last renew up to one interval late, and polls once per interval
after expiry); an interval is ``retry_period_s`` stretched by a random jitter of up to
``jitter_factor`` (client-go: 1.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

from heteroscale.coordinator.kube import (LEASES, NO_RETRY, Clock, Kube, SystemClock,
                                      format_micro_time, parse_time)
from heteroscale.errors import ApiError, ConfigError, NotLeaderError, TransientError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class ElectionTiming:
    """Lease timing (ARCHITECTURE §3.4; client-go defaults 15/10/2 s).

    ``duration_s``: how long followers wait, after last seeing the record change, before
    taking over (longer = slower failover, fewer false takeovers under API hiccups).
    ``renew_deadline_s``: how long a leader keeps trying to renew before stepping down;
    must be < ``duration_s`` so it steps down before anyone may take over.
    ``retry_period_s``: renew/acquire interval; ``renew_deadline_s > 1.2 × retry_period_s``
    so at least one retry fits in a deadline. ``jitter_factor``: acquire attempts are
    spread over ``retry × [1, 1 + jitter]`` so candidates do not stampede.
    """

    duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    jitter_factor: float = 1.2

    def __post_init__(self) -> None:
        problems = []
        for name in ("duration_s", "renew_deadline_s", "retry_period_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                problems.append(f"lease.{name} must be a positive number of seconds, got {value!r}")
        if not problems:
            if not self.duration_s > self.renew_deadline_s:
                problems.append(f"lease.duration_s must exceed renew_deadline_s "
                                f"({self.duration_s:g} <= {self.renew_deadline_s:g})")
            if not self.renew_deadline_s > 1.2 * self.retry_period_s:
                problems.append(f"lease.renew_deadline_s must exceed 1.2 × retry_period_s "
                                f"({self.renew_deadline_s:g} <= {1.2 * self.retry_period_s:g})")
        if not 0 <= self.jitter_factor <= 10:
            problems.append("jitter_factor must be within [0, 10]")
        if problems:
            raise ConfigError(problems, source="lease")


@dataclass(frozen=True)
class LeaseRecord:
    """The election record. ``holder`` ``""`` means released. Times are unix seconds."""

    holder: str
    duration_s: float
    acquire_time_s: float | None
    renew_time_s: float | None
    transitions: int = 0


class LeaseConflict(Exception):
    """Lost an optimistic-concurrency race (someone else wrote first)."""


class MalformedLease(TransientError):
    """The store answered, but not with a lease record we can read."""


class LeaseStore(Protocol):
    """Where the record lives. ``version`` is an opaque token of the stored revision;
    ``update`` fails with ``LeaseConflict`` if the stored revision is no longer ``version``."""

    description: str

    async def get(self) -> tuple[LeaseRecord, str] | None:
        ...

    async def create(self, record: LeaseRecord) -> str:
        ...

    async def update(self, record: LeaseRecord, version: str) -> str:
        ...


# ---------------------------------------------------------------- the algorithm

class LeaseElection:
    """Implements ``types.LeaderElection`` over any ``LeaseStore``."""

    def __init__(self, *, store: LeaseStore, identity: str, timing: ElectionTiming,
                 clock: Clock | None = None, rng: random.Random | None = None,
                 release_on_cancel: bool = True, verify_fence: bool = True,
                 on_change: Callable[[bool], None] | None = None) -> None:
        if not identity:
            raise ConfigError(["leader identity must not be empty"], source="lease")
        self.identity = identity
        self.store = store
        self.timing = timing
        self.clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self.release_on_cancel = release_on_cancel
        self.verify_fence = verify_fence
        self._on_change = on_change
        self._observed: LeaseRecord | None = None
        self._observed_version: str | None = None
        self._observed_at = 0.0          # local monotonic time the record last changed
        self._holding = False
        self._last_renew = -math.inf     # local monotonic time of our last successful write
        self.last_error: str = ""
        self.errors = 0                  # unexpected failures contained by the supervisor

    # -- state -----------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self._holding and self._renew_fresh()

    @property
    def leader_identity(self) -> str:
        """The holder as last observed (``""`` if none or released)."""
        return self._observed.holder if self._observed else ""

    @property
    def transitions(self) -> int:
        return self._observed.transitions if self._observed else 0

    def _renew_fresh(self) -> bool:
        return self.clock.monotonic() - self._last_renew < self.timing.renew_deadline_s

    def _set_holding(self, holding: bool) -> None:
        if holding != self._holding:
            self._holding = holding
            log.info("%s: %s leadership of %s", self.identity,
                     "acquired" if holding else "lost", self.store.description)
            if self._on_change is not None:
                self._on_change(holding)

    async def still_leader(self) -> bool:
        """The fence: re-checked right before every write."""
        if not self.is_leader:
            return False
        if not self.verify_fence:
            return True
        try:
            async with asyncio.timeout(self.timing.retry_period_s):
                got = await self.store.get()
        except (TransientError, TimeoutError) as exc:
            log.warning("%s: fence cannot confirm the lease: %s", self.identity, exc)
            return False
        return got is not None and got[0].holder == self.identity and self.is_leader

    async def permit(self, what: str) -> float:
        """Before every write attempt: the fence, then the seconds left until the renew
        deadline (from the last successful renewal). ``NotLeaderError`` if either fails."""
        if not await self.still_leader():
            raise NotLeaderError(f"{self.identity} is not the leader of {self.store.description}: refused to {what}")
        left = self._last_renew + self.timing.renew_deadline_s - self.clock.monotonic()
        if left <= 0:
            raise NotLeaderError(f"{self.identity}: renew deadline passed: refused to {what}")
        return left

    # -- one step: client-go tryAcquireOrRenew ------------------------------
    async def tick(self) -> bool:
        """Try once to acquire or renew. True if we hold the lease after this step."""
        now = self.clock.monotonic()
        wall = self.clock.time()
        desired = LeaseRecord(holder=self.identity, duration_s=self.timing.duration_s,
                              acquire_time_s=wall, renew_time_s=wall, transitions=0)
        try:
            got = await self.store.get()
            if got is None:
                version = await self.store.create(desired)
                self._observe(desired, version, now, wrote=True)
                return True
            record, version = got
            if record != self._observed:
                self._observe(record, version, now, wrote=False)
            held_by_other = record.holder not in ("", self.identity)
            if held_by_other and self._observed_at + record.duration_s > now:
                if self._holding:
                    self._set_holding(False)
                return False
            if record.holder == self.identity:
                desired = replace(desired, acquire_time_s=record.acquire_time_s,
                                  transitions=record.transitions)
            else:
                desired = replace(desired, transitions=record.transitions + 1)
            new_version = await self.store.update(desired, version)
        except LeaseConflict:
            log.info("%s: lost a race for %s", self.identity, self.store.description)
            return False
        except TransientError as exc:
            self.last_error = str(exc)
            log.warning("%s: lease %s: %s", self.identity, self.store.description, exc)
            return False
        self._observe(desired, new_version, now, wrote=True)
        return True

    def _observe(self, record: LeaseRecord, version: str, now: float, *, wrote: bool) -> None:
        self._observed, self._observed_version, self._observed_at = record, version, now
        if wrote:
            self._last_renew = now
            self.last_error = ""
            self._set_holding(True)

    # -- loops -----------------------------------------------------------
    async def run(self) -> None:
        """Acquire, renew, step down on a missed deadline and try again; until cancelled.
        On cancellation a leader releases the lease (if ``release_on_cancel``). Supervised:
        an unexpected error steps down, waits a retry period and starts over."""
        try:
            while True:
                try:
                    await self._acquire()
                    await self._renew()
                except Exception as exc:    # noqa: BLE001 - the election must outlive any one bad answer
                    self.errors += 1
                    text = f"{type(exc).__name__}: {exc}"
                    if text != self.last_error:
                        log.error("%s: election step failed on %s: %s; stepping down and retrying",
                                  self.identity, self.store.description, text, exc_info=True)
                    self.last_error = text
                    self._set_holding(False)
                    await self.clock.sleep(self.timing.retry_period_s)
        finally:
            if self._holding and self.release_on_cancel:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(self.release())
            self._set_holding(False)

    async def _acquire(self) -> None:
        while not await self._bounded_tick():
            jitter = 1.0 + self._rng.random() * self.timing.jitter_factor
            await self.clock.sleep(self.timing.retry_period_s * jitter)

    async def _renew(self) -> None:
        while True:
            await self.clock.sleep(self.timing.retry_period_s)
            round_start = self.clock.monotonic()
            while not await self._bounded_tick():
                if self._observed and self._observed.holder not in ("", self.identity):
                    self._set_holding(False)
                    return
                if self.clock.monotonic() - round_start >= self.timing.renew_deadline_s \
                        or not self._renew_fresh():
                    log.warning("%s: no renew within %.1fs; stepping down", self.identity,
                                self.timing.renew_deadline_s)
                    self._set_holding(False)
                    return
                await self.clock.sleep(self.timing.retry_period_s)

    async def _bounded_tick(self) -> bool:
        # client-go bounds each renew attempt by the renew deadline; the store's own
        # call timeout is usually shorter. asyncio.timeout, not wait_for: Python 3.11's
        # wait_for can swallow a cancellation that races the inner call's completion,
        # which left a cancelled election renewing forever (seen under load).
        try:
            async with asyncio.timeout(self.timing.renew_deadline_s):
                return await self.tick()
        except TimeoutError:
            self.last_error = "lease call timed out"
            log.warning("%s: lease call on %s timed out after %.1fs", self.identity,
                        self.store.description, self.timing.renew_deadline_s)
            return False

    async def release(self) -> bool:
        """Give the lease up now (holder cleared, duration 1 s). True if released.

        A conflict (the record changed since we last wrote it, e.g. a renewal raced this
        call) is re-read: if we still hold it, the release is tried again with the fresh
        version; if someone else holds it, there is nothing of ours to release."""
        if not self._holding or self._observed_version is None or self._observed is None:
            return False
        version, transitions = self._observed_version, self._observed.transitions
        try:
            async with asyncio.timeout(self.timing.retry_period_s):
                for _ in range(3):
                    wall = self.clock.time()
                    record = LeaseRecord(holder="", duration_s=1, acquire_time_s=wall, renew_time_s=wall,
                                         transitions=transitions)
                    try:
                        version = await self.store.update(record, version)
                        break
                    except LeaseConflict:
                        got = await self.store.get()
                        if got is None or got[0].holder != self.identity:
                            self._set_holding(False)
                            return False
                        version, transitions = got[1], got[0].transitions
                else:
                    raise LeaseConflict("the record kept changing")
        except (LeaseConflict, TransientError, TimeoutError) as exc:
            log.warning("%s: could not release %s: %s", self.identity, self.store.description, exc)
            return False
        self._observed, self._observed_version = record, version
        self._last_renew = -math.inf
        self._set_holding(False)
        return True


# ---------------------------------------------------------------- Kubernetes Lease

def _spec_to_record(spec: Any) -> LeaseRecord:
    """A Lease ``spec`` as a record; ``MalformedLease`` for anything of the wrong shape."""
    if not isinstance(spec, dict):
        raise MalformedLease(f"lease spec is {type(spec).__name__}, not an object")
    holder = spec.get("holderIdentity") or ""
    duration = spec.get("leaseDurationSeconds") or 0
    transitions = spec.get("leaseTransitions") or 0
    if not isinstance(holder, str):
        raise MalformedLease(f"holderIdentity is {type(holder).__name__}, not a string")
    for name, value in (("leaseDurationSeconds", duration), ("leaseTransitions", transitions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MalformedLease(f"{name} must be a non-negative integer, got {str(value)[:40]!r}")
    return LeaseRecord(holder=holder, duration_s=float(duration),
                       acquire_time_s=parse_time(_text(spec.get("acquireTime"))),
                       renew_time_s=parse_time(_text(spec.get("renewTime"))),
                       transitions=transitions)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _version(obj: Any) -> str:
    """An object's ``metadata.resourceVersion``; ``MalformedLease`` if it has none."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    if not isinstance(version, str) or not version:
        raise MalformedLease("lease answer without metadata.resourceVersion")
    return version


def _record_to_spec(record: LeaseRecord) -> dict[str, Any]:
    spec: dict[str, Any] = {"holderIdentity": record.holder,
                            # the API field is whole seconds; rounding up keeps followers
                            # waiting at least as long as the leader assumes
                            "leaseDurationSeconds": max(1, math.ceil(record.duration_s)),
                            "leaseTransitions": record.transitions}
    if record.acquire_time_s is not None:
        spec["acquireTime"] = format_micro_time(record.acquire_time_s)
    if record.renew_time_s is not None:
        spec["renewTime"] = format_micro_time(record.renew_time_s)
    return spec


class KubeLeaseStore:
    """A ``coordination.k8s.io/v1`` Lease; ``resourceVersion`` is the version token."""

    def __init__(self, kube: Kube, *, name: str, namespace: str) -> None:
        self.kube = kube.with_retry(NO_RETRY)     # the election loop is the retry
        self.name = name
        self.namespace = namespace
        self.description = f"lease {namespace}/{name}"

    async def get(self) -> tuple[LeaseRecord, str] | None:
        lease = await self.kube.get_or_none(LEASES, self.name, namespace=self.namespace)
        if lease is None:
            return None
        # re-read of the record as stored (rounded duration, µs times)
        return _spec_to_record(lease.get("spec") or {}), _version(lease)

    async def create(self, record: LeaseRecord) -> str:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/managed-by": "heteroscale"}},
                "spec": _record_to_spec(record)}
        try:
            created = await self.kube.create(LEASES, body, namespace=self.namespace)
        except ApiError as exc:
            if exc.status == 409:
                raise LeaseConflict(str(exc)) from exc
            raise
        return _version(created)

    async def update(self, record: LeaseRecord, version: str) -> str:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": version,
                             "labels": {"app.kubernetes.io/managed-by": "heteroscale"}},
                "spec": _record_to_spec(record)}
        try:
            updated = await self.kube.replace(LEASES, self.name, body, namespace=self.namespace)
        except ApiError as exc:
            if exc.status in (404, 409):    # 404: deleted under us — also a lost race
                raise LeaseConflict(str(exc)) from exc
            raise
        return _version(updated)


def KubernetesLeaseElection(*, api: Kube, name: str, namespace: str, identity: str,
                            duration_s: float = 15, renew_deadline_s: float = 10,
                            retry_period_s: float = 2, clock: Clock | None = None,
                            rng: random.Random | None = None, release_on_cancel: bool = True,
                            verify_fence: bool = True,
                            on_change: Callable[[bool], None] | None = None) -> LeaseElection:
    """Election on the Lease ``namespace/name`` (RBAC: leases get/create/update)."""
    timing = ElectionTiming(duration_s=duration_s, renew_deadline_s=renew_deadline_s,
                            retry_period_s=retry_period_s)
    return LeaseElection(store=KubeLeaseStore(api, name=name, namespace=namespace),
                         identity=identity, timing=timing, clock=clock, rng=rng,
                         release_on_cancel=release_on_cancel, verify_fence=verify_fence,
                         on_change=on_change)


# ---------------------------------------------------------------- local lease file

class FileLeaseStore:
    """The record as JSON in ``path``, for several processes on one machine.

    Every operation holds an exclusive ``fcntl.flock`` on ``path + ".lock"`` (the lock
    file is never replaced, so all processes lock the same inode); writes go to a
    temporary file that is fsynced and renamed over ``path``, so a reader never sees a
    half-written record. ``version`` is a counter stored in the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.description = f"lease file {self.path}"

    async def get(self) -> tuple[LeaseRecord, str] | None:
        return await asyncio.to_thread(self._locked, self._read)

    async def create(self, record: LeaseRecord) -> str:
        def op() -> str:
            if self._read() is not None:
                raise LeaseConflict(f"{self.path} exists")
            return self._write(record, 1)
        return await asyncio.to_thread(self._locked, op)

    async def update(self, record: LeaseRecord, version: str) -> str:
        def op() -> str:
            current = self._read()
            if current is None or current[1] != version:
                raise LeaseConflict(f"{self.path} changed (version {current and current[1]})")
            return self._write(record, int(version) + 1)
        return await asyncio.to_thread(self._locked, op)

    def _locked(self, op: Callable[[], Any]) -> Any:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.lock_path, "a+") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    return op()
                finally:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        except OSError as exc:
            raise TransientError(f"{self.description}: {exc}") from exc

    def _read(self) -> tuple[LeaseRecord, str] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            # a garbled file cannot be trusted by anyone: treat it as a released lease at
            # version "0", so the next update (by whoever wins the lock) rewrites it
            log.warning("%s: unreadable (%s); treating as released", self.description, exc)
            return LeaseRecord("", 0.0, None, None, 0), "0"
        try:
            record = LeaseRecord(holder=str(data.get("holderIdentity") or ""),
                                 duration_s=float(data.get("leaseDurationSeconds") or 0),
                                 acquire_time_s=_number(data.get("acquireTime")),
                                 renew_time_s=_number(data.get("renewTime")),
                                 transitions=int(data.get("leaseTransitions") or 0))
            return record, str(int(data.get("version") or 0))
        except (AttributeError, TypeError, ValueError, OverflowError) as exc:
            log.warning("%s: not a lease record (%s); treating as released", self.description, exc)
            return LeaseRecord("", 0.0, None, None, 0), "0"

    def _write(self, record: LeaseRecord, version: int) -> str:
        data = {"holderIdentity": record.holder, "leaseDurationSeconds": record.duration_s,
                "acquireTime": record.acquire_time_s, "renewTime": record.renew_time_s,
                "leaseTransitions": record.transitions, "version": version}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return str(version)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a time: {str(value)[:40]!r}")
    return float(value)


def LocalLeaseElection(*, path: str | os.PathLike[str], identity: str, duration_s: float = 15,
                       renew_deadline_s: float = 10, retry_period_s: float = 2,
                       clock: Clock | None = None, rng: random.Random | None = None,
                       release_on_cancel: bool = True, verify_fence: bool = True,
                       on_change: Callable[[bool], None] | None = None) -> LeaseElection:
    """Election among processes on one machine through a lease file (embedded mode)."""
    timing = ElectionTiming(duration_s=duration_s, renew_deadline_s=renew_deadline_s,
                            retry_period_s=retry_period_s)
    return LeaseElection(store=FileLeaseStore(path), identity=identity, timing=timing,
                         clock=clock, rng=rng, release_on_cancel=release_on_cancel,
                         verify_fence=verify_fence, on_change=on_change)
