"""Prompt reuse across requests: the KV caches of sequences that finished, kept in mlx-lm's
`LRUPromptCache` (a token trie, least recently used out first) within a byte budget, so a new
request prefills only what its longest cached prefix lacks.

A conversation's turn N+1 resends turn N's prompt and answer: the sequence that answered turn N
is in the cache, and a cache that can be trimmed is cut back to the longest common prefix (the
template may write the answer back differently from how it was generated). A cache that cannot
be trimmed (recurrent state, as in linear-attention layers) is reused only when its tokens are
an exact prefix of the new prompt.

Both lanes use one cache: they run on their own threads, so every call holds a lock, and what
goes in is evaluated first (an unevaluated MLX array belongs to its thread's stream).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

_MODEL = "model"  # the trie's key: one router, one model


@dataclass
class Reuse:
    cache: list[Any] | None  # the layers' caches for prompt[:cached], or None: a cold start
    cached: int  # prompt tokens that need no prefill


class PromptCache:
    def __init__(self, max_bytes: int, max_entries: int = 1 << 16) -> None:
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.cached_tokens = 0  # prompt tokens served from the cache, in all

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def fetch(self, prompt: list[int]) -> Reuse:
        """The longest cached prefix of `prompt`, leaving at least its last token to prefill
        (generation starts from a token)."""
        with self._lock:
            cache, rest = self._lru.fetch_nearest_cache(_MODEL, prompt)
        if cache is not None and not rest:  # the whole prompt: step back one token
            if not can_trim_prompt_cache(cache):
                cache = None
            else:
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
        cached = len(prompt) - len(rest) if cache is not None else 0
        with self._lock:
            if cached:
                self.hits += 1
                self.cached_tokens += cached
            else:
                self.misses += 1
        return Reuse(cache if cached else None, cached)

    def insert(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep a finished sequence's cache, whose entries hold `tokens`; the least recently
        used go first when the budget is passed (one larger than the budget is not kept)."""
        if not tokens or not cache:
            return
        mx.eval([c.state for c in cache])
        if sum(c.nbytes for c in cache) > self.max_bytes:
            return
        with self._lock:
            self._lru.insert_cache(_MODEL, list(tokens), cache)

    def stats(self) -> dict[str, float]:
        return {"prompt_cache_bytes": float(self.nbytes), "prompt_cache_budget_bytes": float(self.max_bytes),
                "prompt_cache_entries": float(len(self._lru)), "prompt_cache_hits": float(self.hits),
                "prompt_cache_misses": float(self.misses), "prompt_cache_tokens_reused": float(self.cached_tokens)}
