"""The demo's P/D router: picking, the real two-hop flow through real emulators, failures."""

from __future__ import annotations

from collections import Counter

import pytest
from aiohttp.test_utils import TestServer

from heteroscale.demo.emulator.model import EmulatorSettings
from heteroscale.demo.emulator.server import EmulatorServer

from heteroscale.demo.router import Backend, NoBackend, Router, client_tbt_s
from tests.conftest import free_port

FAST = dict(speedup=1000.0, tick_s=0.002, stream_interval_s=0.001, kv_wait_timeout_s=2.0)


class Listed:
    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends

    def routable(self) -> list[Backend]:
        return list(self.backends)


def B(name: str, role: str, group: str, port: int = 1, kv_port: int = 0) -> Backend:
    return Backend(instance=name, role=role, group=group, url=f"http://127.0.0.1:{port}", kv_port=kv_port)


def test_pick_least_loaded_prefill_then_decode_of_same_group():
    router = Router(Listed([B("p1", "prefill", "g1"), B("p2", "prefill", "g2"),
                            B("d1", "decode", "g1"), B("d2", "decode", "g2"), B("d3", "decode", "g2")]),
                    model="m")
    router.in_flight.update({"p1": 3, "p2": 1, "d2": 2, "d3": 0})
    prefill, decode = router.pick()
    assert (prefill.instance, decode.instance) == ("p2", "d3")


def test_pick_skips_a_prefill_whose_group_has_no_decode():
    router = Router(Listed([B("p1", "prefill", "g1"), B("p2", "prefill", "g2"), B("d2", "decode", "g2")]),
                    model="m")
    router.in_flight.update({"p2": 9})
    prefill, decode = router.pick()
    assert (prefill.instance, decode.instance) == ("p2", "d2")


def test_pick_without_a_pair_raises():
    with pytest.raises(NoBackend):
        Router(Listed([B("p1", "prefill", "g1"), B("d1", "decode", "g2")]), model="m").pick()


def test_client_tbt_counts_tokens_after_the_first_chunk():
    # first chunk at 10.0 s with 1 token, last at 12.0 s with 41: 40 tokens in 2 s = 50 ms each
    assert client_tbt_s(first_s=10.0, last_s=12.0, first_tokens=1, last_tokens=41) == pytest.approx(0.05)
    # at a speed-up of 10 the same wall gaps are 10× longer in the modelled service
    assert client_tbt_s(first_s=10.0, last_s=12.0, first_tokens=1, last_tokens=41,
                        time_scale=10.0) == pytest.approx(0.5)
    # coalesced chunks: 8 tokens came with the first chunk, so only 33 gaps remain
    assert client_tbt_s(first_s=10.0, last_s=12.0, first_tokens=8, last_tokens=41) == pytest.approx(2.0 / 33)
    # everything in one chunk: not measurable, never a made-up 0
    assert client_tbt_s(first_s=10.0, last_s=10.0, first_tokens=5, last_tokens=5) is None


async def _serve(role: str, gpu: str, **kw) -> tuple[EmulatorServer, TestServer]:
    emu = EmulatorServer(EmulatorSettings(role=role, gpu=gpu, model="8b", port=0,
                                          served_model_name="m", **{**FAST, **kw}))
    server = TestServer(emu.app(), host="127.0.0.1")
    await server.start_server()
    return emu, server


async def test_complete_runs_prefill_then_decode_through_real_emulators():
    dec_emu, dec = await _serve("decode", "H20")
    pre_emu, pre = await _serve("prefill", "L20")
    try:
        backends = [B("p", "prefill", "g", pre.port), B("d", "decode", "g", dec.port, dec_emu.kv_port),
                    B("p-other", "prefill", "g-other", pre.port)]
        async with Router(Listed(backends), model="m") as router:
            results = [await router.complete(prompt_tokens=64, max_tokens=25) for _ in range(3)]
            assert not router.in_flight                     # all back to zero
            assert router.sent["p-other"] == 0               # its DG has no decode
    finally:
        await dec.close()
        await pre.close()
    for r in results:
        assert r.ok, r.error
        assert r.output_tokens == 25 and r.prompt_tokens == 64
        assert r.ttft_s is not None and r.ttft_s > 0
        assert r.tbt_s is None or r.tbt_s > 0
        assert r.e2e_s >= r.ttft_s >= r.prefill_s > 0
        assert r.finished_s >= r.arrival_s
        assert (r.prefill, r.decode) == ("p", "d")
    decode_tokens = dec_emu.metrics.generation_tokens._value.get()
    assert decode_tokens == 75


async def test_a_request_loads_its_prefill_only_until_the_prefill_answer():
    """The prefill instance's count drops when decode starts streaming; decode's stays."""
    dec_emu, dec = await _serve("decode", "H20", speedup=4.0, tick_s=0.01, stream_interval_s=0.02)
    pre_emu, pre = await _serve("prefill", "L20", speedup=4.0)
    seen = []

    class Recorded(Counter):
        """The router's in-flight counts, remembered at every change (polling can miss a
        prefill that ends between two samples on a busy machine)."""

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            seen.append(dict(self))

        def __delitem__(self, key):
            super().__delitem__(key)
            seen.append(dict(self))

    try:
        backends = [B("p", "prefill", "g", pre.port), B("d", "decode", "g", dec.port, dec_emu.kv_port)]
        async with Router(Listed(backends), model="m", time_scale=4.0) as router:
            router.in_flight = Recorded()
            result = await router.complete(prompt_tokens=64, max_tokens=300)
            assert not router.in_flight
    finally:
        await dec.close()
        await pre.close()
    assert result.ok, result.error
    assert {"p": 1, "d": 1} in seen                 # while prefilling, both
    assert {"d": 1} in seen[seen.index({"p": 1, "d": 1}):]   # then, while decoding, only decode
    assert seen[-1] == {}
    # 300 tokens streamed in several chunks: the client's TBT is measurable, in modelled seconds
    assert result.tbt_s is not None and result.tbt_s > 0


async def test_engine_down_is_a_failed_result_not_an_exception():
    backends = [B("p", "prefill", "g", free_port()), B("d", "decode", "g", free_port(), free_port())]
    async with Router(Listed(backends), model="m") as router:
        result = await router.complete(prompt_tokens=10, max_tokens=5)
        assert not router.in_flight
    assert not result.ok
    assert "ClientConnectorError" in result.error or "Connect" in result.error


async def test_no_backend_is_a_failed_result():
    async with Router(Listed([]), model="m") as router:
        result = await router.complete(prompt_tokens=10, max_tokens=5)
    assert not result.ok and result.error.startswith("no_backend")
