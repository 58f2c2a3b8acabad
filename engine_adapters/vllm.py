"""vLLM adapter: a vLLM ``/metrics`` page -> ``EngineSnapshot`` (pure).

Written for vLLM 0.32 (V1 engine) names; also accepts the names older fleets
still expose (ENGINES.md §1.2 "Renamed / removed"):

================================  =============================================
signal                            vLLM 0.32 name (fallback for older images)
================================  =============================================
generated tokens                  ``vllm:generation_tokens_total``
prompt tokens                     ``vllm:prompt_tokens_total``
prompt tokens computed here       ``vllm:prompt_tokens_by_source_total{source="local_compute"}``
prompt tokens from a cache        the other ``source`` values (``local_cache_hit``,
                                  ``external_kv_transfer``); else ``vllm:prompt_tokens_cached_total``;
                                  else ``vllm:prefix_cache_hits_total`` + ``vllm:external_prefix_cache_hits_total``
                                  (else ``vllm:gpu_prefix_cache_hits_total``)
running                           ``vllm:num_requests_running``
waiting (for capacity)            ``vllm:num_requests_waiting_by_reason{reason="capacity"}``
                                  (``vllm:num_requests_waiting``)
deferred                          ``vllm:num_requests_waiting_by_reason{reason="deferred"}``
requests per KV fetch stage       ``vllm:num_requests_kv_fetch_by_stage{stage}`` (KV consumers only)
preemptions                       ``vllm:num_preemptions_total``
KV usage (0..1)                   ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc``)
TTFT                              ``vllm:time_to_first_token_seconds``
TBT                               ``vllm:inter_token_latency_seconds`` (``vllm:time_per_output_token_seconds``)
================================  =============================================

Data parallelism: every series carries ``engine="<dp rank>"``; one page holds
all engines of the pod. Counters, running/waiting and histograms are summed
across engines; the KV-usage ratio is averaged (each engine has its own pool of
the same size). ``ranks`` is the set of ``engine`` label values seen.

"Prompt tokens from a cache" on a decode pod includes tokens whose KV arrived
from the prefill pod (``external_kv_transfer``): they were not computed here,
which is what "uncached prefill tokens/s" must exclude.

Waiting. Since vLLM 0.32 ``num_requests_waiting`` also counts requests deferred
by a transient constraint - on a P/D decode pod, mostly requests whose KV is
still being fetched - so a KV-transfer hold-up would read as a decode queue.
``num_requests_waiting_by_reason`` splits the two (they sum to
``num_requests_waiting``): "waiting" is the ``capacity`` share when the page has
it, and the ``deferred`` share is its own signal. Names checked against vLLM
0.33.0 (``vllm/v1/metrics/loggers.py``).
"""

from __future__ import annotations

import math

from heteroscale.engine_adapters.snapshot import (
    GENERATION_TOKENS, KV_CACHE_USAGE, PREEMPTIONS, PROMPT_CACHED_TOKENS, PROMPT_TOKENS, PROMPT_UNCACHED_TOKENS,
    MAX_KV_STAGES, MAX_STAGE_CHARS, REQUESTS_DEFERRED, REQUESTS_RUNNING, REQUESTS_WAITING, TBT, TTFT,
    EngineSnapshot, SampleIndex, checked_ranks, counter_total,
    drop_none, histogram_series, mean_values, merge_histograms, parse_page, samples_of, sum_values,
)

ENGINE = "vllm"
PREFIX = "vllm:"

GENERATION = "vllm:generation_tokens"
PROMPT = "vllm:prompt_tokens"
PROMPT_BY_SOURCE = "vllm:prompt_tokens_by_source"
PROMPT_CACHED = "vllm:prompt_tokens_cached"
PREFIX_HITS = "vllm:prefix_cache_hits"
EXTERNAL_PREFIX_HITS = "vllm:external_prefix_cache_hits"
OLD_PREFIX_HITS = "vllm:gpu_prefix_cache_hits"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
WAITING_BY_REASON = "vllm:num_requests_waiting_by_reason"
KV_FETCH_BY_STAGE = "vllm:num_requests_kv_fetch_by_stage"
PREEMPTED = "vllm:num_preemptions"
KV_USAGE = "vllm:kv_cache_usage_perc"
OLD_KV_USAGE = "vllm:gpu_cache_usage_perc"
TTFT_HIST = "vllm:time_to_first_token_seconds"
ITL_HIST = "vllm:inter_token_latency_seconds"
OLD_TPOT_HIST = "vllm:time_per_output_token_seconds"

FAMILIES = (GENERATION, PROMPT, PROMPT_BY_SOURCE, PROMPT_CACHED, PREFIX_HITS, EXTERNAL_PREFIX_HITS,
            OLD_PREFIX_HITS, RUNNING, WAITING, WAITING_BY_REASON, KV_FETCH_BY_STAGE, PREEMPTED, KV_USAGE,
            OLD_KV_USAGE, TTFT_HIST, ITL_HIST, OLD_TPOT_HIST)

LOCAL_COMPUTE = "local_compute"


def parse(text: str) -> EngineSnapshot:
    """Parse one vLLM page. Raises ``ScrapeError`` (empty, parse, wrong_engine)."""
    index = parse_page(text, families=FAMILIES, prefix=PREFIX, engine=ENGINE, other_prefixes=("sglang:",))
    return EngineSnapshot(
        engine=ENGINE,
        counters=drop_none(_counters(index)),
        gauges=drop_none(_gauges(index)),
        histograms=drop_none({
            TTFT: merge_histograms(histogram_series(index, TTFT_HIST).values()),
            TBT: merge_histograms(histogram_series(index, ITL_HIST).values())
            or merge_histograms(histogram_series(index, OLD_TPOT_HIST).values()),
        }),
        ranks=_ranks(index),
        kv_stages=_kv_stages(index),
    )


def _counters(index: SampleIndex) -> dict[str, float | None]:
    uncached = counter_total(index, PROMPT_BY_SOURCE, lambda labels: labels.get("source") == LOCAL_COMPUTE)
    by_source_cached = counter_total(index, PROMPT_BY_SOURCE,
                                     lambda labels: labels.get("source", LOCAL_COMPUTE) != LOCAL_COMPUTE)
    if uncached is not None:
        cached = by_source_cached if by_source_cached is not None else 0.0
    else:
        cached = counter_total(index, PROMPT_CACHED)
        if cached is None:
            cached = _sum_present(counter_total(index, PREFIX_HITS), counter_total(index, EXTERNAL_PREFIX_HITS))
        if cached is None:
            cached = counter_total(index, OLD_PREFIX_HITS)
    return {
        GENERATION_TOKENS: counter_total(index, GENERATION),
        PROMPT_TOKENS: counter_total(index, PROMPT),
        PROMPT_CACHED_TOKENS: cached,
        PROMPT_UNCACHED_TOKENS: uncached,
        PREEMPTIONS: counter_total(index, PREEMPTED),
    }


def _sum_present(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    total = sum(present) if present else None
    return total if total is None or math.isfinite(total) else None


def _gauges(index: SampleIndex) -> dict[str, float | None]:
    usage = [s for s in samples_of(index, KV_USAGE) if 0.0 <= s.value <= 1.0] \
        or [s for s in samples_of(index, OLD_KV_USAGE) if 0.0 <= s.value <= 1.0]
    capacity = _by_reason(index, "capacity")
    return {
        REQUESTS_RUNNING: sum_values([s for s in samples_of(index, RUNNING) if s.value >= 0]),
        REQUESTS_WAITING: capacity if capacity is not None
        else sum_values([s for s in samples_of(index, WAITING) if s.value >= 0]),
        REQUESTS_DEFERRED: _by_reason(index, "deferred"),
        KV_CACHE_USAGE: mean_values(usage),
    }


def _by_reason(index: SampleIndex, reason: str) -> float | None:
    return sum_values([s for s in samples_of(index, WAITING_BY_REASON, lambda labels: labels.get("reason") == reason)
                       if s.value >= 0])


def _kv_stages(index: SampleIndex) -> dict[str, float]:
    by_stage: dict[str, list] = {}
    for s in samples_of(index, KV_FETCH_BY_STAGE):
        stage = s.labels.get("stage")
        if stage and len(stage) <= MAX_STAGE_CHARS and s.value >= 0 and (
                stage in by_stage or len(by_stage) < MAX_KV_STAGES):
            by_stage.setdefault(stage, []).append(s)
    return drop_none({stage: sum_values(found) for stage, found in by_stage.items()})


def _ranks(index: SampleIndex) -> frozenset[str]:
    return checked_ranks(s.labels["engine"] for samples in index.values() for s in samples if "engine" in s.labels)
