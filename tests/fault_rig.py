"""The fault-injection tier's rig: two real coordinator processes, a real kube-apiserver
behind the fault proxy, and sidecar reports served from loopback pod IPs.

What is real: kube-apiserver + controller-manager (k8s-envtest v1.20; the Deployment
and ReplicaSet controllers make and remove the pods), two ``heteroscale coordinator``
PROCESSES of one service, each with its own identity, electing a leader on one Lease
and scaling the Deployments ``chat-prefill``/``chat-decode`` through the scale
subresource; each talks to the API only through its own port of ``FaultProxy``
(tests/fault_proxy.py), which attributes every request to it.

What stands in: there is no kubelet, so ``Rig`` plays it: a pod the ReplicaSet made gets
a loopback pod IP (127.88.X.Y: every 127.x address is local on Linux) and Running/Ready,
and a report endpoint on that IP at the sidecar port answers ``/v1/report`` the way the
scenario says (a valid report with a chosen decode tokens/s, a fuzzed body from
tests/sidecar_fuzz.py, or a 500); a pod being deleted is removed at once (grace 0).
One prefill pod at a time (``page_sidecars``) is instead a real ``heteroscale sidecar``
PROCESS on its IP, scraping an engine stand-in that answers every scrape with the next
fuzzed engine page (``FuzzedPages``): fuzzed pages reach the coordinator through a
real sidecar's report.

The checks (``Rig.verdict``), each over the proxy's write log:

* non-holder writes: a write (not the election's own Lease writes) that reached the real
  server while the Lease on the server named another holder (read by the proxy right
  before forwarding). A write whose request left before the writer's leadership ended
  and landed after is the documented residual window: counted apart, never hidden;
* wrong writes: a scale written outside [min, max] of its role, or a scale-in that
  landed while the decode reports were partial (``Rig.phases``);
* crashes: a coordinator process that exited without being killed by the rig, or whose
  ``/healthz`` did not answer at a check; a sidecar process that exited;
* non-finite values: a sample value in either process's ``/metrics`` that is NaN/Inf,
  or a ``NaN``/``Infinity`` token in the status JSON or in the page sidecar's report.

``tests/test_faults_k8s.py`` runs a short version (default suite, marker ``k8s``);
``benchmarks/fault_bench.py`` runs the long one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import yaml
from aiohttp import web

from heteroscale.coordinator.kube import DEPLOYMENTS, PODS, Kube, format_time
from heteroscale.report import ReportFormatError, SidecarReport, parse_report_json
from tests import sidecar_fuzz
from tests.conftest import free_port
from tests.fault_proxy import FaultPlan, FaultProxy, Upstream, proxy_kubeconfig
from tests.k8s_envtest import REPO, Cluster, deployment_body

LEASE = "heteroscale-coordinator"
IDENTITIES = ("coord-a", "coord-b")
# lease 4 s / renew deadline 2 s / retry 0.5 s; a write attempt 1 s (< 4 - 2, as the config demands)
TIMING = {"duration_s": 4, "renew_deadline_s": 2, "retry_period_s": 0.5}
WRITE_TIMEOUT_S = 1.0
MIN_DECODE, MAX_DECODE = 1, 6
TAU = 100.0                    # decode tokens/s per instance the policy aims at


def coordinator_config(*, namespace: str, port: int, sidecar_port: int, interval_s: float) -> dict:
    return {
        "coordinator": {
            "backend": "kubernetes", "interval_s": interval_s, "listen": f"127.0.0.1:{port}",
            "observe_timeout_s": 3,
            "lease": {"name": LEASE, "namespace": namespace, **TIMING},
            "api": {"timeout_s": 2, "write_timeout_s": WRITE_TIMEOUT_S},
            "collect": {"timeout_s": min(0.4, 0.8 * interval_s), "sidecar_port": sidecar_port},
        },
        "services": [{
            "name": "chat", "namespace": namespace, "pd_ratio": "1:1",
            "target_decode_tps_per_instance": TAU, "min_decode": MIN_DECODE, "max_decode": MAX_DECODE,
            "prefill": {"deployment": "chat-prefill"}, "decode": {"deployment": "chat-decode"},
            "policy": {"scale_out_cooldown_s": 0, "scale_in_stabilization_s": 0, "warmup_s": 0,
                       "smoothing_window_s": 0, "report_max_age_s": 30, "pending_timeout_s": 60,
                       "latency_net": {"enabled": False}},
        }],
    }


# ---------------------------------------------------------------- the reports

@dataclass(frozen=True)
class ReportPlan:
    """What the pods answer. ``decode_tps``: each valid decode report's tokens/s;
    ``victims``: every ``victims``-th decode pod (by name; 0 = none) answers fuzzed
    bodies that the coordinator's parser refuses (so the decode view is partial);
    ``prefill_fuzz``: prefill pods answer the raw fuzz stream (accepted or not);
    ``fail``: every pod answers 500."""

    decode_tps: float = TAU
    victims: int = 0
    prefill_fuzz: bool = False
    fail: bool = False


@dataclass
class Phase:
    name: str
    start_s: float
    end_s: float | None = None
    partial: bool = False         # decode reports partial: no scale-in may land


class _OnEveryIp:
    """One aiohttp app answering ``path`` on several pod IPs (one site per IP, one port)."""

    path = "/"

    def __init__(self, *, port: int) -> None:
        self.port = port
        self._sites: dict[str, web.TCPSite] = {}
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(self.path, self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()

    async def listen(self, ip: str) -> None:
        assert self._runner is not None
        if ip not in self._sites:
            site = web.TCPSite(self._runner, ip, self.port)
            await site.start()
            self._sites[ip] = site

    async def remove(self, ip: str) -> None:
        site = self._sites.pop(ip, None)
        if site is not None:
            await site.stop()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.Response:
        raise NotImplementedError


class Reports(_OnEveryIp):
    """``/v1/report`` on every pod IP (one aiohttp site per IP, the same port)."""

    path = "/v1/report"

    def __init__(self, *, port: int, seed: int) -> None:
        super().__init__(port=port)
        self.plan = ReportPlan()
        self.pods: dict[str, tuple[str, str]] = {}        # ip -> (pod name, role)
        self._fuzz: Iterator[bytes] = sidecar_fuzz.report_bodies(seed)
        self.served: dict[str, int] = {"valid": 0, "fuzz_refused": 0, "fuzz_accepted": 0, "error": 0}
        self.fuzz_skipped = 0          # accepted fuzz bodies drawn for a victim and not served

    async def add(self, ip: str, pod: str, role: str) -> None:
        self.pods[ip] = (pod, role)
        await self.listen(ip)

    async def remove(self, ip: str) -> None:
        self.pods.pop(ip, None)
        await super().remove(ip)

    def decode_victims(self) -> set[str]:
        if not self.plan.victims:
            return set()
        names = sorted(p for p, r in self.pods.values() if r == "decode")
        return {n for i, n in enumerate(names) if i % self.plan.victims == 0}

    def _next_fuzz(self, *, refused_only: bool) -> tuple[bytes, bool]:
        """The next fuzzed body and whether the coordinator's parser accepts it."""
        while True:
            body = next(self._fuzz)
            try:
                parse_report_json(body)
                accepted = True
            except ReportFormatError:
                accepted = False
            if accepted and refused_only:
                self.fuzz_skipped += 1
                continue
            return body, accepted

    async def _answer(self, request: web.Request) -> web.Response:
        ip = (request.transport.get_extra_info("sockname") or ("",))[0] if request.transport else ""
        pod, role = self.pods.get(ip, ("", ""))
        plan = self.plan
        if not pod or plan.fail:
            self.served["error"] += 1
            return web.Response(status=500, text="engine down")
        if (role == "decode" and pod in self.decode_victims()) or (role == "prefill" and plan.prefill_fuzz):
            body, accepted = self._next_fuzz(refused_only=role == "decode")
            self.served["fuzz_accepted" if accepted else "fuzz_refused"] += 1
            return web.Response(body=body, content_type="application/json")
        now = time.time()
        report = SidecarReport(service="chat", role=role, pod=pod, engine="emulator", engine_up=True, stale=False,
                               observed_at=now, window_s=5.0, started_at=now - 600,
                               decode_tps=plan.decode_tps if role == "decode" else 0.0,
                               prefill_tps=1000.0 if role == "prefill" else 0.0,
                               requests_running=4.0, requests_waiting=0.0, kv_cache_usage_ratio=0.3)
        self.served["valid"] += 1
        return web.json_response(report.to_dict())


class FuzzedPages(_OnEveryIp):
    """An engine stand-in: ``/metrics`` on given IPs answers the next fuzzed engine page
    of tests/sidecar_fuzz.py (mutated vLLM/SGLang/KV-connector pages and garbage)."""

    path = "/metrics"

    def __init__(self, *, port: int, seed: int) -> None:
        super().__init__(port=port)
        self.served = 0
        self.reports_checked = 0
        self._pages: Iterator[str] = sidecar_fuzz.pages(seed)

    async def _answer(self, request: web.Request) -> web.Response:
        self.served += 1
        return web.Response(body=next(self._pages).encode("utf-8", "surrogatepass"),
                            content_type="text/plain", charset="utf-8")


# ---------------------------------------------------------------- the rig

@dataclass
class Proc:
    identity: str
    port: int
    config: Path
    kubeconfig: Path
    log: Path
    popen: subprocess.Popen | None = None
    killed_by_rig: bool = False
    stopped: bool = False
    resumes: list[float] = field(default_factory=list)     # when SIGCONT was sent
    kills: list[float] = field(default_factory=list)
    stops: list[float] = field(default_factory=list)


class Rig:
    def __init__(self, cluster: Cluster, kube: Kube, *, namespace: str, work: Path, seed: int = 1,
                 interval_s: float = 0.5, page_sidecars: int = 1) -> None:
        self.cluster, self.kube, self.namespace, self.work = cluster, kube, namespace, work
        self.seed = seed
        self.interval_s = interval_s
        self.proxy = FaultProxy(Upstream.from_kubeconfig(cluster.kubeconfig), lease_namespace=namespace,
                                lease_name=LEASE)
        self.reports = Reports(port=free_port(), seed=seed)
        self.procs: dict[str, Proc] = {}
        self.phases: list[Phase] = []
        self.crashes: list[str] = []
        self.health_failures: list[str] = []
        self.non_finite: list[str] = []
        self.checks = 0
        self._kubelet: asyncio.Task | None = None
        self._next_ip = 0
        self._http: aiohttp.ClientSession | None = None
        self._net = 88
        # prefill pods backed by a real ``heteroscale sidecar`` process scraping fuzzed pages
        self.page_sidecars = page_sidecars
        self.sidecars: dict[str, subprocess.Popen] = {}        # ip -> sidecar process
        self.sidecar_crashes: list[str] = []
        self.pages = FuzzedPages(port=free_port(), seed=seed)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, *, prefill: int = 2, decode: int = 3) -> None:
        for name, n in (("chat-prefill", prefill), ("chat-decode", decode)):
            await self.kube.create(DEPLOYMENTS, deployment_body(name, n), namespace=self.namespace)
        await self.reports.start()
        await self.pages.start()
        ports = await self.proxy.start({ident: 0 for ident in IDENTITIES})
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._kubelet = asyncio.create_task(self._kubelet_loop(), name="fault-rig-kubelet")
        for ident in IDENTITIES:
            port = free_port()
            config = self.work / f"{ident}.yaml"
            config.write_text(yaml.safe_dump(coordinator_config(
                namespace=self.namespace, port=port, sidecar_port=self.reports.port, interval_s=self.interval_s)))
            kubeconfig = proxy_kubeconfig(self.cluster.kubeconfig, self.work / f"{ident}.kubeconfig",
                                          port=ports[ident])
            self.procs[ident] = Proc(identity=ident, port=port, config=config, kubeconfig=kubeconfig,
                                     log=self.work / f"{ident}.log")
            self._spawn(self.procs[ident])
        self.phase("start")

    def _spawn(self, proc: Proc) -> None:
        with open(proc.log, "a") as log:
            proc.popen = subprocess.Popen(
                [sys.executable, "-m", "heteroscale", "coordinator", "--config", str(proc.config),
                 "--kubeconfig", str(proc.kubeconfig), "--identity", proc.identity],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        proc.killed_by_rig = False
        proc.stopped = False

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.popen is not None and proc.popen.poll() is None:
                if proc.stopped:
                    proc.popen.send_signal(signal.SIGCONT)
                proc.popen.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            if proc.popen is not None:
                try:
                    await asyncio.to_thread(proc.popen.wait, 15)
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    await asyncio.to_thread(proc.popen.wait, 10)
        if self._kubelet is not None:
            self._kubelet.cancel()
            await asyncio.gather(self._kubelet, return_exceptions=True)
        for ip in list(self.sidecars):
            await self._stop_sidecar(ip)
        await self.proxy.close()
        await self.reports.close()
        await self.pages.close()
        if self._http is not None:
            await self._http.close()
        self.end_phase()

    # -- phases ------------------------------------------------------------------------
    def phase(self, name: str, *, partial: bool = False) -> None:
        self.end_phase()
        self.phases.append(Phase(name=name, start_s=time.time(), partial=partial))

    def end_phase(self) -> None:
        if self.phases and self.phases[-1].end_s is None:
            self.phases[-1].end_s = time.time()

    def load(self, name: str, plan: ReportPlan) -> None:
        """Switch what the pods report, and open a phase named ``name``."""
        self.reports.plan = plan
        self.phase(name, partial=plan.victims > 0)

    # -- the kubelet -------------------------------------------------------------------
    def _ip(self) -> str:
        self._next_ip += 1
        return f"127.{self._net}.{self._next_ip // 250}.{self._next_ip % 250 + 1}"

    async def _kubelet_loop(self) -> None:
        while True:
            try:
                await self._kubelet_step()
            except Exception as exc:   # noqa: BLE001 - a hiccup of the stand-in must not end the run
                self.proxy.errors.append(f"kubelet: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.3)

    async def _kubelet_step(self) -> None:
        pods = await self.kube.list(PODS, namespace=self.namespace)
        live = set()
        for pod in pods:
            meta, status = pod["metadata"], pod.get("status") or {}
            name = meta["name"]
            role = "decode" if name.startswith("chat-decode") else "prefill"
            if meta.get("deletionTimestamp"):
                with contextlib.suppress(Exception):
                    await self.kube.delete(PODS, name, namespace=self.namespace, grace_period_s=0)
                continue
            ip = status.get("podIP")
            if status.get("phase") == "Running" and ip:
                live.add(ip)
                if ip not in self.reports.pods and ip not in self.sidecars:
                    await self.reports.add(ip, name, role)
                continue
            ip = self._ip()
            now = format_time(time.time())
            if role == "prefill" and len(self.sidecars) < self.page_sidecars:
                await self._start_sidecar(ip, name)
            else:
                await self.reports.add(ip, name, role)
            await self.kube.patch(PODS, name, {"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}]}},
                namespace=self.namespace, subresource="status", patch_type="strategic")
            live.add(ip)
        for ip in list(self.reports.pods):
            if ip not in live:
                await self.reports.remove(ip)
        for ip in list(self.sidecars):
            if ip not in live:
                await self._stop_sidecar(ip)

    async def _start_sidecar(self, ip: str, pod: str) -> None:
        await self.pages.listen(ip)
        with open(self.work / f"sidecar-{pod}.log", "a") as log:
            self.sidecars[ip] = subprocess.Popen(
                [sys.executable, "-m", "heteroscale", "sidecar", "--engine", "vllm",
                 "--engine-url", f"http://{ip}:{self.pages.port}", "--role", "prefill", "--service", "chat",
                 "--listen", f"{ip}:{self.reports.port}", "--pod", pod, "--interval", "0.25",
                 "--scrape-timeout", "0.2", "--gpu-source", "none", "--no-rdma", "--log-level", "WARNING"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    async def _stop_sidecar(self, ip: str) -> None:
        proc = self.sidecars.pop(ip)
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await self.pages.remove(ip)

    # -- the processes -----------------------------------------------------------------
    async def lease(self) -> dict[str, Any]:
        return await self.proxy.read_lease()

    async def holder(self) -> str:
        return (await self.lease())["holder"]

    async def wait_for(self, check, *, timeout_s: float, what: str, step_s: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = await check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout_s} s")
            await asyncio.sleep(step_s)

    async def healthy(self, proc: Proc) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(f"http://127.0.0.1:{proc.port}/healthz") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def wait_leader(self, *, timeout_s: float = 40) -> str:
        async def check():
            holder = await self.holder()
            return holder if holder in self.procs else ""
        return await self.wait_for(check, timeout_s=timeout_s, what="a leader")

    async def wait_healthy(self, proc: Proc, *, timeout_s: float = 60) -> None:
        async def check():
            if proc.popen is None or proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.identity} exited ({proc.popen and proc.popen.returncode}); "
                                   f"log tail: {proc.log.read_text()[-1500:]}")
            return await self.healthy(proc)
        await self.wait_for(check, timeout_s=timeout_s, what=f"{proc.identity} /healthz")

    def kill(self, ident: str) -> None:
        proc = self.procs[ident]
        assert proc.popen is not None
        proc.killed_by_rig = True
        proc.kills.append(time.time())
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)

    def restart(self, ident: str) -> None:
        self._spawn(self.procs[ident])

    def stop(self, ident: str) -> None:
        proc = self.procs[ident]
        assert proc.popen is not None
        proc.stopped = True
        proc.stops.append(time.time())
        proc.popen.send_signal(signal.SIGSTOP)

    def resume(self, ident: str) -> None:
        proc = self.procs[ident]
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGCONT)
        proc.stopped = False
        proc.resumes.append(time.time())

    async def failover_cycle(self, *, how: str) -> dict[str, Any]:
        """Take the leader down (``kill``: SIGKILL, then restart it; ``stop``: SIGSTOP, then
        SIGCONT once the other took over) and wait until the other holds the Lease and
        both answer ``/healthz`` again. Returns what happened."""
        leader = await self.wait_leader()
        other = next(i for i in self.procs if i != leader)
        await self.wait_healthy(self.procs[other])
        started = time.time()
        if how == "kill":
            self.kill(leader)
        else:
            self.stop(leader)
        await self.wait_for(lambda: self._held_by(other), timeout_s=60, what=f"{other} takes over from {leader}")
        took_s = time.time() - started
        if how == "kill":
            self.restart(leader)
        else:
            self.resume(leader)
        await self.wait_healthy(self.procs[leader])
        return {"how": how, "from": leader, "to": other, "takeover_s": round(took_s, 2)}

    async def _held_by(self, ident: str) -> bool:
        return await self.holder() == ident

    async def check_alive(self) -> None:
        """Every process the rig did not kill or stop is running and answers /healthz;
        its /metrics and status JSON carry only finite numbers."""
        self.checks += 1
        for proc in self.procs.values():
            if proc.popen is None or proc.killed_by_rig or proc.stopped:
                continue
            code = proc.popen.poll()
            if code is not None:
                self.crashes.append(f"{proc.identity} exited with {code}")
                proc.killed_by_rig = True      # count once; restart it to go on
                self.restart(proc.identity)
                continue
            if not await self.healthy(proc):
                self.health_failures.append(f"{proc.identity} /healthz did not answer 200 at {time.time():.1f}")
                continue
            await self._check_finite(proc)
        for ip, sidecar in list(self.sidecars.items()):
            code = sidecar.poll()
            if code is not None:
                self.sidecar_crashes.append(f"sidecar on {ip} exited with {code}")
                await self.pages.remove(ip)
                del self.sidecars[ip]
                continue
            await self._check_sidecar_report(ip)

    async def _check_sidecar_report(self, ip: str) -> None:
        """The sidecar's own report, built from fuzzed pages, is strict JSON (no NaN/Inf)."""
        assert self._http is not None
        try:
            async with self._http.get(f"http://{ip}:{self.reports.port}/v1/report") as resp:
                if resp.status != 200:
                    return                      # not up yet, or no page parsed yet
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return                              # starting; a dead one is caught by poll()

        def refuse(token: str) -> Any:
            self.non_finite.append(f"sidecar {ip} /v1/report: {token}")
            return None
        try:
            json.loads(text, parse_constant=refuse)
            self.pages.reports_checked += 1
        except ValueError as exc:
            self.non_finite.append(f"sidecar {ip} /v1/report unreadable: {exc}")

    async def _check_finite(self, proc: Proc) -> None:
        assert self._http is not None
        base = f"http://127.0.0.1:{proc.port}"
        try:
            async with self._http.get(base + "/metrics") as resp:
                text = await resp.text()
            async with self._http.get(base + "/api/v1/status") as resp:
                status_text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.health_failures.append(f"{proc.identity}: {exc}")
            return
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            value = line.rsplit(" ", 1)[-1]
            try:
                number = float(value)
            except ValueError:
                self.non_finite.append(f"{proc.identity} /metrics: unparsable {line[:120]!r}")
                continue
            if not math.isfinite(number):
                self.non_finite.append(f"{proc.identity} /metrics: {line[:160]}")

        def refuse(token: str) -> Any:
            self.non_finite.append(f"{proc.identity} status JSON: {token}")
            return None
        try:
            json.loads(status_text, parse_constant=refuse)
        except ValueError as exc:
            self.non_finite.append(f"{proc.identity} status JSON unreadable: {exc}")

    # -- faults ------------------------------------------------------------------------
    def faults(self, rate: float, *, seed: int | None = None, **kw) -> None:
        self.proxy.set_plan(FaultPlan(rate=rate, seed=self.seed if seed is None else seed, **kw))

    # -- the verdict -------------------------------------------------------------------
    def _phase_at(self, t: float) -> Phase | None:
        for phase in reversed(self.phases):
            if phase.start_s <= t:
                return phase
        return None

    def verdict(self) -> dict[str, Any]:
        non_holder, residual, wrong, scale_ins = [], [], [], []
        bounds = {"decode": (MIN_DECODE, MAX_DECODE), "prefill": (0, MAX_DECODE)}
        for w in self.proxy.writes:
            if w["lease_write"]:
                continue
            if w["holder_before"] != w["who"]:
                proc = self.procs[w["who"]]
                # the residual window: the request left while its writer held the Lease and
                # was held on the wire (the proxy's ``late``) until after that ended; or the
                # writer was frozen (SIGSTOP) between its last check and the socket write
                resumed = [t for t in proc.resumes if 0 <= w["t_arrive"] - t <= WRITE_TIMEOUT_S]
                on_wire = w.get("holder_at_arrival") == w["who"] and w.get("held_s", 0) > 0
                (residual if (resumed or on_wire) else non_holder).append(w)
            if "replicas_asked" in w and 200 <= w["status"] < 300:
                role = "decode" if "/chat-decode/" in w["path"] else "prefill"
                low, high = bounds[role]
                asked, before = w["replicas_asked"], w["replicas_before"]
                if not isinstance(asked, int) or not low <= asked <= high:
                    wrong.append({**w, "why": "outside bounds"})
                if isinstance(asked, int) and isinstance(before, int) and asked < before:
                    phase = self._phase_at(w["t_arrive"])
                    scale_ins.append({"t": w["t_arrive"], "role": role, "from": before, "to": asked,
                                      "phase": phase.name if phase else None})
                    if phase is not None and phase.partial:
                        wrong.append({**w, "why": f"scale-in in phase {phase.name} (partial reports)"})
        scale_writes = [w for w in self.proxy.writes if "replicas_asked" in w and 200 <= w["status"] < 300]
        return {
            "proxy": self.proxy.summary(),
            "writes_checked": len([w for w in self.proxy.writes if not w["lease_write"]]),
            "scale_writes_landed": len(scale_writes),
            "scale_ins_landed": len(scale_ins),
            "non_holder_writes": len(non_holder),
            "residual_window_writes": len(residual),
            "wrong_writes": len(wrong),
            "crashes": len(self.crashes) + len(self.sidecar_crashes),
            "fuzzed_pages_scraped": self.pages.served,
            "sidecar_reports_checked": self.pages.reports_checked,
            "health_failures": len(self.health_failures),
            "non_finite_out": len(self.non_finite),
            "health_checks": self.checks,
            "reports_served": dict(self.reports.served),
            "fuzz_accepted_not_served_to_victims": self.reports.fuzz_skipped,
            "first_problems": [_brief(x) for x in (non_holder + residual + wrong)[:5]]
                              + (self.crashes + self.sidecar_crashes + self.health_failures + self.non_finite)[:5],
        }


def _brief(write: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in write.items()}



# ---------------------------------------------------------------- scenarios

HIGH = ReportPlan(decode_tps=1.6 * TAU)                      # every decode pod above target: grow
LOW = ReportPlan(decode_tps=0.2 * TAU)                       # well below: shrink (on a complete view)
PARTIAL_LOW = ReportPlan(decode_tps=0.2 * TAU, victims=3)    # below, but a third of decode refused: hold


async def _hold(rig: Rig, seconds: float, *, until=None) -> None:
    """Wait ``seconds`` (or until ``until()``), checking the processes about once a second."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        await rig.check_alive()
        if until is not None and until():
            return


async def failover_cycles(rig: Rig, cycles: int, *, first: int = 0, progress=None) -> list[dict[str, Any]]:
    """``cycles`` leader failovers, SIGKILL (even index) and SIGSTOP (odd) alternately,
    counting from ``first``; the load flips each cycle, so the new leader has a decision
    to write."""
    done = []
    for index in range(first, first + cycles):
        rig.load(f"failover-{index}-{'high' if index % 2 == 0 else 'low'}", HIGH if index % 2 == 0 else LOW)
        await _hold(rig, 1.0)
        done.append(await rig.failover_cycle(how="kill" if index % 2 == 0 else "stop"))
        await rig.check_alive()
        if progress:
            progress(f"cycle {index + 1}: {done[-1]}")
    return done


async def api_faults(rig: Rig, target: int, *, rate: float = 0.25, phase_s: float = 6.0,
                     max_s: float = 900.0, progress=None) -> int:
    """Inject faults into ``rate`` of all API calls until ``target`` were injected, while
    the load goes high, partial-low (scale-in forbidden) and low in turn."""
    before = len(rig.proxy.faults)
    rig.faults(rate)
    started = time.monotonic()
    try:
        while len(rig.proxy.faults) - before < target and time.monotonic() - started < max_s:
            for name, plan in (("faults-high", HIGH), ("faults-partial-low", PARTIAL_LOW), ("faults-low", LOW)):
                rig.load(name, plan)
                await _hold(rig, phase_s)
            if progress:
                progress(f"faults injected: {len(rig.proxy.faults) - before}")
    finally:
        rig.faults(0.0)
    return len(rig.proxy.faults) - before


async def fuzzed_reports(rig: Rig, target: int, *, max_s: float = 1200.0, progress=None) -> dict[str, Any]:
    """Grow decode first, then serve fuzzed bodies: decode victims answer only bodies the
    parser refuses (the view is partial, the rest report low load: no scale-in may land),
    prefill pods the whole fuzz stream. Then the control: the same low load on a complete
    view must scale in (so the check above could have failed)."""
    rig.load("fuzz-grow", HIGH)
    await _hold(rig, 30, until=lambda: len([r for _, r in rig.reports.pods.values() if r == "decode"]) >= 3)
    served0 = rig.reports.served["fuzz_refused"] + rig.reports.served["fuzz_accepted"]
    rig.load("fuzz-partial-low", ReportPlan(decode_tps=0.2 * TAU, victims=3, prefill_fuzz=True))
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        served = rig.reports.served["fuzz_refused"] + rig.reports.served["fuzz_accepted"] - served0
        if served >= target:
            break
        await _hold(rig, 2.0)
        if progress:
            progress(f"fuzzed reports served: {served}")
    served = rig.reports.served["fuzz_refused"] + rig.reports.served["fuzz_accepted"] - served0
    landed_before = len([w for w in rig.proxy.writes if "replicas_asked" in w])
    rig.load("fuzz-control-low", LOW)

    def scaled_in() -> bool:
        return any(w.get("replicas_asked") is not None and isinstance(w.get("replicas_before"), int)
                   and w["replicas_asked"] < w["replicas_before"] and 200 <= w["status"] < 300
                   for w in rig.proxy.writes[landed_before:])
    await _hold(rig, 30, until=scaled_in)
    return {"fuzzed_served": served, "control_scaled_in": scaled_in()}
