"""SGLang 0.5.23 ``/metrics`` fixture pages, built from SGLang's own metric definitions.

SGLang cannot run here (no GPU), so its pages are built the way SGLang builds them:
``SPEC`` below lists every metric of ``SchedulerMetricsCollector`` and
``TokenizerMetricsCollector`` in ``sglang/srt/observability/metrics_collector.py`` of
the 0.5.23 release (name, type, extra label names, buckets, multiprocess mode, help text,
read from the released wheel's source), and the page is rendered by the real
``prometheus_client`` in multiprocess mode, which SGLang always uses (no ``_created``
series; gauges without a multiprocess mode get a ``pid`` label). Label sets follow
``SchedulerMetricsCollector.init_new`` (model_name, engine_type, tp_rank, pp_rank,
moe_ep_rank, ``priority=""`` with ``--enable-priority-scheduling``, dp_rank with DP, in that
order) and the tokenizer manager (model_name, engine_type, ``priority``; ``is_streaming``
on token counters and TTFT). Queue gauges with priority scheduling carry the total under
``priority=""`` and one series per priority (``_log_gauge_queue_count``); tokenizer series
carry the request's own priority. Families SGLang only creates behind a flag (LoRA,
HiCache, streaming sessions, EPLB, the prefill delayer, MFU estimates) and its own
``GaugeHistogram`` families are left out.

Run ``python tests/data/sglang_pages.py [OUT_DIR]`` to rewrite the ``sglang_0.5.23_*.txt``
pages (tests/test_engine_sglang.py checks that the committed pages are what this builds).
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SGLANG_VERSION = "0.5.23"
MODEL = "Qwen/Qwen3-8B"
PER_STAGE_BUCKETS = tuple(0.001 * (1.62 ** i) for i in range(30))   # exponential_buckets(0.001, 1.62, 30)

# (collector, type, name, extra label names, buckets, multiprocess_mode, help)
SPEC = (
    ('scheduler', 'gauge', 'sglang:num_running_reqs', (), None, 'mostrecent',
     'The number of running requests.'),
    ('scheduler', 'gauge', 'sglang:num_queue_reqs', (), None, 'mostrecent',
     'The number of requests in the waiting queue.'),
    ('scheduler', 'gauge', 'sglang:num_grammar_queue_reqs', (), None, 'mostrecent',
     'The number of requests in the grammar waiting queue.'),
    ('scheduler', 'gauge', 'sglang:gen_throughput', (), None, 'mostrecent',
     'The generation throughput (token/s).'),
    ('scheduler', 'gauge', 'sglang:cache_hit_rate', (), None, 'mostrecent',
     'The prefix cache hit rate.'),
    ('scheduler', 'gauge', 'sglang:decode_sum_seq_lens', (), None, 'mostrecent',
     'The sum of all sequence lengths in decode.'),
    ('scheduler', 'gauge', 'sglang:token_usage', (), None, 'mostrecent',
     'The token usage.'),
    ('scheduler', 'gauge', 'sglang:full_token_usage', (), None, 'mostrecent',
     'The token usage for full attention layers.'),
    ('scheduler', 'gauge', 'sglang:swa_token_usage', (), None, 'mostrecent',
     'The token usage for SWA layers.'),
    ('scheduler', 'gauge', 'sglang:mamba_usage', (), None, 'mostrecent',
     'The token usage for Mamba layers.'),
    ('scheduler', 'gauge', 'sglang:num_used_tokens', (), None, 'mostrecent',
     'The number of used tokens.'),
    ('scheduler', 'gauge', 'sglang:kv_available_tokens', (), None, 'mostrecent',
     'Number of free token slots in the KV cache pool.'),
    ('scheduler', 'gauge', 'sglang:kv_evictable_tokens', (), None, 'mostrecent',
     'Number of evictable (radix-cached) token slots in the KV cache pool.'),
    ('scheduler', 'gauge', 'sglang:kv_used_tokens', (), None, 'mostrecent',
     'Number of actively used token slots in the KV cache pool.'),
    ('scheduler', 'gauge', 'sglang:swa_available_tokens', (), None, 'mostrecent',
     'Number of free token slots in the SWA pool (hybrid-SWA only).'),
    ('scheduler', 'gauge', 'sglang:swa_evictable_tokens', (), None, 'mostrecent',
     'Number of evictable (radix-cached) token slots in the SWA pool.'),
    ('scheduler', 'gauge', 'sglang:swa_used_tokens', (), None, 'mostrecent',
     'Number of actively used token slots in the SWA pool.'),
    ('scheduler', 'gauge', 'sglang:mamba_available_tokens', (), None, 'mostrecent',
     'Number of free state slots in the mamba SSM pool (hybrid-SSM only).'),
    ('scheduler', 'gauge', 'sglang:mamba_evictable_tokens', (), None, 'mostrecent',
     'Number of evictable (radix-cached) state slots in the mamba SSM pool.'),
    ('scheduler', 'gauge', 'sglang:mamba_used_tokens', (), None, 'mostrecent',
     'Number of actively used state slots in the mamba SSM pool.'),
    ('scheduler', 'gauge', 'sglang:weight_load_duration_seconds', ('source',), None, 'mostrecent',
     'Wall time of the most recent update_weights_from_<source> call on this scheduler rank (seconds). `source` label is one of: disk, distributed, tensor, ipc. Event-detection via changes(...[<range>]) > 0 — no separate counter needed.'),
    ('scheduler', 'gauge', 'sglang:spec_accept_length', (), None, 'mostrecent',
     'Mean acceptance length of speculative decoding (accepted drafts + bonus token per forward).'),
    ('scheduler', 'gauge', 'sglang:spec_accept_rate', (), None, 'mostrecent',
     'Speculative acceptance rate (`accepted drafts / proposed drafts` in batch).'),
    ('scheduler', 'gauge', 'sglang:spec_cap_length', (), None, 'mostrecent',
     'Mean DSpark confidence-scheduled verify window per verify step, incl the bonus slot (0 when no cap is scheduled).'),
    ('scheduler', 'gauge', 'sglang:spec_block_accept_length', (), None, 'mostrecent',
     'Mean uncapped full-block accept length per verify step (accept + cap-trimmed drafts; exact only in DSpark cap-accept mode).'),
    ('scheduler', 'gauge', 'sglang:spec_num_steps', (), None, 'mostrecent',
     'Currently active speculative_num_steps.'),
    ('scheduler', 'gauge', 'sglang:spec_num_draft_tokens', (), None, 'mostrecent',
     'Currently active speculative_num_draft_tokens (decouples from steps under topk>1).'),
    ('scheduler', 'gauge', 'sglang:num_retracted_reqs', (), None, None,
     'The number of retracted requests.'),
    ('scheduler', 'counter', 'sglang:num_retracted_requests_total', (), None, None,
     'Total number of retracted requests.'),
    ('scheduler', 'counter', 'sglang:num_retracted_input_tokens_total', (), None, None,
     'Total number of retracted input tokens.'),
    ('scheduler', 'counter', 'sglang:num_retracted_output_tokens_total', (), None, None,
     'Total number of retracted output tokens.'),
    ('scheduler', 'gauge', 'sglang:num_paused_reqs', (), None, None,
     'The number of paused requests by async weight sync.'),
    ('scheduler', 'gauge', 'sglang:num_prefill_bootstrap_queue_reqs', (), None, 'mostrecent',
     'The number of requests in the prefill bootstrap queue.'),
    ('scheduler', 'gauge', 'sglang:num_prefill_inflight_queue_reqs', (), None, 'mostrecent',
     'The number of requests in the prefill inflight queue.'),
    ('scheduler', 'gauge', 'sglang:num_decode_prealloc_queue_reqs', (), None, 'mostrecent',
     'The number of requests in the decode prealloc queue.'),
    ('scheduler', 'gauge', 'sglang:num_decode_transfer_queue_reqs', (), None, 'mostrecent',
     'The number of requests in the decode transfer queue.'),
    ('scheduler', 'gauge', 'sglang:num_decode_host_receive_queue_reqs', (), None, 'mostrecent',
     'Requests in the decode transfer queue receiving into host memory or waiting for device admission.'),
    ('scheduler', 'counter', 'sglang:num_decode_host_receive_reqs_total', (), None, None,
     'Total requests admitted to receive prefill KV in host memory.'),
    ('scheduler', 'gauge', 'sglang:num_decode_deferred_kv_release_reqs', (), None, 'mostrecent',
     'The number of failed decode requests whose KV allocations are held pending transfer drain acknowledgement or timeout.'),
    ('scheduler', 'histogram', 'sglang:decode_deferred_kv_release_seconds', (), (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0), None,
     'Histogram of time spent holding deferred decode KV releases.'),
    ('scheduler', 'counter', 'sglang:decode_deferred_kv_release_total', ('outcome',), None, None,
     'Total deferred decode KV release resolution attempts.'),
    ('scheduler', 'histogram', 'sglang:kv_transfer_speed_gb_s', (), (0.1, 0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 400.0), None,
     'Histogram of KV cache transfer speed in GB/s.'),
    ('scheduler', 'histogram', 'sglang:kv_transfer_latency_ms', (), (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0), None,
     'Histogram of KV cache transfer latency in ms.'),
    ('scheduler', 'gauge', 'sglang:pending_prealloc_token_usage', (), None, 'mostrecent',
     'The token usage for pending preallocated tokens (not preallocated yet).'),
    ('scheduler', 'gauge', 'sglang:prealloc_full_token_usage', (), None, 'mostrecent',
     'Share of the full-attention KV pool held by decode requests whose KV transfer is pending (preallocated, not yet running); same capacity basis as sglang:full_token_usage.'),
    ('scheduler', 'gauge', 'sglang:prealloc_swa_token_usage', (), None, 'mostrecent',
     'Share of the SWA KV pool held by decode requests whose KV transfer is pending; same capacity basis as sglang:swa_token_usage.'),
    ('scheduler', 'counter', 'sglang:num_bootstrap_failed_reqs_total', (), None, None,
     'The number of bootstrap failed requests.'),
    ('scheduler', 'counter', 'sglang:num_transfer_failed_reqs_total', (), None, None,
     'The number of transfer failed requests.'),
    ('scheduler', 'counter', 'sglang:num_prefill_retries_total', (), None, None,
     'Total number of prefill retries.'),
    ('scheduler', 'histogram', 'sglang:kv_transfer_bootstrap_ms', (), (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0), None,
     'Histogram of KV transfer bootstrap time in ms.'),
    ('scheduler', 'histogram', 'sglang:kv_transfer_alloc_ms', (), (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0), None,
     'Histogram of KV transfer allocation waiting time in ms.'),
    ('scheduler', 'histogram', 'sglang:kv_transfer_total_mb', (), (1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0), None,
     'Histogram of KV cache transfer size in MB.'),
    ('scheduler', 'gauge', 'sglang:utilization', (), None, 'mostrecent',
     'The utilization.'),
    ('scheduler', 'gauge', 'sglang:fwd_occupancy', (), None, 'mostrecent',
     'Forward pass GPU occupancy percentage.'),
    ('scheduler', 'gauge', 'sglang:new_token_ratio', (), None, 'mostrecent',
     'The new token ratio.'),
    ('scheduler', 'gauge', 'sglang:is_cuda_graph', (), None, 'mostrecent',
     'Whether the batch is using CUDA graph.'),
    ('scheduler', 'counter', 'sglang:cuda_graph_passes_total', ('mode',), None, None,
     'Total number of forward passes categorized by CUDA graph.'),
    ('scheduler', 'gauge', 'sglang:num_unique_running_routing_keys', (), None, 'mostrecent',
     'Number of unique routing keys in running batch.'),
    ('scheduler', 'histogram', 'sglang:queue_time_seconds', (), (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0, 1000.0, 1200.0, 1400.0, 1600.0, 1800.0, 2000.0, 2500.0, 3000.0), None,
     'Histogram of queueing time in seconds.'),
    ('scheduler', 'histogram', 'sglang:per_stage_req_latency_seconds', ('stage',), PER_STAGE_BUCKETS, None,
     'The latency of each stage of requests.'),
    ('scheduler', 'histogram', 'sglang:grammar_compilation_time_seconds', (), (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 240.0), None,
     'Histogram of grammar compilation time in seconds.'),
    ('scheduler', 'counter', 'sglang:num_grammar_cache_hit_total', (), None, None,
     'Number of grammar cache hits.'),
    ('scheduler', 'counter', 'sglang:num_grammar_aborted_total', (), None, None,
     'Number of grammar aborted requests.'),
    ('scheduler', 'counter', 'sglang:num_grammar_timeout_total', (), None, None,
     'Number of grammar timeouts.'),
    ('scheduler', 'counter', 'sglang:num_grammar_total', (), None, None,
     'Number of the total grammar requests.'),
    ('scheduler', 'histogram', 'sglang:grammar_schema_count', (), (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0, 100.0, 120.0, 140.0, 160.0, 180.0, 200.0, 300.0, 400.0, 500.0, 700.0, 1000.0), None,
     'Histogram of grammar schema count.'),
    ('scheduler', 'histogram', 'sglang:grammar_ebnf_size', (), (0.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0, 10000.0, 20000.0, 30000.0, 50000.0, 100000.0), None,
     'Histogram of grammar EBNF size.'),
    ('scheduler', 'histogram', 'sglang:grammar_tree_traversal_time_avg', (), (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 90.0, 120.0, 240.0), None,
     'Histogram of average grammar tree traversal time in seconds.'),
    ('scheduler', 'histogram', 'sglang:grammar_tree_traversal_time_max', (), (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 90.0, 120.0, 240.0), None,
     'Histogram of max grammar tree traversal time in seconds.'),
    ('scheduler', 'counter', 'sglang:realtime_tokens_total', ('mode',), None, None,
     'Total number of tokens processed (updated on each log interval). mode: prefill_compute, prefill_cache, decode.'),
    ('scheduler', 'counter', 'sglang:prefill_effective_tokens_total', ('mode',), None, None,
     'Effective prefill tokens with retracted-request re-counts excluded, updated on each log interval. mode: device_hit, host_hit, storage_hit, input. Windowed prefix cache hit rate = rate(sum of *_hit) / rate(sum of all modes); per-tier rate uses a single *_hit mode in the numerator.'),
    ('scheduler', 'counter', 'sglang:forward_execution_seconds_total', ('category',), None, None,
     'Total time that GPU is busy executing model forward passes. Refer to ForwardMode for category labels.'),
    ('scheduler', 'counter', 'sglang:scheduler_idle_seconds_total', (), None, None,
     'Total wall time while the scheduler has no runnable or queued work.'),
    ('scheduler', 'counter', 'sglang:scheduler_process_cpu_seconds_total', (), None, None,
     'Total CPU time consumed by the scheduler process across all threads.'),
    ('scheduler', 'counter', 'sglang:scheduler_stage_seconds_total', ('category', 'forward_overlap'), None, None,
     ''),
    ('scheduler', 'counter', 'sglang:estimated_flops_per_gpu_total', (), None, None,
     'Estimated number of floating point operations per GPU (for Model FLOPs Utilization calculations).'),
    ('scheduler', 'counter', 'sglang:estimated_read_bytes_per_gpu_total', (), None, None,
     'Estimated number of bytes read from memory per GPU (for Model FLOPs Utilization calculations).'),
    ('scheduler', 'counter', 'sglang:estimated_write_bytes_per_gpu_total', (), None, None,
     'Estimated number of bytes written to memory per GPU (for Model FLOPs Utilization calculations).'),
    ('scheduler', 'counter', 'sglang:dp_cooperation_realtime_tokens_total', ('mode', 'num_prefill_ranks'), None, None,
     'Total number of tokens processed with labels about DP cooperation. mode: prefill_compute, prefill_cache, decode.'),
    ('scheduler', 'counter', 'sglang:dp_cooperation_forward_execution_seconds_total', ('category', 'num_prefill_ranks'), None, None,
     'Total time that GPU is busy executing model forward passes, with labels about DP cooperation. Refer to ForwardMode for category labels.'),
    ('scheduler', 'counter', 'sglang:dp_attention_tokens_total', ('kind',), None, None,
     'Tokens of MLP-sync steps on this DP rank. kind=scheduled: tokens this rank ran; kind=imbalance: tokens the busiest rank ran beyond this rank, i.e. capacity lost to DP imbalance on this rank. On speculative-decode steps the unit is batch rows (requests).'),
    ('scheduler', 'counter', 'sglang:dp_attention_steps_total', ('rank_state',), None, None,
     'MLP-sync steps on this DP rank. rank_state=idle: this rank had no tokens and only ran to keep the DP collectives in lockstep.'),
    ('scheduler', 'counter', 'sglang:dp_attention_pairs_total', ('kind',), None, None,
     "Causal (query, key) pairs attended by MLP-sync steps on this DP rank, pricing every layer as full attention: a decode row reads its sequence, a prefill chunk its prefix plus the pairs within the chunk. kind=scheduled: this rank; kind=imbalance: the busiest rank's excess over this rank. The context-length counterpart of sglang:dp_attention_tokens_total; like it, speculative-decode steps count one query per row. Sliding-window layers execute fewer pairs than counted, so on hybrid-SWA models long rows are overstated."),
    ('scheduler', 'histogram', 'sglang:dp_attention_token_imbalance_ratio', (), (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0), None,
     'Per MLP-sync step, max tokens over mean tokens across the DP ranks (1.0 = balanced, num_dp_ranks = one busy rank). Reported once per engine, by the scheduler of DP rank 0.'),
    ('scheduler', 'histogram', 'sglang:dp_attention_sync_wait_seconds', (), (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), None,
     "Wall time of this DP rank's scheduler MLP-sync all-gather per step. On the gloo path (the default with overlap scheduling) this is waiting for the slowest rank; on the device-group paths it also includes the gather's stream sync."),
    ('scheduler', 'histogram', 'sglang:prefill_delayer_wait_forward_passes', (), None, None,
     'Histogram of forward passes waited by prefill delayer.'),
    ('scheduler', 'histogram', 'sglang:prefill_delayer_wait_seconds', (), (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0), None,
     'Histogram of wait time in seconds by prefill delayer.'),
    ('scheduler', 'counter', 'sglang:prefill_delayer_outcomes_total', ('input_estimation', 'output_allow', 'output_reason', 'actual_execution'), None, None,
     'Prefill delayer outcome counts.'),
    ('scheduler', 'gauge', 'sglang:max_total_num_tokens', (), None, 'mostrecent',
     'Maximum total number of tokens in the KV cache pool.'),
    ('scheduler', 'gauge', 'sglang:max_total_num_tokens_swa', (), None, 'mostrecent',
     'Maximum total number of tokens in the SWA KV cache pool.'),
    ('scheduler', 'gauge', 'sglang:weight_memory_usage_gb', (), None, 'mostrecent',
     'Memory used by model weights in GB.'),
    ('scheduler', 'gauge', 'sglang:kv_cache_memory_usage_gb', (), None, 'mostrecent',
     'Memory used by the KV cache pools in GB.'),
    ('scheduler', 'gauge', 'sglang:graph_memory_usage_gb', ('phase',), None, 'mostrecent',
     'Memory used by captured device graphs in GB.'),
    ('scheduler', 'gauge', 'sglang:max_running_requests_under_SLO', (), None, 'mostrecent',
     'The maximum number of running requests under SLO.'),
    ('scheduler', 'gauge', 'sglang:page_size', (), None, 'mostrecent',
     'KV cache page size in tokens.'),
    ('scheduler', 'gauge', 'sglang:num_pages', (), None, 'mostrecent',
     'Number of KV cache pages.'),
    ('scheduler', 'gauge', 'sglang:context_len', (), None, 'mostrecent',
     'Maximum context length.'),
    ('scheduler', 'gauge', 'sglang:startup_available_gpu_memory_gb', (), None, 'mostrecent',
     'Available GPU memory in GB at startup.'),
    ('scheduler', 'gauge', 'sglang:lora_pool_slots_used', (), None, 'mostrecent',
     'Number of LoRA adapter slots currently occupied in GPU memory.'),
    ('scheduler', 'gauge', 'sglang:lora_pool_slots_total', (), None, 'mostrecent',
     'Total number of LoRA adapter slots available (max_loras_per_batch).'),
    ('scheduler', 'gauge', 'sglang:lora_pool_utilization', (), None, 'mostrecent',
     'LoRA pool utilization ratio (used/total). 1.0 means pool is full.'),
    ('scheduler', 'gauge', 'sglang:hicache_host_used_tokens', (), None, 'mostrecent',
     'Number of tokens currently used in the host KV cache.'),
    ('scheduler', 'gauge', 'sglang:hicache_host_total_tokens', (), None, 'mostrecent',
     'Total capacity of the host KV cache in tokens.'),
    ('scheduler', 'gauge', 'sglang:hicache_host_mamba_used_states', (), None, 'mostrecent',
     'Number of state slots currently used in the host Mamba cache (hybrid-SSM models only).'),
    ('scheduler', 'gauge', 'sglang:hicache_host_mamba_total_states', (), None, 'mostrecent',
     'Total capacity of the host Mamba cache in state slots (hybrid-SSM models only).'),
    ('scheduler', 'gauge', 'sglang:num_streaming_sessions', (), None, 'mostrecent',
     'The number of streaming sessions.'),
    ('scheduler', 'gauge', 'sglang:streaming_session_held_tokens', (), None, 'mostrecent',
     'The number of KV tokens currently held by streaming session slots.'),
    ('tokenizer', 'gauge', 'sglang:startup_time_seconds', ('phase',), None, 'mostrecent',
     'Engine startup duration by phase in seconds.'),
    ('tokenizer', 'gauge', 'sglang:startup_cuda_graph_time_seconds', ('phase',), None, 'mostrecent',
     'CUDA graph capture duration by phase in seconds.'),
    ('tokenizer', 'counter', 'sglang:prompt_tokens_total', ('is_streaming',), None, None,
     'Number of prefill tokens processed.'),
    ('tokenizer', 'counter', 'sglang:generation_tokens_total', ('is_streaming',), None, None,
     'Number of generation tokens processed.'),
    ('tokenizer', 'counter', 'sglang:spec_verify_calls_total', (), None, None,
     'Number of speculative decoding verification calls.'),
    ('tokenizer', 'histogram', 'sglang:prompt_tokens_histogram', (), (100.0, 300.0, 500.0, 700.0, 1000.0, 1500.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 7000.0, 8000.0, 9000.0, 10000.0, 12500.0, 15000.0, 17500.0, 20000.0, 22500.0, 25000.0, 27500.0, 30000.0, 35000.0, 40000.0, 60000.0, 80000.0, 100000.0, 200000.0, 300000.0, 400000.0, 600000.0, 800000.0, 1000000.0, 1100000.0), None,
     'Histogram of prompt token length.'),
    ('tokenizer', 'histogram', 'sglang:uncached_prompt_tokens_histogram', (), (100.0, 300.0, 500.0, 700.0, 1000.0, 1500.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 7000.0, 8000.0, 9000.0, 10000.0, 12500.0, 15000.0, 17500.0, 20000.0, 22500.0, 25000.0, 27500.0, 30000.0, 35000.0, 40000.0, 60000.0, 80000.0, 100000.0, 200000.0, 300000.0, 400000.0, 600000.0, 800000.0, 1000000.0, 1100000.0), None,
     'Histogram of uncached (compute) prompt token length.'),
    ('tokenizer', 'histogram', 'sglang:generation_tokens_histogram', (), (100.0, 300.0, 500.0, 700.0, 1000.0, 1500.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 7000.0, 8000.0, 9000.0, 10000.0, 12500.0, 15000.0, 17500.0, 20000.0, 22500.0, 25000.0, 27500.0, 30000.0, 35000.0, 40000.0, 60000.0, 80000.0, 100000.0, 200000.0, 300000.0, 400000.0, 600000.0, 800000.0, 1000000.0, 1100000.0), None,
     'Histogram of generation token length.'),
    ('tokenizer', 'counter', 'sglang:cached_tokens_total', ('cache_source',), None, None,
     'Number of cached prompt tokens by source (device/host/storage).'),
    ('tokenizer', 'counter', 'sglang:num_requests_total', ('is_streaming',), None, None,
     'Number of requests processed.'),
    ('tokenizer', 'histogram', 'sglang:get_loads_duration_seconds', (), (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0), None,
     'Time spent serving /v1/loads requests (seconds).'),
    ('tokenizer', 'counter', 'sglang:num_so_requests_total', (), None, None,
     'Number of structured output requests processed.'),
    ('tokenizer', 'counter', 'sglang:num_aborted_requests_total', (), None, None,
     'Number of requests aborted.'),
    ('tokenizer', 'histogram', 'sglang:time_to_first_token_seconds', ('is_streaming',), (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0), None,
     'Histogram of time to first token in seconds.'),
    ('tokenizer', 'histogram', 'sglang:inter_token_latency_seconds', (), (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0), None,
     'Histogram of inter-token latency in seconds.'),
    ('tokenizer', 'histogram', 'sglang:request_time_per_output_token_seconds', ('is_streaming',), (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0), None,
     'Per-request TPOT in seconds: (finished_time - first_token_time) / (completion_tokens - 1).'),
    ('tokenizer', 'histogram', 'sglang:e2e_request_latency_seconds', ('is_streaming',), (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0, 600.0, 1200.0, 1800.0, 2400.0), None,
     'Histogram of End-to-end request latency in seconds'),)

# Created only behind a server flag, or written by SGLang's own GaugeHistogram class.
CONDITIONAL = frozenset({
    "sglang:lora_pool_slots_used", "sglang:lora_pool_slots_total", "sglang:lora_pool_utilization",
    "sglang:hicache_host_used_tokens", "sglang:hicache_host_total_tokens",
    "sglang:hicache_host_mamba_used_states", "sglang:hicache_host_mamba_total_states",
    "sglang:num_streaming_sessions", "sglang:streaming_session_held_tokens",
    "sglang:prefill_delayer_wait_forward_passes", "sglang:prefill_delayer_wait_seconds",
    "sglang:prefill_delayer_outcomes_total", "sglang:estimated_flops_per_gpu_total",
    "sglang:estimated_read_bytes_per_gpu_total", "sglang:estimated_write_bytes_per_gpu_total",
    "sglang:weight_load_duration_seconds", "sglang:dp_attention_tokens_total", "sglang:dp_attention_steps_total",
    "sglang:dp_attention_pairs_total", "sglang:dp_attention_token_imbalance_ratio",
    "sglang:dp_attention_sync_wait_seconds", "sglang:scheduler_stage_seconds_total",
})
# Queue gauges written with _log_gauge_queue_count: total under priority="", one series per priority.
QUEUE_GAUGES = frozenset({
    "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:num_prefill_bootstrap_queue_reqs",
    "sglang:num_prefill_inflight_queue_reqs", "sglang:num_decode_prealloc_queue_reqs",
    "sglang:num_decode_transfer_queue_reqs", "sglang:num_decode_host_receive_queue_reqs",
})

EXTRA_VALUES = {
    "stage": ("prefill_waiting", "decode_loop", "prefill_forward", "decode_transferred"),
    "category": ("extend", "decode"),
    "source": ("disk",),
    "phase": ("decode", "load_weight", "kv_cache_allocation", "scheduler_e2e", "tokenizer_e2e"),
    "outcome": ("released",),
    "num_prefill_ranks": ("0",),
    "forward_overlap": ("false",),
    "is_streaming": ("true", "false"),
}
MODE_VALUES = {
    "sglang:cuda_graph_passes_total": ("decode_cuda_graph", "decode_none"),
    "sglang:prefill_effective_tokens_total": ("input", "device_hit", "host_hit", "storage_hit"),
}


@dataclass(frozen=True)
class Rank:
    tp: int
    ep: int = 0
    pp: int = 0
    dp: int | None = None


@dataclass
class Scenario:
    """One SGLang server: its scheduler ranks, what they hold, and what its tokenizer counted."""

    file: str
    engine_type: str
    ranks: tuple[Rank, ...]
    priorities: tuple[int, ...] = ()            # non-empty: --enable-priority-scheduling
    # scheduler gauges per DP group (the same on every TP copy); queue gauges by priority
    gauges: dict[str, dict] = field(default_factory=dict)
    realtime: dict = field(default_factory=dict)        # dp -> {mode: tokens}
    retracted: dict = field(default_factory=dict)       # dp -> requests retracted so far
    kv_transfers: tuple = ()                            # (latency_ms, total_mb) observed by rank 0
    kv_bootstraps: tuple = ()                           # (bootstrap_ms, alloc_ms) observed by rank 0
    failures: dict = field(default_factory=dict)        # counter name -> value (rank 0)
    # tokenizer: per priority (or None) -> {is_streaming: value}
    generation_tokens: dict = field(default_factory=dict)
    prompt_tokens: dict = field(default_factory=dict)
    cached_tokens: dict = field(default_factory=dict)   # cache_source -> tokens
    ttft: tuple = ()                                    # (seconds, count)
    itl: tuple = ()                                     # (seconds, tokens)
    seed: int = 0


def _dp_of(rank: Rank):
    return rank.dp if rank.dp is not None else 0


SCENARIOS = (
    Scenario(
        file=f"sglang_{SGLANG_VERSION}_decode_dp2_tp2_priority.txt", engine_type="decode",
        ranks=(Rank(tp=0, ep=0, dp=0), Rank(tp=1, ep=1, dp=0), Rank(tp=2, ep=0, dp=1), Rank(tp=3, ep=1, dp=1)),
        priorities=(1, 5),
        gauges={
            "sglang:num_running_reqs": {0: {1: 40, 5: 24}, 1: {1: 41, 5: 24}},
            "sglang:num_queue_reqs": {0: {1: 3, 5: 2}, 1: {1: 4, 5: 2}},
            "sglang:num_decode_prealloc_queue_reqs": {0: {1: 1, 5: 1}, 1: {1: 1, 5: 0}},
            "sglang:num_decode_transfer_queue_reqs": {0: {1: 3, 5: 2}, 1: {1: 2, 5: 2}},
            "sglang:num_decode_host_receive_queue_reqs": {0: {1: 0, 5: 0}, 1: {1: 0, 5: 0}},
            "sglang:num_prefill_bootstrap_queue_reqs": {0: {1: 0, 5: 0}, 1: {1: 0, 5: 0}},
            "sglang:num_prefill_inflight_queue_reqs": {0: {1: 0, 5: 0}, 1: {1: 0, 5: 0}},
            "sglang:token_usage": {0: 0.71, 1: 0.61},
        },
        realtime={0: {"decode": 1_200_000}, 1: {"decode": 1_300_000}},
        retracted={0: 7, 1: 5},
        kv_bootstraps=((3.0, 1.5), (4.0, 2.0)),
        failures={"sglang:num_transfer_failed_reqs_total": 2},
        generation_tokens={1: {"true": 1_000_000, "false": 400_000}, 5: {"true": 700_000, "false": 300_000}},
        prompt_tokens={1: {"true": 5_000_000, "false": 1_000_000}, 5: {"true": 2_000_000, "false": 1_000_000}},
        cached_tokens={"device": 6_000_000, "host": 1_000_000},
        ttft=((0.15, 100), (0.5, 50), (3.0, 10)),
        itl=((0.012, 1000), (0.03, 200)),
        seed=1,
    ),
    Scenario(
        file=f"sglang_{SGLANG_VERSION}_prefill_tp1.txt", engine_type="prefill",
        ranks=(Rank(tp=0),),
        gauges={
            "sglang:num_running_reqs": {0: 8}, "sglang:num_queue_reqs": {0: 3},
            "sglang:num_prefill_bootstrap_queue_reqs": {0: 2}, "sglang:num_prefill_inflight_queue_reqs": {0: 4},
            "sglang:num_decode_prealloc_queue_reqs": {0: 0}, "sglang:num_decode_transfer_queue_reqs": {0: 0},
            "sglang:num_decode_host_receive_queue_reqs": {0: 0},
            "sglang:token_usage": {0: 0.42},
        },
        realtime={0: {"prefill_compute": 3_000_000, "prefill_cache": 5_000_000}},
        kv_transfers=tuple((8.0 + (i % 5), 2.0 + (i % 3)) for i in range(83)),
        kv_bootstraps=tuple((2.0 + (i % 4), 0.5) for i in range(83)),
        failures={"sglang:num_transfer_failed_reqs_total": 1, "sglang:num_prefill_retries_total": 2},
        generation_tokens={None: {"true": 1_500, "false": 500}},
        prompt_tokens={None: {"true": 6_000_000, "false": 2_000_000}},
        cached_tokens={"device": 5_000_000},
        seed=2,
    ),
)


def _scheduler_labels(s: Scenario, rank: Rank) -> dict[str, str]:
    labels = {"model_name": MODEL, "engine_type": s.engine_type, "tp_rank": str(rank.tp),
              "pp_rank": str(rank.pp), "moe_ep_rank": str(rank.ep)}
    if s.priorities:
        labels["priority"] = ""
    if rank.dp is not None:
        labels["dp_rank"] = str(rank.dp)
    return labels


def _tokenizer_labels(s: Scenario) -> dict[str, str]:
    labels = {"model_name": MODEL, "engine_type": s.engine_type}
    if s.priorities:
        labels["priority"] = ""
    return labels


def _extra_values(name: str, extra: tuple[str, ...]) -> list[tuple[str, ...]]:
    combos: list[tuple[str, ...]] = [()]
    for label in extra:
        choices = MODE_VALUES.get(name) if label == "mode" else EXTRA_VALUES.get(label, ("x",))
        combos = [c + (v,) for c in combos for v in choices]
    return combos


def render(s: Scenario, directory: str) -> str:
    """The page of one scenario. Must run in a fresh process (multiprocess mode is chosen at import)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    rng = random.Random(s.seed)
    sched_names = list(_scheduler_labels(s, s.ranks[0]))
    tok_names = list(_tokenizer_labels(s))
    for collector, kind, name, extra, buckets, mode, doc in SPEC:
        if name in CONDITIONAL:
            continue
        names = (sched_names if collector == "scheduler" else tok_names) + list(extra)
        if kind == "gauge":
            metric = Gauge(name, doc, names, registry=None, **({"multiprocess_mode": mode} if mode else {}))
        elif kind == "counter":
            metric = Counter(name, doc, names, registry=None)
        else:
            metric = Histogram(name, doc, names, buckets=buckets, registry=None)
        if collector == "scheduler":
            for i, rank in enumerate(s.ranks):
                _scheduler_metric(s, rank, i, name, kind, extra, metric, rng)
        else:
            _tokenizer_metric(s, name, kind, extra, metric, rng)
    # Gauges in "all" mode carry the writing process's pid: make it a fixed one.
    for path in Path(directory).glob("*.db"):
        stem, _, _pid = path.stem.rpartition("_")
        path.rename(path.with_name(f"{stem}_4242.db"))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return generate_latest(registry).decode()


def _scheduler_metric(s: Scenario, rank: Rank, index: int, name: str, kind: str, extra: tuple, metric, rng) -> None:
    labels = _scheduler_labels(s, rank)
    dp = _dp_of(rank)
    if name in s.gauges:
        value = s.gauges[name][dp]
        if isinstance(value, dict):           # a QueueCount: total under priority="", then per priority
            metric.labels(**labels).set(sum(value.values()))
            for priority, count in value.items():
                metric.labels(**(labels | {"priority": str(priority)})).set(count)
        else:
            metric.labels(**labels).set(value)
        return
    if name in ("sglang:num_retracted_reqs", "sglang:num_paused_reqs"):
        metric.labels(**labels).set(0)          # per log interval; nothing retracted or paused just now
        return
    if name == "sglang:realtime_tokens_total":
        for mode, tokens in s.realtime.get(dp, {}).items():
            metric.labels(**labels, mode=mode).inc(tokens)
        return
    if name == "sglang:num_retracted_requests_total":
        if s.retracted.get(dp):
            metric.labels(**labels).inc(s.retracted[dp])
        return
    if name in ("sglang:kv_transfer_latency_ms", "sglang:kv_transfer_total_mb", "sglang:kv_transfer_speed_gb_s"):
        if index == 0:
            for latency_ms, total_mb in s.kv_transfers:
                value = {"sglang:kv_transfer_latency_ms": latency_ms, "sglang:kv_transfer_total_mb": total_mb,
                         "sglang:kv_transfer_speed_gb_s": (total_mb / 1024) / (latency_ms / 1000)}[name]
                metric.labels(**labels).observe(value)
        return
    if name in ("sglang:kv_transfer_bootstrap_ms", "sglang:kv_transfer_alloc_ms"):
        if index == 0:
            for bootstrap_ms, alloc_ms in s.kv_bootstraps:
                metric.labels(**labels).observe(bootstrap_ms if name.endswith("bootstrap_ms") else alloc_ms)
        return
    if name in ("sglang:num_transfer_failed_reqs_total", "sglang:num_bootstrap_failed_reqs_total",
                "sglang:num_prefill_retries_total", "sglang:num_decode_host_receive_reqs_total",
                "sglang:num_retracted_input_tokens_total", "sglang:num_retracted_output_tokens_total",
                "sglang:dp_cooperation_realtime_tokens_total", "sglang:decode_deferred_kv_release_total",
                "sglang:decode_deferred_kv_release_seconds", "sglang:eplb_balancedness"):
        if index == 0 and s.failures.get(name):
            metric.labels(**labels).inc(s.failures[name])
        return
    if name.startswith("sglang:grammar_") or name.startswith("sglang:num_grammar_") and kind != "gauge":
        return                                  # no structured-output requests in these scenarios
    for values in _extra_values(name, extra):
        child = metric.labels(*labels.values(), *values)
        if kind == "gauge":
            child.set(round(rng.uniform(0, 100), 2))
        elif kind == "counter":
            child.inc(rng.randint(1, 10_000))
        else:
            for _ in range(rng.randint(1, 5)):
                child.observe(rng.uniform(0, 2))


def _tokenizer_metric(s: Scenario, name: str, kind: str, extra: tuple, metric, rng) -> None:
    base = _tokenizer_labels(s)

    def labels(priority) -> dict[str, str]:
        return base | ({"priority": str(priority)} if priority is not None else {})

    if name in ("sglang:generation_tokens_total", "sglang:prompt_tokens_total", "sglang:num_requests_total"):
        table = {"sglang:generation_tokens_total": s.generation_tokens,
                 "sglang:prompt_tokens_total": s.prompt_tokens}.get(name)
        for priority, by_stream in (table or {p: {"true": 90, "false": 10} for p in s.generation_tokens}).items():
            for streaming, value in by_stream.items():
                metric.labels(**labels(priority), is_streaming=streaming).inc(value)
        return
    if name == "sglang:cached_tokens_total":
        for source, value in s.cached_tokens.items():
            metric.labels(**base, cache_source=source).inc(value)
        return
    priorities = list(s.generation_tokens) or [None]
    if name == "sglang:time_to_first_token_seconds":
        for i, (seconds, count) in enumerate(s.ttft):
            for k in range(count):
                metric.labels(**labels(priorities[k % len(priorities)]),
                              is_streaming="true" if k % 4 else "false").observe(seconds)
        return
    if name == "sglang:inter_token_latency_seconds":
        for seconds, tokens in s.itl:
            for k in range(tokens):
                metric.labels(**labels(priorities[k % len(priorities)])).observe(seconds)
        return
    if name in ("sglang:e2e_request_latency_seconds", "sglang:request_time_per_output_token_seconds",
                "sglang:prompt_tokens_histogram", "sglang:uncached_prompt_tokens_histogram",
                "sglang:generation_tokens_histogram"):
        for k in range(20):
            child = metric.labels(**labels(priorities[k % len(priorities)]),
                                  **({"is_streaming": "true"} if extra else {}))
            child.observe(rng.uniform(0.5, 30) if "latency" in name or "per_output" in name
                          else rng.randint(100, 8000))
        return
    if name in ("sglang:startup_time_seconds", "sglang:startup_cuda_graph_time_seconds"):
        for phase in (("load_weight", "kv_cache_allocation", "scheduler_e2e", "tokenizer_e2e")
                      if name == "sglang:startup_time_seconds" else ("decode",)):
            metric.labels(**base, phase=phase).set(round(rng.uniform(1, 60), 3))
        return
    if kind == "counter" and name != "sglang:spec_verify_calls_total":
        metric.labels(**base).inc(rng.randint(0, 50))
    elif kind == "histogram" and name == "sglang:get_loads_duration_seconds":
        for _ in range(10):
            metric.labels(**base).observe(rng.uniform(0.0001, 0.01))


def build(out_dir: Path) -> list[Path]:
    """Render every scenario (each in its own process) into ``out_dir``."""
    import subprocess

    written = []
    for s in SCENARIOS:
        with tempfile.TemporaryDirectory() as tmp:
            page = subprocess.run([sys.executable, __file__, "--render", s.file, tmp], check=True,
                                  capture_output=True, text=True).stdout
        path = out_dir / s.file
        path.write_text(page)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if argv[:1] == ["--render"]:
        scenario = next(s for s in SCENARIOS if s.file == argv[1])
        sys.stdout.write(render(scenario, argv[2]))
        return 0
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent
    for path in build(out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
