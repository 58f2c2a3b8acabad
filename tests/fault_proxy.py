"""A fault-injecting HTTP proxy in front of the real kube-apiserver (the ``faults`` tier).

Clients (the coordinator processes under test) speak plain HTTP/1.1 to the proxy on
127.0.0.1; the proxy forwards to the real API server over HTTPS (its CA from the admin
kubeconfig) and passes the client's ``Authorization`` header through, so the server
still authenticates and authorizes every call as the client. One proxy can listen on
several ports, one per client, so every request is attributed to the replica that sent
it (``who``).

What it injects, chosen per request by a seeded ``random.Random`` (``FaultPlan``):

* ``409`` (writes only), ``429`` with ``Retry-After``, ``500``, ``503``: answered by the
  proxy, nothing forwarded;
* ``reset_before``: the connection is aborted, nothing forwarded;
* ``reset_after``: forwarded (a write lands), then the connection is aborted: the
  client never learns that its write landed;
* ``slow``: forwarded at once, the answer held back 0.2-3 s (longer than the client's
  write timeout, sometimes);
* ``late``: held 0.2-3 s BEFORE it is forwarded (a request slow on the wire): a write
  can reach the server after its client gave up on it, the residual window of
  docs/kubernetes.md;
* ``invalid_json`` / ``wrong_shape``: forwarded, then a 200 whose body is cut-off JSON,
  or JSON of the wrong shape (``{}``, ``[]``, a string, ``null``, a number,
  ``{"spec": "x"}``, ``{"metadata": []}``, ``{"spec": {"replicas": "3"}}``).

What it records:

* ``faults``: every injected fault (time, who, method, path, kind);
* ``writes``: every POST/PUT/PATCH/DELETE that reached the real server, with the Lease
  as the proxy read it from the real server itself (not through the proxy) when the
  request arrived, right before forwarding and right after the answer (holder,
  renewTime), and for a PUT of a ``scale`` subresource the replicas before (read from
  the server) and asked for.

``python -m tests.fault_proxy --kubeconfig K --port P`` runs one by hand (no faults
unless ``--rate`` is given).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http
import json
import random
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FAULT_KINDS = ("409", "429", "500", "503", "reset_before", "reset_after", "slow", "late", "invalid_json",
               "wrong_shape")
WRONG_SHAPES = (b"{}", b"[]", b'"Scale"', b"null", b"42", b'{"spec": "x"}', b'{"metadata": []}',
                b'{"spec": {"replicas": "3"}}', b'{"kind": "Lease", "spec": {"holderIdentity": 7}}')
_HOP_HEADERS = frozenset({"host", "connection", "content-length", "transfer-encoding", "keep-alive",
                          "accept-encoding", "proxy-connection", "upgrade"})


@dataclass(frozen=True)
class FaultPlan:
    """Which requests get a fault. ``rate``: the share of requests faulted (0 = none);
    ``kinds``: the kinds drawn from, uniformly; ``seed``: the schedule's seed;
    ``slow_s``: the range, in seconds, a ``slow`` answer or a ``late`` request is held;
    ``lease_writes``: whether the election's own Lease writes may be faulted too."""

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 1
    slow_s: tuple[float, float] = (0.2, 3.0)
    lease_writes: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not 0 <= self.rate <= 1:
            raise ValueError(f"bad fault plan: unknown kinds {sorted(unknown)} or rate {self.rate}")


@dataclass(frozen=True)
class Upstream:
    """The real API server: URL, TLS context trusting its CA, and the admin's
    ``Authorization`` header (for the proxy's own reads of the Lease and of scales)."""

    url: str
    ssl_context: ssl.SSLContext
    authorization: str

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> "Upstream":
        doc = yaml.safe_load(Path(path).read_text())
        cluster = doc["clusters"][0]["cluster"]
        user = doc["users"][0]["user"]
        ctx = ssl.create_default_context()
        if cluster.get("certificate-authority-data"):
            ctx.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif cluster.get("certificate-authority"):
            ctx.load_verify_locations(cafile=cluster["certificate-authority"])
        if user.get("client-certificate-data"):
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
                cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
                key.write_bytes(base64.b64decode(user["client-key-data"]))
                ctx.load_cert_chain(cert, key)
        token = user.get("token") or ""
        return cls(url=cluster["server"].rstrip("/"), ssl_context=ctx,
                   authorization=f"Bearer {token}" if token else "")


def proxy_kubeconfig(source: str | Path, dest: Path, *, port: int) -> Path:
    """A copy of the kubeconfig ``source`` whose server is the proxy (plain HTTP on
    127.0.0.1:``port``); the user (token) is kept."""
    doc = yaml.safe_load(Path(source).read_text())
    for entry in doc["clusters"]:
        entry["cluster"] = {"server": f"http://127.0.0.1:{port}"}
    dest.write_text(yaml.safe_dump(doc))
    return dest


@dataclass
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


class FaultProxy:
    """Listen on one port per client (``listeners``: name -> port, 0 = any free one) and
    forward to ``upstream``; see the module docstring."""

    def __init__(self, upstream: Upstream, *, lease_namespace: str, lease_name: str,
                 plan: FaultPlan | None = None) -> None:
        self.upstream = upstream
        self.lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{lease_namespace}/leases/{lease_name}"
        self.plan = plan or FaultPlan()
        self.rng = random.Random(self.plan.seed)
        self.faults: list[dict[str, Any]] = []
        self.writes: list[dict[str, Any]] = []
        self.requests = 0
        self.errors: list[str] = []          # the proxy's own failures (upstream unreachable...)
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    def set_plan(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)

    async def start(self, listeners: dict[str, int]) -> dict[str, int]:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.upstream.ssl_context, limit=64),
            timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False)
        for name, port in listeners.items():
            server = await asyncio.start_server(
                lambda r, w, name=name: self._serve(r, w, who=name), "127.0.0.1", port)
            self._servers.append(server)
            self.ports[name] = server.sockets[0].getsockname()[1]
        return dict(self.ports)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        if self._session is not None:
            await self._session.close()

    # -- the direct reads (never faulted) ------------------------------------------------
    async def _direct_get(self, path: str) -> dict[str, Any] | None:
        assert self._session is not None
        headers = {"Accept": "application/json"}
        if self.upstream.authorization:
            headers["Authorization"] = self.upstream.authorization
        try:
            async with self._session.get(self.upstream.url + path, headers=headers) as resp:
                if resp.status != 200:
                    return None
                return json.loads(await resp.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self.errors.append(f"direct GET {path}: {exc}")
            return None

    async def read_lease(self) -> dict[str, Any]:
        """The Lease on the real server: holder, renewTime, duration, transitions."""
        lease = await self._direct_get(self.lease_path)
        spec = (lease or {}).get("spec") or {}
        return {"holder": spec.get("holderIdentity") or "", "renew_time": spec.get("renewTime"),
                "duration_s": spec.get("leaseDurationSeconds"), "transitions": spec.get("leaseTransitions", 0)}

    # -- serving ---------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, who: str) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                if not await self._handle(request, writer, who=who):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        return _Request(method=method.upper(), target=target, headers=headers, body=body)

    def _draw(self, request: _Request) -> str | None:
        if self.plan.rate <= 0 or self.rng.random() >= self.plan.rate:
            return None
        is_lease = "/leases" in request.target
        kinds = [k for k in self.plan.kinds
                 if (k != "409" or request.method in WRITE_METHODS)
                 and (self.plan.lease_writes or not (is_lease and request.method in WRITE_METHODS))]
        return self.rng.choice(kinds) if kinds else None

    async def _handle(self, request: _Request, writer: asyncio.StreamWriter, *, who: str) -> bool:
        """One request; False when the connection is to be dropped."""
        self.requests += 1
        t_arrive = time.time()
        kind = self._draw(request)
        if kind is not None:
            self.faults.append({"t": t_arrive, "who": who, "method": request.method,
                                "path": request.target.split("?")[0], "kind": kind})
        if kind in ("409", "429", "500", "503"):
            status = int(kind)
            headers = {"Retry-After": str(self.rng.choice((0, 1, 1, 2)))} if status in (429, 503) else {}
            reason = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}[status]
            body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "message": f"injected by the fault proxy: {kind}", "reason": reason,
                               "code": status}).encode()
            await self._respond(writer, status, body=body, content_type="application/json", headers=headers)
            return True
        if kind == "reset_before":
            writer.transport.abort()
            return False
        status, body, content_type, extra = await self._forward(
            request, who=who, t_arrive=t_arrive,
            hold_s=self.rng.uniform(*self.plan.slow_s) if kind == "late" else 0.0)
        if kind == "reset_after":
            writer.transport.abort()
            return False
        if kind == "slow":
            await asyncio.sleep(self.rng.uniform(*self.plan.slow_s))
        elif kind == "invalid_json" and status < 300:
            body = body[: max(1, len(body) // self.rng.choice((2, 3, 5)))] if body else b"{\"kind\": "
            content_type = "application/json"
        elif kind == "wrong_shape" and status < 300:
            body = self.rng.choice(WRONG_SHAPES)
            content_type = "application/json"
        await self._respond(writer, status, body=body, content_type=content_type, headers=extra)
        return True

    async def _forward(self, request: _Request, *, who: str, t_arrive: float,
                       hold_s: float = 0.0) -> tuple[int, bytes, str, dict[str, str]]:
        assert self._session is not None
        path = request.target.split("?")[0]
        write = request.method in WRITE_METHODS
        record: dict[str, Any] | None = None
        if write:
            lease = await self.read_lease()
            record = {"t_arrive": t_arrive, "who": who, "method": request.method, "path": path,
                      "lease_write": "/leases/" in path or path.endswith("/leases"),
                      "holder_at_arrival": lease["holder"], "held_s": round(hold_s, 3)}
        if hold_s > 0:
            await asyncio.sleep(hold_s)
        if record is not None:
            lease = await self.read_lease() if hold_s > 0 else lease
            record.update(holder_before=lease["holder"], renew_before=lease["renew_time"])
            if request.method == "PUT" and path.endswith("/scale"):
                current = await self._direct_get(path)
                record["replicas_before"] = ((current or {}).get("spec") or {}).get("replicas")
                try:
                    record["replicas_asked"] = json.loads(request.body)["spec"]["replicas"]
                except (ValueError, KeyError, TypeError):
                    record["replicas_asked"] = None
        headers = {k: v for k, v in request.headers.items() if k not in _HOP_HEADERS}
        if record is not None:
            record["t_forward"] = time.time()
        try:
            async with self._session.request(request.method, self.upstream.url + request.target,
                                             headers=headers, data=request.body or None) as resp:
                body = await resp.read()
                status = resp.status
                content_type = resp.headers.get("Content-Type", "application/json")
                extra = {k: resp.headers[k] for k in ("Retry-After", "Warning") if k in resp.headers}
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.errors.append(f"{request.method} {path}: upstream: {exc}")
            status, body, content_type, extra = 502, b'{"kind":"Status","code":502}', "application/json", {}
        if record is not None:
            record["t_done"] = time.time()
            record["status"] = status
            after = await self.read_lease()
            record["holder_after"] = after["holder"]
            record["renew_after"] = after["renew_time"]
            self.writes.append(record)
        return status, body, content_type, extra

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, *, body: bytes, content_type: str,
                       headers: dict[str, str]) -> None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        head = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", "Connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for fault in self.faults:
            kinds[fault["kind"]] = kinds.get(fault["kind"], 0) + 1
        return {"requests": self.requests, "faults": len(self.faults), "fault_kinds": dict(sorted(kinds.items())),
                "writes_forwarded": len(self.writes), "proxy_errors": len(self.errors)}


async def _main(args: argparse.Namespace) -> None:
    proxy = FaultProxy(Upstream.from_kubeconfig(args.kubeconfig), lease_namespace=args.lease_namespace,
                       lease_name=args.lease, plan=FaultPlan(rate=args.rate, seed=args.seed))
    ports = await proxy.start({"client": args.port})
    print(f"fault proxy on http://127.0.0.1:{ports['client']}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.close()
        print(json.dumps(proxy.summary()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.fault_proxy")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lease", default="heteroscale-coordinator")
    parser.add_argument("--lease-namespace", default="default")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(parser.parse_args()))
