"""``heteroscale coordinator`` and ``heteroscale validate``: wiring only.

``coordinator`` reads and validates the config, builds the actuator for the backend,
the collector, the leader election (a Kubernetes Lease for the kubernetes backend, a
local lease file otherwise), the reconciler and the status app, runs them as named
tasks, and on SIGTERM/SIGINT stops them in reverse order: the loop first, then the
election (which releases the lease so a standby takes over at once), then the HTTP
server and the clients.

``validate`` prints every problem of a config on its own line (stderr) and exits 2,
or prints ``ok: N services`` and exits 0.

``build_runtime`` is the seam the demo and tests use to get the same wiring in
process, with their own actuator and election.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from heteroscale.coordinator.actuators import make_actuator
from heteroscale.coordinator.collect import ChainSource, Collector, PodSource, StaticSource
from heteroscale.coordinator.config import read_config
from heteroscale.coordinator.core.settings import Config
from heteroscale.coordinator.leader import KubernetesLeaseElection, LocalLeaseElection
from heteroscale.coordinator.reconciler import Reconciler
from heteroscale.coordinator.seams import Actuator, LeaderElection, PodLister, ReportSource, SignalCollector
from heteroscale.coordinator.status import make_status_app
from heteroscale.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from heteroscale.coordinator.kube import Kube
from heteroscale.net import parse_host_port

log = logging.getLogger("heteroscale.coordinator")
EXIT_USAGE = 2


# ---------------------------------------------------------------- arguments

def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="coordinator config (YAML)")


def add_coordinator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="coordinator config (YAML)")
    parser.add_argument("--listen", default=None, metavar="HOST:PORT",
                        help="status page, API and /metrics (default: coordinator.listen, 0.0.0.0:9500)")
    parser.add_argument("--dry-run", action="store_true", help="decide and report, never write")
    parser.add_argument("--identity", default=None,
                        help="leader-election identity (default: $POD_NAME, else hostname-pid)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (kubernetes backend)")
    parser.add_argument("--context", default=None, help="kubeconfig context (kubernetes backend)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def report_problems(path: str, exc: ConfigError) -> int:
    """``validate``'s output: every problem on its own line, prefixed by the file; exit 2."""
    for problem in exc.problems:
        sys.stderr.write(f"{path}: {problem}\n")
    return EXIT_USAGE


# ---------------------------------------------------------------- wiring

def default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def parse_listen(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise UsageError(f"--listen {exc}") from None


def make_election(config: Config, *, identity: str, kube: "Kube | None" = None) -> LeaderElection:
    """The lease for this backend: a Kubernetes Lease, else a local lease file."""
    lease = config.coordinator.lease
    timing = dict(duration_s=lease.duration_s, renew_deadline_s=lease.renew_deadline_s,
                  retry_period_s=lease.retry_period_s)
    if config.coordinator.backend == "kubernetes":
        if kube is None:
            raise UsageError("the kubernetes backend's lease needs an API client")
        return KubernetesLeaseElection(api=kube, name=lease.name, namespace=lease.namespace,
                                       identity=identity, **timing)
    path = lease.path or str(Path(tempfile.gettempdir()) / f"heteroscale-{lease.namespace}-{lease.name}.lease")
    return LocalLeaseElection(path=path, identity=identity, **timing)


def report_source(config: Config, actuator: Actuator) -> ReportSource:
    """Config URLs first; then what the actuator knows: the instances it started itself
    (an actuator that is a ``ReportSource``, like the local one) or pod IPs (``PodLister``)."""
    if isinstance(actuator, ReportSource):
        return ChainSource(StaticSource(), actuator)
    if isinstance(actuator, PodLister):
        return ChainSource(StaticSource(), PodSource(actuator.list_pods, port=config.coordinator.collect.sidecar_port))
    return StaticSource()


def make_collector(config: Config, *, source: ReportSource) -> SignalCollector:
    """Where signals come from: ``/v1/report`` pulls from ``source``, or PromQL
    (``coordinator.metrics_source``), which finds its instances itself."""
    prometheus = config.coordinator.metrics_source
    if prometheus.type == "prometheus":
        from heteroscale.coordinator.promql import PromCollector
        return PromCollector.from_config(prometheus, interval_s=config.coordinator.interval_s)
    return Collector.from_config(config.coordinator.collect, source=source)


class CoordinatorCrashed(RuntimeError):
    """The reconcile loop or the election ended with an error (exit status 1)."""


@dataclass
class Runtime:
    config: Config
    reconciler: Reconciler
    app: web.Application
    election: LeaderElection
    kube: "Kube | None" = None


def build_runtime(config: Config, *, actuator: Actuator | None = None, election: LeaderElection | None = None,
                  identity: str | None = None, dry_run: bool | None = None, kubeconfig: str | None = None,
                  context: str | None = None) -> Runtime:
    """The coordinator's parts, wired as ``heteroscale coordinator`` wires them. Tests and
    embedders may pass their own ``actuator`` and ``election``."""
    identity = identity or default_identity()
    dry_run = config.coordinator.dry_run if dry_run is None else dry_run
    kube = None
    if config.coordinator.backend == "kubernetes" and (actuator is None or election is None):
        from heteroscale.coordinator.kube import kube_from_config
        api = config.coordinator.api
        kube = kube_from_config(kubeconfig=kubeconfig, context=context, timeout_s=api.timeout_s,
                                write_timeout_s=api.write_timeout_s)
    if election is None:
        election = make_election(config, identity=identity, kube=kube)
    if actuator is None and config.coordinator.backend == "static":
        # The advisory backend's pools are read from what the collector fetched.
        collector = make_collector(config, source=StaticSource())
        actuator = make_actuator(config, latest=collector.latest.get, dry_run=dry_run)
    else:
        if actuator is None:
            # Every write the actuator makes goes through the election's fence, attempt by attempt.
            actuator = make_actuator(config, kube=kube.fenced(election) if kube is not None else None,
                                     dry_run=dry_run)
        collector = make_collector(config, source=report_source(config, actuator))
    reconciler = Reconciler(config=config, actuator=actuator, collector=collector, election=election,
                            dry_run=dry_run)
    return Runtime(config=config, reconciler=reconciler, app=make_status_app(reconciler),
                   election=election, kube=kube)


async def serve(runtime: Runtime, *, host: str, port: int, stop: asyncio.Event) -> None:
    """Run election, loop and HTTP until ``stop`` is set; then shut down in order."""
    runner = web.AppRunner(runtime.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    rec = runtime.reconciler
    log.info("coordinator %s: %d service(s), backend %s%s, status on http://%s:%d/", rec.identity,
             len(runtime.config.services), runtime.config.coordinator.backend,
             " (dry run)" if rec.dry_run else "", host, port)
    election_task = asyncio.create_task(runtime.election.run(), name="coordinator-election")
    loop_task = asyncio.create_task(rec.run(stop=stop), name="coordinator-reconcile")
    stop_task = asyncio.create_task(stop.wait(), name="coordinator-stop")
    crashed: BaseException | None = None
    try:
        # Normally only ``stop`` ends this; if the loop or the election dies, say so and
        # stop too rather than serve a status page for a coordinator that does nothing.
        done, _ = await asyncio.wait({stop_task, loop_task, election_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stop_task}:
            error = task.exception() if not task.cancelled() else None
            if error is None and stop.is_set():
                continue            # the loop saw the stop first: a clean shutdown, not a crash
            crashed = error or RuntimeError(f"{task.get_name()} returned")
            log.error("%s ended unexpectedly: %r; shutting down", task.get_name(), crashed)
    finally:
        for task in (stop_task, loop_task, election_task):   # loop first: no write after the lease goes
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await runner.cleanup()
        await rec.collector.close()
        with contextlib.suppress(Exception):
            await rec.actuator.close()
        if runtime.kube is not None:
            with contextlib.suppress(Exception):
                await runtime.kube.close()
        log.info("coordinator %s stopped", rec.identity)
    if crashed is not None:
        raise CoordinatorCrashed(str(crashed)) from crashed


def run_coordinator(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = read_config(args.config)
    host, port = parse_listen(args.listen or config.coordinator.listen)

    async def main() -> None:
        runtime = build_runtime(config, identity=args.identity, dry_run=True if args.dry_run else None,
                                kubeconfig=args.kubeconfig, context=args.context)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(runtime, host=host, port=port, stop=stop)

    try:
        asyncio.run(main())
    except CoordinatorCrashed as exc:
        sys.stderr.write(f"heteroscale coordinator: stopped after an internal error: {exc}\n")
        return 1
    return 0
