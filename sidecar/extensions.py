"""The sidecar's extension seam: add signals to the sidecar without editing agent.py.

An extension is an object that follows ``SidecarExtension``. The agent starts
every extension once, calls ``sample(now_s)`` once per scrape cycle (bounded by
the scrape timeout; an extension that raises or hangs is logged and reported
as an empty sample, never a crash), exports whatever ``collect()`` yields on
``/metrics``, and closes it on shutdown (shielded, bounded).

Where a sample goes in ``/v1/report``: an extension named ``kv_transfer`` fills
the report's ``kv_transfer`` object; any other extension appears under
``extensions.<name>`` (the report's ``from_dict`` ignores keys it does not know,
so an older coordinator is not disturbed).

The §3.2 metric ``heteroscale_kv_transfer_bytes_per_second{direction,source}`` is
exported by the sidecar's own collector (``heteroscale.sidecar.metrics``) from the
``kv_transfer`` sample, so its name, labels and absence rules stay in one place:

* ``sample["sources"][NAME][KV_BYTES_PER_SECOND]``: float bytes/s of source NAME
  (``engine``, ``rdma``, ``probe``), one series each; a source that did not
  measure is left out (never 0). A sample with no ``sources`` but a headline
  ``sample[KV_BYTES_PER_SECOND]`` counts under ``sample["source"]`` (default ``engine``);
* ``sample[KV_DIRECTION]``: ``"send"`` or ``"receive"``; when missing the
  sidecar uses the role's default (``send`` on prefill, ``receive`` on decode).

An extension must therefore not export that family itself from ``collect()``.

Extensions are built from the command line by modules listed in
``EXTENSION_MODULES``. Each such module may define
``add_arguments(parser) -> None`` (its own flags) and
``build(args) -> SidecarExtension | Iterable[SidecarExtension] | None``. A module
that is absent (not built yet) is skipped; a module that exists but fails to
import is an error, loudly, because silently losing a signal is worse.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from types import ModuleType
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

from prometheus_client.core import Metric

# Modules that may contribute extensions; looked up lazily, each optional.
EXTENSION_MODULES: tuple[str, ...] = ("heteroscale.kv_transfer.extension",)

KV_TRANSFER_NAME = "kv_transfer"
KV_BYTES_PER_SECOND = "bytes_per_second"
KV_DIRECTION = "direction"
KV_DIRECTIONS = ("send", "receive")


@runtime_checkable
class SidecarExtension(Protocol):
    """Something that adds signals to one sidecar.

    ``name`` picks the report key (see the module docstring). ``now_s`` passed to
    ``sample`` is the sidecar's monotonic clock in seconds, good for rates and
    intervals, not a wall-clock date.
    """

    name: str

    async def start(self) -> None:
        ...

    async def sample(self, now_s: float) -> Mapping[str, Any]:
        ...

    def collect(self) -> Iterable[Metric]:
        ...

    async def close(self) -> None:
        ...


@runtime_checkable
class EnginePageObserver(Protocol):
    """Optional extra of an extension: it wants each engine page the agent fetched.

    The agent calls ``observe_engine_page(text, now_s)`` after every successful
    fetch (same monotonic clock as ``sample``), so an extension can read metric
    families the engine adapter ignores (the KV-transfer connector metrics)
    without a second scrape. It is called from the agent's page-parsing worker
    thread, not the event loop (a page can be megabytes): it must not touch
    asyncio objects, must guard state that ``sample``/``collect`` read on the
    loop (a lock held only to apply, not to parse), and must not raise; the
    helper below guards it anyway.
    """

    def observe_engine_page(self, text: str, now_s: float) -> None:
        ...


def observe_engine_page(extensions: Iterable[Any], text: str, now_s: float) -> None:
    """Hand an engine page to every extension that observes pages; a failing one is logged, skipped."""
    for ext in extensions:
        observe = getattr(ext, "observe_engine_page", None)
        if observe is None:
            continue
        try:
            observe(text, now_s)
        except Exception:   # an extension bug must not break the engine scrape
            logging.getLogger("heteroscale.sidecar").exception(
                "extension %s failed to observe the engine page", getattr(ext, "name", ext))


def default_kv_direction(role: str) -> str:
    """The KV-cache direction of a role: prefill sends, decode receives."""
    return "send" if role == "prefill" else "receive"


def _optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only "this very module (or its package) does not exist" means "not built yet".
        if exc.name and name.startswith(exc.name):
            return None
        raise


def extension_modules(names: Iterable[str] = EXTENSION_MODULES) -> list[ModuleType]:
    """The extension modules present in this installation, in order."""
    found = []
    for name in names:
        module = _optional_module(name)
        if module is not None:
            found.append(module)
    return found


def add_extension_arguments(parser: argparse.ArgumentParser,
                            modules: Iterable[ModuleType] | None = None) -> None:
    """Let every present extension module add its own flags."""
    for module in extension_modules() if modules is None else modules:
        add = getattr(module, "add_arguments", None)
        if add is not None:
            add(parser)


def build_extensions(args: argparse.Namespace,
                     modules: Iterable[ModuleType] | None = None) -> list[SidecarExtension]:
    """Build the extensions the flags ask for (none when no module is present)."""
    built: list[SidecarExtension] = []
    for module in extension_modules() if modules is None else modules:
        build = getattr(module, "build", None)
        if build is None:
            continue
        result = build(args)
        if result is None:
            continue
        if isinstance(result, SidecarExtension):
            built.append(result)
        else:
            built.extend(result)
    return built
