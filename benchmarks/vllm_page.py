"""Build a full, realistic vLLM 0.32 ``/metrics`` page with prometheus_client itself.

Used by the sidecar benchmark and to (re)write the constructed test fixtures
``tests/data/vllm_constructed_*.txt``. The families, label sets and default
buckets are vLLM 0.32's (ENGINES.md §1.2, from ``vllm/v1/metrics/loggers.py``
and ``buckets.py``); the exposition is produced by the same library vLLM uses,
so escaping, float formatting and ``_created`` series are exactly real.

    python benchmarks/vllm_page.py --write-fixtures   # rewrites tests/data/vllm_constructed_*.txt
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MODEL = "Qwen/Qwen3-8B"
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
ITERATION_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
REQUEST_TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]


def build_page(*, engines: int = 2, seed: int = 0, multiprocess: bool | None = None,
               old_names: bool = False, scale: float = 1.0, kv_consumer: bool = False) -> str:
    """A vLLM page for ``engines`` data-parallel engines.

    ``multiprocess`` (default: ``engines > 1``, as vLLM 0.32 does) drops the
    ``_created`` series and puts each histogram's ``_sum`` first, as the
    multiprocess collector does. ``old_names`` uses the pre-0.10 names
    ``vllm:gpu_cache_usage_perc`` and ``vllm:time_per_output_token_seconds``.
    ``scale`` multiplies every counter and histogram observation count.
    ``kv_consumer`` adds ``vllm:num_requests_kv_fetch_by_stage``, which vLLM registers
    only on a KV consumer (a P/D decode pod; name and help text as in vLLM 0.33.0).
    """
    rng = random.Random(seed)
    reg = CollectorRegistry()
    labels = ["model_name", "engine"]

    def gauge(name, doc, extra=()):
        return Gauge(name, doc, labels + list(extra), registry=reg)

    def counter(name, doc, extra=()):
        return Counter(name, doc, labels + list(extra), registry=reg)

    def hist(name, doc, buckets):
        return Histogram(name, doc, labels, buckets=buckets, registry=reg)

    running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
    waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
    by_reason = gauge("vllm:num_requests_waiting_by_reason", "Number of requests waiting, by reason.", ["reason"])
    kv_fetch = gauge("vllm:num_requests_kv_fetch_by_stage",
                     "Number of waiting requests by async KV load stage. Stage labels: 'waiting_to_start' = needs "
                     "an async KV load that has not started; 'in_progress' = load started and not yet reported "
                     "finished; 'completed_waiting' = load finished, request not running yet.",
                     ["stage"]) if kv_consumer else None
    sleep = gauge("vllm:engine_sleep_state", "Engine sleep state", ["sleep_state"])
    usage = gauge("vllm:gpu_cache_usage_perc" if old_names else "vllm:kv_cache_usage_perc",
                  "KV-cache usage. 1 means 100 percent usage.")
    preempt = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
    prompt = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
    by_source = counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", ["source"])
    cached = counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).")
    cached_src = counter("vllm:prompt_tokens_cached_by_source", "Number of cached prompt tokens by source.",
                         ["source"])
    gen = counter("vllm:generation_tokens", "Number of generation tokens processed.")
    success = counter("vllm:request_success", "Count of successfully processed requests.", ["finished_reason"])
    pq = counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.")
    ph = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
    epq = counter("vllm:external_prefix_cache_queries", "External prefix cache queries (tokens).")
    eph = counter("vllm:external_prefix_cache_hits", "External prefix cache hits (tokens).")
    mmq = counter("vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.")
    mmh = counter("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.")
    histograms = [
        (hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
              ITERATION_BUCKETS), 64.0),
        (hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
              TTFT_BUCKETS), 0.3),
        (hist("vllm:time_per_output_token_seconds" if old_names else "vllm:inter_token_latency_seconds",
              "Histogram of inter-token latency in seconds.", ITL_BUCKETS), 0.04),
        (hist("vllm:request_time_per_output_token_seconds",
              "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS), 0.04),
        (hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
              REQUEST_LATENCY_BUCKETS), 8.0),
        (hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
              REQUEST_LATENCY_BUCKETS), 0.4),
        (hist("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
              REQUEST_LATENCY_BUCKETS), 7.0),
        (hist("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
              REQUEST_LATENCY_BUCKETS), 0.3),
        (hist("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
              REQUEST_LATENCY_BUCKETS), 6.5),
        (hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", REQUEST_TOKEN_BUCKETS), 900.0),
        (hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
              REQUEST_TOKEN_BUCKETS), 250.0),
        (hist("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation "
              "tokens.", REQUEST_TOKEN_BUCKETS), 1024.0),
        (hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
              REQUEST_TOKEN_BUCKETS), 1024.0),
        (hist("vllm:request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during prefill.",
              REQUEST_TOKEN_BUCKETS), 700.0),
        (hist("vllm:request_params_n", "Histogram of the n request parameter.", [1, 2, 5, 10, 20]), 1.0),
        (hist("vllm:request_num_preemptions", "Number of preemptions per finished request.",
              [1, 2, 3, 4, 5, 10, 20]), 0.5),
    ]
    for e in range(engines):
        lv = {"model_name": MODEL, "engine": str(e)}
        n_req = int((400 + 50 * e) * scale)
        running.labels(**lv).set(12 + e)
        waiting.labels(**lv).set(3 + e)
        by_reason.labels(**lv, reason="capacity").set(1 + e)
        by_reason.labels(**lv, reason="deferred").set(2)
        if kv_fetch is not None:
            for stage, n in (("waiting_to_start", 1), ("in_progress", 1 + e), ("completed_waiting", 0)):
                kv_fetch.labels(**lv, stage=stage).set(n)
        sleep.labels(**lv, sleep_state="awake").set(1)
        sleep.labels(**lv, sleep_state="weights_offloaded").set(0)
        sleep.labels(**lv, sleep_state="discard_all").set(0)
        usage.labels(**lv).set(0.4375 + 0.1 * e)
        preempt.labels(**lv).inc(2 * scale)
        local_compute, cache_hit, external = 53100.0 * scale, 12000.0 * scale, 1.9e6 * scale * (e + 1)
        prompt.labels(**lv).inc(local_compute + cache_hit + external)
        by_source.labels(**lv, source="local_compute").inc(local_compute)
        by_source.labels(**lv, source="local_cache_hit").inc(cache_hit)
        by_source.labels(**lv, source="external_kv_transfer").inc(external)
        cached.labels(**lv).inc(cache_hit + external)
        cached_src.labels(**lv, source="device").inc(cache_hit)
        cached_src.labels(**lv, source="p2p").inc(external)
        gen.labels(**lv).inc(n_req * 250.0)
        for reason, n in (("stop", n_req - 8), ("length", 6), ("abort", 1), ("error", 1)):
            success.labels(**lv, finished_reason=reason).inc(n)
        pq.labels(**lv).inc(local_compute + cache_hit)
        ph.labels(**lv).inc(cache_hit)
        epq.labels(**lv).inc(external)
        eph.labels(**lv).inc(external)
        mmq.labels(**lv).inc(0)
        mmh.labels(**lv).inc(0)
        for h, typical in histograms:
            child = h.labels(**lv)
            for _ in range(min(n_req, 400)):
                child.observe(max(0.0, rng.lognormvariate(0.0, 0.6) * typical))
    page = generate_latest(reg).decode()
    return _as_multiprocess(page) if (engines > 1 if multiprocess is None else multiprocess) else page


def _as_multiprocess(page: str) -> str:
    """Mimic the multiprocess collector: no ``_created``, ``_sum`` before the buckets."""
    out: list[str] = []
    block: list[str] = []

    def flush() -> None:
        sums = [ln for ln in block if "_sum{" in ln.split(" ")[0] or ln.split("{")[0].endswith("_sum")]
        rest = [ln for ln in block if ln not in sums]
        out.extend(sums + rest)
        block.clear()

    skip = False
    for line in page.splitlines():
        if line.startswith("# HELP") or line.startswith("# TYPE"):
            flush()
            skip = line.split()[2].endswith("_created")
            if not skip:
                out.append(line)
            continue
        if skip:
            continue
        block.append(line)
    flush()
    return "\n".join(out) + "\n"


FIXTURES = {
    "vllm_constructed_dp1.txt": dict(engines=1),
    "vllm_constructed_dp2.txt": dict(engines=2),
    "vllm_constructed_old_names.txt": dict(engines=1, old_names=True),
    "vllm_constructed_decode_kv_consumer.txt": dict(engines=2, kv_consumer=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-fixtures", action="store_true")
    args = parser.parse_args()
    if not args.write_fixtures:
        print(build_page(), end="")
        return
    data = Path(__file__).resolve().parents[1] / "tests" / "data"
    for name, kwargs in FIXTURES.items():
        (data / name).write_text(build_page(**kwargs))
        print("wrote", data / name)


if __name__ == "__main__":
    main()
