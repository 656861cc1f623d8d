"""Per-request samplers, and what of the sampled tokens becomes text: plain functions of their inputs."""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from mlx_lm.generate import Sampler


def request_sampler(temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None) -> Sampler:
    """A sampler with its own random key, so a seed gives the same tokens in any batch.

    Greedy requests share one sampler object, so a greedy batch samples in one call.
    """
    if temperature == 0:
        return greedy_sampler
    # A signed 64-bit seed (OpenAI's range) modulo 2**64: each seed its own key, none shared.
    key = mx.random.key(seed % (1 << 64) if seed is not None else int.from_bytes(os.urandom(8), "little"))
    return SeededSampler(key, temperature, top_p, top_k, min_p)


class SeededSampler:
    """Each token of a sequence is drawn with the next key of its own chain: the n-th token's
    key depends on the seed and n only. A verify step draws several positions at once and
    commits only those it keeps, so a seeded request gives the same tokens with speculation as
    without, whatever was drafted."""

    def __init__(self, key: mx.array, temperature: float, top_p: float, top_k: int, min_p: float) -> None:
        self.key, self.inv_t, self.top_k = key, 1.0 / temperature, top_k
        # mlx-lm compiles each filter per value: rounding keeps that cache small.
        self.top_p, self.min_p = round(top_p, 3), round(min_p, 3)
        self._drawn: list[mx.array] = []

    def __call__(self, logprobs: mx.array) -> mx.array:
        """mlx-lm's one-token step: one row, one key, kept."""
        tokens = self.draw(logprobs)
        self.commit(logprobs.shape[0])
        return tokens

    def draw(self, logprobs: mx.array) -> mx.array:
        """One token per row (consecutive positions of this sequence), each with the next key."""
        out, key, self._drawn = [], self.key, []
        for row in range(logprobs.shape[0]):
            key, step = mx.random.split(key)
            self._drawn.append(key)
            out.append(mx.random.categorical(self._filter(logprobs[row:row + 1]) * self.inv_t, key=step))
        return mx.concatenate(out) if len(out) > 1 else out[0]

    def commit(self, n: int) -> None:
        """The first n drawn positions were kept: the chain goes on after them."""
        if n > 0:
            self.key = self._drawn[n - 1]

    def _filter(self, logprobs: mx.array) -> mx.array:
        if 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if 0 < self.top_k < logprobs.shape[-1]:  # k >= vocab keeps every token
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Tokens that are never part of the text (<s>, <pad>, <|im_start|>...): those that
    `decode(skip_special_tokens=True)` drops. Tokens merely added, such as <think>, stay."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return frozenset(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


class StopText:
    """Cuts the text at the first stop string, holding back what may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to send now, the stop string that ended the text or None)."""
        buf = self.pending + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at, stop = min(hits)
            self.pending = ""
            return buf[:at], stop
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])),
                   default=0)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
