"""A decode batch's KV cache where rows forget different numbers of their last positions.

After a verify step each row keeps its own number of drafted positions, but mlx-lm's batch cache
has one write index for all rows. Moving every row's K and V so the rows end together costs a
copy of the whole batch cache each step, more than the step itself once sequences are long or
several. Instead a row's dropped positions stay where they are as *holes*: the attention mask
hides them (the cache already gives RoPE each row's own position), and they are squeezed out
only when some row holds HOLE_LIMIT of them, or when a row leaves for the prompt cache.

`HoledKVCache` is mlx-lm's `BatchKVCache` with a (rows, positions) hole map kept through every
operation the batch performs on it (grow, trim, filter, extend, extract).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

HOLE_LIMIT = 32  # positions a row may hold as holes before the batch is squeezed


class HoledKVCache(BatchKVCache):
    hole: mx.array | None = None  # (rows, _idx) True where a position was dropped; None: none

    @classmethod
    def adopt(cls, cache: BatchKVCache) -> HoledKVCache:
        if not isinstance(cache, HoledKVCache):
            cache.__class__ = cls  # the same arrays and counters, with the hole map's behaviour
            cache.hole = None
        return cache

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        out = super().update_and_fetch(keys, values)
        if self.hole is not None:
            self.hole = mx.concatenate([self.hole, mx.zeros((self.hole.shape[0], keys.shape[2]), mx.bool_)], axis=1)
        return out

    def make_mask(self, N: int, return_array: bool = False, **kwargs):  # noqa: N803 - mlx-lm's name
        mask = super().make_mask(N, return_array=return_array, **kwargs)
        if self.hole is None:
            return mask
        seen = ~mx.concatenate([self.hole, mx.zeros((self.hole.shape[0], N), mx.bool_)], axis=1)
        return mask & seen[:, None, None, :]

    def trim(self, n: int) -> int:
        n = super().trim(n)
        if self.hole is not None:
            self.hole = self.hole[:, :self._idx]
        return n

    def filter(self, batch_indices) -> None:
        before = self._idx
        super().filter(batch_indices)
        if self.hole is not None:
            self.hole = self.hole[mx.array(list(batch_indices))][:, before - self._idx:]  # its left shift too

    def extend(self, other: BatchKVCache) -> None:
        mine, theirs = (self.hole, self._idx, len(self.offset)), (getattr(other, "hole", None), other._idx,
                                                                  len(other.offset))
        super().extend(other)
        if mine[0] is None and theirs[0] is None:
            return
        rows = [mx.concatenate([mx.zeros((n, self._idx - idx), mx.bool_),
                                h if h is not None else mx.zeros((n, idx), mx.bool_)], axis=1)
                for h, idx, n in (mine, theirs)]
        self.hole = mx.concatenate(rows, axis=0)

    def extract(self, idx: int):
        cache = super().extract(idx)
        if self.hole is None:
            return cache
        padding = int(self.left_padding[idx].item())
        kept = np.flatnonzero(~np.array(self.hole[idx, padding:self._idx]))
        if len(kept) < cache.keys.shape[2]:
            at = mx.array(kept)
            cache.keys = mx.contiguous(mx.take(cache.keys, at, axis=2))
            cache.values = mx.contiguous(mx.take(cache.values, at, axis=2))
            cache.offset = len(kept)
        return cache

    def drop(self, extra: list[int]) -> None:
        """Row b forgets its last extra[b] positions (RoPE's positions go back with them)."""
        if not any(extra) or self.keys is None:
            return
        n = self._idx
        tail = mx.arange(n)[None, :] >= (n - mx.array(extra))[:, None]
        self.hole = tail if self.hole is None else self.hole | tail
        self.offset = self.offset - mx.array(extra)

    def holes(self) -> int:
        return 0 if self.hole is None else int(self.hole.sum(axis=1).max().item())

    def squeeze(self) -> None:
        """Each row's kept positions moved to its end, the holes to its left padding."""
        if self.hole is None:
            return
        n, hole, padding = self._idx, np.array(self.hole), np.array(self.left_padding)
        order = np.empty((len(hole), n), np.int32)
        for b in range(len(hole)):
            kept = np.flatnonzero(~hole[b] & (np.arange(n) >= padding[b]))
            order[b] = np.concatenate([np.zeros(n - len(kept), np.int32), kept])
            padding[b] = n - len(kept)
        where = mx.array(order)[:, None, :, None]
        self.keys = mx.concatenate([mx.take_along_axis(self.keys[..., :n, :], where, axis=2), self.keys[..., n:, :]],
                                   axis=2)
        self.values = mx.concatenate([mx.take_along_axis(self.values[..., :n, :], where, axis=2),
                                      self.values[..., n:, :]], axis=2)
        self.left_padding = mx.array(padding)
        self.hole = None


def drop_tail(caches: list, drop: list[int]) -> None:
    """Forget the last drop[b] positions of each row b: the part all rows drop is trimmed, the
    rest become holes; squeezed out once a row holds HOLE_LIMIT of them."""
    common = min(drop)
    extra = [d - common for d in drop]
    for c in caches:
        c.trim(common)
        c.drop(extra)
    if any(extra) and caches and caches[0].holes() >= HOLE_LIMIT:
        for c in caches:
            c.squeeze()
