"""KV memory: what one sequence's cache costs at the model's real size, and the budget that
decides when a sequence may start.

A sequence reserves what its cache can grow to when it joins a lane and gives it back when it
ends. What it reserves is what mlx-lm allocates, not the cache's logical size: a batch pads a
lane's rows to its longest and grows them 256 tokens at a time, so one long sequence makes every
row of its lane long. The engine copies a lane's arrays to their own size when a sequence leaves
(`compact`), so the memory comes back when the reservation does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, BatchKVCache, RotatingKVCache, make_prompt_cache

from services.defaults import KV_SHARE
from services.router.holes import HOLE_LIMIT
from shared.errors import BadRequest

_KV_HEADS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")  # mlx-lm's attention modules' spellings


@dataclass(frozen=True)
class KVSize:
    """Per cached layer: (bytes one token adds, the most tokens it keeps; None: all of them)."""

    layers: tuple[tuple[int, int | None], ...]

    @property
    def per_token(self) -> int:
        return sum(w for w, _ in self.layers)

    def bytes_for(self, tokens: int) -> int:
        return sum(w * (tokens if cap is None else min(tokens, cap)) for w, cap in self.layers)

    def tokens_within(self, budget: int) -> int:
        """The longest sequence whose cache fits `budget` (a sliding window's layers stop growing)."""
        lo, hi = 0, 1
        while self.bytes_for(hi) <= budget and hi < 1 << 40:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.bytes_for(mid) <= budget else (lo, mid)
        return lo


def kv_size(model: nn.Module, config: dict) -> KVSize:
    """What a sequence's cache costs per layer, read from the model's own attention modules and
    cache objects (mlx-lm's `make_prompt_cache`, as `BatchGenerator` makes them): K and V of
    n_kv_heads x head_dim each, in the activations' dtype. Recurrent state (ArraysCache) is a
    fixed size per sequence, not per token, and is not counted."""
    layers = list(getattr(model, "layers", []))
    caches = make_prompt_cache(model)
    if not layers or len(layers) != len(caches):
        return _from_config(config)
    out: list[tuple[int, int | None]] = []
    for layer, cache in zip(layers, caches):
        if isinstance(cache, ArraysCache):
            continue
        width = _layer_width(layer)
        if width is None:
            return _from_config(config)
        out.append((width, cache.max_size if isinstance(cache, RotatingKVCache) else None))
    return KVSize(tuple(out))


def _layer_width(layer: nn.Module) -> int | None:
    """Bytes of one token's K and V in this layer; None when no attention module is recognised."""
    for _, m in layer.named_modules():
        heads = next((getattr(m, a) for a in _KV_HEADS if isinstance(getattr(m, a, None), int)), None)
        if heads is None:
            continue
        k_dim = getattr(m, "head_dim", None)
        if not isinstance(k_dim, int):
            k_dim = _out_features(m, "k_proj") // heads if _out_features(m, "k_proj") else None
        if not k_dim:
            return None
        v_dim = _out_features(m, "v_proj") // heads if _out_features(m, "v_proj") else k_dim
        floats = [v.dtype for _, v in tree_flatten(m.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
        if not floats:
            return None
        itemsize = max(d.size for d in floats)  # the activations take the widest: mixed dtypes promote
        return heads * (k_dim + v_dim) * itemsize
    return None


def _out_features(m: nn.Module, name: str) -> int:
    proj = getattr(m, name, None)
    weight = getattr(proj, "weight", None) if proj is not None else None
    return int(weight.shape[0]) if weight is not None else 0  # a quantized weight packs its inputs, not outputs


def _from_config(config: dict) -> KVSize:
    """Models whose attention the walk does not recognise: the usual config keys, fp16/bf16."""
    attn = config.get("attn_config") or {}
    n_layers = int(config.get("num_hidden_layers") or config.get("n_layers") or 0)
    n_heads = int(config.get("num_attention_heads") or config.get("n_heads") or 1)
    heads = int(config.get("num_key_value_heads") or attn.get("kv_n_heads") or n_heads)
    head_dim = int(config.get("head_dim") or (config.get("hidden_size") or config.get("d_model") or 0) // n_heads)
    itemsize = 4 if str(config.get("torch_dtype", config.get("dtype", ""))) == "float32" else 2
    return KVSize(((2 * heads * head_dim * itemsize, None),) * n_layers)


def machine_memory() -> int:
    """The machine's memory as the router sees it: Metal's recommended working set, else physical memory."""
    if mx.metal.is_available():
        size = int(mx.device_info().get("max_recommended_working_set_size", 0))
        if size > 0:
            return size
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(weights_bytes: int, memory: int) -> int:
    """--kv-budget unset: a share (KV_SHARE) of what the machine has once the router's own weights
    are out, leaving the rest to the experts (workers, flash-cache) and the prompt cache."""
    return max(1, int(KV_SHARE * max(0, memory - weights_bytes)))


def weights_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


STEP = 256  # tokens: mlx-lm's KV caches grow this many at a time (KVCache.step, BatchKVCache.step)
SLACK = STEP + HOLE_LIMIT  # beyond a row's tokens: a growth step, and speculation's dropped positions


def lane_bytes(size: KVSize, totals: list[int]) -> int:
    """The most KV memory mlx-lm's batch can hold for one lane's sequences, each growing to
    `totals[i]` tokens: a lane's rows are aligned to its longest and grown a step at a time, so
    every row can be as long as the longest sequence plus one step (and the positions
    speculative decoding dropped but has not squeezed out yet)."""
    return len(totals) * size.bytes_for(max(totals) + SLACK) if totals else 0


@dataclass
class KVBudget:
    """Lanes' KV memory, as mlx-lm allocates it (`lane_bytes`), against a byte budget. A sequence
    reserves its whole life, prompt plus `max_tokens` (bounded by the context), when it joins a
    lane and gives it back when it ends. Reserved and released on the MLX threads; `in_use` is
    read by the event loop."""

    size: KVSize
    budget: int
    max_context: int = 1 << 31
    in_use: int = 0
    in_use_max: int = 0  # the most reserved at once: what sampling `in_use` can miss
    lanes: dict[int, dict[str, int]] = field(default_factory=dict)  # lane -> request -> tokens at its end

    def tokens(self, prompt_tokens: int, max_tokens: int) -> int:
        return min(prompt_tokens + max_tokens, self.max_context)  # the context ends a sequence first

    def need(self, prompt_tokens: int, max_tokens: int) -> int:
        """What one sequence alone in a lane holds."""
        return lane_bytes(self.size, [self.tokens(prompt_tokens, max_tokens)])

    def cost(self, lane: int, prompt_tokens: int, max_tokens: int) -> int:
        """What joining `lane` adds: its own row, and every other row's growth to it if it is the longest."""
        totals = list(self.lanes.get(lane, {}).values())
        return lane_bytes(self.size, totals + [self.tokens(prompt_tokens, max_tokens)]) - lane_bytes(self.size, totals)

    def reserve(self, request_id: str, lane: int, prompt_tokens: int, max_tokens: int) -> bool:
        if not fits(self.in_use, self.cost(lane, prompt_tokens, max_tokens), self.budget):
            return False
        self.lanes.setdefault(lane, {})[request_id] = self.tokens(prompt_tokens, max_tokens)
        self._total()
        return True

    def release(self, request_id: str) -> None:
        for seqs in self.lanes.values():
            if seqs.pop(request_id, None) is not None:
                self._total()
                return

    def _total(self) -> None:
        self.in_use = sum(lane_bytes(self.size, list(seqs.values())) for seqs in self.lanes.values())
        self.in_use_max = max(self.in_use_max, self.in_use)

    @property
    def reserved(self) -> dict[str, int]:
        return {rid: t for seqs in self.lanes.values() for rid, t in seqs.items()}

    def refusal(self, prompt_tokens: int, max_tokens: int) -> BadRequest | None:
        """Why a request can never start, however long it waits; None when it can."""
        need = self.need(prompt_tokens, max_tokens)
        if need <= self.budget:
            return None
        tokens = self.tokens(prompt_tokens, max_tokens)
        fit = max(0, self.size.tokens_within(self.budget) - SLACK)
        return BadRequest(f"this request needs {need} bytes of KV cache ({prompt_tokens} prompt + "
                          f"{tokens - prompt_tokens} max_tokens tokens, and the {SLACK} more its cache can hold, at "
                          f"{self.size.per_token} bytes each); the budget is {self.budget} bytes (--kv-budget): at "
                          f"most {fit} tokens fit", "max_tokens" if prompt_tokens < fit else None)


def fits(in_use: int, need: int, budget: int) -> bool:
    return in_use + need <= budget


def compact(gen: object) -> None:
    """After a sequence leaves, mlx-lm's batch keeps the others' rows as views into the old,
    longer arrays, which stay allocated until the lane next grows: copy each layer's K and V to
    their own length (plus the step the next token would grow them by) so that memory is free
    when the reservation is. A batch laid out otherwise is left alone."""
    batches = (getattr(gen, "_prompt_batch", None), getattr(gen, "_generation_batch", None))
    fresh = []
    for cache in (c for b in batches for c in getattr(b, "prompt_cache", None) or ()):
        if isinstance(cache, BatchKVCache) and cache.keys is not None and cache.keys.shape[0] > 0:
            cache.keys, cache.values = _own(cache.keys, cache._idx), _own(cache.values, cache._idx)
            fresh += [cache.keys, cache.values]
    mx.eval(fresh)  # now, so the old arrays are gone before the next sequence's prefill


def _own(a: mx.array, used: int) -> mx.array:
    b, h, _, d = a.shape
    return mx.concatenate([a[..., :used, :], mx.zeros((b, h, STEP, d), a.dtype)], axis=2)


def unbounded() -> KVBudget:
    """No budget: engines built outside the router (benchmarks, tests) admit by count only."""
    return KVBudget(KVSize(()), 1 << 62)
