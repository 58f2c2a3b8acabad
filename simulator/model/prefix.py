"""A prefill instance's own prefix cache (pure): an LRU of KV blocks.

vLLM's automatic prefix caching and SGLang's radix cache keep the KV of earlier
prompts in the instance's free KV memory and reuse the longest cached prefix of a new
prompt, block by block; the cache is per instance, so how requests are routed decides
the hit rate. Blocks are the trace's prompt block hashes (Mooncake ``hash_ids``, one
per 512 tokens); a hit counts only for a run of leading blocks (a prefix).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

BLOCK_TOKENS = 512


class PrefixCache:
    """LRU of block hashes holding at most ``capacity_tokens`` tokens."""

    def __init__(self, capacity_tokens: int, *, block_tokens: int = BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self.capacity = max(0, capacity_tokens // block_tokens)
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0

    def peek(self, hashes: Sequence[int]) -> int:
        """Tokens of the leading blocks already cached (no change to the cache)."""
        hit = 0
        blocks = self.blocks
        for h in hashes:
            if h not in blocks:
                break
            hit += 1
        return hit * self.block_tokens

    def lookup(self, hashes: Sequence[int]) -> int:
        """Cached prefix tokens of a prompt, then record all its blocks as most recent."""
        hit = self.peek(hashes)
        blocks = self.blocks
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        self.queries += len(hashes) * self.block_tokens
        self.hits += hit
        return hit
