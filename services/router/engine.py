"""Continuous batching on the router: sequences join between decode steps and leave when done.

The batching itself is mlx-lm's `BatchGenerator`; the model inside it has its experts on the
bus, so one decode step of B sequences is one message per worker per MoE layer for all B.
Everything here runs on the router's MLX thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator

from services.router.sampling import StopText, request_sampler
from shared.errors import MoebusError
from shared.logs import get_logger
from shared.messages import GenerateEvent, GenerateRequest

log = get_logger("engine")
# Receives each step's events, (stream subject, event), in order: one hand-off per step.
Publish = Callable[[list[tuple[str, GenerateEvent]]], None]


@dataclass(frozen=True)
class EngineLimits:
    max_running: int = 16  # sequences decoded together
    max_waiting: int = 64  # accepted but not yet decoding; beyond that, 429
    prefill_step: int = 512  # prompt tokens per step, so long prompts do not stall streams


@dataclass
class Sequence:
    req: GenerateRequest
    prompt: list[int]
    detok: Any
    stops: StopText
    deadline: float
    started: bool = False
    n: int = 0
    index: int = 0


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, limits: EngineLimits, publish: Publish) -> None:
        self.model = model
        self.publish = publish
        self._out: list[tuple[str, GenerateEvent]] = []
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos = sorted(tokenizer.eos_token_ids)
        self.seqs: dict[int, Sequence] = {}
        self.uids: dict[str, int] = {}
        self.cancelled: dict[str, None] = {}  # insertion-ordered: the oldest go first
        self.running = 0  # read by the event loop for status and admission
        self.waiting = 0
        self.gen = self._generator()

    def _generator(self) -> BatchGenerator:
        return BatchGenerator(
            self.model, stop_tokens=[[e] for e in self.eos], completion_batch_size=self.limits.max_running,
            prefill_batch_size=min(8, self.limits.max_running), prefill_step_size=self.limits.prefill_step,
        )

    def add(self, req: GenerateRequest, prompt: list[int]) -> None:
        seq = Sequence(req, prompt, self.tokenizer.detokenizer, StopText(req.stop),
                       time.monotonic() + req.timeout_s)
        if req.request_id in self.cancelled:  # the gateway gave up before we got to it
            self.cancelled.pop(req.request_id)
            self._emit(seq, GenerateEvent(req.request_id, 0, finish_reason="error", error="cancelled"))
            self._flush()
            return
        try:
            sampler = request_sampler(req.temperature, req.top_p, req.top_k, req.min_p, req.seed)
            (uid,) = self.gen.insert([prompt], max_tokens=[req.max_tokens], samplers=[sampler])
        except Exception as e:  # noqa: BLE001 - the request was accepted: it must hear why it ends
            self._emit(seq, GenerateEvent(req.request_id, 0, finish_reason="error", error=f"cannot start: {e!r}"))
            self._flush()
            return
        self.seqs[uid] = seq
        self.uids[req.request_id] = uid
        self._count()

    def fail_all(self, error: str) -> None:
        """Every sequence ends with `error` (a failed step, or shutdown); the batch starts afresh."""
        self.gen = self._generator()  # its batch state is unknown after a failure
        for uid in list(self.seqs):
            self._fail(uid, error, in_batch=False)
        self._flush()

    def cancel(self, request_id: str) -> None:
        uid = self.uids.get(request_id)
        if uid is None:  # not added yet: remember, a few hundred at most
            self.cancelled[request_id] = None
            while len(self.cancelled) > 512:
                self.cancelled.pop(next(iter(self.cancelled)))
        else:
            self._fail(uid, "cancelled: the client went away")
            self._flush()

    def step(self) -> bool:
        """One decode step for every running sequence; False when there is nothing to do."""
        try:
            return self._step()
        finally:
            self._flush()

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self.publish(out)

    def _step(self) -> bool:
        if not self.seqs:
            return False
        now = time.monotonic()
        for uid, seq in list(self.seqs.items()):
            if now > seq.deadline:
                self._fail(uid, f"request deadline of {seq.req.timeout_s:g}s exceeded")
        if not self.seqs:
            return False
        try:
            _, responses = self.gen.next()
        except Exception as e:  # noqa: BLE001 - every sequence of the step hears of it
            error = str(e) if isinstance(e, MoebusError) else f"internal error: {e!r}"
            log.warning("decode step failed", error=error, sequences=len(self.seqs))
            self.fail_all(error)
            return False
        for r in responses:
            if r.uid in self.seqs:
                self._on_token(r.uid, self.seqs[r.uid], r.token, r.logprobs, r.finish_reason)
        self._count()
        return bool(self.seqs)

    def _on_token(self, uid: int, seq: Sequence, token: int, logprobs: mx.array, finish: str | None) -> None:
        seq.started = True
        in_batch = finish is None  # BatchGenerator has let go of sequences it finished
        text, stop_sequence, extra = "", None, {}
        if token not in self.eos or finish != "stop":
            seq.n += 1
            seq.detok.add_token(token)
            text, stop_sequence = seq.stops.feed(seq.detok.last_segment)
            if seq.req.logprobs:
                extra = self._logprobs(token, logprobs, seq.req.top_logprobs)
        elif finish == "stop":
            token = None  # the end-of-sequence token itself is not part of the text
        if stop_sequence is not None:
            finish = "stop"
        elif finish is not None:
            seq.detok.finalize()
            tail, stop_sequence = seq.stops.feed(seq.detok.last_segment)
            text += tail + ("" if stop_sequence else seq.stops.flush())
        done = finish is not None
        self._emit(seq, GenerateEvent(seq.req.request_id, seq.index, text, token, finish,
                               len(seq.prompt) if done else 0, seq.n if done else 0,
                               stop_sequence=stop_sequence, **extra))
        seq.index += 1
        if done:
            self._drop(uid, still_in_batch=in_batch)

    def _logprobs(self, token: int, logprobs: mx.array, top: int) -> dict:
        out: dict = {"logprob": logprobs[token].item(), "token_text": self.tokenizer.decode([token])}
        if top > 0:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            pairs = sorted(zip(ids.tolist(), logprobs[ids].tolist()), key=lambda p: -p[1])
            out["top_logprobs"] = [[self.tokenizer.decode([i]), lp] for i, lp in pairs]
        return out

    def _fail(self, uid: int, error: str, in_batch: bool = True) -> None:
        seq = self.seqs[uid]
        self._emit(seq, GenerateEvent(seq.req.request_id, seq.index, finish_reason="error", error=error,
                               prompt_tokens=len(seq.prompt), completion_tokens=seq.n))
        self._drop(uid, still_in_batch=in_batch)

    def _emit(self, seq: Sequence, event: GenerateEvent) -> None:
        self._out.append((seq.req.stream, event))

    def _drop(self, uid: int, still_in_batch: bool = True) -> None:
        seq = self.seqs.pop(uid, None)
        if seq is not None:
            self.uids.pop(seq.req.request_id, None)
        if still_in_batch:
            self.gen.remove([uid])  # frees its KV cache
        self._count()

    def _count(self) -> None:
        self.running = sum(s.started for s in self.seqs.values())
        self.waiting = len(self.seqs) - self.running
