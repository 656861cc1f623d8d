"""Live workers, from their heartbeats, and the routing table of a placement (no I/O here)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from shared.messages import WorkerAnnounce
from shared.subjects import experts_subject, identity


@dataclass(frozen=True)
class Table:
    """What the hot path routes by: expert e's live owners are `subjects[owners[e, :count[e]]]`."""

    subjects: list[str]
    owners: np.ndarray  # (E, R) int32 index into subjects, -1 past count
    count: np.ndarray  # (E,) int32 live owners of each expert
    by_layer: tuple[Table, ...] = ()  # each MoE layer's own, where placement differs by layer

    def of(self, layer: int) -> Table:
        """What `layer`'s experts route by."""
        return self.by_layer[layer] if self.by_layer else self

    @staticmethod
    def empty(num_experts: int = 0) -> Table:
        return Table([], np.full((num_experts, 1), -1, np.int32), np.zeros(num_experts, np.int32))

    def without(self, avoid: Iterable[tuple[str, frozenset[int] | None]]) -> Table:
        """This table minus what calls just failed on: (subject, the experts not to ask of it,
        None for all of them)."""
        avoid = list(avoid)
        if not avoid:
            return self
        rows = [[self.subjects[i] for i in row[:n]] for row, n in zip(self.owners, self.count)]
        for subject, experts in avoid:
            for e, row in enumerate(rows):
                if subject in row and (experts is None or e in experts):
                    row.remove(subject)
        layers = tuple(t.without(avoid) for t in self.by_layer)
        return replace(table(rows, {s: s for s in self.subjects}), by_layer=layers)


def table(owners: list[list[str]], live: dict[str, str], layers: list[list[list[str]]] | None = None) -> Table:
    """The routing table for a placement's `owners` (expert -> worker ids), keeping only live
    workers (`live`: id -> subject); with `layers`, each MoE layer's own too."""
    if layers is not None:
        return replace(table(owners, live), by_layer=tuple(table(row, live) for row in layers))
    names = sorted({w for row in owners for w in row if w in live})
    index = {w: i for i, w in enumerate(names)}
    rows = [[index[w] for w in row if w in index] for row in owners]
    width = max([1, *map(len, rows)])
    mat = np.full((len(owners), width), -1, np.int32)
    for e, row in enumerate(rows):
        mat[e, :len(row)] = row
    return Table([live[w] for w in names], mat, np.array([len(r) for r in rows], np.int32))


@dataclass
class WorkerRegistry:
    num_experts: int
    moe_layers: int
    fingerprint: str
    stale_after_s: float
    # On a secured bus a worker's identity is its NATS user: one live id each, or one stolen
    # credential could announce a crowd of ids and be placed nearly every expert.
    one_per_identity: bool = False
    _seen: dict[str, tuple[WorkerAnnounce, float]] = field(default_factory=dict)
    # Workers out without having said goodbye (silent, or not answering): why, and since when,
    # so readiness can say what happened; forgotten when they come back or after a while.
    left: dict[str, tuple[str, float]] = field(default_factory=dict)
    forget_after_s: float = 600.0
    # Ids a newer process of their identity replaced, and when: one that wakes from sleep may
    # still send a heartbeat before it stops, and must not take its identity back meanwhile.
    _replaced: dict[str, float] = field(default_factory=dict)

    def announce(self, a: WorkerAnnounce, now: float) -> list[str] | None:
        """Record a heartbeat. None when it is for another model (ignored); otherwise the
        subjects no longer served (a leaving worker's)."""
        if a.model != self.fingerprint or a.layers != self.moe_layers or not self._valid(a):
            return None
        self.left.pop(a.worker, None)
        if a.leaving:
            old = self._seen.pop(a.worker, None)
            return [old[0].subject] if old else []
        replaced = []
        if self.one_per_identity and a.worker not in self._seen:  # the newest id wins: a restart
            if a.worker in self._replaced:
                return []  # superseded: not live again
            mine = identity(a.worker)
            for w in [w for w in self._seen if identity(w) == mine]:
                replaced.append(self._seen.pop(w)[0].subject)
                self._replaced[w] = now
        self._seen[a.worker] = (a, now)
        return replaced

    def _valid(self, a: WorkerAnnounce) -> bool:
        # A worker answers on its own subject: a forged announce cannot point calls elsewhere.
        return a.subject == experts_subject(a.worker) and all(0 <= e < self.num_experts for e in a.experts)

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop workers silent for too long; returns their (id, subject)s."""
        self.left = {w: (why, t) for w, (why, t) in self.left.items() if now - t < self.forget_after_s}
        # A replaced id is remembered while its identity has a live process: one that slept all
        # night must not, on waking, push out the process that took over from it.
        held = {identity(w) for w in self._seen}
        self._replaced = {w: t for w, t in self._replaced.items()
                          if now - t < self.forget_after_s or identity(w) in held}
        gone = {w: now - t for w, (_, t) in self._seen.items() if now - t > self.stale_after_s}
        for w, silent_s in gone.items():
            self.left[w] = (f"no heartbeat for {silent_s:.0f}s: asleep, stopped, or cut off from the bus", now)
        return [(w, self._seen.pop(w)[0].subject) for w in gone]

    def grace(self, now: float) -> None:
        """The bus itself was silent until `now`: nobody could be heard, so every worker's
        silence starts over (it gets a whole stale period to be heard again)."""
        self._seen = {w: (a, max(t, now)) for w, (a, t) in self._seen.items()}

    def drop_subject(self, subject: str, why: str, now: float) -> str | None:
        """A call to `subject` found nobody: that worker is out until it announces itself again.
        Returns its id, None if it was already gone."""
        for w, (a, _) in list(self._seen.items()):
            if a.subject == subject:
                del self._seen[w]
                self.left[w] = (why, now)
                return w
        return None

    def get(self, worker: str) -> WorkerAnnounce | None:
        seen = self._seen.get(worker)
        return seen[0] if seen else None

    @property
    def workers(self) -> list[str]:
        return sorted(self._seen)

    def live(self) -> dict[str, str]:
        """Worker id -> subject, for every live worker."""
        return {w: a.subject for w, (a, _) in self._seen.items()}

    def capacities(self) -> dict[str, int]:
        """What each worker that is staying may hold (a draining one: nothing)."""
        return {w: 0 if a.draining else a.capacity for w, (a, _) in self._seen.items()}

    def flash(self) -> set[str]:
        """The live flash-caches."""
        return {w for w, (a, _) in self._seen.items() if a.backend == "flash"}

    def loaded(self, worker: str) -> int:
        a = self.get(worker)
        return a.loaded if a else -1

    def reports(self) -> dict[str, WorkerAnnounce]:
        """Each live worker's last announcement (its MLX memory and flash-cache counters)."""
        return {w: a for w, (a, _) in self._seen.items()}

    def heartbeats(self, now: float) -> dict[str, float]:
        return {w: now - t for w, (_, t) in self._seen.items()}
