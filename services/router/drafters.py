"""Draft tokens for speculative decoding: guesses of a sequence's next tokens, which one verify
step of the model checks all at once. A drafter is never trusted: a wrong guess costs a position
in the step, never a wrong token, so drafters are plain functions of the tokens so far.

Each sequence gets a state from `start(prompt)`; `propose(state, context, k)` is called with
the whole context so far (prompt, tokens generated, the next token already chosen) and returns
up to k tokens to follow it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shared.errors import ConfigError


class Drafter(Protocol):
    name: str

    def start(self, prompt: list[int]) -> Any: ...

    def propose(self, state: Any, context: list[int], k: int) -> list[int]: ...


@dataclass
class _Index:
    """Where each n-gram of the context last ended, kept as the context grows (it only grows)."""

    sizes: tuple[int, ...]
    seen: int = 0  # context tokens indexed
    ends: dict[tuple[int, ...], int] = field(default_factory=dict)


class PromptLookup:
    """The continuation of the latest earlier occurrence of the context's last n tokens (the
    longest n that occurs), from the prompt and the text so far: free, and right whenever the
    model repeats what it read or wrote (code edits, summaries, agents quoting tool output)."""

    name = "lookup"

    def __init__(self, sizes: tuple[int, ...] = (4, 3, 2)) -> None:
        self.sizes = sizes  # longest first: a longer match predicts better

    def start(self, prompt: list[int]) -> _Index:
        return _Index(self.sizes)

    def propose(self, state: _Index, context: list[int], k: int) -> list[int]:
        # An n-gram ending at j (exclusive) is indexed once j < len(context): it has a next token,
        # and the context's own suffix never matches itself.
        for j in range(max(state.seen, 1), len(context)):
            for n in state.sizes:
                if j >= n:
                    state.ends[(n, *context[j - n:j])] = j
        state.seen = len(context)
        for n in state.sizes:
            if len(context) > n:
                j = state.ends.get((n, *context[len(context) - n:]))
                if j is not None:
                    return context[j:j + k]
        return []


class Replay:
    """For measurement: each prompt's recorded greedy continuation, every drafted token replaced
    by a wrong one with probability 1 - accept, independently and the same way each time a
    position is drafted. Random weights make real drafters' acceptance meaningless; this one's
    is known, so what the verify step gives for an acceptance rate can be measured."""

    name = "replay"

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], accept: float, seed: int = 0,
                 vocab: int = 1 << 16, rates: dict[tuple[int, ...], float] | None = None) -> None:
        self.continuations, self.accept, self.seed, self.vocab = continuations, accept, seed, vocab
        self.rates = rates or {}  # a prompt's own acceptance rate, where it has one

    @classmethod
    def from_file(cls, path: Path, vocab: int = 1 << 16) -> Replay:
        """{"accept": a, "seed": s, "runs": [{"prompt": [ids], "continuation": [ids], "accept"?: a}, ...]}"""
        try:
            spec = json.loads(path.read_text())
            runs = {tuple(r["prompt"]): list(r["continuation"]) for r in spec["runs"]}
            rates = {tuple(r["prompt"]): float(r["accept"]) for r in spec["runs"] if "accept" in r}
            return cls(runs, float(spec["accept"]), int(spec.get("seed", 0)), vocab=vocab, rates=rates)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--draft-replay {path}: not a replay file ({e})") from e

    def start(self, prompt: list[int]) -> tuple[list[int], int, int, float]:
        key = tuple(prompt)
        # ints hash the same in every process: a position's draft is the same each run
        return self.continuations.get(key, []), len(prompt), hash(key), self.rates.get(key, self.accept)

    def propose(self, state: tuple[list[int], int, int, float], context: list[int], k: int) -> list[int]:
        recorded, prompt_len, which, accept = state
        at = len(context) - prompt_len  # generated so far: the next one is recorded[at]
        return [t if random.Random(f"{self.seed}:{which}:{at + j}").random() < accept else (t + 1) % self.vocab
                for j, t in enumerate(recorded[at:at + k])]


@dataclass
class _Drafting:
    cache: list[Any]  # the draft model's own KV cache for this sequence
    fed: int = 0  # context tokens in it


class DraftModel:
    """A small model with the served model's tokenizer, run on the router: its greedy
    continuation. Each sequence keeps the draft model's own KV cache, fed only what the context
    added since the last proposal (its drafted tokens are trimmed again: kept ones come back as
    context). Its memory is outside --kv-budget: a draft model is small."""

    name = "model"
    CHUNK = 512  # prompt tokens per forward pass on a sequence's first proposal

    def __init__(self, model: Any) -> None:
        self.model = model

    def start(self, prompt: list[int]) -> _Drafting:
        from mlx_lm.models.cache import make_prompt_cache
        return _Drafting(make_prompt_cache(self.model))

    def propose(self, state: _Drafting, context: list[int], k: int) -> list[int]:
        import mlx.core as mx
        from mlx_lm.models.cache import trim_prompt_cache
        new = context[state.fed:]
        for at in range(0, len(new), self.CHUNK):
            logits = self.model(mx.array([new[at:at + self.CHUNK]]), cache=state.cache)
        state.fed = len(context)
        out: list[int] = []
        while True:
            out.append(int(mx.argmax(logits[0, -1]).item()))
            if len(out) == k:
                break
            logits = self.model(mx.array([out[-1:]]), cache=state.cache)
        trim_prompt_cache(state.cache, k - 1)  # back to the context
        return out


def make_drafter(speculate: str, draft_model: Path | None, replay: Path | None, tokenizer: Any) -> Drafter | None:
    """The router's drafter from its flags: a replay file (measurement), a draft model, prompt
    lookup, or none. Runs on the MLX thread: a draft model is loaded there."""
    if replay is not None:
        return Replay.from_file(replay, vocab=len(tokenizer.get_vocab()))  # its wrong tokens are still tokens
    if draft_model is not None:
        from mlx_lm import load
        model, theirs = load(str(draft_model))
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"--draft-model {draft_model}: its tokenizer is not the served model's "
                              "(a draft model must share it, token for token)")
        return DraftModel(model)
    return PromptLookup() if speculate == "lookup" else None
