"""The simulated instances' sidecars: one ``SidecarReport`` per ready instance (pure).

What the live coordinator sees is never the cluster's ground truth: each sidecar
reports its own engine over its own window (rates from counter differences over
``window_s``, as ``engine_adapters.rates`` computes them from Prometheus counters;
p90 latencies from that instance's requests in the window), its start time (so the
coordinator's ``aggregate`` applies warm-up exclusion), and the coordinator pools the
reports with ``heteroscale.coordinator.core.aggregate.aggregate`` — the very function
the live reconciler calls. A share ``report_loss`` of the pulls is lost (a timeout),
drawn from a seeded generator, so the policy meets partial data as it would live.

Which instance reports what (the P/D engines' own split):

* prefill: prompt tokens/s (all and uncached), its queue, GPU utilisation, and the
  client-facing TTFT of the requests it prefilled (measured when the first token
  reached the client, i.e. after decode admission and the KV transfer);
* decode: generated tokens/s, p90 of the per-request mean TBT of requests finished
  in the window, running / waiting-for-capacity / waiting-for-KV (vLLM "deferred")
  counts, KV-cache usage and preemptions per second.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from typing import TYPE_CHECKING, Iterable

import numpy as np

from heteroscale.coordinator.core.types import Fetched
from heteroscale.report import GpuReading, SidecarReport
from heteroscale.simulator import perfmodel as pm

if TYPE_CHECKING:
    from heteroscale.simulator.model.cluster import Cluster


def p90(values: Iterable[float]) -> float | None:
    """The 90th percentile with linear interpolation (numpy's default), ``None`` if empty."""
    v = sorted(values)
    n = len(v)
    if not n:
        return None
    pos = 0.9 * (n - 1)
    lo = int(pos)
    hi = lo + 1 if lo + 1 < n else lo
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


class Sidecars:
    """Turns a ``Cluster``'s per-instance counters and samples into reports."""

    def __init__(self, cluster: "Cluster", *, service_name: str, window_s: float,
                 report_loss: float = 0.0, seed: int = 0) -> None:
        self.cluster = cluster
        self.service_name = service_name
        self.window_s = window_s
        self.report_loss = report_loss
        self.rng = random.Random(seed * 104729 + 17)
        self._snaps: dict[int, deque[tuple[float, ...]]] = {}
        self.lost = 0
        self.sent = 0

    def _counters(self, inst) -> tuple[float, ...]:
        if inst.role == "prefill":
            return inst.c_tokens, inst.c_uncached, inst.c_busy_s, 0.0, inst.c_kv_bytes, inst.c_kv_wire_s
        return (inst.c_tokens, inst.c_active_s, inst.c_compute_s, inst.c_preemptions,
                inst.c_kv_bytes, inst.c_kv_wire_s)

    def _rates(self, inst, now_s: float) -> tuple[float, tuple[float, ...]]:
        """Seconds covered and counter increases over the window (since ready if younger)."""
        snaps = self._snaps.setdefault(inst.index, deque())
        cur = self._counters(inst)
        lo = now_s - self.window_s - 1e-6
        older = None
        while snaps and snaps[0][0] < lo:
            older = snaps.popleft()
        if snaps:
            base = snaps[0]
        elif older is not None:          # pulls further apart than the window: the last one
            base = older
        else:                            # younger than the window: counters started at zero
            base = (max(inst.ready_s, 0.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        snaps.append((now_s, *cur))
        span = max(1e-9, now_s - base[0])
        return span, tuple(c - b for c, b in zip(cur, base[1:]))

    def reports(self, now_s: float) -> list[Fetched]:
        """One pull of every ready instance's sidecar."""
        c = self.cluster
        out: list[Fetched] = []
        lo = now_s - self.window_s
        eff = c.spec.decode.eff
        kv_cap = max(1.0, float(c.spec.decode.kv_capacity_tokens))
        for inst in (*c.prefill, *c.decode):
            if not inst.accepting or inst.ready_s > now_s:
                continue
            span, delta = self._rates(inst, now_s)
            url = f"sim://{inst.role}-{inst.index}"
            if self.report_loss > 0 and self.rng.random() < self.report_loss:
                self.lost += 1
                out.append(Fetched(url=url, role=inst.role, error="timeout"))
                continue
            self.sent += 1
            common = dict(service=self.service_name, role=inst.role, pod=f"{inst.role}-{inst.index}",
                          engine="simulator", engine_up=True, stale=False, observed_at=now_s,
                          window_s=self.window_s, gpu_mode="emulator",
                          started_at=None if inst.warm_at_start else inst.ready_s)
            if inst.node is not None:        # placed: where it runs, and what its KV connector measured
                common["node"] = inst.node
                common["kv_transfer"] = _kv_transfer(inst.role, delta[4], delta[5], span)
            ts, vs = inst.lat_t, inst.lat_v
            while ts and ts[0] < lo:
                ts.popleft()
                vs.popleft()
            if inst.role == "prefill":
                busy = min(1.0, delta[2] / span)
                report = SidecarReport(
                    prefill_tps=delta[0] / span, prefill_uncached_tps=delta[1] / span,
                    requests_waiting=float(len(inst.queue)), requests_running=1.0 if inst.free_s > now_s else 0.0,
                    ttft_p90_s=p90(vs),
                    gpus=(GpuReading("0", utilization_ratio=pm.gpu_utilization("prefill", busy_fraction=busy, eff=eff),
                                     sm_activity_ratio=pm.sm_activity("prefill", busy_fraction=busy, eff=eff)),),
                    **common)
            else:
                active = min(1.0, delta[1] / span)
                compute = delta[2] / delta[1] if delta[1] > 0 else 0.0
                report = SidecarReport(
                    decode_tps=delta[0] / span, tbt_p90_s=p90(vs),
                    requests_running=float(len(inst.running)), requests_waiting=float(len(inst.waiting)),
                    requests_deferred=float(len(inst.landing)),
                    kv_cache_usage_ratio=min(1.0, (inst.context() + inst.reserved) / kv_cap),
                    preemptions_per_s=delta[3] / span,
                    gpus=(GpuReading("0", utilization_ratio=pm.gpu_utilization("decode", busy_fraction=active, eff=eff),
                                     sm_activity_ratio=pm.sm_activity("decode", busy_fraction=active,
                                                                      compute_share=compute, eff=eff)),),
                    **common)
            out.append(Fetched(url=url, role=inst.role, report=report))
        return out

    def pooled_latency_p90(self, now_s: float) -> tuple[float | None, float | None]:
        """Fleet p90 TTFT and TBT of the first tokens / completions in the window (what a
        router-side or client-side measurement would show; the baselines use it)."""
        c = self.cluster
        lo = now_s - self.window_s
        out = []
        for ts, vs in ((c.ttft_log_t, c.ttft_log_v), (c.tbt_log_t, c.tbt_log_v)):
            i = bisect.bisect_left(ts, lo)      # nearly in time order: landing order within a tick
            if i > 50_000:                      # trim what no later window needs
                del ts[:i]
                del vs[:i]
                i = 0
            out.append(float(np.percentile(vs[i:], 90)) if len(vs) > i else None)
        return out[0], out[1]


def _kv_transfer(role: str, moved_bytes: float, wire_s: float, span_s: float) -> dict:
    """The ``kv_transfer`` block an engine connector's metrics give (vLLM's NIXL histograms):
    bytes/s moved over the window and the per-transfer speed (bytes / time on the wire),
    which ``coordinator.core.bandwidth`` pairs inside each Deployment Group."""
    engine: dict = {"connector": "simulator", "window_s": span_s}
    if moved_bytes > 0 and wire_s > 0:
        engine["transfer_speed_bytes_per_second"] = moved_bytes / wire_s
    return {"source": "engine", "direction": "send" if role == "prefill" else "receive",
            "bytes_per_second": moved_bytes / span_s, "sources": {"engine": engine}}
