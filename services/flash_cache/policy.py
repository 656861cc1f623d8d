"""Which experts the flash-cache keeps in DRAM: slot assignment and eviction, pure, no I/O.

The flash-cache's DRAM budget is one pool of slots shared by every MoE layer (experts of
different sizes get a pool each); the experts live on SSD. A request names the distinct experts
it needs, as keys: (layer, expert) in the flash-cache, any hashable here. `SlotPool` says which to
read into which slot and which resident expert gives its slot up: a layer whose tokens use few
distinct experts leaves its share to a layer that uses many. `belady_misses` is the floor any
policy could reach on a trace, `simulate` what `SlotPool` reaches, so the two can be compared
on recorded routing.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import Any

POLICIES = ("lru", "lfu")
# lfu: a use counts half after HALF_LIFE_TURNOVERS * slots ticks (the window may be 0): long enough to
# rank by popularity (the window covers recency), short enough to follow a change of topic. On
# drawn routing (tests/flash_cache/test_policy.py's) 4 read within 6% of the best static choice,
# 2 within 11%; with the topic changing every 100 tokens, 4 read the least of 1 to 64.
HALF_LIFE_TURNOVERS = 4


Key = Any  # hashable and ordered: ties are broken by key


class SlotPool:
    """A fixed number of DRAM slots: which expert sits in which slot, and the eviction decision.
    The clock ticks once per request; `window` counts ticks."""

    def __init__(self, slots: int, window: int, policy: str = "lfu") -> None:
        if slots < 1 or window < 0 or policy not in POLICIES:
            raise ValueError(f"need slots >= 1, window >= 0, policy in {POLICIES}: "
                             f"got {slots}, {window}, {policy!r}")
        self.slots, self.window, self.policy = slots, window, policy
        self.half_life = HALF_LIFE_TURNOVERS * slots
        self.slot_of: dict[Key, int] = {}
        self._free = list(range(slots - 1, -1, -1))  # a stack: slot 0 is handed out first
        self.now = 0
        # Kept past eviction (bounded by the layer's expert count), so a popular expert that was
        # pushed out once comes back with its count instead of as a newcomer.
        self._last: dict[Key, int] = {}
        self._count: dict[Key, tuple[float, int]] = {}  # expert -> (decayed uses, as of tick)
        self.hits = self.misses = self.evictions = 0

    def resident(self) -> list[Key]:
        return list(self.slot_of)

    def passes(self, needed: Sequence[Key]) -> list[list[Key]]:
        """Split a request's distinct experts into passes of at most `slots` experts each,
        resident ones first (so hits are computed before anything is evicted), preserving the
        given order otherwise. Each pass is then admitted and computed before the next."""
        _check_distinct(needed)
        order = [e for e in needed if e in self.slot_of] + [e for e in needed if e not in self.slot_of]
        return [order[i:i + self.slots] for i in range(0, len(order), self.slots)]

    def admit(self, needed: Sequence[Key]) -> list[tuple[Key, int]]:
        """Make every expert of `needed` resident; returns the (expert, slot) pairs to read from
        disk into that slot (the misses), in `needed` order. Counts one use of each at the current
        tick and never evicts an expert in `needed`."""
        _check_distinct(needed)
        if len(needed) > self.slots:
            raise ValueError(f"{len(needed)} experts needed at once, only {self.slots} slots")
        wanted = set(needed)
        reads: list[tuple[Key, int]] = []
        for e in needed:
            self._use(e)
            if e in self.slot_of:
                self.hits += 1
                continue
            self.misses += 1
            if self._free:
                slot = self._free.pop()
            else:
                victim = self._victim(wanted)
                slot = self.slot_of.pop(victim)
                self.evictions += 1
            self.slot_of[e] = slot
            reads.append((e, slot))
        return reads

    def prefetch(self, guess: Sequence[Key]) -> list[tuple[Key, int]]:
        """Read ahead experts a coming request will likely need: the (expert, slot) pairs to
        read, as `admit` returns them, for those of `guess` not resident. A guess counts no use
        and takes only free slots or those of experts outside the window, so it never pushes out
        what the last tokens used; it stops where none is left."""
        reads: list[tuple[Key, int]] = []
        for e in guess:
            if e in self.slot_of:
                continue
            if self._free:
                slot = self._free.pop()
            else:
                old = [x for x in self.slot_of if x not in guess and self._last[x] <= self.now - self.window]
                if not old:
                    break
                slot = self.slot_of.pop(self._rank(old))
                self.evictions += 1
            # unused until a request needs it: the first to go, after its own history if any
            self._last.setdefault(e, self.now - self.window - 1)
            self.slot_of[e] = slot
            reads.append((e, slot))
        return reads

    def tick(self) -> None:
        """Advance the clock by one step (one request to this layer = one token step at
        concurrency 1)."""
        self.now += 1

    def drop(self, experts: Iterable[Key]) -> None:
        """Forget these experts (no longer placed here): their slots become free."""
        for e in experts:
            slot = self.slot_of.pop(e, None)
            if slot is not None:
                self._free.append(slot)
            self._last.pop(e, None)
            self._count.pop(e, None)

    def _use(self, e: Key) -> None:
        self._last[e] = self.now
        self._count[e] = (self._decayed(e) + 1.0, self.now)

    def _decayed(self, e: Key) -> float:
        count, at = self._count.get(e, (0.0, self.now))
        return count * 0.5 ** ((self.now - at) / self.half_life)

    def _victim(self, wanted: set[Key]) -> Key:
        """The resident expert outside `wanted` to evict: one outside the window if any (the
        slot budget is hard, so inside it otherwise), then by policy, then smallest id."""
        candidates = [e for e in self.slot_of if e not in wanted]
        old = [e for e in candidates if self._last[e] <= self.now - self.window]
        return self._rank(old or candidates)

    def _rank(self, candidates: list[Key]) -> Key:
        """The one to evict by policy, then smallest id."""
        if self.policy == "lru":
            return min(candidates, key=lambda e: (self._last[e], e))
        return min(candidates, key=lambda e: (self._decayed(e), self._last[e], e))


def _check_distinct(needed: Sequence[Key]) -> None:
    if len(set(needed)) != len(needed):
        raise ValueError(f"experts needed more than once in {list(needed)}")


def belady_misses(trace: Sequence[Sequence[Key]], slots: int) -> int:
    """Loads an optimal (Belady's MIN) cache of `slots` entries makes on one layer's trace
    (each step: the distinct experts a request needed).

    On a miss with no free slot, MIN evicts the resident expert outside the step whose next
    step needing it is farthest away (never again: infinitely far). A step needing more than
    `slots` experts costs its non-resident experts, then the cache keeps the `slots` experts of
    what it held or read whose next use is nearest. That is a relaxation: splitting into passes
    against MIN's own resident set is no floor, since a policy holding other experts splits the
    step differently and may end it holding what comes next. Passes that read each missing
    expert once end in one of the subsets this chooses from, so it stays a lower bound."""
    if slots < 1:
        raise ValueError(f"need slots >= 1, got {slots}")
    never = len(trace)
    next_use: list[dict[Key, int]] = [{} for _ in trace]  # step -> expert -> next step needing it
    seen: dict[Key, int] = {}
    for t in range(len(trace) - 1, -1, -1):
        next_use[t] = {e: seen.get(e, never) for e in trace[t]}
        seen.update(dict.fromkeys(trace[t], t))
    resident: dict[Key, int] = {}  # expert -> next step needing it
    misses = 0
    for t, step in enumerate(trace):
        if len(step) > slots:
            misses += sum(e not in resident for e in step)
            resident.update(next_use[t])
            resident = dict(heapq.nsmallest(slots, resident.items(), key=lambda kv: (kv[1], kv[0])))
            continue
        for e in step:
            if e not in resident:
                misses += 1
                if len(resident) == slots:
                    del resident[max((x for x in resident if x not in next_use[t]), key=resident.__getitem__)]
                resident[e] = next_use[t][e]
        resident.update(next_use[t])
    return misses


def static_misses(trace: Sequence[Sequence[Key]], slots: int) -> int:
    """Loads of the best fixed choice in hindsight: the `slots - r` experts used most over the
    whole trace stay resident once read, and the other r slots (r: the largest step that fits,
    what must be resident at once) serve the rest, least recently used first. With routing
    drawn independently from fixed popularities, keeping the most popular is the best any
    policy without foresight can do, so a policy's distance to this is what knowing the
    popularities in advance would gain; Belady's distance below it needs the order of the
    coming requests."""
    if slots < 1:
        raise ValueError(f"need slots >= 1, got {slots}")
    rotating = max([1, *(len(s) for s in trace if len(s) <= slots)])
    uses: dict[Key, int] = {}
    for step in trace:
        for e in step:
            uses[e] = uses.get(e, 0) + 1
    kept = set(sorted(uses, key=lambda e: (-uses[e], e))[: slots - rotating])
    loaded: set[Key] = set()
    recent: dict[Key, None] = {}  # the rotating slots, oldest first
    misses = 0
    for step in trace:
        for e in step:
            if e in kept:
                misses += e not in loaded
                loaded.add(e)
            elif e in recent:
                recent[e] = recent.pop(e)
            else:
                misses += 1
                recent[e] = None
                if len(recent) > rotating:
                    del recent[next(x for x in recent if x not in step or len(step) > slots)]
    return misses


def simulate(trace: Sequence[Sequence[Key]], slots: int, window: int, policy: str) -> int:
    """Misses (records read) `SlotPool` makes on the trace: each step's passes admitted in
    turn, then one tick."""
    cache = SlotPool(slots, window, policy)
    for step in trace:
        for chunk in cache.passes(step):
            cache.admit(chunk)
        cache.tick()
    return cache.misses


def reuse_within(trace: Sequence[Sequence[Key]], k: int) -> float:
    """Fraction of needed experts (over all steps) also needed in one of the previous `k`
    steps: the trace's temporal locality."""
    last: dict[Key, int] = {}
    reused = total = 0
    for t, step in enumerate(trace):
        for e in step:
            total += 1
            reused += e in last and t - last[e] <= k
        for e in step:
            last[e] = t
    return reused / total if total else 0.0
