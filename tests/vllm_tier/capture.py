"""Capture real vLLM 0.32 (CPU) ``/metrics`` pages into ``tests/data/``.

Builds the tiny model, starts a real server from ``.venv-vllm``, saves the idle
page (``vllm_0.32_cpu_idle.txt``: histograms registered but empty), drives mixed
traffic (concurrent streams, shared prompt prefixes so the prefix cache hits,
several lengths), waits for the engine to go idle, and saves the page again
(``vllm_0.32_cpu.txt``: counters and histograms populated). Pages are stored
byte-for-byte as served for ``Accept: text/plain; version=0.0.4``.

Run from the repo root with the project venv:
``.venv/bin/python -m tests.vllm_tier.capture [--out-dir tests/data]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.vllm_tier import server as srv
from tests.vllm_tier.traffic import StreamLog, stream_completion

# CPU vLLM uses 128-token KV blocks: a 160-token shared prefix gives one cached block per hit.
SHARED_PREFIX = " ".join(f"w{k}" for k in range(100, 260))


async def mixed_traffic(base_url: str) -> StreamLog:
    log = StreamLog()
    jobs = []
    for i in range(24):
        if i % 3 == 0:     # prefix-cache hits after the first of these
            prompt = f"{SHARED_PREFIX} w{2000 + i}"
        else:
            prompt = " ".join(f"w{(i * 37 + k) % 4000}" for k in range(8 + 12 * (i % 5)))
        jobs.append((prompt, 8 + 24 * (i % 4)))
    sem = asyncio.Semaphore(4)

    async def one(prompt: str, max_tokens: int) -> None:
        async with sem:
            await stream_completion(session, base_url, prompt=prompt, max_tokens=max_tokens, log=log)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(p, m) for p, m in jobs))
    return log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=srv.REPO / "tests" / "data")
    parser.add_argument("--port", type=int, default=18231)
    args = parser.parse_args()
    python = srv.vllm_python()
    if python is None:
        print(f"no .venv-vllm with vLLM; run {srv.SETUP_COMMAND}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hs-vllm-") as tmp:
        model_dir = srv.build_tiny_model(python, Path(tmp) / "tiny-llama")
        server = srv.start_server(python, model_dir, port=args.port, log_path=Path(tmp) / "vllm.log")
        try:
            srv.wait_healthy(server)
            (args.out_dir / "vllm_0.32_cpu_idle.txt").write_text(srv.fetch_metrics(server))
            log = asyncio.run(mixed_traffic(server.url))
            time.sleep(2.0)   # let the last iteration stats land
            page = srv.fetch_metrics(server)
            (args.out_dir / "vllm_0.32_cpu.txt").write_text(page)
            print(f"captured after {log.requests_done} requests, {log.total_tokens} generated tokens")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
