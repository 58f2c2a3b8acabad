"""The Kubernetes API seam: one async ``request`` per call, bounded retries above it.

Layers, bottom up:

``KubeTransport``       the seam. ``request(method, path, query=, body=, content_type=)``
                        returns the decoded JSON object or raises ``ApiError``.
                        ``ApiClientTransport`` is the real one (the official
                        ``kubernetes`` client's ApiClient: kubeconfig or in-cluster
                        config, TLS, bearer token), run with ``asyncio.to_thread``
                        and an explicit timeout on every call; ``tests/k8s_fake.py``
                        is an in-memory fake of the same seam.
``Kube``                the facade everything else uses: get/list/create/replace/
                        patch/delete on ``Resource`` descriptors (deployments,
                        statefulsets, pods, pods/status, nodes, events, leases,
                        scale), plus ``read_modify_write`` for optimistic updates.
                        Retries 429/5xx/no-answer with capped, jittered exponential
                        backoff that honours ``Retry-After``; 409 is retried only by
                        ``read_modify_write`` (re-read, re-apply), never blindly.
                        ``kube.fenced(election)`` is the same client whose every
                        write ATTEMPT (retries included) first asks the election's
                        ``permit``: a closed fence raises ``NotLeaderError`` before
                        anything is sent, and the attempt's timeout is cut to the
                        time left before the renew deadline.

Objects are plain JSON dicts exactly as the API server sends them (camelCase), not
generated model classes: the fake can then be faithful with little code, and callers
never depend on a client version's model layout.

Errors: ``ApiException`` and urllib3 errors are translated here, once, into
``heteroscale.errors.ApiError(status, retry_after_s)``; status 0 means no answer
(connection refused, timeout, TLS). Configuration problems (no kubeconfig, bad
context) are ``UsageError``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Mapping, Protocol, TypeVar

from heteroscale.coordinator.seams import WriteFence
from heteroscale.errors import ApiError, ConfigError, UsageError

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
_PATCH_TYPES = {"merge": MERGE_PATCH, "strategic": STRATEGIC_MERGE_PATCH, "json": JSON_PATCH}


# ---------------------------------------------------------------- clock seam

class Clock(Protocol):
    """Time as an input: wall time for timestamps written to the API, monotonic time for
    intervals, and an interruptible sleep. Tests pass a fake one."""

    def time(self) -> float:
        ...

    def monotonic(self) -> float:
        ...

    async def sleep(self, seconds: float) -> None:
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


# ---------------------------------------------------------------- resources

@dataclass(frozen=True)
class Resource:
    """A REST resource: ``api_version`` ``v1`` (core) or ``group/version``."""

    api_version: str
    plural: str
    kind: str
    namespaced: bool = True

    def path(self, *, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced:
            if not namespace:
                raise ValueError(f"{self.plural} is namespaced: give a namespace")
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            if not name:
                raise ValueError("a subresource needs an object name")
            base += f"/{subresource}"
        return base


DEPLOYMENTS = Resource("apps/v1", "deployments", "Deployment")
STATEFULSETS = Resource("apps/v1", "statefulsets", "StatefulSet")
REPLICASETS = Resource("apps/v1", "replicasets", "ReplicaSet")
PODS = Resource("v1", "pods", "Pod")
EVENTS = Resource("v1", "events", "Event")
NODES = Resource("v1", "nodes", "Node", namespaced=False)
NAMESPACES = Resource("v1", "namespaces", "Namespace", namespaced=False)
LEASES = Resource("coordination.k8s.io/v1", "leases", "Lease")

WORKLOADS = {"Deployment": DEPLOYMENTS, "StatefulSet": STATEFULSETS}
MAX_EVENT_MESSAGE = 1024         # the API server truncates longer messages anyway


# ---------------------------------------------------------------- the seam

class KubeTransport(Protocol):
    async def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      timeout_s: float | None = None) -> JSON:
        """One API call; the decoded JSON object, or ``ApiError``. ``timeout_s`` shortens
        the transport's own timeout for this call (never lengthens it)."""
        ...

    async def close(self) -> None:
        ...


def parse_retry_after(value: Any) -> float | None:
    """``Retry-After`` in seconds (the API server sends integer seconds); ``None`` if absent
    or not a number (HTTP dates are not used by kube-apiserver)."""
    if value is None:
        return None
    try:
        seconds = float(str(value).strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def api_error_from_exception(exc: Any, what: str) -> ApiError:
    """Translate a ``kubernetes.client.ApiException`` into ``ApiError``.

    The API server's ``Status`` body gives the message and reason; ``Retry-After``
    comes from the headers (429 and some 5xx carry it)."""
    status = int(getattr(exc, "status", 0) or 0)
    reason = str(getattr(exc, "reason", "") or "")
    message = ""
    body = getattr(exc, "body", None)
    if body:
        try:
            decoded = json.loads(body)
            if isinstance(decoded, dict):
                message = str(decoded.get("message") or "")
                reason = str(decoded.get("reason") or reason)
        except (TypeError, ValueError):
            message = str(body)[:200]
    headers = getattr(exc, "headers", None) or {}
    retry_after = parse_retry_after(headers.get("Retry-After") if hasattr(headers, "get") else None)
    text = f"{what}: {status} {reason}".rstrip()
    if message:
        text += f": {message}"
    return ApiError(text, status=status, retry_after_s=retry_after)


class ApiClientTransport:
    """The real transport: the official client's ``ApiClient`` in a worker thread.

    Every call carries a total timeout (connect + read, urllib3): ``timeout_s`` for reads,
    ``write_timeout_s`` for writes, counted from the call: time spent waiting for a free
    worker thread counts, and a call whose time ran out before a worker took it is not
    sent at all (``ApiError`` status 0). Writes get the shorter one because a write that is
    still in flight when the lease is lost must land before a rival can take over: keep
    ``write_timeout_s`` below the lease's ``duration_s - renew_deadline_s`` (5 s with the
    defaults). urllib3's own retries are off so that ``Kube``'s policy is the only loop.
    """

    def __init__(self, api_client: Any, *, timeout_s: float = 10.0,
                 write_timeout_s: float = 4.0) -> None:
        if timeout_s <= 0 or write_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self._client = api_client
        self.timeout_s = timeout_s
        self.write_timeout_s = write_timeout_s
        self._closed = False

    @classmethod
    def from_config(cls, *, kubeconfig: str | None = None, context: str | None = None,
                    in_cluster: bool | None = None, timeout_s: float = 10.0,
                    write_timeout_s: float = 4.0) -> ApiClientTransport:
        """In-cluster config when running in a pod (or ``in_cluster=True``), else the
        kubeconfig file (``kubeconfig``, ``$KUBECONFIG`` or ``~/.kube/config``)."""
        import os

        import yaml
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        configuration = client.Configuration()
        use_cluster = in_cluster if in_cluster is not None else (
            kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ)
        try:
            if use_cluster:
                config.load_incluster_config(client_configuration=configuration)
            else:
                config.load_kube_config(config_file=kubeconfig, context=context,
                                        client_configuration=configuration)
        except (ConfigException, OSError, ValueError, TypeError, yaml.YAMLError) as exc:
            where = "in-cluster config" if use_cluster else f"kubeconfig {kubeconfig or '(default)'}"
            raise UsageError(f"cannot load {where}: {exc}") from exc
        configuration.retries = False
        return cls(client.ApiClient(configuration), timeout_s=timeout_s,
                   write_timeout_s=write_timeout_s)

    async def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      timeout_s: float | None = None) -> JSON:
        timeout = self.timeout_s if method == "GET" else self.write_timeout_s
        if timeout_s is not None:
            timeout = min(timeout, timeout_s)
        # The call's time runs from here, not from when a worker thread is free: a write
        # the fence granted 0.5 s must not go out 3 s later because the pool was busy.
        deadline = time.monotonic() + timeout
        return await asyncio.to_thread(self._request_sync, method, path, query, body, content_type, deadline)

    def _request_sync(self, method: str, path: str, query: Mapping[str, str] | None,
                      body: Any, content_type: str, deadline: float) -> JSON:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        what = f"{method} {path}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            method_, url, headers_, body_, _ = self._client.param_serialize(
                method, path, query_params=list((query or {}).items()), header_params=headers,
                body=body, auth_settings=["BearerToken"])
            # Checked as late as the client allows: right before the request is handed to
            # urllib3 (a process frozen after this line still sends it when it resumes).
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                # status 0 (no answer): retried, and a retried write asks the fence again
                raise ApiError(f"{what}: not sent: its {'write ' if method != 'GET' else ''}time ran out "
                               f"before a worker thread could send it", status=0)
            response = self._client.call_api(method_, url, header_params=headers_, body=body_,
                                             _request_timeout=timeout)
            data = response.read()
        except ApiException as exc:
            raise api_error_from_exception(exc, what) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(f"{what}: no answer: {type(exc).__name__}: {exc}", status=0) from exc
        except OSError as exc:
            raise ApiError(f"{what}: no answer: {exc}", status=0) from exc
        if not 200 <= response.status < 300:
            raise api_error_from_exception(ApiException(http_resp=response), what)
        if not data:
            return {}
        try:
            decoded = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ApiError(f"{what}: answer is not JSON", status=response.status) from exc
        if not isinstance(decoded, dict):
            raise ApiError(f"{what}: answer is {type(decoded).__name__}, not an object", status=response.status)
        return decoded

    async def close(self) -> None:
        """Idempotent: several owners (actuator, election, runtime) may share a transport."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._client.close)


# ---------------------------------------------------------------- retries

@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries for named transient failures.

    ``attempts``: total tries (1 = no retry). Backoff before retry ``n`` (0-based) is
    ``min(max_backoff_s, base_backoff_s * 2**n)`` scaled by a jitter in [0.5, 1.0];
    a ``Retry-After`` from the server wins when longer, capped at ``max_retry_after_s``
    (a server asking for minutes should not stall a tick: the caller gives up and tries
    again next tick). ``retry_statuses``: 0 = no answer (timeout, refused), 429, 5xx.
    """

    attempts: int = 4
    base_backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    max_retry_after_s: float = 5.0
    retry_statuses: frozenset[int] = frozenset({0, 429, 500, 502, 503, 504})

    def __post_init__(self) -> None:
        problems = []
        if self.attempts < 1:
            problems.append("attempts must be >= 1")
        if self.base_backoff_s < 0 or self.max_backoff_s < self.base_backoff_s:
            problems.append("need 0 <= base_backoff_s <= max_backoff_s")
        if self.max_retry_after_s < 0:
            problems.append("max_retry_after_s must be >= 0")
        if problems:
            raise ConfigError(problems, source="kube retry policy")

    def retryable(self, error: ApiError) -> bool:
        return error.status in self.retry_statuses

    def delay_s(self, retry_index: int, error: ApiError, jitter: float) -> float:
        backoff = min(self.max_backoff_s, self.base_backoff_s * (2 ** retry_index))
        backoff *= 0.5 + 0.5 * min(max(jitter, 0.0), 1.0)
        if error.retry_after_s is not None:
            backoff = max(backoff, min(error.retry_after_s, self.max_retry_after_s))
        return backoff


NO_RETRY = RetryPolicy(attempts=1)


async def with_retries(op: Callable[[], Awaitable[T]], *, policy: RetryPolicy,
                       sleep: Callable[[float], Awaitable[None]], rng: random.Random,
                       what: str) -> T:
    """Run ``op`` until it succeeds, fails with a non-retryable error, or attempts run out
    (then the last ``ApiError`` is raised)."""
    for index in range(policy.attempts):
        try:
            return await op()
        except ApiError as exc:
            if not policy.retryable(exc) or index == policy.attempts - 1:
                raise
            delay = policy.delay_s(index, exc, rng.random())
            log.info("%s: %s; retry %d/%d in %.2fs", what, exc, index + 1,
                     policy.attempts - 1, delay)
            await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------- facade

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class Kube:
    """Typed, retrying access to the API through one transport.

    ``fence``: when set, every write attempt (retries included) asks it first and is
    bounded by the time it grants; reads are never fenced."""

    transport: KubeTransport
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    fence: WriteFence | None = None

    def with_retry(self, retry: RetryPolicy) -> Kube:
        """The same transport under another retry policy (the election uses ``NO_RETRY``:
        its own loop is the retry)."""
        return Kube(self.transport, retry=retry, sleep=self.sleep, rng=self.rng, fence=self.fence)

    def fenced(self, fence: WriteFence) -> Kube:
        """The same transport whose writes go through ``fence`` (the leader election)."""
        return Kube(self.transport, retry=self.retry, sleep=self.sleep, rng=self.rng, fence=fence)

    async def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json") -> JSON:
        fence = self.fence if method in WRITE_METHODS else None

        async def once() -> JSON:
            # The fence is asked before EVERY attempt: a retry after a lost lease must not go out.
            timeout_s = await fence.permit(f"{method} {path}") if fence is not None else None
            return await self.transport.request(method, path, query=query, body=body,
                                                content_type=content_type, timeout_s=timeout_s)
        return await with_retries(once, policy=self.retry, sleep=self.sleep, rng=self.rng,
                                  what=f"{method} {path}")

    async def get(self, resource: Resource, name: str, *, namespace: str | None = None,
                  subresource: str | None = None) -> JSON:
        return await self.request("GET", resource.path(namespace=namespace, name=name,
                                                       subresource=subresource))

    async def get_or_none(self, resource: Resource, name: str, *, namespace: str | None = None,
                          subresource: str | None = None) -> JSON | None:
        try:
            return await self.get(resource, name, namespace=namespace, subresource=subresource)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, resource: Resource, *, namespace: str | None = None,
                   label_selector: str | None = None,
                   field_selector: str | None = None) -> list[JSON]:
        query = {}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        answer = await self.request("GET", resource.path(namespace=namespace), query=query)
        return list(answer.get("items") or [])

    async def create(self, resource: Resource, body: Mapping[str, Any], *,
                     namespace: str | None = None) -> JSON:
        return await self.request("POST", resource.path(namespace=namespace), body=dict(body))

    async def replace(self, resource: Resource, name: str, body: Mapping[str, Any], *,
                      namespace: str | None = None, subresource: str | None = None) -> JSON:
        return await self.request("PUT", resource.path(namespace=namespace, name=name,
                                                       subresource=subresource), body=dict(body))

    async def patch(self, resource: Resource, name: str, body: Any, *,
                    namespace: str | None = None, subresource: str | None = None,
                    patch_type: str = "merge") -> JSON:
        """``patch_type``: ``merge`` (RFC 7386), ``strategic`` (lists merged by key on
        built-in types) or ``json`` (RFC 6902, ``body`` is a list of operations)."""
        if patch_type not in _PATCH_TYPES:
            raise ValueError(f"patch_type must be one of {sorted(_PATCH_TYPES)}")
        return await self.request("PATCH", resource.path(namespace=namespace, name=name,
                                                         subresource=subresource),
                                  body=body, content_type=_PATCH_TYPES[patch_type])

    async def delete(self, resource: Resource, name: str, *, namespace: str | None = None,
                     grace_period_s: int | None = None) -> JSON:
        query = {} if grace_period_s is None else {"gracePeriodSeconds": str(grace_period_s)}
        return await self.request("DELETE", resource.path(namespace=namespace, name=name),
                                  query=query)

    async def get_scale(self, resource: Resource, name: str, *, namespace: str) -> JSON:
        return await self.get(resource, name, namespace=namespace, subresource="scale")

    async def replace_scale(self, resource: Resource, name: str, *, namespace: str,
                            replicas: int, resource_version: str | None = None) -> JSON:
        """PUT the scale subresource; with ``resource_version`` it is a compare-and-swap
        (409 if the object changed since it was read)."""
        metadata: JSON = {"name": name, "namespace": namespace}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        body = {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": metadata,
                "spec": {"replicas": int(replicas)}}
        return await self.replace(resource, name, body, namespace=namespace, subresource="scale")

    async def read_modify_write(self, resource: Resource, name: str,
                                mutate: Callable[[JSON], JSON | None], *,
                                namespace: str | None = None, subresource: str | None = None,
                                conflict_attempts: int = 5) -> JSON:
        """GET, ``mutate`` (return the new object, or ``None`` for no change), PUT with the
        read ``resourceVersion``; on 409 start again, at most ``conflict_attempts`` times."""
        for attempt in range(conflict_attempts):
            current = await self.get(resource, name, namespace=namespace, subresource=subresource)
            updated = mutate(json.loads(json.dumps(current)))
            if updated is None:
                return current
            updated.setdefault("metadata", {})["resourceVersion"] = \
                current.get("metadata", {}).get("resourceVersion")
            try:
                return await self.replace(resource, name, updated, namespace=namespace,
                                          subresource=subresource)
            except ApiError as exc:
                if exc.status != 409 or attempt == conflict_attempts - 1:
                    raise
                log.info("%s/%s: conflict, re-reading (%d/%d)", resource.plural, name,
                         attempt + 1, conflict_attempts)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        await self.transport.close()


async def set_replicas(kube: Kube, resource: Resource, name: str, *, namespace: str, expect: int,
                       replicas: int, conflict_attempts: int = 5) -> bool:
    """Compare-and-swap on the scale subresource: set ``spec.replicas`` to ``replicas``
    only while it is still ``expect`` (what the caller decided from).

    A 409 is expected even without a rival (controllers bump ``resourceVersion`` with
    every status write): re-read and try again with the same ABSOLUTE count, never a
    delta. If the fresh count is already ``replicas`` (a retried write that did land)
    nothing is written; if it is anything else, someone else scaled it and this raises
    ``ApiError(409)`` rather than overwrite them. Each PUT goes through the client's
    fence (``Kube.fenced``). Returns True if this call wrote."""
    for attempt in range(conflict_attempts):
        scale = await kube.get_scale(resource, name, namespace=namespace)
        now = _replicas(scale)
        if now == replicas:
            return False
        if now != expect:
            raise ApiError(f"{resource.kind.lower()} {namespace}/{name}: replicas changed to {now} by someone "
                           f"else (decided from {expect}); not overwriting", status=409)
        version = (scale.get("metadata") or {}).get("resourceVersion")
        try:
            await kube.replace_scale(resource, name, namespace=namespace, replicas=replicas,
                                     resource_version=str(version) if version else None)
            return True
        except ApiError as exc:
            if exc.status != 409 or attempt == conflict_attempts - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _replicas(scale: Mapping[str, Any]) -> int:
    spec = scale.get("spec")
    value = spec.get("replicas", 0) if isinstance(spec, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(f"scale answer without a valid spec.replicas: {str(spec)[:80]}", status=200)
    return value


def event_body(*, api_version: str, kind: str, name: str, namespace: str, reason: str, message: str,
               now_s: float, component: str, instance: str, warning: bool = False, uid: str | None = None,
               resource_version: str | None = None) -> JSON:
    """A ``v1`` Event about one object (``kubectl describe`` shows it), labelled as ours."""
    stamp = format_time(now_s)
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": "heteroscale"}},
        "involvedObject": {"apiVersion": api_version, "kind": kind, "name": name, "namespace": namespace,
                           **({"uid": uid} if uid else {}),
                           **({"resourceVersion": resource_version} if resource_version else {})},
        "reason": reason, "message": message[:MAX_EVENT_MESSAGE], "type": "Warning" if warning else "Normal",
        "source": {"component": component},
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        "reportingComponent": component, "reportingInstance": instance,
    }


def kube_from_config(*, kubeconfig: str | None = None, context: str | None = None,
                     in_cluster: bool | None = None, timeout_s: float = 10.0,
                     write_timeout_s: float | None = None, retry: RetryPolicy | None = None) -> Kube:
    """The usual way in: a ``Kube`` over the official client, configured like kubectl.
    ``write_timeout_s`` defaults to ``min(4, timeout_s)``."""
    transport = ApiClientTransport.from_config(
        kubeconfig=kubeconfig, context=context, in_cluster=in_cluster, timeout_s=timeout_s,
        write_timeout_s=write_timeout_s if write_timeout_s is not None else min(4.0, timeout_s))
    return Kube(transport, retry=retry or RetryPolicy())


def label_selector_text(selector: Mapping[str, Any] | None) -> str:
    """A ``LabelSelector`` object (matchLabels + matchExpressions) as the query string the
    list call takes. Empty selector → ``""`` (matches everything)."""
    if not selector:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op = expr.get("key"), expr.get("operator")
        values = ",".join(expr.get("values") or [])
        if op == "In":
            parts.append(f"{key} in ({values})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({values})")
        elif op == "Exists":
            parts.append(f"{key}")
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            raise ValueError(f"unknown label selector operator {op!r}")
    return ",".join(parts)


def format_micro_time(unix_s: float) -> str:
    """MicroTime as the API writes it: RFC 3339 with microseconds, UTC, ``Z``."""
    return datetime.fromtimestamp(unix_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_time(unix_s: float) -> str:
    """metav1.Time: RFC 3339, whole seconds, ``Z``."""
    return datetime.fromtimestamp(unix_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    """RFC 3339 (with or without fraction) → unix seconds; ``None`` for empty/garbage."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()
