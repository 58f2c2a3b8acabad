"""vLLM 0.32's Prometheus page for one emulated engine: the families, labels and buckets.

``VllmMetrics`` registers vLLM's metric names in a private ``prometheus_client`` registry,
with the ``model_name``/``engine`` labels and the default histogram buckets of ENGINES.md
§1, so the page the emulator serves is written by the real client library in the real
format. The engine model (``model``) updates these objects; the server renders them.

Two deliberate choices, both of which keep vLLM's behaviour available:

* **Modelled seconds.** The engine observes durations in wall seconds; every
  ``*_seconds`` histogram records them × ``time_scale`` (the speed-up), i.e. in the
  seconds of the service being modelled. A demo run at ``--speedup 10`` therefore
  shows the same latencies as one at 1, and an SLO stays an SLO. (Counters are
  unchanged: token rates read off them are wall rates, × the speed-up.)
* **Latency buckets.** ``latency_buckets="vllm"`` (the default) uses vLLM's own
  TTFT/ITL buckets. They are coarse where SLOs live (25–50–75 ms for ITL, 2.5–5 s
  for TTFT), so a p90 interpolated inside a bucket can sit anywhere in it;
  ``"fine"`` adds bounds every 2.5 ms from 20 to 100 ms (ITL, TPOT) and every
  0.25 s up to 10 s (TTFT) to vLLM's, so a p90 near an SLO is resolved to ~5% of it.
  The demo uses ``fine``; every vLLM bound is kept, so a reader that expects
  vLLM's buckets still finds them.
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
# Finer buckets near typical SLOs (the demo's choice; see the module docstring).
FINE_ITL_BUCKETS = tuple(sorted(set(ITL_BUCKETS) | {round(0.02 + 0.0025 * k, 4) for k in range(33)}))
FINE_TTFT_BUCKETS = tuple(sorted(set(TTFT_BUCKETS) | {round(0.25 * k, 2) for k in range(1, 41)}))
LATENCY_BUCKETS = {"vllm": (TTFT_BUCKETS, ITL_BUCKETS), "fine": (FINE_TTFT_BUCKETS, FINE_ITL_BUCKETS)}
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


class Seconds:
    """A histogram child that is given wall seconds and records modelled ones (× ``scale``)."""

    def __init__(self, child: Any, scale: float) -> None:
        self.child = child
        self.scale = scale

    def observe(self, wall_s: float) -> None:
        self.child.observe(wall_s * self.scale)


class VllmMetrics:
    """vLLM 0.32's metric families in a private registry, bound to one engine's labels.

    ``time_scale``: modelled seconds per wall second (the speed-up); duration histograms
    record wall durations × this. ``latency_buckets``: ``vllm`` or ``fine`` (module docstring).
    """

    def __init__(self, registry: CollectorRegistry, *, model_name: str, engine: str = "0",
                 max_model_len: int = 32768, cache_info: dict[str, str] | None = None,
                 time_scale: float = 1.0, latency_buckets: str = "vllm") -> None:
        if latency_buckets not in LATENCY_BUCKETS:
            raise ValueError(f"latency_buckets must be one of {', '.join(LATENCY_BUCKETS)}")
        ttft_buckets, itl_buckets = LATENCY_BUCKETS[latency_buckets]
        self.latency_buckets = latency_buckets
        labels = ["model_name", "engine"]
        lv = (model_name, engine)
        r = registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels + list(extra), registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*lv)

        def seconds(name: str, doc: str, buckets: tuple[float, ...]) -> Seconds:
            return Seconds(hist(name, doc, buckets), time_scale)

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
        self.ttft = seconds("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", ttft_buckets)
        self.itl = seconds("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", itl_buckets)
        self.tpot = seconds("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.", itl_buckets)
        self.e2e = seconds("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = seconds("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = seconds("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill_time = seconds("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = seconds("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKEN_BUCKETS)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self.request_generation_tokens = hist("vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets)
        self.request_max_generation_tokens = hist("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.", token_buckets)
        self.request_max_tokens = hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets)
        self.request_kv_computed = hist("vllm:request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during prefill (excluding cached tokens).", token_buckets)
        self.request_n = hist("vllm:request_params_n", "Histogram of the n request parameter.", REQUEST_N_BUCKETS)

        self.nixl_xfer_time = seconds("vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.", NIXL_XFER_TIME_BUCKETS)
        self.nixl_post_time = seconds("vllm:nixl_post_time_seconds", "Histogram of transfer post time for NIXL KV Cache transfers.", NIXL_POST_TIME_BUCKETS)
        self.nixl_bytes = hist("vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers.", NIXL_BYTES_BUCKETS)
        self.nixl_descriptors = hist("vllm:nixl_num_descriptors", "Histogram of number of descriptors per NIXL KV Cache transfers.", NIXL_DESCRIPTOR_BUCKETS)
        self.nixl_failed = counter("vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache transfers.").labels(*lv)
        self.nixl_failed_notifications = counter("vllm:nixl_num_failed_notifications", "Number of failed NIXL KV Cache notifications.").labels(*lv)
        self.nixl_expired = counter("vllm:nixl_num_kv_expired_reqs", "Number of requests that had their KV expire.").labels(*lv)
        self.nixl_notifications_after_expiry = counter("vllm:nixl_num_notifications_after_expiry", "Number of notifications received after KV expiry.").labels(*lv)
