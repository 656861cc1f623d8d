"""Speculative decoding over the bus: several tokens per expert round trip.

A decode step pays one round trip per MoE layer whatever it carries, so a sequence with k
drafted tokens runs k + 1 positions in one step (one message per worker per layer, for all
positions of all sequences) and keeps the drafted tokens the model itself would have chosen,
plus the model's own next one. Each position's token is drawn from the model's distribution
exactly as a one-token step draws it (greedy, or the sequence's own seeded key chain), and a
draft is kept while it equals that token: for drafters that propose one token per position
this is the standard rule (accept with min(1, p/q), else resample from max(0, p - q)) and the
output is the one decoding without drafts gives, token for token.

Rows of a batch may draft different k and keep different lengths: every row runs 1 + max k
positions and drops what it did not keep from its KV cache (`holes.drop_tail`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.models.cache import KVCache, make_prompt_cache

from services.router.draft_policy import DECAY, PROBE_EVERY, choose_k
from services.router.drafters import Drafter
from services.router.holes import HoledKVCache, drop_tail
from services.router.sampling import SeededSampler

@dataclass
class SeqState:
    draft: Any  # the drafter's own state for this sequence
    kept: float = 0.5  # drafted tokens kept, decayed (the prior: a third, so a first draft is one token)
    missed: float = 1.0  # drafts cut short by a rejection, decayed
    idle: int = 0  # steps since it last drafted while off
    dry: int = 0  # proposals in a row the drafter had nothing for
    wait: int = 0  # steps before asking the drafter again after a dry spell

    @property
    def alpha(self) -> float:
        return self.kept / (self.kept + self.missed)

    def k(self, k_max: int) -> int:
        if self.wait > 0:  # the drafter had nothing lately: do not stop the batch to ask it every step
            self.wait -= 1
            return 0
        k = choose_k(self.alpha, k_max)
        if k == 0:
            self.idle += 1
            if self.idle >= PROBE_EVERY:  # the text may have turned repetitive: look again
                self.idle = 0
                return 1
        return k

    def proposed(self, drafts: list[int]) -> None:
        """Nothing proposed: wait 1, 2, 4 ... up to PROBE_EVERY steps before asking again."""
        self.dry = 0 if drafts else self.dry + 1
        self.wait = min(1 << (self.dry - 1), PROBE_EVERY) if self.dry else 0

    def record(self, drafted: int, kept: int) -> None:
        self.kept = DECAY * self.kept + kept
        self.missed = DECAY * self.missed + (kept < drafted)


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verify steps
    tokens: int = 0  # tokens verify steps yielded (kept drafts + the model's own)
    draft_seconds: float = 0.0  # spent proposing (a draft model's own forward passes)


@dataclass
class Speculation:
    """What a lane's batch drafts: the drafter, the most tokens a sequence drafts, and the
    batch size from which it stops (there the batch already fills each round trip)."""

    drafter: Drafter
    k_max: int = 4
    max_running: int = 4
    states: dict[int, SeqState] = field(default_factory=dict)  # by BatchGenerator uid
    stats: SpecStats = field(default_factory=SpecStats)

    def plan(self, batch: GenerationBatch) -> tuple[list[int], list[list[int]]] | None:
        """Each row's next token (already chosen) and its drafts; None: a one-token step."""
        if len(batch.uids) > self.max_running:
            return None
        ks = []
        for i, uid in enumerate(batch.uids):
            state = self.states.get(uid)
            room = batch.max_tokens[i] - batch._num_tokens[i] - 1  # never past max_tokens, so never past the context
            constrained = bool(batch.logits_processors and batch.logits_processors[i])  # a grammar sees one token a step
            ks.append(0 if state is None or constrained else max(0, min(state.k(self.k_max), room)))
        if not any(ks):
            return None
        mx.eval(batch._next_tokens)
        pending = batch._next_tokens.tolist()
        vocab = batch._next_logprobs[0].shape[-1]  # the model's: an id past it has no embedding
        drafts = []
        for i, (uid, k) in enumerate(zip(batch.uids, ks)):
            if not k:
                drafts.append([])
                continue
            state, started = self.states[uid], time.perf_counter()
            drafts.append(_valid(self.drafter.propose(state.draft, [*batch.tokens[i], pending[i]], k)[:k], vocab))
            self.stats.draft_seconds += time.perf_counter() - started
            state.proposed(drafts[-1])
        return (pending, drafts) if any(drafts) else None

    def record(self, uid: int, drafted: int, kept: int) -> None:
        if drafted:
            self.states[uid].record(drafted, kept)
            self.stats.drafted += drafted
            self.stats.accepted += kept


def _valid(drafts: list[int], vocab: int) -> list[int]:
    """The drafts up to the first id outside the vocabulary: the embedding lookup of one would
    read past the table (whatever memory lies there), and no model's token can equal it."""
    for n, t in enumerate(drafts):
        if not 0 <= t < vocab:
            return drafts[:n]
    return drafts


def supported(model: Any) -> bool:
    """Only plain KV caches can drop a rejected tail; recurrent or sliding-window state cannot."""
    return all(type(c) is KVCache for c in make_prompt_cache(model))


class SpecBatch(GenerationBatch):
    """mlx-lm's decode batch with a verify step: when some row has drafts, one step runs them
    all; otherwise mlx-lm's own one-token step."""

    spec: Speculation

    def next(self) -> list:
        if not self.uids:
            return []
        plan = self.spec.plan(self)
        return super().next() if plan is None else self._verify(*plan)

    def extend(self, batch: GenerationBatch) -> None:
        for uid, tokens in zip(batch.uids, batch.tokens):  # what is in its cache so far: the prompt
            self.spec.states[uid] = SeqState(self.spec.drafter.start(list(tokens)))
        super().extend(batch)
        self.prompt_cache = [HoledKVCache.adopt(c) for c in self.prompt_cache]  # rows may drop unlike amounts

    def filter(self, keep: list[int]) -> None:
        gone = set(self.uids) - {self.uids[i] for i in keep}
        super().filter(keep)
        for uid in gone:
            self.spec.states.pop(uid, None)

    def _verify(self, pending: list[int], drafts: list[list[int]]) -> list:
        n, k = len(self.uids), max(len(d) for d in drafts)
        rows = [[p, *d, *[d[-1] if d else p] * (k - len(d))] for p, d in zip(pending, drafts)]  # filler: never kept
        inputs = mx.array(rows, dtype=self._next_tokens.dtype)
        logits = self.model(inputs, cache=self.prompt_cache)
        if any(self.logits_processors):  # rows with processors drafted nothing: position 0 only
            logits = mx.stack([self._process(e, inputs, logits[e]) for e in range(n)])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        samplers = [self.fallback_sampler if s is None else s for s in (self.samplers or [None] * n)]
        drawn = [s.draw(logprobs[e, :len(drafts[e]) + 1]) if isinstance(s, SeededSampler)
                 else s(logprobs[e, :len(drafts[e]) + 1]) for e, s in enumerate(samplers)]
        mx.eval(drawn, logprobs)
        kept, nexts = [], []
        for e, (d, tokens) in enumerate(zip(drafts, drawn)):
            y, a = tokens.tolist(), 0
            while a < len(d) and y[a] == d[a]:
                a += 1
            if isinstance(samplers[e], SeededSampler):
                samplers[e].commit(a + 1)
            self.spec.record(self.uids[e], len(d), a)
            kept.append(a)
            nexts.append(y[a])
        drop_tail(self.prompt_cache, [k - a for a in kept])
        self.spec.stats.steps += 1
        self.spec.stats.tokens += sum(kept) + n
        out = [[(pending[e], self._next_logprobs[e]), *((drafts[e][j], logprobs[e, j]) for j in range(kept[e]))]
               for e in range(n)]
        self._next_tokens = mx.array(nexts, dtype=self._next_tokens.dtype)
        self._next_logprobs = [logprobs[e, kept[e]] for e in range(n)]
        return self._respond(out)

    def _process(self, e: int, inputs: mx.array, row: mx.array) -> mx.array:
        if not self.logits_processors[e]:
            return row
        context = self._token_context[e].update_and_fetch(inputs[e:e + 1, 0])
        first = row[None, 0]
        for processor in self.logits_processors[e]:
            first = processor(context, first)
        return mx.concatenate([first, row[1:]])

    def _respond(self, out: list[list[tuple[int, mx.array]]]) -> list:
        """Each row's tokens in order, as one-token steps report them; a row ends at its first
        stop or at max_tokens, and what it wrote after that in this step is forgotten."""
        responses, keep = [], []
        for e, tokens in enumerate(out):
            finish = None
            for at, (token, lp) in enumerate(tokens):
                self.tokens[e].append(token)
                self._num_tokens[e] += 1
                if self._num_tokens[e] >= self.max_tokens[e]:
                    finish = "length"
                if self._matchers[e].advance(token):
                    finish = "stop"
                if finish is None:
                    responses.append(self.Response(self.uids[e], token, lp, None, None, None))
                    continue
                cache = self.extract_cache(e)
                for c in cache:
                    c.trim(len(tokens) - 1 - at)
                responses.append(self.Response(self.uids[e], token, lp, finish, cache, self.tokens[e]))
                break
            if finish is None:
                keep.append(e)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses


def install(gen: BatchGenerator, spec: Speculation) -> bool:
    """Give `gen` a decode batch that speculates; False (and nothing changed) where it cannot."""
    batch = getattr(gen, "_generation_batch", None)
    if type(batch) is not GenerationBatch or batch.uids or not supported(gen.model):
        return False
    spec_batch = SpecBatch.empty(gen.model, gen.sampler)
    spec_batch.spec = spec
    gen._generation_batch = spec_batch
    return True

