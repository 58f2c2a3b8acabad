"""Client-side traffic for the real-vLLM tier: concurrent streaming completions.

Each request asks vLLM for per-chunk usage (``stream_options.continuous_usage_stats``),
so the client knows, chunk by chunk, the cumulative number of generated tokens and
when it received them (unix seconds). ``tokens_between`` then counts the tokens
generated inside any time interval, which is how the tier lines the client's count
up with the sidecar's rate window.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from tests.vllm_tier.server import SERVED_MODEL_NAME


@dataclass
class StreamLog:
    """(unix time received, tokens newly generated in that chunk) per chunk."""

    events: list[tuple[float, int]] = field(default_factory=list)
    requests_done: int = 0

    def tokens_between(self, start_s: float, end_s: float) -> int:
        return sum(n for t, n in self.events if start_s < t <= end_s)

    @property
    def total_tokens(self) -> int:
        return sum(n for _, n in self.events)


async def stream_completion(session: aiohttp.ClientSession, base_url: str, *, prompt: str,
                            max_tokens: int, log: StreamLog, timeout_s: float = 120.0) -> int:
    """One streaming /v1/completions request; returns its completion_tokens."""
    body = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    seen = 0
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.post(f"{base_url}/v1/completions", json=body, timeout=timeout) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            usage = json.loads(data).get("usage") or {}
            done = int(usage.get("completion_tokens") or 0)
            if done > seen:
                log.events.append((time.time(), done - seen))
                seen = done
    log.requests_done += 1
    return seen


async def steady_load(base_url: str, *, clients: int, duration_s: float, max_tokens: int,
                      prompt_words: int = 16, log: StreamLog | None = None) -> StreamLog:
    """``clients`` loops, each sending one request after another until ``duration_s``."""
    log = log or StreamLog()
    deadline = time.monotonic() + duration_s

    async def client(idx: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            words = " ".join(f"w{(idx * 131 + n * 17 + k) % 4000}" for k in range(prompt_words))
            await stream_completion(session, base_url, prompt=words, max_tokens=max_tokens, log=log)
            n += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(i) for i in range(clients)))
    return log
