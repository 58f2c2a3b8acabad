"""Benchmark: the PromQL metric source at fleet scale; records benchmarks/results/promql.json.

    .venv/bin/python benchmarks/promql_bench.py [--services 40] [--per-service 50] [--ticks 5]
                                                [--pure-services 200] [--replace | --out FILE]

A new file under benchmarks/results/runs/ unless ``--replace`` or ``--out`` (``record.py``).

Two measurements:

1. Against a REAL Prometheus (Debian ``prometheus``): one exporter on loopback serves
   the sidecar metric families (ARCHITECTURE §3.2, 19 series per instance, a ``pod``
   label per instance as the PodMonitor's relabeling gives) for ``services x per-service``
   instances; Prometheus scrapes it every 5 s. Once every instance is in, the real
   ``PromCollector`` runs ``--ticks`` ticks for all services (one query per signal per
   tick, all services sharing the snapshot): wall time and CPU time of this process
   per tick, queries per tick, and that every instance came back fresh.
2. The pure part at ``--pure-services`` x 50 instances (10,000 by default): JSON
   decoding, ``parse_vector`` and ``build_snapshot`` of synthetic answers shaped exactly
   like Prometheus's, without the network (the CPU a tick costs the coordinator).

The real-Prometheus point is kept smaller (2,000 instances, 38,000 series by default)
because this shared 2-core machine also runs Prometheus's ingestion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

import record

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from heteroscale.coordinator.config import load_config  # noqa: E402
from heteroscale.coordinator.promql import SIGNALS, PromCollector, build_snapshot, parse_vector  # noqa: E402
from tests.prometheus_server import PrometheusServer  # noqa: E402

GAUGES = ("heteroscale_engine_up", "heteroscale_report_stale", "heteroscale_rate_window_seconds",
          "heteroscale_decode_tokens_per_second", "heteroscale_prefill_tokens_per_second",
          "heteroscale_prefill_uncached_tokens_per_second", "heteroscale_requests_running",
          "heteroscale_requests_waiting", "heteroscale_kv_cache_usage_ratio")
VALUES = {"heteroscale_engine_up": 1, "heteroscale_report_stale": 0, "heteroscale_rate_window_seconds": 5}


def instances(services: int, per: int) -> list[tuple[str, str, str]]:
    out = []
    for s in range(services):
        for i in range(per):
            role = "prefill" if i < per * 2 // 5 else "decode"
            out.append((f"svc-{s}", role, f"svc-{s}-{role}-{i}"))
    return out


def exposition(fleet: list[tuple[str, str, str]]) -> bytes:
    lines = []
    for service, role, pod in fleet:
        base = f'service="{service}",role="{role}",pod="{pod}"'
        for name in GAUGES:
            lines.append(f"{name}{{{base}}} {VALUES.get(name, 1234.5)}")
        for q in ("0.5", "0.9", "0.99"):
            lines.append(f'heteroscale_ttft_seconds{{{base},quantile="{q}"}} 0.2')
            lines.append(f'heteroscale_tbt_seconds{{{base},quantile="{q}"}} 0.03')
        for name in ("utilization_ratio", "sm_activity_ratio", "memory_used_bytes", "power_watts"):
            lines.append(f'heteroscale_gpu_{name}{{{base},gpu="0"}} 0.5')
    return ("\n".join(lines) + "\n").encode()


def synthetic_answers(fleet: list[tuple[str, str, str]], *, now: float) -> dict[str, bytes]:
    """What Prometheus answers for each signal's query, as JSON bytes."""
    out = {}
    for sig in SIGNALS:
        result = []
        for service, role, pod in fleet:
            labels = {"service": service, "role": role, "pod": pod, "instance": "10.0.0.1:9400"}
            extras = {"quantile": ("0.9",), "gpu": ("0",), "direction": ()}.get(sig.extra or "", (None,))
            for extra in extras:
                metric = dict(labels, **({sig.extra: extra} if extra else {}))
                value = str(now - 1) if sig.key == "observed_at" else "1"
                if sig.key in ("started_at", "kv_transfer"):
                    continue
                result.append({"metric": metric, "value": [now, value]})
        out[sig.key] = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
    return out


def pure(services: int, per: int, repeats: int = 3) -> dict:
    fleet = instances(services, per)
    answers = synthetic_answers(fleet, now=time.time())
    times = []
    for _ in range(repeats):
        started = time.process_time()
        snap = build_snapshot({k: parse_vector(json.loads(v)) for k, v in answers.items()})
        times.append(time.process_time() - started)
    assert sum(len(v) for v in snap.by_service.values()) == len(fleet)
    return {"instances": len(fleet), "services": services, "series": snap.series,
            "answer_bytes": sum(len(v) for v in answers.values()),
            "cpu_s_median": round(statistics.median(times), 3), "cpu_s_max": round(max(times), 3)}


async def real(services: int, per: int, ticks: int, workdir: Path) -> dict:
    fleet = instances(services, per)
    page = exposition(fleet)
    app = web.Application()
    app.router.add_get("/metrics", lambda _: web.Response(body=page, content_type="text/plain"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]   # noqa: SLF001 (aiohttp has no public accessor)
    prom = await asyncio.to_thread(PrometheusServer, workdir, targets={"sidecars": [f"127.0.0.1:{port}"]},
                                   scrape_interval_s=5)
    config = load_config({
        "coordinator": {"backend": "static", "interval_s": 15,
                        "metrics_source": {"type": "prometheus", "url": prom.url, "timeout_s": 10}},
        "services": [{"name": f"svc-{s}", "pd_ratio": "2:3", "target_decode_tps_per_instance": 1000,
                      "max_decode": 100, "slo": {"tbt_s": 0.1}, "prefill": {}, "decode": {}}
                     for s in range(services)]})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = await asyncio.to_thread(prom.query, 'count(heteroscale_engine_up{job="sidecars"})')
            if got and int(float(got[0]["value"][1])) == len(fleet):
                break
            await asyncio.sleep(1)
        else:
            raise RuntimeError("Prometheus did not ingest the fleet in 120 s")
        source = PromCollector(url=prom.url, timeout_s=10, selector='job="sidecars"', reuse_s=0.0)
        walls, cpus, fresh = [], [], []
        try:
            for _ in range(ticks + 1):                     # the first tick warms the connection pool
                w0, c0 = time.perf_counter(), time.process_time()
                results = await asyncio.gather(*(source.collect(s) for s in config.services))
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
                now = time.time()
                fresh.append(sum(1 for c in results for f in c.fetched
                                 if f.report and now - f.report.observed_at < 30))
            queries_per_tick = source.queries_total / (ticks + 1)
        finally:
            await source.close()
    finally:
        await asyncio.to_thread(prom.close)
        await runner.cleanup()
    return {"instances": len(fleet), "services": services, "series_per_instance": 19,
            "exposition_bytes": len(page), "ticks": ticks, "queries_per_tick": queries_per_tick,
            "wall_s_median": round(statistics.median(walls[1:]), 3), "wall_s_max": round(max(walls[1:]), 3),
            "cpu_s_median": round(statistics.median(cpus[1:]), 3),
            "fresh_instances_min": min(fresh[1:]), "prometheus_version": _prometheus_version()}


def _prometheus_version() -> str:
    import shutil
    import subprocess
    path = shutil.which("prometheus")
    if path is None:
        return "not installed"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=40)
    parser.add_argument("--per-service", type=int, default=50)
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--pure-services", type=int, default=200)
    record.add_output_arguments(parser, "promql")
    args = parser.parse_args()
    result = {"machine": platform.machine(), "python": platform.python_version(), "host": record.machine(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "pure": pure(args.pure_services, args.per_service)}
    with tempfile.TemporaryDirectory() as tmp:
        result["real_prometheus"] = asyncio.run(real(args.services, args.per_service, args.ticks, Path(tmp)))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out = record.write(record.output_path(args, "promql"), result)
    print(json.dumps(result, indent=2))
    return record.verdict({}, out)


if __name__ == "__main__":
    sys.exit(main())
