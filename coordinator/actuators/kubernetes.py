"""The Kubernetes backend: reads and writes the two role workloads of a service.

``observe`` reads each role's Deployment (or StatefulSet) — one GET gives spec and
status replicas, readiness, the selector and our annotations — and, only when some
replicas are not ready, lists the role's pods to date the oldest pending one.

``apply`` writes the ``scale`` subresource of both roles as one step (see
docs/kubernetes.md for the why):

1. fence: the API client is ``Kube.fenced(election)``, so the lease is re-checked before
   EVERY write attempt, retries and compensation included, and each attempt is cut to
   the time left before the renew deadline; a closed fence raises ``NotLeaderError`` and
   nothing more is written.
2. order: increases before decreases, so capacity never dips mid-step; among increases
   decode first (new decode capacity absorbs what extra prefill would push), among
   decreases prefill first (less prefill output before decode shrinks).
3. each write is a compare-and-swap on the Scale's ``resourceVersion`` and only goes
   ahead while ``spec.replicas`` still equals what ``observe`` saw: a human's concurrent
   ``kubectl scale`` is never overwritten by a decision made before it (409 → re-read,
   ``kube.set_replicas``).
4. 429/5xx/timeouts are retried by ``Kube`` (bounded, backoff, ``Retry-After``). If the
   second role still fails, the first is compensated: written back to its old count
   (again CAS, again fenced), so the P/D ratio is not left broken; then ``ApiError``.
5. afterwards each workload gets the annotations ``heteroscale.io/last-applied-replicas``
   and ``heteroscale.io/last-decision`` and a Kubernetes Event whose reason is the
   decision's reason (``kubectl describe`` shows it). These are best-effort: a failure
   is noted in the result, the scaling stands.

Manual edits: ``spec.replicas`` different from our ``last-applied-replicas`` annotation
(and from what this process last wrote, in case the annotation write failed) means
someone else scaled it → ``PoolStatus.manual_override``; the reconciler takes the new
count as current and the next decision we apply re-stamps the annotation.

``dry_run``: observe as usual, never write anything (not even events).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from heteroscale.coordinator.core.settings import ServiceConfig
from heteroscale.coordinator.core.types import ROLES, ApplyResult, Decision, PoolCounts, PoolStatus
from heteroscale.coordinator.kube import (EVENTS, PODS, WORKLOADS, Clock, Kube, Resource, SystemClock, event_body,
                                          label_selector_text, parse_time, set_replicas)
from heteroscale.errors import ApiError, ConfigError, NotLeaderError

log = logging.getLogger(__name__)

ANNOTATION_REPLICAS = "heteroscale.io/last-applied-replicas"
ANNOTATION_DECISION = "heteroscale.io/last-decision"
COMPONENT = "heteroscale-coordinator"


@dataclass(frozen=True)
class WorkloadRef:
    role: str
    kind: str             # "Deployment" | "StatefulSet"
    resource: Resource
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind.lower()} {self.namespace}/{self.name}"


@dataclass
class _Seen:
    """What the last ``observe`` saw of one workload (for CAS and manual-edit detection)."""

    spec_replicas: int
    pending_first_seen_s: float | None = None
    selector: str = ""


def targets_of(service: ServiceConfig) -> dict[str, WorkloadRef]:
    """The two role workloads of ``service`` (each role names a deployment or statefulset)."""
    found: dict[str, WorkloadRef] = {}
    problems: list[str] = []
    for role in ROLES:
        workload = service.role(role).workload
        if workload is None:
            problems.append(f"{service.name}.{role}: needs a deployment or statefulset")
            continue
        kind, name = workload
        found[role] = WorkloadRef(role, kind, WORKLOADS[kind], service.namespace, name)
    if problems:
        raise ConfigError(problems, source="kubernetes backend")
    return found


def write_order(steps: list[tuple[WorkloadRef, int, int]]) -> list[tuple[WorkloadRef, int, int]]:
    """Increases first (decode, then prefill), then decreases (prefill, then decode)."""
    def key(step: tuple[WorkloadRef, int, int]) -> tuple[int, int]:
        target, old, new = step
        if new > old:
            return (0, 0 if target.role == "decode" else 1)
        return (1, 0 if target.role == "prefill" else 1)
    return sorted(steps, key=key)


class KubernetesActuator:
    """``types.Actuator`` over the Kubernetes API (see the module docstring)."""

    name = "kubernetes"

    def __init__(self, *, api: Kube, dry_run: bool = False, clock: Clock | None = None,
                 identity: str = COMPONENT, conflict_attempts: int = 5) -> None:
        """``api`` is the (fenced) client, owned by the caller; ``dry_run`` observes only."""
        self.dry_run = dry_run
        self.writes = not dry_run
        self.api = api
        self.clock: Clock = clock or SystemClock()
        self.identity = identity
        self.conflict_attempts = conflict_attempts
        self._seen: dict[tuple[str, str, str], _Seen] = {}
        self._written: dict[tuple[str, str, str], int] = {}

    # ------------------------------------------------------------ observe
    async def observe(self, service: ServiceConfig) -> PoolStatus:
        targets = targets_of(service)
        current, ready, pending = {}, {}, {}
        since: list[float] = []
        manual = False
        for role, target in targets.items():
            obj = await self.api.get(target.resource, target.name, namespace=target.namespace)
            spec = int((obj.get("spec") or {}).get("replicas", 1))
            status = obj.get("status") or {}
            ready_n = int(status.get("readyReplicas") or 0)
            current[role], ready[role] = spec, min(ready_n, spec)
            pending[role] = max(0, spec - ready_n)
            key = self._key(target)
            seen = self._seen.get(key)
            first_seen = seen.pending_first_seen_s if seen else None
            if pending[role] > 0:
                first_seen = first_seen if first_seen is not None else self.clock.time()
                oldest = await self._oldest_unready_pod(target, obj)
                since.append(min(first_seen, oldest) if oldest is not None else first_seen)
            else:
                first_seen = None
            self._seen[key] = _Seen(spec_replicas=spec, pending_first_seen_s=first_seen,
                                    selector=label_selector_text((obj.get("spec") or {}).get("selector")))
            manual = manual or self._manual(target, obj, spec)
        return PoolStatus(current=PoolCounts(**current), ready=PoolCounts(**ready),
                          pending=PoolCounts(**pending),
                          pending_since_s=min(since) if since else None, manual_override=manual)

    def _manual(self, target: WorkloadRef, obj: Mapping[str, Any], spec: int) -> bool:
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        text = annotations.get(ANNOTATION_REPLICAS)
        if text is None:
            return False          # never written by us: nothing to compare against
        try:
            recorded = int(text)
        except ValueError:
            return True           # someone edited our annotation: not ours any more
        if spec == recorded or spec == self._written.get(self._key(target)):
            return False
        log.info("%s: replicas %d differ from our last write %d: manual override",
                 target, spec, recorded)
        return True

    async def _oldest_unready_pod(self, target: WorkloadRef, obj: Mapping[str, Any]) -> float | None:
        selector = label_selector_text((obj.get("spec") or {}).get("selector"))
        if not selector:
            return None
        pods = await self.api.list(PODS, namespace=target.namespace, label_selector=selector)
        times = [parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
                 for pod in pods if not _pod_ready(pod)
                 and not (pod.get("metadata") or {}).get("deletionTimestamp")]
        known = [t for t in times if t is not None]
        return min(known) if known else None

    # ------------------------------------------------------------ apply
    async def apply(self, service: ServiceConfig, decision: Decision) -> ApplyResult:
        targets = targets_of(service)
        desired = {role: getattr(decision.desired, role) for role in ROLES}
        if any(n < 0 for n in desired.values()):
            raise ValueError(f"negative replicas in decision {decision.desired}")
        if self.dry_run:
            return ApplyResult(applied=decision.current,
                               note="dry-run: would set " + self._describe(decision.current, decision.desired))
        expected = {role: self._expected(targets[role], getattr(decision.current, role))
                    for role in ROLES}
        steps = write_order([(targets[role], expected[role], desired[role])
                             for role in ROLES if desired[role] != expected[role]])
        done: list[tuple[WorkloadRef, int, int]] = []
        for target, old, new in steps:
            try:
                await self._fenced_scale(target, expect=old, replicas=new)
            except NotLeaderError:
                raise
            except ApiError as exc:
                if not done:
                    raise
                raise await self._compensate(done, failed=target, error=exc) from exc
            done.append((target, old, new))
            self._written[self._key(target)] = new
            self._seen[self._key(target)] = _Seen(spec_replicas=new,
                                                  selector=self._selector_seen(target))
        notes = [self._describe(decision.current, decision.desired)] if steps else ["no change needed"]
        notes += await self._record(targets, decision, desired)
        return ApplyResult(applied=decision.desired, note="; ".join(notes))

    def _selector_seen(self, target: WorkloadRef) -> str:
        seen = self._seen.get(self._key(target))
        return seen.selector if seen else ""

    def _expected(self, target: WorkloadRef, fallback: int) -> int:
        seen = self._seen.get(self._key(target))
        return seen.spec_replicas if seen else fallback

    async def _fenced_scale(self, target: WorkloadRef, *, expect: int, replicas: int) -> None:
        """CAS through the fenced client: set ``replicas`` only while spec.replicas is ``expect``."""
        if await set_replicas(self.api, target.resource, target.name, namespace=target.namespace,
                              expect=expect, replicas=replicas, conflict_attempts=self.conflict_attempts):
            log.info("%s: scaled %d -> %d", target, expect, replicas)

    async def _compensate(self, done: list[tuple[WorkloadRef, int, int]], *, failed: WorkloadRef,
                          error: ApiError) -> ApiError:
        """Write the already-scaled roles back; return the error to raise."""
        undone, broken = [], []
        for target, old, new in reversed(done):
            try:
                await self._fenced_scale(target, expect=new, replicas=old)
                undone.append(f"{target.role} {new}->{old}")
                self._written[self._key(target)] = old
                self._seen[self._key(target)] = _Seen(spec_replicas=old,
                                                      selector=self._selector_seen(target))
            except (ApiError, NotLeaderError) as exc:   # a closed fence: the new leader will repair
                broken.append(f"{target.role} left at {new} ({exc})")
        text = f"{failed.role} write failed ({error})"
        if broken:
            text += "; COMPENSATION FAILED, ratio broken until the next decision: " + ", ".join(broken)
        else:
            text += "; compensated " + ", ".join(undone)
        log.error("%s", text)
        return ApiError(text, status=error.status, retry_after_s=error.retry_after_s)

    async def _record(self, targets: Mapping[str, WorkloadRef], decision: Decision,
                      desired: Mapping[str, int]) -> list[str]:
        """Annotations and Events, best-effort; returns notes about what failed."""
        notes = []
        record = json.dumps({"reason": decision.reason, "at": decision.at,
                             "prefill": desired["prefill"], "decode": desired["decode"],
                             "by": self.identity}, sort_keys=True)
        message = f"{decision.reason}: {self._describe(decision.current, decision.desired)}"
        if decision.detail:
            message += f" ({decision.detail})"
        for role, target in targets.items():
            try:
                obj = await self.api.patch(target.resource, target.name, namespace=target.namespace,
                                           body={"metadata": {"annotations": {
                                               ANNOTATION_REPLICAS: str(desired[role]),
                                               ANNOTATION_DECISION: record}}})
                await self.api.create(EVENTS, self._event(target, obj, decision.reason, message),
                                      namespace=target.namespace)
            except (ApiError, NotLeaderError) as exc:   # best-effort: the scaling stands
                log.warning("%s: could not record the decision: %s", target, exc)
                notes.append(f"{role} record failed: {exc}")
        return notes

    def _event(self, target: WorkloadRef, obj: Mapping[str, Any], reason: str, message: str) -> dict[str, Any]:
        meta = obj.get("metadata") or {}
        return event_body(api_version=target.resource.api_version, kind=target.kind, name=target.name,
                          namespace=target.namespace, reason=reason, message=message, now_s=self.clock.time(),
                          component=COMPONENT, instance=self.identity, uid=meta.get("uid"),
                          resource_version=meta.get("resourceVersion"))

    @staticmethod
    def _describe(current: PoolCounts, desired: PoolCounts) -> str:
        return (f"prefill {current.prefill}->{desired.prefill}, "
                f"decode {current.decode}->{desired.decode}")

    @staticmethod
    def _key(target: WorkloadRef) -> tuple[str, str, str]:
        return (target.kind, target.namespace, target.name)

    # ------------------------------------------------------------ discovery
    async def list_pods(self, service: ServiceConfig, role: str) -> list[tuple[str, str]]:
        """``(pod name, pod IP)`` of the role's running pods, for report collection.
        The role's ``selector`` (config) wins; else the workload's own selector."""
        target = targets_of(service)[role]
        selector = service.role(role).selector or self._selector_seen(target)
        if not selector:
            obj = await self.api.get(target.resource, target.name, namespace=target.namespace)
            selector = label_selector_text((obj.get("spec") or {}).get("selector"))
        if not selector:
            return []
        pods = await self.api.list(PODS, namespace=target.namespace, label_selector=selector)
        found = []
        for pod in pods:
            meta, status = pod.get("metadata") or {}, pod.get("status") or {}
            if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
                continue
            found.append((str(meta.get("name")), str(status["podIP"])))
        return sorted(found)

    async def close(self) -> None:
        return None          # the client belongs to the caller


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False
