"""``heteroscale sidecar``: the per-pod agent that scrapes one engine and its GPUs.

Owns the scrape loop and the cached state behind ``/metrics`` and ``/v1/report``:

* one named, owned background task (``heteroscale-sidecar-scrape``) runs a
  cycle every ``interval_s`` on the monotonic clock: engine scrape, GPU read
  and extension samples run concurrently, each bounded by ``scrape_timeout_s``
  (kept below the interval, so cycles never pile up). The sleep between cycles
  is interruptible, so shutdown is immediate;
* a failed scrape never raises out of the loop: ``engine_up`` drops to 0, the
  reason is counted, the window keeps only good samples, and the report is
  ``stale`` from that first failed scrape on (and whenever the newest good
  sample is older than ``stale_after_s``, 3 intervals), so the coordinator never
  acts on the last rate of an engine that stopped answering. Old samples leave
  the rate window, so rates become ``None`` (unknown) rather than a frozen value;
* pages are parsed in one worker thread (``heteroscale-parse``), never on the
  event loop: a legal page may be as large as the fetch cap (16 MiB), and
  ``/healthz`` must answer while it is parsed. One parse at a time: the cycle
  waits for it, and the loop skips (does not stack) cycles that overran;
* every fetched engine page is also handed to extensions that observe pages
  (``observe_engine_page``, in the same worker thread), so they need no second
  scrape of the engine;
* ``/readyz`` turns ready after the first successful scrape.

Decisions live elsewhere: rates and quantiles are pure (``heteroscale.engine_adapters.rates``),
the page parsers are pure, and the HTTP app only reads what is cached here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from heteroscale.engine_adapters.rates import SignalWindow, WindowStats
from heteroscale.engine_adapters.scrape import PARSERS, ScrapeSettings, decode_page, fetch_body, parser_for
from heteroscale.engine_adapters.snapshot import GENERATION_TOKENS, EngineSnapshot
from heteroscale.errors import ConfigError, ScrapeError, UsageError
from heteroscale.net import parse_host_port
from heteroscale.sidecar.extensions import (
    KV_TRANSFER_NAME, SidecarExtension, add_extension_arguments, build_extensions, default_kv_direction,
    observe_engine_page,
)
from heteroscale.sidecar.gpu.base import GpuReader, NoGpuReader
from heteroscale.sidecar.http import make_app
from heteroscale.sidecar.metrics import MetricsView, SidecarCollector, view_kv
from heteroscale.report import ROLES, GpuReading, SidecarReport, finite_json

log = logging.getLogger("heteroscale.sidecar")

GPU_SOURCES = ("nvml", "emulator", "none")
DEFAULT_LISTEN = "0.0.0.0:9400"
STALE_AFTER_INTERVALS = 3
CLOSE_TIMEOUT_S = 5.0
GIL_SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True)
class AgentSettings:
    """Everything the agent needs, validated once (all problems reported together).

    interval_s: time between scrape cycles. Shorter reacts faster and costs CPU
        on both sides; 1 s is cheap (<1 ms CPU per cycle on a full vLLM page).
    window_s: rates and quantiles span this much history; longer is smoother
        and slower to follow load. Must hold at least two scrapes.
    scrape_timeout_s: bound on each engine/GPU/extension call of a cycle;
        must be below the interval so a hanging engine cannot stack cycles.
    """

    engine: str
    engine_url: str             # full metrics URL (``/metrics`` added when only a host was given)
    role: str
    service: str
    pod: str
    node: str | None = None
    listen_host: str = "0.0.0.0"
    listen_port: int = 9400
    interval_s: float = 1.0
    window_s: float = 5.0
    scrape_timeout_s: float = 0.8
    gpu_source: str = "nvml"
    gpus: tuple[str, ...] | None = None
    emulator_gpu_url: str | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source="sidecar flags")

    def problems(self) -> list[str]:
        out = []
        if self.engine not in PARSERS:
            out.append(f"--engine must be one of {', '.join(PARSERS)}, got {self.engine!r}")
        if self.role not in ROLES:
            out.append(f"--role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not self.service:
            out.append("--service must not be empty")
        if not self.pod:
            out.append("--pod must not be empty")
        url_problem = _url_problem(self.engine_url, "--engine-url")
        if url_problem:
            out.append(url_problem)
        if not self.interval_s > 0:
            out.append(f"--interval must be > 0 seconds, got {self.interval_s:g}")
        if not self.scrape_timeout_s > 0:
            out.append(f"--scrape-timeout must be > 0 seconds, got {self.scrape_timeout_s:g}")
        elif self.interval_s > 0 and self.scrape_timeout_s >= self.interval_s:
            out.append(f"--scrape-timeout ({self.scrape_timeout_s:g} s) must be below --interval "
                       f"({self.interval_s:g} s)")
        if self.interval_s > 0 and not self.window_s >= 2 * self.interval_s:
            out.append(f"--window ({self.window_s:g} s) must hold at least two scrapes "
                       f"(>= 2 x --interval = {2 * self.interval_s:g} s)")
        if not 0 <= self.listen_port <= 65535:
            out.append(f"--listen port must be 0..65535, got {self.listen_port}")
        if self.gpu_source not in GPU_SOURCES:
            out.append(f"--gpu-source must be one of {', '.join(GPU_SOURCES)}, got {self.gpu_source!r}")
        if self.gpu_source == "emulator":
            problem = _url_problem(self.emulator_gpu_url or "", "--emulator-gpu-url")
            if problem:
                out.append(problem + " (required with --gpu-source emulator)")
        return out

    @property
    def stale_after_s(self) -> float:
        return STALE_AFTER_INTERVALS * self.interval_s


def _url_problem(url: str, flag: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port   # raises ValueError on a bad port
    except ValueError as exc:
        return f"{flag} is not a valid URL: {url!r} ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{flag} must be an http(s) URL with a host, got {url!r}"
    return None


def metrics_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/metrics``; an explicit path is kept."""
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urlunsplit(parts)


# -- the agent ---------------------------------------------------------------------------

class Agent:
    """Scrape loop + cached state. ``cycle()`` is public so tests can drive it with a fake clock."""

    def __init__(self, settings: AgentSettings, *, gpu_reader: GpuReader | None = None,
                 extensions: Sequence[SidecarExtension] = (), session: aiohttp.ClientSession | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 page_parser: Callable[[str], EngineSnapshot] | None = None) -> None:
        self.settings = settings
        self.gpu_reader: GpuReader = gpu_reader or NoGpuReader("no GPU reader configured")
        self.extensions = list(extensions)
        self._session = session
        self._own_session = session is None
        self._clock, self._wall = clock, wall
        self._scrape = ScrapeSettings(url=metrics_url(settings.engine_url), engine=settings.engine,
                                      timeout_s=settings.scrape_timeout_s)
        self._parse = page_parser or parser_for(settings.engine)
        self._parser_pool: ThreadPoolExecutor | None = None
        self.window = SignalWindow(settings.window_s)
        self.errors: Counter[str] = Counter()
        self.engine_up = False
        self.last_error: str | None = None
        self.last_good_mono: float | None = None
        self.last_good_wall: float | None = None
        self.started_at: float | None = None
        self.scrape_duration_s: float | None = None
        self.gpus: tuple[GpuReading, ...] = ()
        self.extension_samples: dict[str, Mapping[str, Any]] = {}
        self._last_snapshot: EngineSnapshot | None = None
        self._stats: tuple[float, WindowStats] | None = None
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._started_extensions: list[SidecarExtension] = []

    # -- state read by HTTP -------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.last_good_mono is not None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def stale(self, now_mono: float | None = None) -> bool:
        """True from the first failed scrape on, and when the newest good sample is too old."""
        if self.last_good_mono is None or not self.engine_up:
            return True
        now = self._clock() if now_mono is None else now_mono
        return now - self.last_good_mono > self.settings.stale_after_s

    def stats(self) -> WindowStats:
        """Window stats as of now; cached per cycle so /metrics and /v1/report stay cheap."""
        now = self._clock()
        if self._stats is None or abs(now - self._stats[0]) > self.settings.interval_s / 2:
            self._stats = (now, self.window.stats(now))
        return self._stats[1]

    def _kv(self) -> tuple[tuple[tuple[str, float], ...], str]:
        return view_kv(self.extension_samples.get(KV_TRANSFER_NAME),
                       default_direction=default_kv_direction(self.settings.role))

    def report(self) -> SidecarReport:
        s, st = self.settings, self.stats()
        return SidecarReport.from_signals(
            st,
            service=s.service, role=s.role, pod=s.pod, engine=s.engine, node=s.node,
            engine_up=self.engine_up, stale=self.stale(),
            observed_at=self.last_good_wall or 0.0,
            window_s=st.span_s if st.samples > 1 else s.window_s,
            started_at=self.started_at,
            gpu_mode=self.gpu_reader.mode, gpus=self.gpus,
            kv_transfer=finite_json(dict(self.extension_samples.get(KV_TRANSFER_NAME, {}))),
        )

    def report_dict(self) -> dict[str, Any]:
        doc = self.report().to_dict()
        others = {k: finite_json(dict(v)) for k, v in self.extension_samples.items() if k != KV_TRANSFER_NAME}
        if others:
            doc["extensions"] = others
        doc["scrape_errors"] = dict(self.errors)
        if self.last_error:
            doc["last_error"] = self.last_error
        return doc

    def metrics_view(self) -> MetricsView:
        st = self.stats()
        kv_sources, kv_direction = self._kv()
        return MetricsView(
            service=self.settings.service, role=self.settings.role, engine_up=self.engine_up,
            stale=self.stale(), stats=st, window_s=st.span_s, gpu_mode=self.gpu_reader.mode, gpus=self.gpus,
            kv_sources=kv_sources, kv_direction=kv_direction, started_at=self.started_at,
            scrape_errors=dict(self.errors),
            scrape_duration_s=self.scrape_duration_s, extension_metrics=self._extension_metrics,
        )

    def _extension_metrics(self):
        for ext in self._started_extensions:
            yield from ext.collect()

    # -- one cycle ----------------------------------------------------------------------
    async def cycle(self) -> None:
        """Scrape the engine, read GPUs, sample extensions - concurrently, each bounded."""
        now = self._clock()
        await asyncio.gather(self._scrape_engine(), self._read_gpus(), self._sample_extensions(now))
        self._stats = None      # new data: recompute on next read

    async def _scrape_engine(self) -> None:
        t0, wall0 = self._clock(), self._wall()
        try:
            if self._session is None:
                raise ScrapeError("connect", "agent not started (no HTTP session)")
            body = await fetch_body(self._session, self._scrape)
            # The engine rendered the page somewhere between request and answer:
            # stamp the sample at the midpoint, so a slow answer from a busy
            # engine does not bend the rate (error <= half the request time).
            half_s = (self._clock() - t0) / 2
            t_mono, t_wall = t0 + half_s, wall0 + half_s
            snapshot = await asyncio.get_running_loop().run_in_executor(
                self._parser_executor(), self._parse_page, body, t_mono)
        except ScrapeError as exc:
            self._on_failure(exc)
        else:
            self._on_success(t_mono, t_wall, snapshot)
        finally:
            self.scrape_duration_s = max(0.0, self._clock() - t0)

    def _parser_executor(self) -> ThreadPoolExecutor:
        if self._parser_pool is None:
            self._parser_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heteroscale-parse")
        return self._parser_pool

    def _parse_page(self, body: bytes, t_mono: float) -> EngineSnapshot:
        """In the parse worker thread: decode the page, hand it to observing extensions, parse it.

        Raises only ``ScrapeError``: anything else out of a parser is a broken page
        (or a parser bug), reported as ``parse`` rather than ending the cycle. The
        cyclic garbage collector is paused meanwhile: a parse makes one short-lived,
        acyclic object per sample line, and a full collection over 100,000 of them
        would hold the GIL (and so the event loop) for tens of milliseconds.
        """
        with _collector_paused():
            text = decode_page(body, self._scrape.url)
            # Extensions that read other families of the same page (KV-transfer
            # connector metrics) get it here instead of scraping the engine again.
            observe_engine_page(self._started_extensions, text, t_mono)
            try:
                return self._parse(text)
            except ScrapeError:
                raise
            except (ValueError, ArithmeticError, RecursionError, MemoryError) as exc:
                raise ScrapeError("parse", f"{type(exc).__name__}: {exc}"[:300]) from exc

    def _on_success(self, t_mono: float, t_wall: float, snapshot: EngineSnapshot) -> None:
        if not self.engine_up:
            log.info("engine %s at %s is up", self.settings.engine, self._scrape.url)
        previous = self._last_snapshot
        if snapshot.engine_role in ROLES and snapshot.engine_role != self.settings.role and (
                previous is None or previous.engine_role != snapshot.engine_role):
            log.warning("the engine says it is a %s engine but this sidecar runs with --role %s",
                        snapshot.engine_role, self.settings.role)
        if self.started_at is None or _restarted(previous, snapshot):
            self.started_at = t_wall
        self.engine_up = True
        self.last_error = None
        self.last_good_mono, self.last_good_wall = t_mono, t_wall
        self._last_snapshot = snapshot
        self.window.add(t_mono, snapshot)

    def _on_failure(self, exc: ScrapeError) -> None:
        self.errors[exc.reason] += 1
        message = str(exc)
        if self.engine_up or message != self.last_error:
            # Log on change only: a dead engine at 1 Hz must not flood the log.
            log.warning("engine scrape failed (%s): %s", exc.reason, exc.detail or exc.reason)
        self.engine_up = False
        self.last_error = message

    async def _read_gpus(self) -> None:
        try:
            self.gpus = tuple(await asyncio.wait_for(self.gpu_reader.read(), self.settings.scrape_timeout_s))
        except Exception as exc:   # a reader must not raise; if one does, report nothing rather than crash
            if self.gpus:
                log.warning("GPU read failed (%s: %s); reporting no GPU readings", type(exc).__name__, exc)
            self.gpus = ()

    async def _sample_extensions(self, now: float) -> None:
        async def one(ext: SidecarExtension) -> None:
            try:
                sample = await asyncio.wait_for(ext.sample(now), self.settings.scrape_timeout_s)
                self.extension_samples[ext.name] = dict(sample or {})
            except Exception as exc:
                if self.extension_samples.get(ext.name):
                    log.warning("extension %s failed to sample (%s: %s)", ext.name, type(exc).__name__, exc)
                self.extension_samples[ext.name] = {}
        await asyncio.gather(*(one(ext) for ext in self._started_extensions))

    # -- lifetime -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.scrape_timeout_s),
                connector=aiohttp.TCPConnector(limit=2, force_close=False),
            )
        for ext in self.extensions:
            try:
                await asyncio.wait_for(ext.start(), CLOSE_TIMEOUT_S)
                self._started_extensions.append(ext)
            except Exception as exc:
                log.error("extension %s did not start (%s: %s); running without it", ext.name,
                          type(exc).__name__, exc)
        self._stopping.clear()
        self._task = asyncio.create_task(self._loop(), name="heteroscale-sidecar-scrape")

    async def _loop(self) -> None:
        interval = self.settings.interval_s
        next_t = self._clock()
        while not self._stopping.is_set():
            try:
                await self.cycle()
            except Exception:   # a bug in one cycle must not end the sidecar
                log.exception("sidecar cycle failed")
            next_t += interval
            now = self._clock()
            if next_t < now:      # overran (should not: every call is bounded) -> skip, do not burst
                next_t = now + interval
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that races the timeout, and the loop would run on.
            try:
                async with asyncio.timeout(next_t - now):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.gather(*(_bounded_close(ext.close(), f"extension {ext.name}")
                               for ext in self._started_extensions),
                             _bounded_close(self.gpu_reader.close(), "GPU reader"))
        self._started_extensions.clear()
        if self._parser_pool is not None:
            # A parse still running finishes in its thread (bounded by the page cap); nothing waits for it.
            self._parser_pool.shutdown(wait=False, cancel_futures=True)
            self._parser_pool = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _restarted(previous: EngineSnapshot | None, current: EngineSnapshot) -> bool:
    if previous is None:
        return False
    before, after = previous.counters.get(GENERATION_TOKENS), current.counters.get(GENERATION_TOKENS)
    return before is not None and after is not None and after < before


async def _bounded_close(coro, what: str) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(coro), CLOSE_TIMEOUT_S)
    except Exception as exc:
        log.warning("closing %s failed (%s: %s)", what, type(exc).__name__, exc)


# -- GPU reader ---------------------------------------------------------------------------

async def open_gpu_reader(settings: AgentSettings) -> GpuReader:
    """The GPU source the flags ask for; no-GPU mode (said once in the log) when none is usable."""
    if settings.gpu_source == "none":
        log.info("GPU readings disabled (--gpu-source none): no-GPU mode")
        return NoGpuReader("disabled by --gpu-source none")
    try:
        from heteroscale.sidecar.gpu import open_reader  # type: ignore[attr-defined]
    except ImportError:
        log.warning("GPU support is not built into this version: no-GPU mode")
        return NoGpuReader("GPU support not built")
    try:
        reader = open_reader(source=settings.gpu_source, gpus=settings.gpus,
                             emulator_url=settings.emulator_gpu_url)
        if inspect.isawaitable(reader):
            reader = await reader
    except UsageError:
        raise
    except Exception as exc:
        log.warning("cannot open GPU source %s (%s: %s): no-GPU mode", settings.gpu_source,
                    type(exc).__name__, exc)
        return NoGpuReader(str(exc))
    if reader.mode == "none":
        log.warning("no GPU readable (%s): no-GPU mode", getattr(reader, "reason", "no GPU"))
    return reader


# -- command line -------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", required=True, choices=sorted(PARSERS), help="engine kind")
    parser.add_argument("--engine-url", required=True,
                        help="engine base URL or metrics URL, e.g. http://127.0.0.1:8000 (/metrics is added)")
    parser.add_argument("--role", required=True, choices=ROLES, help="this pod's role")
    parser.add_argument("--service", required=True, help="service name (a constant label on every metric)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN})")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes (default 1)")
    parser.add_argument("--window", type=float, default=5.0, help="rate window in seconds (default 5)")
    parser.add_argument("--scrape-timeout", type=float, default=None,
                        help="seconds per engine scrape, below --interval (default 0.8 x interval)")
    parser.add_argument("--pod", default=None, help="pod name (default $POD_NAME or the hostname)")
    parser.add_argument("--node", default=None, help="node name (default $NODE_NAME)")
    parser.add_argument("--gpu-source", default="nvml", choices=GPU_SOURCES,
                        help="where GPU readings come from (default nvml; none = no-GPU mode)")
    parser.add_argument("--gpus", default=None,
                        help="this engine's GPUs: comma-separated indices or UUIDs; 'file:PATH' (UUIDs the engine "
                             "container wrote there); 'kubelet' (ask the kubelet pod-resources API); "
                             "default: NVIDIA_VISIBLE_DEVICES. See docs/gpu.md")
    parser.add_argument("--emulator-gpu-url", default=None, help="engine emulator URL for --gpu-source emulator")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_extension_arguments(parser)


def parse_listen(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise UsageError(f"--listen {exc}") from None


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    host, port = parse_listen(args.listen)
    interval = args.interval
    timeout = args.scrape_timeout if args.scrape_timeout is not None else 0.8 * interval
    gpus = tuple(g.strip() for g in args.gpus.split(",") if g.strip()) if args.gpus else None
    return AgentSettings(
        engine=args.engine, engine_url=args.engine_url, role=args.role, service=args.service,
        pod=args.pod or os.environ.get("POD_NAME") or socket.gethostname(),
        node=args.node or os.environ.get("NODE_NAME") or None,
        listen_host=host, listen_port=port, interval_s=interval, window_s=args.window,
        scrape_timeout_s=timeout, gpu_source=args.gpu_source, gpus=gpus, emulator_gpu_url=args.emulator_gpu_url,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    extensions = build_extensions(args)
    return asyncio.run(serve(settings, extensions=extensions))


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """The sidecar's listening socket, bound before anything else starts (a busy port is one line)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def serve(settings: AgentSettings, *, extensions: Sequence[SidecarExtension] = ()) -> int:
    """Run the sidecar until SIGTERM/SIGINT.

    The listening socket is bound first: a busy ``--listen`` port ends the process with
    one line, before any GPU probing, engine scrape or extension has run (or logged).
    """
    sock = bind_listen_socket(settings.listen_host, settings.listen_port)
    # A thread that wants the GIL waits up to the switch interval for the holder to drop it.
    # The parse thread holds it for whole pages; 1 ms (default 5) lets /healthz and /metrics
    # through after at most a millisecond per hand-over.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    runner: web.AppRunner | None = None
    try:
        gpu_reader = await open_gpu_reader(settings)
        # Everything imported so far lives for the whole process: keep it out of the
        # collector's sweeps so a long-lived sidecar has short, rare GC pauses.
        gc.freeze()
        agent = Agent(settings, gpu_reader=gpu_reader, extensions=extensions)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SidecarCollector(agent.metrics_view))
        runner = web.AppRunner(make_app(agent, registry), access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        for address in runner.addresses:     # the real port when --listen ...:0
            host, port = address[:2]
            log.info("sidecar for %s %s (%s) listening on http://%s:%d", settings.service, settings.role,
                     settings.engine, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
    finally:
        if runner is not None:
            await runner.cleanup()
        sock.close()
    return 0
