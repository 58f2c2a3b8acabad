"""Engine emulator: one real HTTP process that looks like a vLLM 0.32 server (I/O).

``heteroscale emulate-engine --role prefill|decode --gpu TYPE --model NAME --port P``
runs an asyncio aiohttp server with

* ``POST /v1/completions`` — OpenAI-compatible completions, streaming (SSE) or not;
  ``stream_options: {include_usage, continuous_usage_stats}`` as vLLM has them (the
  latter puts the running token count on every chunk);
* ``GET /metrics`` — vLLM 0.32's Prometheus page: the same names, the labels
  ``model_name``/``engine`` and the default histogram buckets of ENGINES.md §1,
  written by ``prometheus_client`` itself from a private registry, so the format
  (``_total``, ``_created``, ``le`` formatting) is the real one;
* ``GET /health``, ``GET /v1/models``;
* ``GET /emulator/gpu`` — the *modelled* GPU readings (utilisation, SM activity,
  memory, power) as JSON. The sidecar reads it only when started with
  ``--gpu-source emulator``; it is named so nobody mistakes it for NVML;
* ``GET /emulator/info`` — role, GPU, model, speed-up and the KV port.

Timing comes from ``heteroscale.simulator.perfmodel`` (the simulator's roofline model), so the
demo and the simulator agree. Modelled durations are divided by ``--speedup``; the latency
histograms on ``/metrics`` are written in modelled seconds (wall × ``--speedup``), so a
sidecar and a coordinator judge latency in the time the service models, at any speed-up.
``--latency-buckets fine`` adds finer TTFT/ITL bounds near typical SLOs to vLLM's own.

Prefill/decode disaggregation works like vLLM's P/D proxy flow: the router sends
the prompt to a prefill instance with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true, "remote_host", "remote_port"}``;
after its prefill pass the prefill instance *pushes* the request's KV bytes over a
real TCP connection to the decode instance's KV port (scaled down and capped so
loopback is not flooded, but real bytes that KV-transfer measurement can see) and
answers with ``kv_transfer_params={"do_remote_prefill": true, "transfer_id"}``; the
router then sends the request to the decode instance, which waits for those bytes
and joins its continuous batch. The decode side paces each push to the modelled
link: the modelled KV bytes at ``kv_bandwidth_gbps``, slowed by any degraded link
between the two instances' switches (``--kv-location``, ``--degrade-link``; see
``links``). Both sides count the transfer in the NIXL connector histograms
(``vllm:nixl_bytes_transferred``: the modelled KV bytes × ``kv_bytes_scale``, the
bytes on loopback before the 1 MiB cap; ``vllm:nixl_xfer_time_seconds``: the modelled
link time, not this host's loopback and event-loop delays), so the per-transfer speed
a sidecar reads is the modelled link's, × ``kv_bytes_scale``.

Scheduling: one prefill task per instance runs batched passes; one decode task
steps the continuous batch. Neither busy-loops: each sleeps the modelled time of
the work it just did and waits on an event when idle. The decode task advances in
ticks of at least ``--tick`` wall seconds, covering as many modelled steps as fit
(the batch only changes at request boundaries, which it honours), and streams the
tokens of a tick together, as vLLM's ``--stream-interval`` does; so a few dozen
instances fit on two cores.

Limits, on purpose: prefill and decode lanes of one instance do not compete for
the GPU (a plain, non-P/D request prefills and decodes on the same instance
without interference); no preemption (admission is bounded by KV capacity
instead); no prefix cache (the public traces carry no prefix hashes).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import time
import uuid
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from heteroscale.demo.emulator.links import Location, parse_degraded_link, parse_location, slowdown
from heteroscale.demo.emulator.model import ROLES, EmulatedEngine, EmulatorSettings, Request
from heteroscale.demo.emulator.page import CONTENT_TYPE_LATEST, LATENCY_BUCKETS, VllmMetrics
from heteroscale.errors import ConfigError, UsageError
from heteroscale.simulator import perfmodel

log = logging.getLogger("heteroscale.emulator")


class KvInbox:
    """Decode side of the KV push: a TCP server that stores arrived transfers by id."""

    HEADER_LIMIT = 4096
    KEEP_S = 60.0

    def __init__(self, metrics: VllmMetrics, *, clock: Callable[[], float] = time.monotonic,
                 link_time_s: Callable[[int, Location | None], float] = lambda modelled, sender: 0.0) -> None:
        self.metrics = metrics
        self.clock = clock
        self.link_time_s = link_time_s      # (modelled bytes, sender's switch) -> wall seconds on the link
        self._arrived: dict[str, tuple[int, float]] = {}
        self._waiters: dict[str, asyncio.Future[int]] = {}
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = self.clock()
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            header = json.loads(line[: self.HEADER_LIMIT] or b"{}")
            size = int(header["bytes"])
            transfer_id = str(header["transfer_id"])
            tokens = int(header["tokens"])
            modelled = int(header.get("modelled_bytes", 0))
            sender = header.get("from")
            sender_at = (str(sender[0]), str(sender[1])) if isinstance(sender, list) and len(sender) == 2 else None
            remaining = size
            while remaining > 0:
                chunk = await asyncio.wait_for(reader.read(min(remaining, 1 << 16)), 10.0)
                if not chunk:
                    raise ConnectionError("peer closed mid-transfer")
                remaining -= len(chunk)
            # The modelled link paces the transfer: the KV is here only once the modelled
            # bytes would have crossed it (slower across a degraded link).
            link_s = self.link_time_s(modelled, sender_at)
            wait_s = started + link_s - self.clock()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            writer.write(f"OK {link_s!r}\n".encode())
            await writer.drain()
        except (ValueError, KeyError, TypeError, ConnectionError, asyncio.TimeoutError, OSError) as exc:
            log.warning("KV receive failed: %s", exc)
            self.metrics.nixl_failed.inc()
            return
        finally:
            writer.close()
        m = self.metrics
        # What NIXL would time is the modelled link, not this host's loopback and event loops
        # (as the lanes' model clocks, see ``model``); without a modelled size, the wall time.
        m.nixl_bytes.observe(int(header.get("counted_bytes", size)))
        m.nixl_xfer_time.observe(link_s if modelled > 0 else self.clock() - started)
        m.nixl_post_time.observe(0.0)
        m.nixl_descriptors.observe(max(1, tokens // 16))
        self._deliver(transfer_id, tokens)

    def _deliver(self, transfer_id: str, tokens: int) -> None:
        waiter = self._waiters.pop(transfer_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(tokens)
            return
        self._expire()
        self._arrived[transfer_id] = (tokens, self.clock())

    def _expire(self) -> None:
        cutoff = self.clock() - self.KEEP_S
        stale = [k for k, (_, at) in self._arrived.items() if at < cutoff]
        for key in stale:
            del self._arrived[key]
            self.metrics.nixl_expired.inc()

    async def wait(self, transfer_id: str, timeout_s: float) -> int:
        """Tokens of the transfer once it has arrived; ``TimeoutError`` if it does not."""
        if transfer_id in self._arrived:
            return self._arrived.pop(transfer_id)[0]
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[transfer_id] = future
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiters.pop(transfer_id, None)


async def push_kv(*, host: str, port: int, transfer_id: str, tokens: int, size_bytes: int,
                  modelled_bytes: int = 0, counted_bytes: int | None = None, sender: Location | None = None,
                  timeout_s: float = 10.0) -> float | None:
    """Prefill side: send ``size_bytes`` real bytes to a decode instance's KV inbox; the
    inbox answers once the ``modelled_bytes`` would have crossed the modelled link from
    the ``sender``'s switch. Returns the inbox's modelled link time (wall seconds), or
    ``None`` from an inbox that does not say. ``counted_bytes``: what both ends count in
    their NIXL histograms (default ``size_bytes``)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        header = json.dumps({"transfer_id": transfer_id, "tokens": tokens, "bytes": size_bytes,
                             "counted_bytes": size_bytes if counted_bytes is None else counted_bytes,
                             "modelled_bytes": modelled_bytes, "from": list(sender) if sender else None})
        writer.write(header.encode() + b"\n")
        block = b"\0" * min(size_bytes, 1 << 16)
        sent = 0
        while sent < size_bytes:
            part = block[: size_bytes - sent]
            writer.write(part)
            sent += len(part)
            await asyncio.wait_for(writer.drain(), timeout_s)
        reply = (await asyncio.wait_for(reader.readline(), timeout_s)).split()
        if not reply or reply[0] != b"OK":
            raise ConnectionError(f"KV inbox answered {b' '.join(reply)!r}")
        try:
            return float(reply[1]) if len(reply) > 1 else None
        except ValueError:
            return None
    finally:
        writer.close()


class BadRequest(Exception):
    """A request the OpenAI API would answer with 400."""


def parse_completion(body: Any, *, served_model_name: str, max_model_len: int) -> dict[str, Any]:
    """Validate an OpenAI completions body; returns prompt_tokens, max_tokens, stream, kv params."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model_id = body.get("model", served_model_name)
    if model_id != served_model_name:
        raise LookupError(f"The model `{model_id}` does not exist.")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt_tokens = max(1, len(prompt.split()))
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt_tokens = len(prompt)
    else:
        raise BadRequest("prompt must be a non-empty string or a non-empty list of token ids")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens must be a positive integer")
    if prompt_tokens + max_tokens > max_model_len:
        raise BadRequest(f"This model's maximum context length is {max_model_len} tokens. However, you "
                         f"requested {prompt_tokens + max_tokens} tokens.")
    kv = body.get("kv_transfer_params") or {}
    if not isinstance(kv, dict):
        raise BadRequest("kv_transfer_params must be an object")
    stream_options = body.get("stream_options") or {}
    include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
    # vLLM: usage on every chunk only with both include_usage and continuous_usage_stats.
    continuous = include_usage and bool(stream_options.get("continuous_usage_stats"))
    return {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
            "stream": bool(body.get("stream", False)), "kv": kv,
            "include_usage": include_usage, "continuous_usage": continuous}


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class EmulatorServer:
    """The HTTP face of one ``EmulatedEngine`` (and its KV inbox on decode)."""

    def __init__(self, settings: EmulatorSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = CollectorRegistry()
        cache_info = {"block_size": "16", "cache_dtype": "auto", "enable_prefix_caching": "False",
                      "gpu_memory_utilization": str(perfmodel.DEFAULT_EFFICIENCY.memory_fraction)}
        self.metrics = VllmMetrics(self.registry, model_name=settings.served_model_name,
                                   max_model_len=settings.max_model_len, cache_info=cache_info,
                                   time_scale=settings.speedup, latency_buckets=settings.latency_buckets)
        self.engine = EmulatedEngine(settings, metrics=self.metrics, clock=clock)
        self.inbox = KvInbox(self.metrics, clock=clock, link_time_s=self.link_time_s)
        self.kv_port = 0
        self._ids = itertools.count()
        self.started_at = time.time()

    def link_time_s(self, modelled_bytes: int, sender: Location | None) -> float:
        """Wall seconds ``modelled_bytes`` take on the modelled link from ``sender``'s switch to
        this instance's: ``kv_bandwidth_gbps``, slowed by the degraded links it crosses."""
        s = self.settings
        factor = slowdown(s.degraded_links, sender, s.kv_location)
        return max(0, modelled_bytes) * 8.0 / (s.kv_bandwidth_gbps * 1e9) * factor / s.speedup

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/health", self.health)
        app.router.add_get("/emulator/gpu", self.gpu)
        app.router.add_get("/emulator/info", self.info)
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, app: web.Application):  # noqa: ANN202 - aiohttp cleanup_ctx
        self.kv_port = await self.inbox.start(self.settings.host, self.settings.kv_port)
        self.engine.start()
        yield
        await self.engine.stop()
        await self.inbox.close()

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        name = self.settings.served_model_name
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": int(self.started_at), "owned_by": "vllm",
             "root": name, "max_model_len": self.settings.max_model_len}]})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def gpu(self, request: web.Request) -> web.Response:
        return web.json_response({"gpus": self.engine.gpu_readings(), "source": "emulator",
                                  "gpu_type": self.settings.gpu})

    async def info(self, request: web.Request) -> web.Response:
        s = self.settings
        return web.json_response({"role": s.role, "gpu": s.gpu, "model": s.model, "tp": s.tp,
                                  "served_model_name": s.served_model_name, "speedup": s.speedup,
                                  "kv_port": self.kv_port, "kv_capacity_tokens": self.engine.kv_capacity_tokens,
                                  "latency_buckets": s.latency_buckets, "latency_unit": "modelled seconds"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON", "BadRequestError")
        try:
            params = parse_completion(body, served_model_name=s.served_model_name, max_model_len=s.max_model_len)
        except BadRequest as exc:
            return _error(400, str(exc), "BadRequestError")
        except LookupError as exc:
            return _error(404, str(exc), "NotFoundError")
        req = Request(id=f"cmpl-{uuid.uuid4().hex[:16]}", prompt_tokens=params["prompt_tokens"],
                      max_tokens=params["max_tokens"], arrival_s=self.clock())
        kv = params["kv"]
        try:
            if kv.get("do_remote_decode"):
                return await self._prefill_for_remote(req, kv)
            if kv.get("do_remote_prefill"):
                if not await self._receive_kv(req, kv):
                    return _error(503, "KV transfer did not arrive in time", "ServiceUnavailableError")
            else:
                self.engine.submit_prefill(req)
                await req.prefill_done.wait()
            if req.finish_reason is None:
                self.engine.submit_decode(req)
            if params["stream"]:
                return await self._stream(request, req, include_usage=params["include_usage"],
                                           continuous_usage=params["continuous_usage"])
            await req.done.wait()
            return web.json_response(self._completion_doc(req, text=" tok" * req.generated))
        except asyncio.CancelledError:
            self.engine.abort(req)
            raise

    async def _prefill_for_remote(self, req: Request, kv: dict[str, Any]) -> web.Response:
        host, port = kv.get("remote_host"), kv.get("remote_port")
        if not isinstance(host, str) or not isinstance(port, int):
            return _error(400, "do_remote_decode needs remote_host (string) and remote_port (integer)",
                          "BadRequestError")
        req.remote_decode = True
        req.max_tokens = 1
        self.engine.submit_prefill(req)
        await req.prefill_done.wait()
        transfer_id = f"{req.id}-{next(self._ids)}"
        modelled, size = self.engine.kv_bytes_for(req.prompt_tokens)
        counted = max(1, int(modelled * self.settings.kv_bytes_scale))
        started = self.clock()
        try:
            # the decode side paces the push to the modelled link (KvInbox)
            link_s = await push_kv(host=host, port=port, transfer_id=transfer_id, tokens=req.prompt_tokens,
                                   size_bytes=size, modelled_bytes=modelled, counted_bytes=counted,
                                   sender=self.settings.kv_location, timeout_s=self.settings.kv_wait_timeout_s)
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            self.metrics.nixl_failed.inc()
            self.engine.fail(req)
            return _error(503, f"KV transfer to {host}:{port} failed: {exc}", "ServiceUnavailableError")
        m = self.metrics
        m.nixl_bytes.observe(counted)
        m.nixl_xfer_time.observe(link_s if link_s is not None else self.clock() - started)
        m.nixl_post_time.observe(0.0)
        m.nixl_descriptors.observe(max(1, req.prompt_tokens // 16))
        # The prefill instance emits the first token itself, as vLLM's does with max_tokens=1.
        now = self.clock()
        req.generated = 1
        req.first_token_s = now
        m.ttft.observe(now - req.arrival_s)
        m.generation_tokens.inc(1)
        self.engine._finish(req, "length", now)
        doc = self._completion_doc(req, text=" tok")
        doc["kv_transfer_params"] = {"do_remote_prefill": True, "do_remote_decode": False,
                                     "transfer_id": transfer_id, "remote_engine_id": f"{self.settings.host}:{self.settings.port}"}
        return web.json_response(doc)

    async def _receive_kv(self, req: Request, kv: dict[str, Any]) -> bool:
        transfer_id = kv.get("transfer_id")
        if not isinstance(transfer_id, str):
            self.engine.fail(req)
            return False
        self.engine.kv_fetching += 1
        self.engine._refresh_gauges()
        try:
            await self.inbox.wait(transfer_id, self.settings.kv_wait_timeout_s)
        except asyncio.TimeoutError:
            self.engine.fail(req)
            return False
        finally:
            self.engine.kv_fetching -= 1
        m = self.metrics
        m.prompt_tokens.inc(req.prompt_tokens)
        m.prompt_external_kv.inc(req.prompt_tokens)
        m.prompt_cached.inc(req.prompt_tokens)
        m.external_prefix_queries.inc(req.prompt_tokens)
        m.external_prefix_hits.inc(req.prompt_tokens)
        req.prefill_done_s = self.clock()
        return True

    async def _stream(self, request: web.Request, req: Request, *, include_usage: bool,
                      continuous_usage: bool = False) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        sent = 0
        last_emit = 0.0
        while True:
            await req.updated.wait()
            req.updated.clear()
            wait_s = last_emit + self.settings.stream_interval_s - self.clock()
            if req.finished_s is None and wait_s > 0:
                try:
                    async with asyncio.timeout(wait_s):
                        await req.done.wait()
                except TimeoutError:
                    pass
            new = req.generated - sent
            if new > 0:
                await response.write(self._chunk(req, " tok" * new, None,
                                                 completion_tokens=req.generated if continuous_usage else None))
                sent = req.generated
                last_emit = self.clock()
            if req.finished_s is not None:
                break
        await response.write(self._chunk(req, "", req.finish_reason,
                                         completion_tokens=req.generated if continuous_usage else None))
        if include_usage:
            usage = self._completion_doc(req, text="")
            usage["choices"] = []
            await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _chunk(self, req: Request, text: str, finish_reason: str | None, *,
               completion_tokens: int | None = None) -> bytes:
        doc: dict[str, Any] = {"id": req.id, "object": "text_completion", "created": int(time.time()),
                               "model": self.settings.served_model_name,
                               "choices": [{"index": 0, "text": text, "logprobs": None,
                                            "finish_reason": finish_reason, "stop_reason": None}]}
        if completion_tokens is not None:     # continuous_usage_stats: the running count
            doc["usage"] = {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": req.prompt_tokens + completion_tokens}
        return b"data: " + json.dumps(doc).encode() + b"\n\n"

    def _completion_doc(self, req: Request, *, text: str) -> dict[str, Any]:
        return {"id": req.id, "object": "text_completion", "created": int(time.time()),
                "model": self.settings.served_model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": req.finish_reason, "stop_reason": None}],
                "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.generated,
                          "total_tokens": req.prompt_tokens + req.generated}}


# -- command line ---------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--gpu", required=True, help="GPU type from the perf model catalog (H20, L20, H100, H200, A100, L40S)")
    parser.add_argument("--model", required=True, help="model config: 8b, 32b or 70b")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name", default="", help="model_name label and OpenAI model id (default: --model)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallelism (GPUs per instance)")
    parser.add_argument("--speedup", type=float, default=1.0, help="modelled seconds per wall second")
    parser.add_argument("--startup-delay", type=float, default=0.0, dest="startup_delay_s",
                        help="modelled seconds to load weights before the port opens")
    parser.add_argument("--kv-port", type=int, default=0, help="TCP port for incoming KV pushes (0: any free port)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="prompt tokens per prefill pass (default: vLLM's API-server default for the "
                             "GPU: 8192 with >= 70 GiB except A100, else 2048)")
    parser.add_argument("--tick", type=float, default=0.05, dest="tick_s", help="least wall seconds per decode wake-up")
    parser.add_argument("--stream-interval", type=float, default=0.1, dest="stream_interval_s",
                        help="least wall seconds between two SSE chunks of one request")
    parser.add_argument("--kv-bytes-scale", type=float, default=1.0 / 1024)
    parser.add_argument("--kv-bytes-cap", type=int, default=1 << 20)
    parser.add_argument("--latency-buckets", choices=sorted(LATENCY_BUCKETS), default="vllm",
                        help="TTFT/ITL histogram buckets: vllm (vLLM's defaults) or fine (vLLM's plus "
                             "2.5 ms steps from 20 to 100 ms and 0.25 s steps up to 10 s)")
    parser.add_argument("--kv-location", default=None, metavar="S2/S1",
                        help="this instance's switch in the pretend cluster (sent with every KV push)")
    parser.add_argument("--degrade-link", action="append", default=[], metavar="SWITCH[,SWITCH][:FACTOR]",
                        help="a slow link of the pretend cluster: KV transfers crossing it take FACTOR "
                             "(default 4) times their modelled time; repeatable")
    parser.add_argument("--log-level", default="WARNING")


def settings_from_args(args: argparse.Namespace) -> EmulatorSettings:
    problems = []
    location = None
    if args.kv_location:
        try:
            location = parse_location(args.kv_location)
        except ValueError as exc:
            problems.append(f"--kv-location: {exc}")
    links = []
    for text in args.degrade_link:
        try:
            links.append(parse_degraded_link(text))
        except ValueError as exc:
            problems.append(f"--degrade-link: {exc}")
    if problems:
        raise ConfigError(problems, source="emulator flags")
    return EmulatorSettings(
        kv_location=location, degraded_links=tuple(links),
        role=args.role, gpu=args.gpu, model=args.model, port=args.port, host=args.host,
        served_model_name=args.served_model_name, tp=args.tp, speedup=args.speedup,
        startup_delay_s=args.startup_delay_s, kv_port=args.kv_port, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, tick_s=args.tick_s,
        stream_interval_s=args.stream_interval_s, kv_bytes_scale=args.kv_bytes_scale,
        kv_bytes_cap=args.kv_bytes_cap, latency_buckets=args.latency_buckets)


async def serve(settings: EmulatorSettings, *, stop: asyncio.Event | None = None,
                on_ready: Callable[[EmulatorServer], None] | None = None) -> None:
    """Load (sleep the modelled start-up), open the ports, serve until ``stop`` is set."""
    stop = stop or asyncio.Event()
    try:
        async with asyncio.timeout(settings.startup_delay_s / settings.speedup):
            await stop.wait()
            return
    except TimeoutError:
        pass
    server = EmulatorServer(settings)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        await site.start()
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s emulator %(levelname)s %(message)s")
    settings = settings_from_args(args)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(server: EmulatorServer) -> None:
            print(f"emulator {settings.role} {settings.gpu} {settings.model} ready on "
                  f"http://{settings.host}:{settings.port} (kv port {server.kv_port})", flush=True)

        await serve(settings, stop=stop, on_ready=ready)

    try:
        asyncio.run(main())
    except OSError as exc:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    return 0
