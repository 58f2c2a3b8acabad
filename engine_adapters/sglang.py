"""SGLang adapter: an SGLang ``/metrics`` page (``--enable-metrics``) -> ``EngineSnapshot`` (pure).

Names (ENGINES.md §3.3): tokenizer-side counters ``sglang:generation_tokens_total``,
``sglang:prompt_tokens_total``, ``sglang:cached_tokens_total`` and histograms
``sglang:time_to_first_token_seconds``, ``sglang:inter_token_latency_seconds``;
scheduler gauges ``sglang:num_running_reqs``, ``sglang:num_queue_reqs`` (SGLang
has no "waiting"; the queue is its analogue) and ``sglang:token_usage`` (KV pool
fraction, the analogue of vLLM's ``kv_cache_usage_perc``).

Ranks (ENGINES.md §3.2): scheduler series carry ``tp_rank``, ``pp_rank``,
``moe_ep_rank`` and, with data parallelism, ``dp_rank``; tokenizer series carry
none of them (one tokenizer manager per server; multiprocess mode already sums
its worker processes). By default only the TP-0 scheduler of each DP group
records metrics; with ``--enable-metrics-for-all-schedulers`` every TP rank
records the *same* batch state again. So, per family: series that differ only
in ``tp_rank``/``pp_rank``/``moe_ep_rank`` are copies of one another and only
the lowest rank is kept; what remains (``dp_rank``, priority, custom labels)
is summed. Ratios (``token_usage``) are averaged over DP ranks instead.
SGLang always runs prometheus_client in multiprocess mode, so there are no
``_created`` series and histogram lines start with ``_sum``; neither matters here.
"""

from __future__ import annotations

from typing import Sequence

from heteroscale.engine_adapters.snapshot import (
    GENERATION_TOKENS, KV_CACHE_USAGE, PROMPT_CACHED_TOKENS, PROMPT_TOKENS, REQUESTS_RUNNING,
    REQUESTS_WAITING, TBT, TTFT, EngineSnapshot, SampleIndex, drop_none, histogram_series, mean_values,
    merge_histograms, parse_page, samples_of, sum_values,
)

ENGINE = "sglang"
PREFIX = "sglang:"

GENERATION = "sglang:generation_tokens"
PROMPT = "sglang:prompt_tokens"
CACHED = "sglang:cached_tokens"
RUNNING = "sglang:num_running_reqs"
QUEUED = "sglang:num_queue_reqs"
TOKEN_USAGE = "sglang:token_usage"
TTFT_HIST = "sglang:time_to_first_token_seconds"
ITL_HIST = "sglang:inter_token_latency_seconds"

FAMILIES = (GENERATION, PROMPT, CACHED, RUNNING, QUEUED, TOKEN_USAGE, TTFT_HIST, ITL_HIST)

# Labels whose values name copies of the same state (see module docstring).
COPY_RANK_LABELS = ("tp_rank", "pp_rank", "moe_ep_rank")


def parse(text: str) -> EngineSnapshot:
    """Parse one SGLang page. Raises ``ScrapeError`` (empty, parse, wrong_engine)."""
    index = parse_page(text, families=FAMILIES, prefix=PREFIX, engine=ENGINE, other_prefixes=("vllm:",))
    return EngineSnapshot(
        engine=ENGINE,
        counters=drop_none({
            GENERATION_TOKENS: _counter(index, GENERATION),
            PROMPT_TOKENS: _counter(index, PROMPT),
            PROMPT_CACHED_TOKENS: _counter(index, CACHED),
        }),
        gauges=drop_none({
            REQUESTS_RUNNING: sum_values(_lowest_ranks([s for s in samples_of(index, RUNNING) if s.value >= 0])),
            REQUESTS_WAITING: sum_values(_lowest_ranks([s for s in samples_of(index, QUEUED) if s.value >= 0])),
            KV_CACHE_USAGE: mean_values(_lowest_ranks(
                [s for s in samples_of(index, TOKEN_USAGE) if 0.0 <= s.value <= 1.0])),
        }),
        histograms=drop_none({
            TTFT: _histogram(index, TTFT_HIST),
            TBT: _histogram(index, ITL_HIST),
        }),
        ranks=_ranks(index),
        engine_role=_engine_type(index),
    )


def _engine_type(index: SampleIndex) -> str | None:
    """``prefill`` / ``decode`` / ``unified`` when the page names exactly one."""
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
    return frozenset(s.labels["dp_rank"] for samples in index.values() for s in samples if "dp_rank" in s.labels)
