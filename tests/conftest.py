"""Shared fixtures: leaked-task detection, free ports, the shared/ folder."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from heteroscale.net import free_port as _free_port

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the checkout")
    return SHARED


def free_port() -> int:
    """A port below the ephemeral range (see heteroscale.net): safe to hand to a child process."""
    return _free_port()


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture(autouse=True)
async def _no_leaked_tasks(request):
    """Fail an async test that leaves asyncio tasks running behind it (kopf's habit)."""
    if not asyncio.iscoroutinefunction(getattr(request, "function", None)):
        yield
        return
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before
              if not t.done() and t is not asyncio.current_task()]
    if leaked:
        for task in leaked:
            task.cancel()
        await asyncio.gather(*leaked, return_exceptions=True)
        names = ", ".join(sorted(t.get_name() for t in leaked))
        pytest.fail(f"test leaked asyncio tasks: {names}")
