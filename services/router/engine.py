"""Continuous batching on the router: sequences join between decode steps and leave when done.

The batching itself is mlx-lm's `BatchGenerator`; the model inside it has its experts on the
bus, so one decode step of B sequences is one message per worker per MoE layer for all B.

With two micro-batches ("lanes"), sequences are split between two generators and each step
runs both at once, on two threads that take turns at MLX (a `Baton`): while one lane waits on
its expert round trip, the other computes attention. Lane 0 runs on the router's MLX thread;
everything a lane does (insert, step, remove) runs on that lane's own thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator

from services import defaults
from services.router.constrain import GrammarProcessor
from services.router.drafters import Drafter
from services.router.kv import KVBudget, compact, unbounded
from services.router.output import Splitter, initial_state, machines
from services.router.prompt_cache import PromptCache
from services.router.sampling import StopText, request_sampler, special_token_ids
from services.router.speculate import SpecStats, Speculation, install, supported
from shared.errors import MoebusError
from shared.logs import get_logger
from shared.messages import GenerateEvent, GenerateRequest
from shared.mlx_thread import Baton, MLXThread

log = get_logger("engine")
# Receives each step's events, (stream subject, event), in order: one hand-off per step.
Publish = Callable[[list[tuple[str, GenerateEvent]]], None]


@dataclass(frozen=True)
class EngineLimits:
    max_running: int = defaults.MAX_RUNNING  # sequences decoded together
    max_waiting: int = defaults.MAX_WAITING  # accepted but not yet decoding; beyond that, 429
    prefill_step: int = defaults.PREFILL_STEP  # prompt tokens per step, so long prompts do not stall streams
    micro_batches: int = defaults.MICRO_BATCHES  # 2: two lanes overlap one's compute with the other's bus wait
    split_at: int = 8  # ...once this many sequences run; below it one batch costs less
    draft_max: int = defaults.DRAFT_MAX  # drafted tokens a sequence verifies per step, at most
    speculate_max_running: int = defaults.SPECULATE_MAX_RUNNING  # a lane with more sequences does not draft


@dataclass
class Sequence:
    req: GenerateRequest
    prompt: list[int]
    detok: Any
    stops: StopText
    deadline: float
    splitter: Splitter
    grammar: GrammarProcessor | None = None
    started: bool = False
    calls: int = 0  # tool calls it made
    cached: int = 0  # prompt tokens taken from the prompt cache
    n: int = 0
    index: int = 0


class Lane:
    """One micro-batch: a BatchGenerator and its sequences, driven from one thread."""

    def __init__(self, make: Callable[[int], BatchGenerator], cap: int, thread: MLXThread | None) -> None:
        self.thread = thread  # None: the caller's thread (the router's MLX thread)
        self.cap = cap  # sequences it decodes at once
        self.seqs: dict[int, Sequence] = {}
        self.steps = 0  # decode steps it ran: both lanes busy shows in the metrics
        self.shrunk = False  # a sequence left since its arrays were last copied to their own size
        self._make = lambda: make(cap)
        self.gen = self.call(self._make)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.thread is None or self.thread.owns():
            return fn(*args)
        return self.thread.submit(fn, *args).result()

    def reset(self) -> None:
        self.gen = self.call(self._make)  # its batch state is unknown after a failure


def pick_lane(sizes: list[int], caps: list[int], split_at: int, coming: int = 1) -> int:
    """The lane a new sequence joins, `coming` of them (this one included) joining now. Below
    `split_at` sequences in all, the fullest lane that still has room (one batch: splitting a
    small batch doubles the per-layer messages and fixed costs for little overlap); from there
    on, or when no lane has room, the emptiest relative to its size. The first lane on a tie.
    Counting those still to come splits a burst evenly: a sequence cannot change lanes later."""
    room = [i for i in range(len(sizes)) if sizes[i] < caps[i]]
    if sum(sizes) + coming < split_at and room:
        return max(room, key=lambda i: (sizes[i], -i))
    return min(range(len(sizes)), key=lambda i: (sizes[i] - caps[i], i))


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, limits: EngineLimits, publish: Publish,
                 max_context: int = 1 << 31,
                 before_step: Callable[[], None] = lambda: None,
                 after_step: Callable[[float], None] = lambda seconds: None,
                 prompt_cache: PromptCache | None = None, drafter: Drafter | None = None) -> None:
        self.model = model
        if drafter is not None and not supported(model):
            log.info("speculative decoding is off: this model's caches cannot forget rejected drafts")
            drafter = None
        self.drafter = drafter  # None: one token per step (services.router.speculate)
        self.spec_stats = SpecStats()  # every lane's verify steps, for the metrics
        self.prompt_cache = prompt_cache  # None: every prompt prefilled in full
        self.before_step = before_step  # e.g. switch to a new placement: never inside a step
        self.after_step = after_step  # a decode step's wall time, for the metrics
        self.max_context = max_context
        self.publish = publish
        self._out: list[tuple[str, GenerateEvent]] = []
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos = sorted(tokenizer.eos_token_ids)
        self.machines = machines(tokenizer)
        # Generated and counted, never in the text; except the markers of thinking and tool calls,
        # which the splitter reads even where the tokenizer calls them special.
        self.special = special_token_ids(tokenizer) - _marker_ids(tokenizer)
        self.mask_seconds, self.masks = 0.0, 0  # constrained decoding's cost, for the metrics
        self.baton = Baton()  # the lanes' turns at MLX: the bus client releases it while a lane waits
        self.uids: dict[str, tuple[Lane, int]] = {}
        # Accepted, not yet in a lane: a lane takes a sequence only when it has room, so no
        # generator ever decodes more than its share of max_running (mlx-lm's BatchGenerator
        # can move more prompts into its decode batch than completion_batch_size).
        self.queue: deque[Sequence] = deque()
        self.cancelled: dict[str, None] = {}  # insertion-ordered: the oldest go first
        self.running = 0  # read by the event loop for status and admission
        self.waiting = 0
        self.running_max = 0  # the most sequences in the lanes at once: what sampling `running` can miss
        self.memory_max = 0  # the most MLX memory after a step: what --kv-budget bounds, measured
        self.kv: KVBudget = unbounded()  # the router sets its byte budget (services.router.kv)
        n = max(1, min(limits.micro_batches, limits.max_running))
        caps = [limits.max_running // n + (i < limits.max_running % n) for i in range(n)]  # sum: max_running
        self.lanes = [Lane(self._generator, caps[i], None if i == 0 else MLXThread(f"mlx-lane{i}"))
                      for i in range(n)]

    @property
    def seqs(self) -> dict[tuple[int, int], Sequence]:
        return {(i, uid): s for i, lane in enumerate(self.lanes) for uid, s in lane.seqs.items()}

    def _generator(self, cap: int) -> BatchGenerator:
        gen = BatchGenerator(
            self.model, stop_tokens=[[e] for e in self.eos], completion_batch_size=cap,
            prefill_batch_size=min(8, cap), prefill_step_size=self.limits.prefill_step,
        )
        if self.drafter is not None and self.limits.draft_max > 0:
            install(gen, Speculation(self.drafter, self.limits.draft_max, self.limits.speculate_max_running,
                                     stats=self.spec_stats))
        return gen

    def add(self, req: GenerateRequest, prompt: list[int], grammar: GrammarProcessor | None = None) -> None:
        chat = req.messages is not None
        kind = "raw" if not chat else "tools" if req.tools and req.tool_choice != "none" else "chat"
        splitter = Splitter(self.machines[kind], self.tokenizer, req.tools,
                            initial_state(self.tokenizer, prompt) if chat else "normal")
        seq = Sequence(req, prompt, self.tokenizer.detokenizer, StopText(req.stop),
                       time.monotonic() + req.timeout_s, splitter, grammar)
        if req.request_id in self.cancelled:  # the gateway gave up before we got to it
            self.cancelled.pop(req.request_id)
            self._emit(seq, GenerateEvent(request_id=req.request_id, index=0, finish_reason="error", error="cancelled"))
        else:
            self.queue.append(seq)  # it joins a lane when the next step starts, with the rest of its burst
        self._count()
        self._flush()

    def _admit(self) -> None:
        """Queued sequences join lanes that have room, oldest first."""
        while self.queue:
            sizes, caps = [len(lane.seqs) for lane in self.lanes], [lane.cap for lane in self.lanes]
            if all(n >= c for n, c in zip(sizes, caps)):
                return
            head, picked = self.queue[0], pick_lane(sizes, caps, self.limits.split_at, len(self.queue))
            # The oldest waits until its KV cache fits; later ones do not pass it, so it is never starved.
            # The picked lane first; else the lane with room it costs least in (rows pad to a lane's longest).
            room = sorted((i for i in range(len(self.lanes)) if sizes[i] < caps[i] and i != picked),
                          key=lambda i: self.kv.cost(i, len(head.prompt), head.req.max_tokens))
            lane = next((i for i in [picked, *room]
                         if self.kv.reserve(head.req.request_id, i, len(head.prompt), head.req.max_tokens)), None)
            if lane is None:
                return
            self._insert(self.lanes[lane], self.queue.popleft())

    def _insert(self, lane: Lane, seq: Sequence) -> None:
        req = seq.req
        # The context bounds the completion: a sequence that reaches it ends with "length".
        max_tokens = min(req.max_tokens, self.max_context - len(seq.prompt))
        try:
            sampler = request_sampler(req.temperature, req.top_p, req.top_k, req.min_p, req.seed)
            processors = [[seq.grammar] if seq.grammar is not None else []]
            uid = lane.call(self._start, lane, seq, max_tokens, sampler, processors)
        except Exception as e:  # noqa: BLE001 - the request was accepted: it must hear why it ends
            self._emit(seq, GenerateEvent(request_id=req.request_id, index=0, finish_reason="error",
                                          error=f"cannot start: {e!r}"))
            return
        lane.seqs[uid] = seq
        self.uids[req.request_id] = (lane, uid)

    def _start(self, lane: Lane, seq: Sequence, max_tokens: int, sampler: Any, processors: list) -> int:
        """Into the lane's batch, on the lane's thread: with the longest cached prefix of its
        prompt, only the rest is prefilled."""
        reuse = self.prompt_cache.fetch(seq.prompt) if self.prompt_cache is not None else None
        if reuse is None or reuse.cache is None:
            return lane.gen.insert([seq.prompt], max_tokens=[max_tokens], samplers=[sampler],
                                   logits_processors=processors)[0]
        seq.cached = reuse.cached
        return lane.gen.insert([seq.prompt[reuse.cached:]], max_tokens=[max_tokens], caches=[reuse.cache],
                               all_tokens=[seq.prompt[:reuse.cached]], samplers=[sampler],
                               logits_processors=processors)[0]

    @property
    def prompt_cache_bytes(self) -> int:
        return self.prompt_cache.nbytes if self.prompt_cache is not None else 0

    def fail_all(self, error: str) -> None:
        """Every sequence ends with `error` (shutdown); the batches start afresh."""
        for lane in self.lanes:
            self._fail_lane(lane, error)
        while self.queue:
            self._end_queued(self.queue.popleft(), error)
        self._count()
        self._flush()

    def _fail_lane(self, lane: Lane, error: str) -> None:
        lane.reset()
        for uid in list(lane.seqs):
            self._fail(lane, uid, error, in_batch=False)

    def cancel(self, request_id: str) -> None:
        queued = next((s for s in self.queue if s.req.request_id == request_id), None)
        if queued is not None:
            self.queue.remove(queued)
            self._end_queued(queued, "cancelled: the client went away")
            self._count()
            self._flush()
            return
        found = self.uids.get(request_id)
        if found is None:  # not added yet: remember, a few hundred at most
            self.cancelled[request_id] = None
            while len(self.cancelled) > 512:
                self.cancelled.pop(next(iter(self.cancelled)))
        else:
            lane, uid = found
            lane.call(self._fail, lane, uid, "cancelled: the client went away")
            self._count()
            self._flush()

    def step(self) -> bool:
        """One decode step for every running sequence; False when there is nothing to do."""
        try:
            return self._step()
        finally:
            self._flush()

    def close(self) -> None:
        for lane in self.lanes:
            if lane.thread is not None:
                lane.thread.stop()

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self.publish(out)

    def _step(self) -> bool:
        self.before_step()
        self._admit()  # what arrived since the last step, together, into the room left
        busy = [lane for lane in self.lanes if lane.seqs]
        self.running_max = max(self.running_max, sum(len(lane.seqs) for lane in busy))
        started = time.perf_counter()
        # Lanes with threads start at once and take turns (the baton) with the one run here.
        pending = [lane.thread.submit(self._lane_step, lane) for lane in busy if lane.thread is not None]
        try:
            for lane in busy:
                if lane.thread is None:
                    self._lane_step(lane)
        finally:  # never leave a lane running on its own past this step
            for fut in pending:
                fut.result()
        if busy:
            self.after_step(time.perf_counter() - started)
            self.memory_max = max(self.memory_max, mx.get_active_memory())
        now = time.monotonic()
        for seq in [s for s in self.queue if now > s.deadline]:
            self.queue.remove(seq)
            self._end_queued(seq, f"request deadline of {seq.req.timeout_s:g}s exceeded")
        self._count()
        return bool(self.queue) or any(lane.seqs for lane in self.lanes)  # the queue joins next step

    def _lane_step(self, lane: Lane) -> None:
        """One step of one lane, on that lane's thread, holding the baton except on the bus."""
        with self.baton:
            try:
                now = time.monotonic()
                for uid, seq in list(lane.seqs.items()):
                    if now > seq.deadline:
                        self._fail(lane, uid, f"request deadline of {seq.req.timeout_s:g}s exceeded")
                self._compact(lane)
                if not lane.seqs:
                    return
                _, responses = lane.gen.next()
                lane.steps += 1
                for r in responses:
                    if r.uid in lane.seqs:
                        self._on_token(lane, r.uid, lane.seqs[r.uid], r.token, r.logprobs, r.finish_reason)
                    if r.prompt_cache is not None and self.prompt_cache is not None:
                        self.prompt_cache.insert(r.all_tokens, r.prompt_cache)  # a finished sequence
                self._compact(lane)
            except Exception as e:  # noqa: BLE001 - every sequence of the lane hears of it
                error = str(e) if isinstance(e, MoebusError) else f"internal error: {e!r}"
                log.warning("decode step failed", error=error, sequences=len(lane.seqs))
                self._fail_lane(lane, error)

    def _on_token(self, lane: Lane, uid: int, seq: Sequence, token: int, logprobs: mx.array, finish: str | None) -> None:
        seq.started = True
        in_batch = finish is None  # BatchGenerator has let go of sequences it finished
        text, stop_sequence, extra = "", None, {}
        if token not in self.eos or finish != "stop":
            seq.n += 1
            if token not in self.special:  # decode(skip_special_tokens=True): mlx-lm's detokenizers would write <s>
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
        parts = seq.splitter.feed(text)
        if done:
            rest = seq.splitter.finish()
            parts.text, parts.reasoning, parts.calls = (parts.text + rest.text, parts.reasoning + rest.reasoning,
                                                        parts.calls + rest.calls)
        seq.calls += len(parts.calls)
        error = None
        if done and seq.grammar is not None:
            self.mask_seconds += seq.grammar.mask_s
            self.masks += seq.grammar.masks
            if seq.grammar.error is not None:
                finish, error = "error", f"constrained decoding stopped: {seq.grammar.error}"
        if finish == "stop" and seq.calls and stop_sequence is None:
            finish = "tool_calls"
        self._emit(seq, GenerateEvent(
            request_id=seq.req.request_id, index=seq.index, text=parts.text, reasoning=parts.reasoning,
            tool_calls=parts.calls or None, token=token, finish_reason=finish, error=error,
            prompt_tokens=len(seq.prompt) if done else 0, completion_tokens=seq.n if done else 0,
            cached_tokens=seq.cached if done else 0, stop_sequence=stop_sequence, **extra))
        seq.index += 1
        if done:
            self._drop(lane, uid, still_in_batch=in_batch)

    def _logprobs(self, token: int, logprobs: mx.array, top: int) -> dict:
        # A special token's text is empty, as in the completion's text.
        text = "" if token in self.special else self.tokenizer.decode([token])
        out: dict = {"logprob": logprobs[token].item(), "token_text": text}
        if top > 0:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            # Tokens a grammar forbids have -inf: not alternatives, and not JSON either.
            pairs = sorted(((i, lp) for i, lp in zip(ids.tolist(), logprobs[ids].tolist()) if lp > -float("inf")),
                           key=lambda p: -p[1])
            out["top_logprobs"] = [(self.tokenizer.decode([i]), lp) for i, lp in pairs]
        return out

    def _fail(self, lane: Lane, uid: int, error: str, in_batch: bool = True) -> None:
        seq = lane.seqs.get(uid)
        if seq is None:  # finished meanwhile
            return
        self._emit(seq, GenerateEvent(request_id=seq.req.request_id, index=seq.index, finish_reason="error",
                                      error=error, prompt_tokens=len(seq.prompt), completion_tokens=seq.n))
        self._drop(lane, uid, still_in_batch=in_batch)

    def _end_queued(self, seq: Sequence, error: str) -> None:
        self._emit(seq, GenerateEvent(request_id=seq.req.request_id, index=0, finish_reason="error", error=error,
                                      prompt_tokens=len(seq.prompt)))

    def _emit(self, seq: Sequence, event: GenerateEvent) -> None:
        if event.finish_reason is not None:  # every way a sequence ends passes here: its KV bytes are free
            self.kv.release(seq.req.request_id)
        self._out.append((seq.req.stream, event))

    def _drop(self, lane: Lane, uid: int, still_in_batch: bool = True) -> None:
        seq = lane.seqs.pop(uid, None)
        if seq is not None:
            self.uids.pop(seq.req.request_id, None)
        if still_in_batch:
            lane.gen.remove([uid])
        lane.shrunk = True

    def _compact(self, lane: Lane) -> None:
        """Sequences left: their KV memory is free before the lane prefills the next, not when it next grows."""
        if lane.shrunk:
            compact(lane.gen)
            lane.shrunk = False

    def _count(self) -> None:
        seqs = [s for lane in self.lanes for s in lane.seqs.values()]
        self.running = sum(s.started for s in seqs)
        self.waiting = len(seqs) - self.running + len(self.queue)


def _marker_ids(tokenizer: Any) -> set[int]:
    markers = [getattr(tokenizer, name, None) for name in ("think_start", "think_end", "tool_call_start",
                                                             "tool_call_end")]
    ids = [tokenizer.encode(m, add_special_tokens=False) for m in markers if m]
    return {i[0] for i in ids if len(i) == 1}
