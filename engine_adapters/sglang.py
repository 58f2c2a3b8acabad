"""SGLang adapter: an SGLang ``/metrics`` page (``--enable-metrics``) -> ``EngineSnapshot`` (pure).

Names follow SGLang 0.5.23 (``python/sglang/srt/observability/metrics_collector.py``;
older releases had them in ``srt/metrics/collector.py``, ENGINES.md §3.3):

================================  ==============================================================
signal                            SGLang name
================================  ==============================================================
tokens, per batch (preferred)     ``sglang:realtime_tokens_total{mode="decode"|"prefill_compute"|"prefill_cache"}``
tokens, per finished request      ``sglang:generation_tokens_total``, ``sglang:prompt_tokens_total``,
(fallback)                        ``sglang:cached_tokens_total``
running / waiting                 ``sglang:num_running_reqs`` / ``sglang:num_queue_reqs``
KV pool usage (0..1)              ``sglang:token_usage``
preemptions                       ``sglang:num_retracted_requests_total`` (retracted requests)
requests per KV stage             ``sglang:num_prefill_bootstrap_queue_reqs`` (older:
                                  ``num_prefill_prealloc_queue_reqs``), ``..._prefill_inflight_...``,
                                  ``..._decode_prealloc_...``, ``..._decode_transfer_...``,
                                  ``..._decode_host_receive_queue_reqs``
TTFT / TBT                        ``sglang:time_to_first_token_seconds`` / ``sglang:inter_token_latency_seconds``
================================  ==============================================================

Token rates. The tokenizer counts a request's tokens when it finishes, so a rate
from ``generation_tokens_total`` lags by a request's duration and arrives in
bursts. The scheduler writes ``realtime_tokens_total`` as batches run (decode
tokens every decode step, prefill tokens every prefill batch); when the page has
that family it is used: decode = ``mode="decode"``, prompt computed here =
``prefill_compute``, prompt from the cache = ``prefill_cache``, prompt = their sum.
SGLang creates a mode's series at its first non-zero increment, so while the
family is on the page a missing mode counts 0 (a prefill server never has
``decode``). ``token_source`` says which family the counters came from; the rate
window never differences snapshots of different sources.

Priority scheduling (``--enable-priority-scheduling``): every scheduler series
gets ``priority=""``, and the queue gauges (running, waiting, the P/D queues)
add one series per priority next to that total (``_log_gauge_queue_count``).
Where a family has ``priority=""`` series, only those are read; summing all
would count every request twice. Tokenizer series carry the request's own
priority and partition the requests, so they are summed.

Ranks (ENGINES.md §3.2): scheduler series carry ``tp_rank``, ``pp_rank``,
``moe_ep_rank`` and, with data parallelism, ``dp_rank``; tokenizer series carry
none of them (one tokenizer manager per server; multiprocess mode already sums
its worker processes). By default only the TP-0 scheduler of each DP group
records metrics; with ``--enable-metrics-for-all-schedulers`` every TP rank
records the *same* batch state again. So, per family: series that differ only
in ``tp_rank``/``pp_rank``/``moe_ep_rank`` are copies of one another and only
the lowest rank is kept; what remains (``dp_rank``, ``is_streaming``, custom
labels) is summed. Ratios (``token_usage``) are averaged over DP ranks instead.
SGLang always runs prometheus_client in multiprocess mode, so there are no
``_created`` series, histogram lines start with ``_sum``, and gauges without a
multiprocess mode carry a ``pid`` label; none of it matters here.
"""

from __future__ import annotations

import math
from typing import Sequence

from heteroscale.engine_adapters.snapshot import (
    GENERATION_TOKENS, KV_CACHE_USAGE, PREEMPTIONS, PROMPT_CACHED_TOKENS, PROMPT_TOKENS, PROMPT_UNCACHED_TOKENS,
    REQUESTS_RUNNING, REQUESTS_WAITING, TBT, TTFT, EngineSnapshot, SampleIndex, checked_ranks, drop_none, histogram_series,
    mean_values, merge_histograms, parse_page, samples_of, sum_values,
)

ENGINE = "sglang"
PREFIX = "sglang:"

REALTIME = "sglang:realtime_tokens"
GENERATION = "sglang:generation_tokens"
PROMPT = "sglang:prompt_tokens"
CACHED = "sglang:cached_tokens"
RUNNING = "sglang:num_running_reqs"
QUEUED = "sglang:num_queue_reqs"
TOKEN_USAGE = "sglang:token_usage"
RETRACTED = "sglang:num_retracted_requests"
TTFT_HIST = "sglang:time_to_first_token_seconds"
ITL_HIST = "sglang:inter_token_latency_seconds"

# Requests per KV-transfer stage: report key -> SGLang gauges (newest name first).
KV_STAGE_GAUGES = {
    "prefill_bootstrap": ("sglang:num_prefill_bootstrap_queue_reqs", "sglang:num_prefill_prealloc_queue_reqs"),
    "prefill_inflight": ("sglang:num_prefill_inflight_queue_reqs",),
    "decode_prealloc": ("sglang:num_decode_prealloc_queue_reqs",),
    "decode_transfer": ("sglang:num_decode_transfer_queue_reqs",),
    "decode_host_receive": ("sglang:num_decode_host_receive_queue_reqs",),
}

FAMILIES = (REALTIME, GENERATION, PROMPT, CACHED, RUNNING, QUEUED, TOKEN_USAGE, RETRACTED, TTFT_HIST, ITL_HIST,
            *(name for names in KV_STAGE_GAUGES.values() for name in names))

REALTIME_SOURCE = "realtime"
FINISHED_SOURCE = "finished"

# Labels whose values name copies of the same state (see module docstring).
COPY_RANK_LABELS = ("tp_rank", "pp_rank", "moe_ep_rank")


def parse(text: str) -> EngineSnapshot:
    """Parse one SGLang page. Raises ``ScrapeError`` (empty, parse, too_large, wrong_engine)."""
    index = parse_page(text, families=FAMILIES, prefix=PREFIX, engine=ENGINE, other_prefixes=("vllm:",))
    counters, source = _token_counters(index)
    counters[PREEMPTIONS] = _counter(index, RETRACTED)
    return EngineSnapshot(
        engine=ENGINE,
        counters=drop_none(counters),
        gauges=drop_none({
            REQUESTS_RUNNING: _queue(index, RUNNING),
            REQUESTS_WAITING: _queue(index, QUEUED),
            KV_CACHE_USAGE: mean_values(_lowest_ranks(
                [s for s in samples_of(index, TOKEN_USAGE) if 0.0 <= s.value <= 1.0])),
        }),
        histograms=drop_none({
            TTFT: _histogram(index, TTFT_HIST),
            TBT: _histogram(index, ITL_HIST),
        }),
        ranks=_ranks(index),
        engine_role=_engine_type(index),
        kv_stages=drop_none({stage: _first_queue(index, names) for stage, names in KV_STAGE_GAUGES.items()}),
        token_source=source,
    )


def _token_counters(index: SampleIndex) -> tuple[dict[str, float | None], str]:
    realtime = [s for s in samples_of(index, REALTIME + "_total") if s.value >= 0]
    if realtime:
        by_mode = {}
        for mode in ("decode", "prefill_compute", "prefill_cache"):
            found = _lowest_ranks([s for s in realtime if s.labels.get("mode") == mode])
            by_mode[mode] = sum_values(found) if found else 0.0     # None only when the sum overflows
        compute, cache = by_mode["prefill_compute"], by_mode["prefill_cache"]
        prompt = compute + cache if compute is not None and cache is not None else None
        if prompt is not None and not math.isfinite(prompt):
            prompt = None
        return {
            GENERATION_TOKENS: by_mode["decode"],
            PROMPT_TOKENS: prompt,
            PROMPT_CACHED_TOKENS: by_mode["prefill_cache"],
            PROMPT_UNCACHED_TOKENS: by_mode["prefill_compute"],
        }, REALTIME_SOURCE
    return {
        GENERATION_TOKENS: _counter(index, GENERATION),
        PROMPT_TOKENS: _counter(index, PROMPT),
        PROMPT_CACHED_TOKENS: _counter(index, CACHED),
    }, FINISHED_SOURCE


def _engine_type(index: SampleIndex) -> str | None:
    """``prefill`` / ``decode`` / ``unified`` / ``dynamic`` when the page names exactly one."""
    types = {s.labels["engine_type"] for samples in index.values() for s in samples if "engine_type" in s.labels}
    return types.pop() if len(types) == 1 else None


def _rank_of(labels) -> tuple[int, ...]:
    out = []
    for name in COPY_RANK_LABELS:
        try:
            out.append(int(labels.get(name, 0)))
        except ValueError:
            out.append(0)
    return tuple(out)


def _group_key(labels, *, extra_drop: str = "") -> tuple:
    return tuple(sorted((k, v) for k, v in labels.items() if k not in COPY_RANK_LABELS and k != extra_drop))


def _lowest_ranks(samples: Sequence) -> list:
    """Keep, per group of copies, only the sample from the lowest (tp, pp, ep) rank."""
    best: dict[tuple, object] = {}
    for s in samples:
        key = _group_key(s.labels)
        if key not in best or _rank_of(s.labels) < _rank_of(best[key].labels):
            best[key] = s
    return list(best.values())


def _priority_totals(samples: Sequence) -> list:
    """With priority scheduling, the ``priority=""`` totals only (see the module docstring)."""
    totals = [s for s in samples if s.labels.get("priority") == ""]
    return totals if totals else list(samples)


def _queue(index: SampleIndex, family: str) -> float | None:
    found = [s for s in samples_of(index, family) if s.value >= 0]
    return sum_values(_lowest_ranks(_priority_totals(found)))


def _first_queue(index: SampleIndex, families: Sequence[str]) -> float | None:
    for family in families:
        value = _queue(index, family)
        if value is not None:
            return value
    return None


def _counter(index: SampleIndex, family: str) -> float | None:
    found = [s for s in samples_of(index, family + "_total") if s.value >= 0]
    return sum_values(_lowest_ranks(found))


def _histogram(index: SampleIndex, family: str):
    series = histogram_series(index, family)
    best: dict[tuple, tuple] = {}
    for key in series:
        labels = dict(key)
        group = _group_key(labels)
        if group not in best or _rank_of(labels) < _rank_of(dict(best[group])):
            best[group] = key
    return merge_histograms(series[k] for k in best.values())


def _ranks(index: SampleIndex) -> frozenset[str]:
    return checked_ranks(s.labels["dp_rank"] for samples in index.values() for s in samples if "dp_rank" in s.labels)
