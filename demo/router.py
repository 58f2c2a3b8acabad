"""A small P/D router for the demo: client → prefill → decode of the same Deployment Group (I/O).

For each request the router picks the least-loaded prefill instance that is in
traffic, then the least-loaded decode instance *of the same Deployment Group* (the
KV cache never crosses a DG's network domain), and runs vLLM's disaggregated flow:

1. ``POST prefill/v1/completions`` with ``max_tokens=1`` and
   ``kv_transfer_params={"do_remote_decode": true, "remote_host", "remote_port"}``
   — the prefill instance computes the prompt and pushes its KV bytes to the
   decode instance's KV port;
2. ``POST decode/v1/completions`` (streaming) with the ``kv_transfer_params`` the
   prefill instance answered with; the tokens stream back over SSE.

"In traffic" is the actuator's call (the ready-ratio gate and draining live
there): the router asks its ``BackendSource`` for the routable instances on every
request and never sends to one that is not listed. It counts its own requests in
flight per instance: on a prefill instance from dispatch until the prefill answer
(its queue: a request that moved on to decode no longer loads it), on a decode
instance for the whole request. That is both its load measure and what the
actuator waits on to finish draining.

Latency is measured as a client sees it and reported in *modelled* seconds (wall ×
``time_scale``, the demo's speed-up), so it compares with SLOs at any speed-up:
TTFT = arrival → first streamed token; TBT = the mean gap per token after the
first chunk, ``(t_last − t_first) / (tokens_last − tokens_first)``, read from the
running token count vLLM puts on every chunk with
``stream_options.continuous_usage_stats``. Tokens coalesce into chunks (the
engine's stream interval), so counting ``tokens − 1`` gaps between the first and
last chunk would understate TBT; when every token came in one chunk TBT is not
measurable and is ``None``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import aiohttp


@dataclass(frozen=True)
class Backend:
    """One routable engine instance."""

    instance: str           # unique id
    role: str               # prefill | decode
    group: str              # Deployment Group name
    url: str                # http://host:port of the engine
    kv_host: str = "127.0.0.1"
    kv_port: int = 0        # decode only: where prefill pushes KV


class BackendSource(Protocol):
    def routable(self) -> Sequence[Backend]:
        ...


@dataclass(frozen=True)
class RequestResult:
    """What happened to one request. Latencies in modelled seconds; ``arrival_s`` and
    ``finished_s`` are wall (monotonic) clock readings."""

    ok: bool
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    ttft_s: float | None = None
    tbt_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None
    prefill: str | None = None
    decode: str | None = None
    finished_s: float | None = None
    prefill_s: float | None = None      # dispatch → prefill answer (prefill + KV push)


def client_tbt_s(*, first_s: float, last_s: float, first_tokens: int, last_tokens: int,
                 time_scale: float = 1.0) -> float | None:
    """Mean modelled gap per token after the first chunk; ``None`` if all came in one chunk.

    Worked example: the first chunk arrives at 10.0 s holding 1 token, the last at 12.0 s
    with the count at 41: 40 tokens in 2.0 s → 50 ms each (× ``time_scale``)."""
    gaps = last_tokens - first_tokens
    if gaps <= 0:
        return None
    return (last_s - first_s) * time_scale / gaps


class NoBackend(Exception):
    """No prefill+decode pair is in traffic right now."""


class Router:
    def __init__(self, source: BackendSource, *, model: str, timeout_s: float = 120.0,
                 time_scale: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.model = model
        self.time_scale = time_scale       # modelled seconds per wall second
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5.0)
        self.clock = clock
        self.in_flight: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Router":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=64, force_close=False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def pick(self) -> tuple[Backend, Backend]:
        """The least-loaded prefill in traffic, and the least-loaded decode of its DG."""
        backends = list(self.source.routable())
        decodes: dict[str, list[Backend]] = {}
        for b in backends:
            if b.role == "decode":
                decodes.setdefault(b.group, []).append(b)
        prefills = [b for b in backends if b.role == "prefill" and decodes.get(b.group)]
        if not prefills:
            raise NoBackend("no Deployment Group has a prefill and a decode instance in traffic")
        prefill = min(prefills, key=lambda b: (self.in_flight[b.instance], self.sent[b.instance]))
        decode = min(decodes[prefill.group], key=lambda b: (self.in_flight[b.instance], self.sent[b.instance]))
        return prefill, decode

    async def complete(self, *, prompt_tokens: int, max_tokens: int) -> RequestResult:
        """Route one request through prefill and decode; never raises for engine trouble."""
        arrival = self.clock()
        try:
            prefill, decode = self.pick()
        except NoBackend as exc:
            return RequestResult(False, prompt_tokens, 0, arrival, error=f"no_backend: {exc}", finished_s=arrival)
        for b in (prefill, decode):
            self.in_flight[b.instance] += 1
            self.sent[b.instance] += 1
        held = [prefill, decode]
        try:
            return await self._run(prefill, decode, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                   arrival=arrival, release_prefill=lambda: self._release(held, prefill))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
            return RequestResult(False, prompt_tokens, 0, arrival, error=f"{type(exc).__name__}: {exc}",
                                 prefill=prefill.instance, decode=decode.instance, finished_s=self.clock())
        finally:
            for b in list(held):
                self._release(held, b)

    def _release(self, held: list[Backend], backend: Backend) -> None:
        """Drop one request's in-flight count on ``backend`` (once)."""
        if backend not in held:
            return
        held.remove(backend)
        self.in_flight[backend.instance] -= 1
        if self.in_flight[backend.instance] <= 0:
            del self.in_flight[backend.instance]

    async def _run(self, prefill: Backend, decode: Backend, *, prompt_tokens: int, max_tokens: int,
                   arrival: float, release_prefill: Callable[[], None]) -> RequestResult:
        session = self._client()
        scale = self.time_scale
        prompt = [1] * prompt_tokens
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "stream": False,
                "kv_transfer_params": {"do_remote_decode": True, "remote_host": decode.kv_host,
                                       "remote_port": decode.kv_port}}
        async with session.post(f"{prefill.url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return self._failed(f"prefill HTTP {resp.status}", prompt_tokens=prompt_tokens, arrival=arrival,
                                    prefill=prefill, decode=decode)
            doc = await resp.json()
        prefill_s = (self.clock() - arrival) * scale
        release_prefill()
        kv = doc["kv_transfer_params"]
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "kv_transfer_params": kv}
        first = last = None
        first_tokens = last_tokens = tokens = 0
        async with session.post(f"{decode.url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return self._failed(f"decode HTTP {resp.status}", prompt_tokens=prompt_tokens, arrival=arrival,
                                    prefill=prefill, decode=decode)
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage")
                if usage:
                    tokens = int(usage["completion_tokens"])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    now = self.clock()
                    if first is None:
                        first, first_tokens = now, tokens
                    last, last_tokens = now, tokens
        end = self.clock()
        if first is None or tokens <= 0:
            return self._failed("decode produced no tokens", prompt_tokens=prompt_tokens, arrival=arrival,
                                prefill=prefill, decode=decode)
        tbt = client_tbt_s(first_s=first, last_s=last, first_tokens=first_tokens, last_tokens=last_tokens,
                           time_scale=scale)
        return RequestResult(True, prompt_tokens, tokens, arrival, ttft_s=(first - arrival) * scale, tbt_s=tbt,
                             e2e_s=(end - arrival) * scale, prefill=prefill.instance, decode=decode.instance,
                             finished_s=end, prefill_s=prefill_s)

    def _failed(self, error: str, *, prompt_tokens: int, arrival: float, prefill: Backend,
                decode: Backend) -> RequestResult:
        return RequestResult(False, prompt_tokens, 0, arrival, error=error,
                             prefill=prefill.instance, decode=decode.instance, finished_s=self.clock())
