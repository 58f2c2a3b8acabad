"""Fetch an engine's ``/metrics`` page and parse it (the only I/O in engine_adapters).

One GET per scrape with ``Accept: text/plain; version=0.0.4`` (an OpenMetrics
request would get ``:`` escaped to ``_`` in sample names by prometheus_client,
ENGINES.md §1.1), a total timeout (kept below the scrape interval by the
caller), and a size cap. Every failure becomes a ``ScrapeError`` whose
``reason`` feeds ``heteroscale_scrape_errors_total{reason}``:

=============  ===========================================================
``connect``    refused, reset, DNS, the server closed without an answer
``timeout``    no complete answer within ``timeout_s``
``http_status`` an answer other than 200
``parse``      not UTF-8, cut short, not a Prometheus page
``too_large``  a body over ``max_bytes`` (16 MiB), or a sample line the sidecar
               reads over 16 KiB (``heteroscale.promtext.MAX_LINE_CHARS``)
``wrong_engine`` a valid page, but from another engine
``empty``      an empty page
=============  ===========================================================

Parsing is pure (``heteroscale.engine_adapters.vllm`` / ``sglang``): about a
millisecond on a full page, but a legal page may be as large as ``max_bytes``,
so the sidecar runs it in a worker thread, never on its event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

import aiohttp

from heteroscale.engine_adapters import sglang, vllm
from heteroscale.engine_adapters.snapshot import EngineSnapshot
from heteroscale.errors import ScrapeError
from heteroscale.net import read_capped
from heteroscale.promtext import MAX_PAGE_BYTES

ACCEPT = "text/plain; version=0.0.4"
DEFAULT_MAX_BYTES = MAX_PAGE_BYTES

PARSERS: dict[str, Callable[[str], EngineSnapshot]] = {"vllm": vllm.parse, "sglang": sglang.parse}


def parser_for(engine: str) -> Callable[[str], EngineSnapshot]:
    try:
        return PARSERS[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r} (choose from {', '.join(PARSERS)})") from None


@dataclass(frozen=True)
class ScrapeSettings:
    """Where and how to fetch one engine page."""

    url: str                    # full URL of the engine's metrics page, e.g. http://127.0.0.1:8000/metrics
    engine: str                 # "vllm" | "sglang": picks the parser
    timeout_s: float = 0.8      # whole request; must stay below the scrape interval
    max_bytes: int = DEFAULT_MAX_BYTES   # a real vLLM page is ~100 KB; larger is not a metrics page

    def __post_init__(self) -> None:
        parser_for(self.engine)
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")


async def fetch_page(session: aiohttp.ClientSession, settings: ScrapeSettings) -> str:
    """GET the page text; ``ScrapeError`` on any failure."""
    return decode_page(await fetch_body(session, settings), settings.url)


def decode_page(body: bytes, url: str) -> str:
    """A page body as text (``ScrapeError("parse")`` when it is not UTF-8)."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScrapeError("parse", f"page from {url} is not UTF-8") from exc


async def fetch_body(session: aiohttp.ClientSession, settings: ScrapeSettings) -> bytes:
    """GET the page body (not decoded: a large page is decoded off the event loop)."""
    try:
        async with asyncio.timeout(settings.timeout_s):
            async with session.get(settings.url, headers={"Accept": ACCEPT},
                                   allow_redirects=False) as response:
                if response.status != 200:
                    raise ScrapeError("http_status", f"HTTP {response.status} from {settings.url}")
                body = await read_capped(response, settings.max_bytes)
    except ScrapeError:
        raise
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise ScrapeError("timeout", f"no answer from {settings.url} within {settings.timeout_s:g} s") from exc
    except aiohttp.ClientPayloadError as exc:
        raise ScrapeError("parse", f"page from {settings.url} was cut short: {exc}") from exc
    except aiohttp.ClientResponseError as exc:   # malformed HTTP answer
        raise ScrapeError("http_status", f"bad HTTP answer from {settings.url}: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ScrapeError("connect", f"cannot reach {settings.url}: {type(exc).__name__}: {exc}") from exc
    return body


async def scrape(session: aiohttp.ClientSession, settings: ScrapeSettings) -> EngineSnapshot:
    """Fetch and parse one page. Raises only ``ScrapeError``."""
    text = await fetch_page(session, settings)
    return parser_for(settings.engine)(text)
