"""vLLM 0.32's Prometheus page for one emulated engine: the families, labels and buckets.

``VllmMetrics`` registers vLLM's metric names in a private ``prometheus_client`` registry,
with the ``model_name``/``engine`` labels and the default histogram buckets of ENGINES.md
§1, so the page the emulator serves is written by the real client library in the real
format. The engine model (``model``) updates these objects; the server renders them.
"""

from __future__ import annotations

import itertools
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"

# vLLM 0.32 default histogram buckets (vllm/v1/metrics/buckets.py; ENGINES.md §1.2).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_N_BUCKETS = (1, 2, 5, 10, 20)
# NIXL connector (kv_connector/v1/nixl/stats.py, ENGINES.md §2.3).
NIXL_XFER_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
NIXL_POST_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
NIXL_BYTES_BUCKETS = tuple(float(2 ** k) for k in range(11, 34, 2))
NIXL_DESCRIPTOR_BUCKETS = (10, 20, 30, 50, 75, 100, 200, 400, 1000, 2000, 4000, 10000, 20000, 50000)


def request_token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to ``max_model_len`` (32768 -> 1, 2, 5, ..., 20000)."""
    out: list[float] = []
    for exponent in itertools.count():
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_model_len:
                return tuple(out)
            out.append(float(value))
    return tuple(out)  # pragma: no cover - itertools.count never ends


class VllmMetrics:
    """vLLM 0.32's metric families in a private registry, bound to one engine's labels."""

    def __init__(self, registry: CollectorRegistry, *, model_name: str, engine: str = "0",
                 max_model_len: int = 32768, cache_info: dict[str, str] | None = None) -> None:
        labels = ["model_name", "engine"]
        lv = (model_name, engine)
        r = registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels + list(extra), registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*lv)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.").labels(*lv)
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.").labels(*lv)
        waiting_reason = gauge("vllm:num_requests_waiting_by_reason",
                               "Number of requests waiting to be processed, by reason.", ("reason",))
        self.waiting_capacity = waiting_reason.labels(*lv, "capacity")
        self.waiting_deferred = waiting_reason.labels(*lv, "deferred")
        fetch = gauge("vllm:num_requests_kv_fetch_by_stage",
                      "Number of waiting requests by asynchronous KV fetch stage.", ("stage",))
        self.kv_fetch_waiting = fetch.labels(*lv, "waiting_to_start")
        self.kv_fetch_in_progress = fetch.labels(*lv, "in_progress")
        fetch.labels(*lv, "completed_waiting").set(0)
        sleep_state = gauge("vllm:engine_sleep_state", "Engine sleep state.", ("sleep_state",))
        sleep_state.labels(*lv, "awake").set(1)
        sleep_state.labels(*lv, "weights_offloaded").set(0)
        sleep_state.labels(*lv, "discard_all").set(0)
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.").labels(*lv)
        info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                     sorted((cache_info or {}).keys()) + ["engine"], registry=r)
        info.labels(**{**(cache_info or {}), "engine": engine}).set(1)

        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.").labels(*lv)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels(*lv)
        by_source = counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.", ("source",))
        self.prompt_local_compute = by_source.labels(*lv, "local_compute")
        self.prompt_local_cache_hit = by_source.labels(*lv, "local_cache_hit")
        self.prompt_external_kv = by_source.labels(*lv, "external_kv_transfer")
        self.prompt_cached = counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens.").labels(*lv)
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.").labels(*lv)
        success = counter("vllm:request_success", "Count of successfully processed requests.", ("finished_reason",))
        self.success = {reason: success.labels(*lv, reason)
                        for reason in ("stop", "length", "abort", "error", "repetition")}
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.").labels(*lv)
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.").labels(*lv)
        self.external_prefix_queries = counter("vllm:external_prefix_cache_queries", "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.").labels(*lv)
        self.external_prefix_hits = counter("vllm:external_prefix_cache_hits", "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.").labels(*lv)
        rejections = Counter("vllm:admission_rejections", "Requests rejected by admission control.",
                             ["model_name", "reason"], registry=r)
        rejections.labels(model_name, "max_num_queued_reqs")
        rejections.labels(model_name, "max_num_queued_tokens")

        token_buckets = request_token_buckets(max_model_len)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = hist("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill_time = hist("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = hist("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKEN_BUCKETS)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self.request_generation_tokens = hist("vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets)
        self.request_max_generation_tokens = hist("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.", token_buckets)
        self.request_max_tokens = hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets)
        self.request_kv_computed = hist("vllm:request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during prefill (excluding cached tokens).", token_buckets)
        self.request_n = hist("vllm:request_params_n", "Histogram of the n request parameter.", REQUEST_N_BUCKETS)

        self.nixl_xfer_time = hist("vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.", NIXL_XFER_TIME_BUCKETS)
        self.nixl_post_time = hist("vllm:nixl_post_time_seconds", "Histogram of transfer post time for NIXL KV Cache transfers.", NIXL_POST_TIME_BUCKETS)
        self.nixl_bytes = hist("vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers.", NIXL_BYTES_BUCKETS)
        self.nixl_descriptors = hist("vllm:nixl_num_descriptors", "Histogram of number of descriptors per NIXL KV Cache transfers.", NIXL_DESCRIPTOR_BUCKETS)
        self.nixl_failed = counter("vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache transfers.").labels(*lv)
        self.nixl_failed_notifications = counter("vllm:nixl_num_failed_notifications", "Number of failed NIXL KV Cache notifications.").labels(*lv)
        self.nixl_expired = counter("vllm:nixl_num_kv_expired_reqs", "Number of requests that had their KV expire.").labels(*lv)
        self.nixl_notifications_after_expiry = counter("vllm:nixl_num_notifications_after_expiry", "Number of notifications received after KV expiry.").labels(*lv)
