"""KV memory: what one sequence's cache costs at the model's real size, and the budget that
decides when a sequence may start.

A sequence reserves its whole cache, prompt plus `max_tokens` (bounded by the context), when it
joins a lane, and gives it back when it ends: the sum of reservations never passes the budget.
That sum is the caches' logical size; mlx-lm's batch allocates in 256-token steps and pads a
lane's shorter sequences to its longest, so its arrays can be larger by that much.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, RotatingKVCache, make_prompt_cache

from services.defaults import KV_SHARE
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


@dataclass
class KVBudget:
    """Reservations of running sequences against a byte budget. Reserved on the MLX thread when
    a sequence joins a lane, released where it ends; `in_use` is read by the event loop."""

    size: KVSize
    budget: int
    max_context: int = 1 << 31
    in_use: int = 0
    in_use_max: int = 0  # the most reserved at once: what sampling `in_use` can miss
    reserved: dict[str, int] = field(default_factory=dict)

    def tokens(self, prompt_tokens: int, max_tokens: int) -> int:
        return min(prompt_tokens + max_tokens, self.max_context)  # the context ends a sequence first

    def need(self, prompt_tokens: int, max_tokens: int) -> int:
        return self.size.bytes_for(self.tokens(prompt_tokens, max_tokens))

    def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int) -> bool:
        need = self.need(prompt_tokens, max_tokens)
        if not fits(self.in_use, need, self.budget):
            return False
        self.reserved[request_id] = need
        self.in_use += need
        self.in_use_max = max(self.in_use_max, self.in_use)
        return True

    def release(self, request_id: str) -> None:
        self.in_use -= self.reserved.pop(request_id, 0)

    def refusal(self, prompt_tokens: int, max_tokens: int) -> BadRequest | None:
        """Why a request can never start, however long it waits; None when it can."""
        need = self.need(prompt_tokens, max_tokens)
        if need <= self.budget:
            return None
        completion, fit = self.tokens(prompt_tokens, max_tokens) - prompt_tokens, self.size.tokens_within(self.budget)
        return BadRequest(f"this request needs {need} bytes of KV cache ({prompt_tokens} prompt + {completion} "
                          f"max_tokens tokens at {self.size.per_token} bytes each); the budget is {self.budget} bytes "
                          f"(--kv-budget): at most {fit} tokens fit",
                          "max_tokens" if prompt_tokens < fit else None)  # else a shorter max_tokens cannot help


def fits(in_use: int, need: int, budget: int) -> bool:
    return in_use + need <= budget


def unbounded() -> KVBudget:
    """No budget: engines built outside the router (benchmarks, tests) admit by count only."""
    return KVBudget(KVSize(()), 1 << 62)
