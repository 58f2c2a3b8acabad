"""An in-memory fake of the Kubernetes API subset HeteroScale uses, behind the same
``KubeTransport`` seam as the real client, plus a fake clock.

Faithful where our code depends on it. ``tests/test_kube_parity.py`` runs the same
scenarios through ``Kube`` on this fake and on kube-apiserver v1.20 (``k8s`` tier) and
expects the same answers:
- ``resourceVersion``: one global counter, bumped on every write; a PUT (or a patch
  carrying ``metadata.resourceVersion``) with a stale one is ``409 Conflict``;
  create of an existing name is ``409 AlreadyExists``; unknown objects ``404``;
  namespaced objects need their Namespace (``404`` otherwise).
- a write that changes nothing keeps the ``resourceVersion``; new pods start ``Pending``;
- ``generateName``, ``uid``, ``creationTimestamp`` (from the fake clock),
  ``generation`` bumped on spec changes; the main endpoint ignores ``status``, the
  ``/status`` subresource ignores everything else.
- ``/scale`` on deployments and statefulsets: an ``autoscaling/v1`` Scale built from the
  object (``spec.replicas``, ``status.replicas``, ``status.selector``), sharing its
  ``resourceVersion``; PUT/PATCH change only ``spec.replicas``.
- patches: JSON merge patch; strategic merge patch as merge patch except that the lists
  the API merges by key (``conditions`` by ``type``, ``containers``/``env``/... by
  ``name``) are merged by key. JSON patch (RFC 6902) is answered 415 (we never send it).
- list with ``labelSelector`` (equality and set-based) and ``fieldSelector`` on
  ``metadata.name``/``metadata.namespace``/``involvedObject.*``.
Not modelled: controllers (no ReplicaSets or Pods appear by themselves: tests create
pods and set statuses), watch, admission, graceful deletion (DELETE removes at once).

Failure injection: ``inject(status, method=, path_contains=, times=, retry_after_s=)``
makes matching calls fail as the real transport would report them (status 0 = timeout).
``calls`` records every call (method, path) so a test can assert what was written.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from heteroscale.coordinator.kube import JSON_PATCH, STRATEGIC_MERGE_PATCH, format_time
from heteroscale.errors import ApiError

JSON = dict[str, Any]

# (api_version, plural) -> (kind, namespaced)
KINDS: dict[tuple[str, str], tuple[str, bool]] = {
    ("apps/v1", "deployments"): ("Deployment", True),
    ("apps/v1", "statefulsets"): ("StatefulSet", True),
    ("apps/v1", "replicasets"): ("ReplicaSet", True),
    ("v1", "pods"): ("Pod", True),
    ("v1", "events"): ("Event", True),
    ("v1", "nodes"): ("Node", False),
    ("v1", "namespaces"): ("Namespace", False),
    ("coordination.k8s.io/v1", "leases"): ("Lease", True),
}
SCALABLE = {"deployments", "statefulsets", "replicasets"}
HAS_STATUS = {"deployments", "statefulsets", "replicasets", "pods", "nodes", "namespaces"}
MERGE_KEYS = {"conditions": "type", "containers": "name", "initContainers": "name",
              "env": "name", "volumes": "name", "volumeMounts": "mountPath",
              "tolerations": "key", "readinessGates": "conditionType"}


# ---------------------------------------------------------------- fake clock

class FakeClock:
    """Wall and monotonic time that move only when a test calls ``advance``; ``sleep``
    waits until the fake time reaches its deadline. Implements ``kube.Clock``."""

    def __init__(self, start_s: float = 1_800_000_000.0) -> None:
        self._wall0 = start_s
        self._now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self._wall0 + self._now

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._seq), future))
        await future

    async def settle(self, rounds: int = 50) -> None:
        """Let every task that can run do so (the fakes never wait on real I/O)."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in deadline order and letting the woken
        tasks run (and sleep again) before moving on."""
        target = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            if not future.done():
                future.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()


# ---------------------------------------------------------------- helpers

def merge_patch(target: Any, patch: Any, *, strategic: bool = False, key: str = "") -> Any:
    """RFC 7386 merge patch; with ``strategic`` the keyed lists of MERGE_KEYS merge by key."""
    if not isinstance(patch, dict):
        if strategic and isinstance(patch, list) and key in MERGE_KEYS and isinstance(target, list):
            return _merge_keyed_list(target, patch, MERGE_KEYS[key])
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value, strategic=strategic, key=name)
    return result


def _merge_keyed_list(target: list, patch: list, merge_key: str) -> list:
    result = copy.deepcopy(target)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            result.append(copy.deepcopy(item))
            continue
        for index, existing in enumerate(result):
            if isinstance(existing, dict) and existing.get(merge_key) == item[merge_key]:
                result[index] = merge_patch(existing, item, strategic=True)
                break
        else:
            result.append(copy.deepcopy(item))
    return result


_SET_RE = re.compile(r"^\s*(!?)([A-Za-z0-9./_-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def selector_matches(selector: str | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector syntax: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``,
    ``a notin (x)``, ``a``, ``!a``. Garbage raises ValueError (→ 400)."""
    for term in _split_selector(selector or ""):
        term = term.strip()
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        else:
            match = _SET_RE.match(term)
            if not match:
                raise ValueError(f"unable to parse requirement: {term!r}")
            negate, key, op, values = match.groups()
            if op:
                allowed = {v.strip() for v in values.split(",") if v.strip()}
                present = key in labels and labels[key] in allowed
                if (op == "in") != present:
                    return False
            elif bool(negate) == (key in labels):
                return False
    return True


def _field(obj: Mapping[str, Any], dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _fields_match(selector: str | None, obj: Mapping[str, Any]) -> bool:
    for term in (selector or "").split(","):
        if not term.strip():
            continue
        negate = "!=" in term
        key, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        actual = _field(obj, key.strip())
        if (str(actual) == value.strip()) == negate:
            return False
    return True


def _selector_text(obj: Mapping[str, Any]) -> str:
    labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


@dataclass
class Fault:
    status: int
    method: str | None
    path_contains: str | None
    times: int
    retry_after_s: float | None
    message: str


# ---------------------------------------------------------------- the fake

class Faults:
    """Failure injection shared by the fake and by ``FaultyTransport`` (a real transport
    with injected failures): matching calls fail the way the real transport reports them."""

    _faults: list[Fault]

    def inject(self, status: int, *, method: str | None = None, path_contains: str | None = None,
               times: int = 1, retry_after_s: float | None = None, message: str = "") -> None:
        """The next ``times`` calls matching method/path fail with ``status`` (0: timeout)."""
        self._faults.append(Fault(status, method, path_contains, times, retry_after_s,
                                  message or ("injected timeout" if status == 0 else "injected")))

    def clear_faults(self) -> None:
        self._faults.clear()

    def _maybe_fail(self, method: str, path: str, what: str) -> None:
        for fault in self._faults:
            if fault.times <= 0:
                continue
            if fault.method and fault.method != method:
                continue
            if fault.path_contains and fault.path_contains not in path:
                continue
            fault.times -= 1
            if fault.status == 0:
                raise ApiError(f"{what}: no answer: ReadTimeoutError: {fault.message}", status=0)
            reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                      409: "Conflict", 504: "Timeout"}.get(fault.status, "Injected")
            raise ApiError(f"{what}: {fault.status} {reason}: {fault.message}",
                           status=fault.status, retry_after_s=fault.retry_after_s)


class FaultyTransport(Faults):
    """Wraps a real transport: records every call, fails injected ones before they are
    sent (the real server answers the rest)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._faults = []
        self.calls: list[tuple[str, str]] = []
        self.timeouts: list[float | None] = []     # the timeout_s each call was given

    def writes(self, path_contains: str = "") -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.calls if m != "GET" and path_contains in p]

    async def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      timeout_s: float | None = None) -> JSON:
        self.calls.append((method.upper(), path))
        self.timeouts.append(timeout_s)
        self._maybe_fail(method.upper(), path, f"{method} {path}")
        return await self.inner.request(method, path, query=query, body=body,
                                        content_type=content_type, timeout_s=timeout_s)

    async def close(self) -> None:
        await self.inner.close()


class FakeKube(Faults):
    """Implements ``KubeTransport`` on an in-memory store."""

    def __init__(self, *, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or FakeClock().time
        self._objects: dict[tuple[str, str, str, str], JSON] = {}
        self._rv = itertools.count(1000)
        self._uid = itertools.count(1)
        self._names = itertools.count(1)
        self._faults = []
        self.calls: list[tuple[str, str]] = []
        self.timeouts: list[float | None] = []     # the timeout_s each call was given
        self.closed = False

    # -- test helpers ----------------------------------------------------
    def writes(self, path_contains: str = "") -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.calls if m != "GET" and path_contains in p]

    def add_namespace(self, name: str) -> None:
        key = ("v1", "namespaces", "", name)
        if key not in self._objects:
            self._store(key, {"apiVersion": "v1", "kind": "Namespace",
                              "metadata": {"name": name}, "spec": {}, "status": {"phase": "Active"}},
                        new=True)

    def concurrent_write(self, method: str, path: str, body: Any = None,
                         content_type: str = "application/merge-patch+json") -> JSON:
        """Another client's write, happening right now (synchronously, not logged in
        ``calls``): how tests put a human's ``kubectl`` edit between two of our calls."""
        try:
            return self._handle(method.upper(), path, {}, copy.deepcopy(body), content_type)
        except _Status as status:
            raise ApiError(f"{method} {path}: {status.code} {status.reason}: {status.message}",
                           status=status.code) from None

    def objects(self, plural: str, namespace: str = "") -> list[JSON]:
        return [copy.deepcopy(o) for (_, p, ns, _), o in sorted(self._objects.items())
                if p == plural and ns == namespace]

    # -- transport -------------------------------------------------------
    async def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      timeout_s: float | None = None) -> JSON:
        method = method.upper()
        self.calls.append((method, path))
        self.timeouts.append(timeout_s)
        what = f"{method} {path}"
        self._maybe_fail(method, path, what)
        try:
            return self._handle(method, path, dict(query or {}), copy.deepcopy(body), content_type)
        except _Status as status:
            raise ApiError(f"{what}: {status.code} {status.reason}: {status.message}",
                           status=status.code) from None

    async def close(self) -> None:
        self.closed = True

    # -- routing ---------------------------------------------------------
    def _route(self, path: str) -> tuple[str, str, str, str, str]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            api_version, rest = "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            api_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            raise _Status(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if not rest:
            raise _Status(404, "NotFound", "the server could not find the requested resource")
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else ""), (rest[2] if len(rest) > 2 else "")
        if (api_version, plural) not in KINDS:
            raise _Status(404, "NotFound", f"the server could not find the requested resource ({plural})")
        return api_version, plural, namespace, name, sub

    def _handle(self, method: str, path: str, query: dict[str, str], body: Any,
                content_type: str) -> JSON:
        api_version, plural, namespace, name, sub = self._route(path)
        kind, namespaced = KINDS[(api_version, plural)]
        if namespaced and namespace and ("v1", "namespaces", "", namespace) not in self._objects \
                and method != "GET":
            raise _Status(404, "NotFound", f'namespaces "{namespace}" not found')
        if sub and sub not in ("status", "scale"):
            raise _Status(404, "NotFound", f"no subresource {sub}")
        if sub == "scale" and plural not in SCALABLE:
            raise _Status(404, "NotFound", f"{plural} has no scale subresource")
        key = (api_version, plural, namespace, name)
        if method == "GET" and not name:
            return self._list(api_version, plural, kind, namespace, query)
        if method == "POST" and not name:
            return self._create(api_version, plural, kind, namespace, body)
        if not name:
            raise _Status(405, "MethodNotAllowed", f"{method} on a collection")
        current = self._objects.get(key)
        if current is None:
            group = api_version.split("/")[0] if "/" in api_version else ""
            resource = f"{plural}.{group}" if group else plural
            raise _Status(404, "NotFound", f'{resource} "{name}" not found')
        if method == "GET":
            return self._scale_of(current) if sub == "scale" else copy.deepcopy(current)
        if method == "DELETE":
            del self._objects[key]
            return {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        if method == "PUT":
            return self._update(key, current, body, sub)
        if method == "PATCH":
            if content_type == JSON_PATCH:
                raise _Status(415, "UnsupportedMediaType", "json patch is not modelled by the fake")
            strategic = content_type == STRATEGIC_MERGE_PATCH
            base = self._scale_of(current) if sub == "scale" else copy.deepcopy(current)
            rv = ((body or {}).get("metadata") or {}).get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise self._conflict(plural, name)
            merged = merge_patch(base, body or {}, strategic=strategic)
            merged.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self._update(key, current, merged, sub)
        raise _Status(405, "MethodNotAllowed", method)

    # -- verbs -----------------------------------------------------------
    def _list(self, api_version: str, plural: str, kind: str, namespace: str,
              query: Mapping[str, str]) -> JSON:
        items = []
        for (av, p, ns, _), obj in sorted(self._objects.items()):
            if av != api_version or p != plural or (namespace and ns != namespace):
                continue
            try:
                if not selector_matches(query.get("labelSelector"),
                                        obj["metadata"].get("labels") or {}):
                    continue
            except ValueError as exc:
                raise _Status(400, "BadRequest", str(exc)) from None
            if not _fields_match(query.get("fieldSelector"), obj):
                continue
            item = copy.deepcopy(obj)
            item.pop("apiVersion", None)
            item.pop("kind", None)
            items.append(item)
        return {"apiVersion": api_version, "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(next(self._rv))}, "items": items}

    def _create(self, api_version: str, plural: str, kind: str, namespace: str, body: Any) -> JSON:
        if not isinstance(body, dict):
            raise _Status(400, "BadRequest", "body must be an object")
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            if not meta.get("generateName"):
                raise _Status(422, "Invalid", "metadata.name: Required value")
            name = f"{meta['generateName']}{next(self._names):05x}"
            meta["name"] = name
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
            raise _Status(422, "Invalid", f"metadata.name: Invalid value: {name!r}")
        if meta.get("namespace") and namespace and meta["namespace"] != namespace:
            raise _Status(400, "BadRequest", "the namespace of the object does not match the request")
        if plural == "deployments" or plural == "statefulsets":
            spec = body.setdefault("spec", {})
            if not (spec.get("selector") or {}).get("matchLabels") and \
                    not (spec.get("selector") or {}).get("matchExpressions"):
                raise _Status(422, "Invalid", "spec.selector: Required value")
            spec.setdefault("replicas", 1)
            body["status"] = {"observedGeneration": 0}
            meta["generation"] = 1
        elif plural == "pods":
            body["status"] = {"phase": "Pending", "qosClass": "BestEffort"}   # as the pod strategy does
        elif plural in HAS_STATUS and plural != "namespaces":
            body.setdefault("status", {})
        key = (api_version, plural, namespace, name)
        if key in self._objects:
            group = api_version.split("/")[0] if "/" in api_version else ""
            resource = f"{plural}.{group}" if group else plural
            raise _Status(409, "AlreadyExists", f'{resource} "{name}" already exists')
        if namespace:
            meta["namespace"] = namespace
        body["apiVersion"], body["kind"] = api_version, kind
        return self._store(key, body, new=True)

    def _update(self, key: tuple[str, str, str, str], current: JSON, body: Any, sub: str) -> JSON:
        plural, name = key[1], key[3]
        if not isinstance(body, dict):
            raise _Status(400, "BadRequest", "body must be an object")
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise self._conflict(plural, name)
        updated = copy.deepcopy(current)
        if sub == "scale":
            replicas = (body.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise _Status(422, "Invalid", "spec.replicas: must be a non-negative integer")
            updated.setdefault("spec", {})["replicas"] = replicas
        elif sub == "status":
            updated["status"] = body.get("status") or {}
        else:
            meta = body.get("metadata") or {}
            for field_name in ("labels", "annotations", "ownerReferences", "finalizers"):
                if field_name in meta:
                    updated["metadata"][field_name] = meta[field_name]
                else:
                    updated["metadata"].pop(field_name, None)
            for top, value in body.items():
                if top in ("metadata", "apiVersion", "kind"):
                    continue
                if top == "status" and plural in HAS_STATUS:
                    continue   # the main endpoint ignores status, as the real server does
                updated[top] = value
        if updated.get("spec") != current.get("spec") and "generation" in current["metadata"]:
            updated["metadata"]["generation"] = current["metadata"]["generation"] + 1
        if updated == current:
            return self._scale_of(current) if sub == "scale" else copy.deepcopy(current)
        stored = self._store(key, updated, new=False)
        return self._scale_of(stored) if sub == "scale" else stored

    def _store(self, key: tuple[str, str, str, str], obj: JSON, *, new: bool) -> JSON:
        meta = obj.setdefault("metadata", {})
        if new:
            meta["uid"] = f"00000000-0000-4000-8000-{next(self._uid):012d}"
            meta["creationTimestamp"] = format_time(self._clock())
        meta["resourceVersion"] = str(next(self._rv))
        self._objects[key] = obj
        return copy.deepcopy(obj)

    def _scale_of(self, obj: JSON) -> JSON:
        meta = obj["metadata"]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": meta["name"], "namespace": meta.get("namespace"),
                             "uid": meta["uid"], "resourceVersion": meta["resourceVersion"],
                             "creationTimestamp": meta["creationTimestamp"]},
                "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
                "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                           "selector": _selector_text(obj)}}

    @staticmethod
    def _conflict(plural: str, name: str) -> _Status:
        return _Status(409, "Conflict",
                       f'Operation cannot be fulfilled on {plural} "{name}": the object has been '
                       "modified; please apply your changes to the latest version and try again")


class _Status(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
