"""``heteroscale demo``: the whole loop on one machine, with real processes (I/O).

What runs, all on loopback:

* a simulated cluster (``--topology``; default ``demo/topology.yaml``: two S2
  domains, each with an S1 switch of L20 nodes and one of H20 nodes);
* engine-emulator + sidecar process pairs, started and stopped by the
  ``LocalActuator`` through the real placement code;
* the coordinator's own parts, in this process: the ``Collector`` pulling every
  sidecar's ``/v1/report``, the ``Reconciler`` running the real policy, a local
  file lease (``LocalLeaseElection``), and the status app on ``--listen``;
* a P/D router and a load generator drawing a trace's request sizes on a
  compressed diurnal profile (``loadgen``).

The service is sized from the performance model (``sizing``, a modelled pressure
test): a 32B model, prefill on L20 (2 GPUs per instance), decode on H20; the target
decode tokens/s per instance, the P/D ratio and the fleet come out of it, and the
load's peak asks for about ``--max-instances``.

``--speedup X`` runs the modelled world X times faster than the wall clock: engines,
start-up delays and arrivals all speed up together, so request rates (and CPU) grow
with X. Latency is judged in the time the service models, whatever X: the engines
write their latency histograms in modelled seconds, the router converts what clients
measure, and the SLOs stay in modelled seconds. Throughputs are per wall second
(token counters do not know about the speed-up), so the decode target τ the
coordinator compares them with is modelled τ × X.

Outputs (``--report FILE``, its timeline plot, ``--log-dir DIR``) are checked before
anything starts. Exit paths: the run ends after ``--duration`` and the drain of the
requests still in flight, on Ctrl-C or SIGTERM, or on an error; every path goes
through one ``finally`` that stops the loop, releases the lease and stops every child
process group; ``atexit`` SIGKILLs whatever could still be left if even that was skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from heteroscale.coordinator.actuators.local import (LocalActuator, LocalSettings, SimulatedCluster,
                                                     emulator_gpu)
from heteroscale.coordinator.collect import Collector
from heteroscale.coordinator.config import load_config
from heteroscale.coordinator.core.settings import Config
from heteroscale.coordinator.leader import LocalLeaseElection
from heteroscale.coordinator.core.policy import prefill_for_decode
from heteroscale.coordinator.reconciler import Reconciler
from heteroscale.coordinator.snapshot import ServiceSnapshot
from heteroscale.coordinator.status import make_status_app
from heteroscale.coordinator.core.placement import RoleDemand, ServiceDemand, plan
from heteroscale.coordinator.core.types import Decision, PoolCounts
from heteroscale.demo.emulator.links import DegradedLink, parse_degraded_link, unknown_switches
from heteroscale.demo.plot import plot_timeline
from heteroscale.demo.loadgen import (MAX_GROWTH_PER_S, MAX_OUTPUT_TOKENS, DayClock, LoadGenerator, RequestSize,
                                     default_trace_path, read_sizes)
from heteroscale.demo.router import Backend, RequestResult, Router
from heteroscale.demo.sizing import Fits, ServiceSizing, size_service
from heteroscale.errors import ConfigError, UsageError
from heteroscale.net import free_ports, parse_host_port
from heteroscale.simulator import perfmodel

log = logging.getLogger("heteroscale.demo")

DEFAULT_TOPOLOGY = Path(__file__).resolve().parent / "topology.yaml"
PANEL = Path(__file__).resolve().parent / "demo.html"
LATENCY_WINDOW_S = 5.0
SERVICE = "chat"
TAIL_S = 3.0                      # quiet seconds after the last request, before the report
DRAIN_NOTE_S = 5.0                # how often the drain at the end is reported
KV_BYTES_SCALE = 1.0 / 1024       # real KV bytes sent per modelled byte (the emulator's default)


@dataclass(frozen=True)
class DemoSettings:
    """One demo run. Durations are wall seconds unless named ``modelled``.

    duration_s: how long load is offered; the run ends a few seconds later.
    speedup: modelled seconds per wall second (engines, start-up, arrivals).
    max_instances: the fleet the load's peak asks for (prefill + decode).
    startup_delay_s: modelled engine start-up (weights loading).
    ttft_slo_s / tbt_slo_s: the service's SLOs, modelled seconds. The TTFT SLO defaults to
        2.5 × the modelled prefill time of the trace's 90th-percentile prompt, rounded up
        to 0.5 s: long prompts dominate TTFT's tail, and an SLO the hardware cannot meet
        would keep the latency safety net firing at any load.
    degrade_links: ``--degrade-link`` values, ``SWITCH[,SWITCH][:FACTOR]``: KV transfers
        crossing such a link take FACTOR (default 4) times their modelled time
        (``demo.emulator.links``); the switches must exist in the topology.
    """

    duration_s: float = 180.0
    speedup: float = 1.0
    listen: str = "127.0.0.1:9500"
    listen_fallback: bool = False          # the default port is taken: use any free one
    trace: Path | None = None
    topology: Path | None = None
    report: Path | None = None
    max_instances: int = 16
    seed: int = 1
    startup_delay_s: float = 3.0
    model: str = "32b"
    prefill_gpu_types: tuple[str, ...] = ("NVIDIA-L20", "NVIDIA-H20")
    decode_gpu_types: tuple[str, ...] = ("NVIDIA-H20",)
    prefill_gpus_per_instance: int = 2
    decode_gpus_per_instance: int = 1
    ttft_slo_s: float | None = None        # None: derived from the perf model (see build_world)
    tbt_slo_s: float = 0.05
    log_dir: Path | None = None
    quiet: bool = False
    degrade_links: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        out = []
        for text in self.degrade_links:
            try:
                parse_degraded_link(text)
            except ValueError as exc:
                out.append(f"--degrade-link: {exc}")
        if not (self.duration_s >= 10 and math.isfinite(self.duration_s)):
            out.append(f"--duration must be at least 10 seconds, got {self.duration_s:g}")
        if not (0.05 <= self.speedup <= 20):
            out.append(f"--speedup must be between 0.05 and 20, got {self.speedup:g}")
        if not 4 <= self.max_instances <= 64:
            out.append(f"--max-instances must be between 4 and 64, got {self.max_instances}")
        if self.startup_delay_s < 0:
            out.append("--startup-delay must not be negative")
        try:
            parse_host_port(self.listen, require_host=True)
        except ValueError as exc:
            out.append(f"--listen {exc}")
        for name in ("trace", "topology"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                out.append(f"--{name}: no such file: {path}")
        if self.report is not None:
            report = Path(self.report)
            out.extend(_file_problems(report, "--report")
                       or _file_problems(plot_path(report), "--report (its timeline plot)"))
        if self.log_dir is not None:
            out.extend(_dir_problems(Path(self.log_dir), "--log-dir"))
        return out

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen, require_host=True)


def plot_path(report: Path) -> Path:
    """Where the timeline plot of ``--report FILE`` goes: beside it, ``<stem>-timeline.png``."""
    return report.with_name(f"{report.stem}-timeline.png")


def _file_problems(path: Path, flag: str) -> list[str]:
    """Why ``path`` cannot be written as a file (checked before the run, not after it)."""
    if path.is_dir():
        return [f"{flag} {path}: is a directory (give a file name, e.g. {path / 'report.json'})"]
    parent = path.absolute().parent
    if not parent.is_dir():
        return [f"{flag} {path}: no such directory: {parent}"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"{flag} {path}: cannot write in {parent}"]
    if path.exists() and not os.access(path, os.W_OK):
        return [f"{flag} {path}: not writable"]
    return []


def _dir_problems(path: Path, flag: str) -> list[str]:
    """Why ``path`` cannot be (created as) a writable directory."""
    if path.exists() and not path.is_dir():
        return [f"{flag} {path}: not a directory"]
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"{flag} {path}: {existing} is not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{flag} {path}: cannot write in {existing}"]
    return []


# ---------------------------------------------------------------- the world

@dataclass(frozen=True)
class World:
    """The sized service and the config the coordinator runs (rates per wall second)."""

    sizing: ServiceSizing
    config: Config
    peak_rps_wall: float

    @property
    def service(self):  # noqa: ANN201 - ServiceConfig
        return self.config.services[0]


def ttft_slo_for(settings: DemoSettings, *, p90_prompt: int) -> float:
    """2.5 × modelled prefill of the p90 prompt on the first prefill GPU type, rounded up to 0.5 s."""
    spec = perfmodel.InstanceSpec(perfmodel.model(settings.model),
                                  perfmodel.gpu(emulator_gpu(settings.prefill_gpu_types[0])),
                                  settings.prefill_gpus_per_instance)
    return max(0.5, math.ceil(2.5 * spec.prefill_time_s(p90_prompt) * 2) / 2)


def cluster_fits(settings: DemoSettings, cluster: SimulatedCluster) -> Fits:
    """Whether the simulated cluster holds ``(prefill, decode)`` instances of the demo's service,
    asked of the real placement code on the empty cluster."""
    view = cluster.view({})

    def fits(prefill: int, decode: int) -> bool:
        demand = ServiceDemand(name=SERVICE, affinity="s2", ratio=(prefill, decode),
                               prefill=RoleDemand(settings.prefill_gpu_types, settings.prefill_gpus_per_instance),
                               decode=RoleDemand(settings.decode_gpu_types, settings.decode_gpus_per_instance))
        result = plan(view=view, services=[demand], current={},
                      desired={SERVICE: PoolCounts(prefill, decode)})
        short = result.shortfall.get(SERVICE)
        return short is None or short.prefill + short.decode == 0

    return fits


def build_world(settings: DemoSettings, *, sizes: list[RequestSize], lease_path: Path,
                fits: Fits | None = None) -> World:
    x = settings.speedup
    prompts = sorted(r.prompt_tokens for r in sizes)
    ttft_slo = settings.ttft_slo_s or ttft_slo_for(settings, p90_prompt=prompts[int(0.9 * (len(prompts) - 1))])
    try:
        sizing = size_service(model=settings.model, prefill_gpu=emulator_gpu(settings.prefill_gpu_types[0]),
                              decode_gpu=emulator_gpu(settings.decode_gpu_types[0]),
                              prefill_tp=settings.prefill_gpus_per_instance,
                              decode_tp=settings.decode_gpus_per_instance,
                              prompts=[r.prompt_tokens for r in sizes], outputs=[r.output_tokens for r in sizes],
                              tbt_slo_s=settings.tbt_slo_s, ttft_slo_s=ttft_slo,
                              max_instances=settings.max_instances, fits=fits, seed=settings.seed)
    except ValueError as exc:
        raise UsageError(f"--max-instances {settings.max_instances}: {exc}") from None
    d = settings.duration_s
    # Policy time constants scale with the run so that a short run still scales both ways.
    policy = {
        "scale_out_cooldown_s": round(max(4.0, d / 24), 1),
        "scale_in_stabilization_s": round(max(8.0, d / 10), 1),
        "smoothing_window_s": 4.0,
        "warmup_s": 2.0,
        "report_max_age_s": 5.0,
        "pending_timeout_s": 60.0,
        "latency_net": {"moderate": 1.0, "severe": 1.5},
        # the slow learners follow the compressed day too
        "adaptive_target": {"recover_after_s": round(max(10.0, d / 12), 1)},
        "ratio_drift": {"window_s": round(max(10.0, d / 8), 1), "dwell_s": round(max(10.0, d / 12), 1)},
        "scale_in_backoff_window_s": round(max(8.0, d / 12), 1),
        "reversal_window_s": round(max(16.0, d / 6), 1),
        "scale_in_backoff_s": round(max(8.0, d / 16), 1),
        "scale_in_backoff_max_s": round(max(16.0, d / 4), 1),
        "kv_transfer_hold_max_s": round(max(4.0, d / 40), 1),
    }
    doc = {
        "coordinator": {"interval_s": 1.0, "backend": "local",
                        "collect": {"timeout_s": 0.8, "concurrency": 64},
                        "lease": {"name": "heteroscale-demo", "path": str(lease_path),
                                  "duration_s": 6, "renew_deadline_s": 4, "retry_period_s": 1},
                        "history_s": max(600.0, d * 2), "decisions_kept": 200},
        "services": [{
            "name": SERVICE, "pd_ratio": f"{sizing.pd_ratio[0]}:{sizing.pd_ratio[1]}",
            # tokens/s are counted per wall second: modelled τ × speed-up
            "target_decode_tps_per_instance": round(sizing.target_decode_tps * x, 2),
            "min_decode": 1, "max_decode": sizing.max_decode, "affinity": "s2",
            # latencies are modelled seconds everywhere (engine histograms, clients)
            "slo": {"ttft_s": ttft_slo, "tbt_s": settings.tbt_slo_s},
            "prefill": {"gpu_types": list(settings.prefill_gpu_types),
                        "gpus_per_instance": settings.prefill_gpus_per_instance},
            "decode": {"gpu_types": list(settings.decode_gpu_types),
                       "gpus_per_instance": settings.decode_gpus_per_instance},
            "policy": policy,
        }],
    }
    return World(sizing=sizing, config=load_config(doc, origin="demo config"), peak_rps_wall=sizing.peak_rps * x)


def day_clock(settings: DemoSettings, world: World) -> DayClock:
    """The compressed day, slowed where the load rises above what the smallest fleet carries
    at τ (``loadgen.DayClock``)."""
    svc = world.service
    floor = svc.min_decode * world.sizing.target_decode_tps / world.sizing.peak_decode_tps
    return DayClock(duration_s=settings.duration_s, floor=floor, max_growth_per_s=MAX_GROWTH_PER_S)


# ---------------------------------------------------------------- bookkeeping

@dataclass
class Sample:
    """One second of the run. Latencies are modelled seconds; rates are per wall second.

    ``prefill``/``decode``: instances in the pools (starting or ready); ``gpus``: GPUs held,
    which includes instances still draining (``gpus_draining``) until they stop.
    ``ttft_p90_s``/``tbt_p90_s``: what clients saw, over requests finished in the last 5 s;
    ``engine_*``: what the coordinator read from the engines' histograms at its last tick.
    """

    at_s: float
    prefill: int
    decode: int
    gpus: int
    util_prefill: float | None
    util_decode: float | None
    offered_rps: float
    completed_rps: float = 0.0
    ttft_p90_s: float | None = None
    tbt_p90_s: float | None = None
    gpus_draining: int = 0
    desired_prefill: int | None = None
    desired_decode: int | None = None
    engine_ttft_p90_s: float | None = None
    engine_tbt_p90_s: float | None = None


@dataclass
class Tally:
    """What the report needs, gathered while the demo runs."""

    samples: list[Sample] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    gpu_seconds: float = 0.0
    max_instances: int = 0


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RouterSource:
    """The actuator's in-traffic instances, as the router's backends."""

    def __init__(self, actuator: LocalActuator) -> None:
        self.actuator = actuator

    def routable(self) -> list[Backend]:
        return [Backend(instance=i.name, role=i.role, group=i.group, url=i.engine_url, kv_port=i.kv_port)
                for i in self.actuator.routable(SERVICE)]


def _service_snapshot(reconciler: Reconciler) -> ServiceSnapshot:
    return next(s for s in reconciler.snapshot.services if s.name == SERVICE)


def _fresh_reports(reconciler: Reconciler) -> list[Any]:
    collection = reconciler.collector.latest.get(SERVICE)
    return [f.report for f in (collection.fetched if collection else ()) if f.report is not None]


# ---------------------------------------------------------------- the run

class Demo:
    def __init__(self, settings: DemoSettings, *, out=sys.stdout) -> None:  # noqa: ANN001
        self.settings = settings
        self.out = out
        self.tally = Tally()
        self.started_mono = time.monotonic()
        self.actuator: LocalActuator | None = None
        self.reconciler: Reconciler | None = None
        self.world: World | None = None
        self.url = ""
        self._flagged: tuple[tuple[str, str], ...] = ()
        self._placements_seen = 0

    def say(self, text: str) -> None:
        if not self.settings.quiet:
            print(text, file=self.out, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started_mono

    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        s = self.settings
        trace = s.trace or default_trace_path()
        sizes = read_sizes(Path(trace))
        cluster = SimulatedCluster.from_file(s.topology or DEFAULT_TOPOLOGY)
        workdir = Path(tempfile.mkdtemp(prefix="heteroscale-demo-"))
        world = build_world(s, sizes=sizes, lease_path=workdir / "lease", fits=cluster_fits(s, cluster))
        self.world = world
        svc = world.service
        router: Router | None = None
        actuator = LocalActuator(cluster=cluster, settings=LocalSettings(
            model=s.model, speedup=s.speedup, startup_delay_s=s.startup_delay_s, log_dir=s.log_dir,
            emulator_args=("--latency-buckets", "fine",
                           *(arg for link in degraded_links(s) for arg in ("--degrade-link", link.text)))),
            in_flight=lambda name: router.in_flight.get(name, 0) if router else 0)
        self.actuator = actuator
        router = Router(RouterSource(actuator), model=s.model, time_scale=s.speedup)
        collector = Collector(source=actuator, timeout_s=world.config.coordinator.collect.timeout_s)
        lease = world.config.coordinator.lease
        election = LocalLeaseElection(path=lease.path, identity=f"demo-{os.getpid()}",
                                      duration_s=lease.duration_s, renew_deadline_s=lease.renew_deadline_s,
                                      retry_period_s=lease.retry_period_s)
        reconciler = Reconciler(config=world.config, actuator=actuator, collector=collector, election=election)
        self.reconciler = reconciler
        loadgen = LoadGenerator(sizes=sizes, send=lambda p, o: router.complete(prompt_tokens=p, max_tokens=o),
                                duration_s=s.duration_s, peak_rps=world.peak_rps_wall, seed=s.seed,
                                day=day_clock(s, world))
        app = make_status_app(reconciler)
        self._add_demo_routes(app, world=world, loadgen=loadgen)
        runner = web.AppRunner(app, access_log=None)
        tasks: list[asyncio.Task[Any]] = []
        try:
            await runner.setup()
            host, port = s.host_port
            port = port or free_ports(1, host)[0]
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as exc:
                if not s.listen_fallback:
                    raise UsageError(f"cannot listen on {s.listen}: {exc.strerror or exc}") from None
                port = free_ports(1, host)[0]
                self.say(f"{s.listen} is taken ({exc.strerror or exc}); using port {port}")
                site = web.TCPSite(runner, host, port)
                await site.start()
            self.url = f"http://{host}:{port}/"
            self._intro(world, trace)
            tasks.append(asyncio.create_task(election.run(), name="demo-election"))
            await self._bring_up(actuator, svc, stop)
            if stop.is_set():
                return self._report(world, loadgen, actuator, interrupted=True)
            tasks.append(asyncio.create_task(reconciler.run(stop=stop), name="demo-reconciler"))
            tasks.append(asyncio.create_task(self._watch(reconciler, actuator, loadgen, stop), name="demo-watch"))
            load_task = asyncio.create_task(loadgen.run(), name="demo-load")
            tasks.append(load_task)
            stop_task = asyncio.create_task(stop.wait(), name="demo-stop-wait")
            tasks.append(stop_task)
            await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            interrupted = stop.is_set()
            if not interrupted:
                self.say(f"[{self.elapsed():6.1f}s] every request is done; {TAIL_S:.0f}s more for the "
                         f"coordinator to see the quiet, then the report")
                try:
                    async with asyncio.timeout(TAIL_S):
                        await stop.wait()
                except TimeoutError:
                    pass
                interrupted = stop.is_set()
            return self._report(world, loadgen, actuator, interrupted=interrupted)
        finally:
            stop.set()
            await loadgen.cancel()
            for task in reversed(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await actuator.close()
            await router.close()
            await collector.close()
            await runner.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)

    def _intro(self, world: World, trace: Path) -> None:
        z, svc, s = world.sizing, world.service, self.settings
        self.say(f"heteroscale demo: model {s.model}, prefill on {'/'.join(s.prefill_gpu_types)} "
                 f"({s.prefill_gpus_per_instance} GPUs each), decode on {'/'.join(s.decode_gpu_types)}; "
                 f"P:D ratio {svc.pd_ratio_text}, target {z.target_decode_tps:.0f} decode tok/s "
                 f"per instance, SLO TTFT {svc.slo.ttft_s:.2f}s TBT {svc.slo.tbt_s * 1000:.0f}ms, "
                 f"up to {z.max_prefill}P+{z.max_decode}D")
        floor = svc.min_decode * z.target_decode_tps / z.peak_decode_tps
        self.say(f"load: {trace.name} request sizes, peak {z.peak_rps:.1f} req/s on a day compressed into "
                 f"{s.duration_s:.0f}s, its rise above {100 * floor:.0f}% of the peak slowed to "
                 f"{100 * MAX_GROWTH_PER_S:.1f}%/s" + (f" (speed-up {s.speedup:g}: {world.peak_rps_wall:.1f} req/s and "
                                           f"{svc.target_decode_tps_per_instance:.0f} tok/s per wall second; "
                                           f"latencies in modelled seconds)" if s.speedup != 1 else ""))
        if s.degrade_links:
            self.say("degraded KV links: " + ", ".join(
                f"{'<->'.join(link.ends)} {link.factor:g}x slower" for link in degraded_links(s)))
        self.say(f"status page: {self.url}demo  (coordinator page alone: {self.url})")

    async def _bring_up(self, actuator: LocalActuator, svc, stop: asyncio.Event) -> None:  # noqa: ANN001
        """Start the minimum pools (a Deployment's initial replicas) and wait until they serve."""
        first = PoolCounts(prefill_for_decode(svc, svc.min_decode), svc.min_decode)
        await actuator.apply(svc, Decision(svc.name, time.time(), "initial", PoolCounts(0, 0), first))
        self.say(f"[{self.elapsed():6.1f}s] starting {first.prefill}P+{first.decode}D ...")
        deadline = time.monotonic() + 120.0
        while not stop.is_set() and time.monotonic() < deadline:
            routable = actuator.routable(SERVICE)
            if any(i.role == "decode" for i in routable) and any(i.role == "prefill" for i in routable):
                self.say(f"[{self.elapsed():6.1f}s] serving: {len(routable)} instances in traffic; load starts")
                return
            if not actuator.instances:
                raise UsageError("the first instances failed to start (run with --log-dir DIR to see their logs)")
            await asyncio.sleep(0.25)
        if not stop.is_set():
            raise UsageError("the first instances did not become ready within 120 s "
                             "(run with --log-dir DIR to see their logs)")

    async def _watch(self, reconciler: Reconciler, actuator: LocalActuator, loadgen: LoadGenerator,
                     stop: asyncio.Event) -> None:
        """Once a second: print new decisions, sample pools, GPUs and utilisation; say what the
        drain at the end waits for."""
        seen: set[tuple[float, str]] = set()
        last = time.monotonic()
        drain_said_at: float | None = None
        while not stop.is_set():
            try:      # asyncio.timeout: 3.11's wait_for can swallow a racing cancel
                async with asyncio.timeout(1.0):
                    await stop.wait()
            except TimeoutError:
                pass
            now = time.monotonic()
            rt = reconciler.services[SERVICE]
            for decision in reversed(list(rt.decisions)):
                key = (decision.at, decision.reason)
                if key not in seen:
                    seen.add(key)
                    self._decision(decision)
            self._sample(reconciler, actuator, loadgen, dt=now - last)
            self._kv_news(reconciler, actuator)
            last = now
            if loadgen.sending_done and loadgen.in_flight and (drain_said_at is None
                                                               or now - drain_said_at >= DRAIN_NOTE_S):
                self._drain_note(loadgen, first=drain_said_at is None)
                drain_said_at = now

    def _kv_news(self, reconciler: Reconciler, actuator: LocalActuator) -> None:
        """Say when the KV bandwidth map flags a different set of pairs, and when placement
        acted on measured bandwidth (a slow domain avoided or released first)."""
        bw = _service_snapshot(reconciler).bandwidth
        flagged = tuple(sorted((p.prefill, p.decode) for p in bw.flagged)) if bw is not None else ()
        if flagged != self._flagged:
            self._flagged = flagged
            if flagged:
                worst = min(bw.flagged, key=lambda p: p.bytes_per_second or 0.0)
                self.say(f"[{self.elapsed():6.1f}s] KV bandwidth: {len(flagged)} pair(s) flagged, e.g. "
                         f"{worst.prefill}->{worst.decode}: {worst.reason}")
            else:
                self.say(f"[{self.elapsed():6.1f}s] KV bandwidth: no pair flagged")
        for entry in actuator.placements[self._placements_seen:]:
            whys = dict.fromkeys(x["why"] for x in entry["allocations"] + entry["releases"])
            for why in whys:
                if "measured KV bandwidth" in why:
                    self.say(f"[{self.elapsed():6.1f}s] placement: {why}")
        self._placements_seen = len(actuator.placements)

    def _drain_note(self, loadgen: LoadGenerator, *, first: bool) -> None:
        left = loadgen.in_flight
        if first:
            self.say(f"[{self.elapsed():6.1f}s] load over: {loadgen.stats.sent} requests sent; waiting for the "
                     f"{left} still in flight (long answers take up to ~{self._longest_answer_s():.0f}s)")
        else:
            self.say(f"[{self.elapsed():6.1f}s] draining: {left} request{'s' if left != 1 else ''} in flight")

    def _longest_answer_s(self) -> float:
        """Wall seconds the longest answer the demo asks for takes at the sized decode step."""
        step = self.world.sizing.decode_step_s if self.world else self.settings.tbt_slo_s
        return MAX_OUTPUT_TOKENS * step / self.settings.speedup

    def _decision(self, d: Decision) -> None:
        at = self.elapsed()
        tps = d.inputs.get("smoothed_decode_tps")
        tps_text = f"decode {tps:.0f} tok/s" if isinstance(tps, (int, float)) else "decode tok/s n/a"
        self.tally.decisions.append({"at": round(at, 2), "unix": d.at, "reason": d.reason,
                                     "prefill": d.desired.prefill, "decode": d.desired.decode,
                                     "from": d.current.as_dict(), "direction": d.direction,
                                     "detail": d.detail})
        self.say(f"[{at:6.1f}s] {d.reason:<20} {d.current.prefill}P{d.current.decode}D -> "
                 f"{d.desired.prefill}P{d.desired.decode}D  {tps_text}  {d.detail}".rstrip())

    def _sample(self, reconciler: Reconciler, actuator: LocalActuator, loadgen: LoadGenerator, *,
                dt: float) -> None:
        live = [i for i in actuator.instances.values() if i.live]
        gpus = sum(i.gpus for i in actuator.instances.values() if i.holds_gpus)
        draining = sum(i.gpus for i in actuator.instances.values() if i.state == "draining")
        self.tally.gpu_seconds += gpus * dt
        self.tally.max_instances = max(self.tally.max_instances, len(live))
        util: dict[str, list[float]] = {"prefill": [], "decode": []}
        for report in _fresh_reports(reconciler):
            if not report.engine_up:
                continue
            for g in report.gpus:
                if g.utilization_ratio is not None:
                    util[report.role].append(g.utilization_ratio)
        recent = _finished_since(loadgen.stats.results, time.monotonic() - LATENCY_WINDOW_S)
        done = [r for r in recent if r.ok]
        svc = _service_status(reconciler)
        latency = svc.get("latency") or {}
        self.tally.samples.append(Sample(
            at_s=round(self.elapsed(), 2), prefill=sum(1 for i in live if i.role == "prefill"),
            decode=sum(1 for i in live if i.role == "decode"), gpus=gpus, gpus_draining=draining,
            util_prefill=_mean(util["prefill"]), util_decode=_mean(util["decode"]),
            offered_rps=round(loadgen.rate_now(), 3), completed_rps=round(len(recent) / LATENCY_WINDOW_S, 3),
            ttft_p90_s=_quantile([r.ttft_s for r in done if r.ttft_s is not None], 0.9),
            tbt_p90_s=_quantile([r.tbt_s for r in done if r.tbt_s is not None], 0.9),
            desired_prefill=(svc.get("prefill") or {}).get("desired"),
            desired_decode=(svc.get("decode") or {}).get("desired"),
            engine_ttft_p90_s=latency.get("ttft_p90_s"), engine_tbt_p90_s=latency.get("tbt_p90_s")))

    def _add_demo_routes(self, app: web.Application, *, world: World, loadgen: LoadGenerator) -> None:
        async def demo_status(request: web.Request) -> web.Response:
            return web.json_response(self._live_doc(world, loadgen), headers={"Cache-Control": "no-store"})

        async def panel(request: web.Request) -> web.FileResponse:
            return web.FileResponse(PANEL, headers={"Cache-Control": "no-store"})

        app.router.add_get("/api/v1/demo", demo_status)
        app.router.add_get("/demo", panel)

    def _live_doc(self, world: World, loadgen: LoadGenerator) -> dict[str, Any]:
        results = loadgen.stats.results
        recent = results[-200:]
        svc = world.service
        ok = [r for r in recent if r.ok]
        instances = list(self.actuator.instances.values()) if self.actuator else []
        held = [i for i in instances if i.holds_gpus]
        gpus = {state: sum(i.gpus for i in held if i.state == state) for state in ("starting", "ready", "draining")}
        return {"elapsed_s": round(self.elapsed(), 1), "duration_s": self.settings.duration_s,
                "speedup": self.settings.speedup, "pd_ratio": svc.pd_ratio_text,
                "slo": {"ttft_s": svc.slo.ttft_s, "tbt_s": svc.slo.tbt_s}, "latency_unit": "modelled seconds",
                "offered_rps": round(loadgen.rate_now(), 3), "requests": len(results),
                "in_flight": loadgen.in_flight, "sending_done": loadgen.sending_done,
                "recent_slo_attainment": _attainment(recent, svc.slo.ttft_s, svc.slo.tbt_s),
                "recent_ttft_p90_s": _quantile([r.ttft_s for r in ok if r.ttft_s is not None], 0.9),
                "recent_tbt_p90_s": _quantile([r.tbt_s for r in ok if r.tbt_s is not None], 0.9),
                "gpus": {"held": sum(gpus.values()), **gpus,
                         "per_instance": {"prefill": self.settings.prefill_gpus_per_instance,
                                          "decode": self.settings.decode_gpus_per_instance}},
                "kv_transfer": _service_snapshot(self.reconciler).kv_transfer if self.reconciler else None,
                "kv_bytes_scale": KV_BYTES_SCALE,
                "degraded_links": list(self.settings.degrade_links),
                "placements": self._placements(),
                "samples": [asdict(x) for x in self.tally.samples[-600:]],
                "instances": [i.to_dict() for i in instances]}

    def _placements(self) -> list[dict[str, Any]]:
        """The local actuator's placement cycles, ``at`` in seconds since the demo started."""
        if self.actuator is None:
            return []
        offset = time.time() - self.elapsed()
        return [{**p, "at": round(p["at"] - offset, 2)} for p in self.actuator.placements]

    def _report(self, world: World, loadgen: LoadGenerator, actuator: LocalActuator, *,
                interrupted: bool) -> dict[str, Any]:
        svc = world.service
        results = loadgen.stats.results
        ok = [r for r in results if r.ok]
        samples = self.tally.samples
        moves = [d for d in self.tally.decisions if d["direction"] != "hold"]
        return {
            "requests": len(results),
            "requests_ok": len(ok),
            "requests_failed": len(results) - len(ok),
            "requests_shed": loadgen.stats.shed,
            "slo_attainment": _attainment(results, svc.slo.ttft_s, svc.slo.tbt_s),
            "slo": {"ttft_s": svc.slo.ttft_s, "tbt_s": svc.slo.tbt_s},
            "latency_unit": "modelled seconds",
            "latency": {"ttft_p50_s": _quantile([r.ttft_s for r in ok if r.ttft_s is not None], 0.5),
                        "ttft_p90_s": _quantile([r.ttft_s for r in ok if r.ttft_s is not None], 0.9),
                        "tbt_p50_s": _quantile([r.tbt_s for r in ok if r.tbt_s is not None], 0.5),
                        "tbt_p90_s": _quantile([r.tbt_s for r in ok if r.tbt_s is not None], 0.9)},
            "gpu_seconds": round(self.tally.gpu_seconds, 1),
            "mean_gpu_utilization": {
                "prefill": _mean([x.util_prefill for x in samples if x.util_prefill is not None]),
                "decode": _mean([x.util_decode for x in samples if x.util_decode is not None])},
            "decisions": self.tally.decisions,
            "scale_out": sum(1 for d in moves if d["direction"] == "out"),
            "scale_in": sum(1 for d in moves if d["direction"] == "in"),
            "max_instances": self.tally.max_instances,
            "pd_ratio": svc.pd_ratio_text,
            "target_decode_tps_per_instance": svc.target_decode_tps_per_instance,
            "sizing": world.sizing.to_dict(),
            "speedup": self.settings.speedup,
            "duration_s": self.settings.duration_s,
            "seed": self.settings.seed,
            "elapsed_s": round(self.elapsed(), 1),
            "interrupted": interrupted,
            "processes_started": len(actuator.all_pids()),
            "child_pids": actuator.all_pids(),
            "degraded_links": list(self.settings.degrade_links),
            "placements": self._placements(),
            "timeline": [asdict(x) for x in samples],
        }


def _service_status(reconciler: Reconciler) -> dict[str, Any]:
    """The demo service's entry of the coordinator's status document ({} before the first tick)."""
    doc = reconciler.status(history=False)
    return next((x for x in doc.get("services", []) if x.get("name") == SERVICE), {})


def _finished_since(results: list[RequestResult], since_mono: float) -> list[RequestResult]:
    """Requests that finished after ``since_mono`` (results are appended as they finish)."""
    out = []
    for r in reversed(results):
        end = r.finished_s if r.finished_s is not None else r.arrival_s
        if end < since_mono:
            break
        out.append(r)
    return out


def _attainment(results: list[RequestResult], ttft_s: float | None, tbt_s: float | None) -> float | None:
    """Share of requests that completed within both SLOs (failures count as misses).

    A request whose tokens all came in one chunk has no measurable TBT (``tbt_s`` None)
    and is judged on TTFT alone."""
    if not results:
        return None
    good = sum(1 for r in results if r.ok
               and (ttft_s is None or (r.ttft_s is not None and r.ttft_s <= ttft_s))
               and (tbt_s is None or r.tbt_s is None or r.tbt_s <= tbt_s))
    return round(good / len(results), 4)


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, default=None,
                        help="trace file (Azure CSV, Mooncake JSONL, BurstGPT CSV); default: the Azure "
                             "conversation trace in ../shared/traces, or the sample shipped with the package")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--speedup", type=float, default=1.0,
                        help="modelled seconds per wall second (default 1: real time)")
    parser.add_argument("--listen", default=None,
                        help="status page HOST:PORT (default 127.0.0.1:9500, or any free port if that is "
                             "taken; port 0: any free port)")
    parser.add_argument("--report", type=Path, default=None,
                        help="write a JSON summary to this file at the end, and its timeline plot beside it "
                             "(FILE without its suffix + '-timeline.png')")
    parser.add_argument("--topology", type=Path, default=None, help="simulated cluster YAML")
    parser.add_argument("--max-instances", type=int, default=16,
                        help="fleet size the load's peak asks for (default 16)")
    parser.add_argument("--startup-delay", type=float, default=3.0, dest="startup_delay_s",
                        help="modelled engine start-up seconds (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="keep each child process's log in this directory (created if missing)")
    parser.add_argument("--degrade-link", action="append", default=[], dest="degrade_links",
                        metavar="SWITCH[,SWITCH][:FACTOR]",
                        help="slow one link of the simulated cluster: KV transfers with an end under SWITCH "
                             "(an S2 or S1 name), or between the two switches, take FACTOR (default 4) times "
                             "their modelled time; repeatable")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    settings = DemoSettings(duration_s=args.duration, speedup=args.speedup,
                            listen=args.listen or DemoSettings.listen, listen_fallback=args.listen is None,
                            trace=args.trace, topology=args.topology, report=args.report,
                            max_instances=args.max_instances, seed=args.seed,
                            startup_delay_s=args.startup_delay_s, log_dir=args.log_dir, quiet=args.quiet,
                            degrade_links=tuple(getattr(args, "degrade_links", None) or ()))
    problems = settings.problems()
    if not problems and settings.degrade_links:
        problems = degrade_problems(settings)
    if problems:
        raise ConfigError(problems, source="demo flags")
    return settings


def degraded_links(settings: DemoSettings) -> tuple[DegradedLink, ...]:
    return tuple(parse_degraded_link(text) for text in settings.degrade_links)


def degrade_problems(settings: DemoSettings) -> list[str]:
    """``--degrade-link`` names switches the simulated cluster does not have."""
    cluster = SimulatedCluster.from_file(settings.topology or DEFAULT_TOPOLOGY)
    known = sorted(set(cluster.switches_of_nodes().values()))
    missing = unknown_switches(degraded_links(settings), known)
    if not missing:
        return []
    names = sorted({name for loc in known for name in loc})
    return [f"--degrade-link: no switch named {', '.join(missing)} in the topology (it has {', '.join(names)})"]


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    demo = Demo(settings)

    def last_resort() -> None:
        if demo.actuator is not None:
            demo.actuator.kill_all_now()

    atexit.register(last_resort)

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await demo.run(stop)

    try:
        report = asyncio.run(main())
    finally:
        last_resort()
        atexit.unregister(last_resort)
    _summary(demo, report)
    code = 130 if report.get("interrupted") else 0
    if settings.report is not None and not write_outputs(demo, report, settings.report):
        code = code or EXIT_OUTPUT
    return code


EXIT_OUTPUT = 2


def write_outputs(demo: Demo, report: dict[str, Any], path: Path) -> bool:
    """Write the JSON report and its timeline plot beside it. The paths were checked before
    the run; should writing still fail, the report goes to a temporary file instead of
    being lost, and the problem is one line on stderr. False if anything was not written."""
    text = json.dumps(report, indent=2) + "\n"
    try:
        path.write_text(text)
    except OSError as exc:
        fd, rescue = tempfile.mkstemp(prefix="heteroscale-demo-report-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        print(f"heteroscale demo: error: cannot write the report to {path} ({exc.strerror or exc}); "
              f"it is in {rescue}", file=sys.stderr)
        return False
    demo.say(f"report: {path}")
    plot = plot_path(path)
    try:
        plot_timeline(report, plot)
    except (OSError, ValueError) as exc:
        print(f"heteroscale demo: error: cannot write the timeline plot {plot}: {exc}", file=sys.stderr)
        return False
    demo.say(f"timeline plot: {plot}")
    return True


def _summary(demo: Demo, report: dict[str, Any]) -> None:
    util = report["mean_gpu_utilization"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    demo.say(f"done{' (interrupted)' if report['interrupted'] else ''}: {report['requests']} requests, "
             f"SLO attainment {pct(report['slo_attainment'])}, {report['scale_out']} scale-outs, "
             f"{report['scale_in']} scale-ins, at most {report['max_instances']} instances, "
             f"{report['gpu_seconds'] / 3600:.2f} GPU-hours, mean GPU utilisation prefill "
             f"{pct(util['prefill'])} decode {pct(util['decode'])}")
