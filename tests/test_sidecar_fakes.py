"""Shared by the sidecar tests (no tests here): a real HTTP engine stand-in on 127.0.0.1 whose
behaviour the test swaps (page, HTTP 500, hang, garbage, cut-short body)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web


def vllm_page(*, gen: float, prompt: float = 0.0, local_compute: float = 0.0, running: float = 1.0,
              ttft_buckets: tuple[float, float, float] = (0.0, 0.0, 0.0), engines: tuple[str, ...] = ("0",)) -> str:
    """A small but real-format vLLM 0.32 page (values split evenly over ``engines``)."""
    n = len(engines)
    lines = ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
             "# TYPE vllm:num_requests_running gauge"]
    lines += [f'vllm:num_requests_running{{engine="{e}",model_name="m"}} {running / n}' for e in engines]
    lines += ["# TYPE vllm:num_requests_waiting gauge"]
    lines += [f'vllm:num_requests_waiting{{engine="{e}",model_name="m"}} 0.0' for e in engines]
    lines += ["# TYPE vllm:kv_cache_usage_perc gauge"]
    lines += [f'vllm:kv_cache_usage_perc{{engine="{e}",model_name="m"}} 0.25' for e in engines]
    lines += ["# TYPE vllm:generation_tokens_total counter"]
    lines += [f'vllm:generation_tokens_total{{engine="{e}",model_name="m"}} {gen / n}' for e in engines]
    lines += ["# TYPE vllm:prompt_tokens_total counter"]
    lines += [f'vllm:prompt_tokens_total{{engine="{e}",model_name="m"}} {prompt / n}' for e in engines]
    lines += ["# TYPE vllm:prompt_tokens_by_source_total counter"]
    for e in engines:
        lines.append(f'vllm:prompt_tokens_by_source_total{{engine="{e}",model_name="m",source="local_compute"}} '
                     f'{local_compute / n}')
        lines.append(f'vllm:prompt_tokens_by_source_total{{engine="{e}",model_name="m",source="local_cache_hit"}} '
                     f'{(prompt - local_compute) / n}')
    lines += ["# TYPE vllm:time_to_first_token_seconds histogram"]
    for e in engines:
        cum = 0.0
        for le, c in zip(("0.1", "1.0", "+Inf"), ttft_buckets):
            cum += c / n
            lines.append(f'vllm:time_to_first_token_seconds_bucket{{engine="{e}",le="{le}",model_name="m"}} {cum}')
        lines.append(f'vllm:time_to_first_token_seconds_count{{engine="{e}",model_name="m"}} {cum}')
        lines.append(f'vllm:time_to_first_token_seconds_sum{{engine="{e}",model_name="m"}} 1.0')
    return "\n".join(lines) + "\n"


@dataclass
class FakeEngine:
    """Serves ``page`` on /metrics; ``mode`` in page|500|hang|garbage|cut|empty."""

    page: str = ""
    mode: str = "page"
    page_fn: Callable[[], str] | None = None      # when set, called per request instead of ``page``
    requests: int = 0
    accept_headers: list = field(default_factory=list)
    url: str = ""
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.accept_headers.append(request.headers.get("Accept"))
        if self.mode == "500":
            return web.Response(status=500, text="internal error")
        if self.mode == "hang":
            await self._release.wait()
            return web.Response(text=self.page)
        if self.mode == "garbage":
            return web.Response(text="<html>\x00\x01 not { metrics\n")
        if self.mode == "empty":
            return web.Response(text="")
        if self.mode == "cut":
            # promise the whole page, send half, close: a truncated transfer
            resp = web.StreamResponse(headers={"Content-Length": str(len(self.page.encode()))})
            await resp.prepare(request)
            await resp.write(self.page.encode()[: len(self.page) // 2])
            request.transport.close()
            return resp
        text = self.page_fn() if self.page_fn is not None else self.page
        return web.Response(text=text, content_type="text/plain")

    async def start(self) -> "FakeEngine":
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
