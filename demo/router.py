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
request and never sends to one that is not listed. It counts its own in-flight
requests per instance, which is both its load measure and what the actuator
waits on to finish draining.

Latency is measured as a client sees it (wall seconds): TTFT = arrival → first
streamed token; TBT = mean gap between tokens after the first, i.e.
``(last − first) / (tokens − 1)``.
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
    """What happened to one request, in wall seconds."""

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


class NoBackend(Exception):
    """No prefill+decode pair is in traffic right now."""


class Router:
    def __init__(self, source: BackendSource, *, model: str, timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.model = model
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
            return RequestResult(False, prompt_tokens, 0, arrival, error=f"no_backend: {exc}")
        for b in (prefill, decode):
            self.in_flight[b.instance] += 1
            self.sent[b.instance] += 1
        try:
            return await self._run(prefill, decode, prompt_tokens=prompt_tokens,
                                   max_tokens=max_tokens, arrival=arrival)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
            return RequestResult(False, prompt_tokens, 0, arrival, error=f"{type(exc).__name__}: {exc}",
                                 prefill=prefill.instance, decode=decode.instance)
        finally:
            for b in (prefill, decode):
                self.in_flight[b.instance] -= 1
                if self.in_flight[b.instance] <= 0:
                    del self.in_flight[b.instance]

    async def _run(self, prefill: Backend, decode: Backend, *, prompt_tokens: int, max_tokens: int,
                   arrival: float) -> RequestResult:
        session = self._client()
        prompt = [1] * prompt_tokens
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "stream": False,
                "kv_transfer_params": {"do_remote_decode": True, "remote_host": decode.kv_host,
                                       "remote_port": decode.kv_port}}
        async with session.post(f"{prefill.url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return self._failed(f"prefill HTTP {resp.status}", prompt_tokens=prompt_tokens, arrival=arrival,
                                    prefill=prefill, decode=decode)
            doc = await resp.json()
        kv = doc["kv_transfer_params"]
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "kv_transfer_params": kv}
        first = last = None
        tokens = 0
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
                    continue
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    now = self.clock()
                    first = first if first is not None else now
                    last = now
        end = self.clock()
        if first is None or tokens <= 0:
            return self._failed("decode produced no tokens", prompt_tokens=prompt_tokens, arrival=arrival,
                                prefill=prefill, decode=decode)
        tbt = (last - first) / (tokens - 1) if tokens > 1 else 0.0
        return RequestResult(True, prompt_tokens, tokens, arrival, ttft_s=first - arrival, tbt_s=tbt,
                             e2e_s=end - arrival, prefill=prefill.instance, decode=decode.instance)

    @staticmethod
    def _failed(error: str, *, prompt_tokens: int, arrival: float, prefill: Backend,
                decode: Backend) -> RequestResult:
        return RequestResult(False, prompt_tokens, 0, arrival, error=error,
                             prefill=prefill.instance, decode=decode.instance)
