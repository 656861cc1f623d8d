"""Live workers and the expert -> worker table, from announcements (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.messages import WorkerAnnounce
from shared.placement import route_table


@dataclass
class WorkerRegistry:
    num_experts: int
    moe_layers: int
    fingerprint: str
    stale_after_s: float
    _seen: dict[str, tuple[WorkerAnnounce, float]] = field(default_factory=dict)

    def announce(self, a: WorkerAnnounce, now: float) -> list[str] | None:
        """Record an announcement. None when it is for another model or cluster size (ignored);
        otherwise the subjects no longer served: a leaving worker's, or the one a restarted
        worker (same id, new process) replaced."""
        if a.model != self.fingerprint or a.layers != self.moe_layers or not self._valid(a):
            return None
        if a.world and any(o.world and o.world != a.world for o, _ in self._seen.values() if o.worker != a.worker):
            return None  # started for another cluster size: its experts overlap the live workers'
        old = self._seen.get(a.worker)
        gone = [old[0].subject] if old is not None and (a.leaving or old[0].subject != a.subject) else []
        if a.leaving:
            self._seen.pop(a.worker, None)
        else:
            self._seen[a.worker] = (a, now)
        return gone

    def _valid(self, a: WorkerAnnounce) -> bool:
        return all(0 <= e < self.num_experts for e in a.experts)

    def expire(self, now: float) -> list[str]:
        """Drop workers silent for too long; returns their subjects."""
        gone = [w for w, (_, t) in self._seen.items() if now - t > self.stale_after_s]
        return [self._seen.pop(w)[0].subject for w in gone]

    def drop_subject(self, subject: str) -> str | None:
        """A call to `subject` found nobody (or no reply): the worker is out until it announces
        itself again. Returns its id, None if it was already gone."""
        for w, (a, _) in list(self._seen.items()):
            if a.subject == subject:
                del self._seen[w]
                return w
        return None

    @property
    def workers(self) -> list[str]:
        return sorted(self._seen)

    def owners(self) -> list[str | None]:
        return route_table(self.num_experts, ((w, a.experts) for w, (a, _) in self._seen.items()))

    def table(self) -> tuple[list[str], np.ndarray]:
        """(subjects, owner index per expert, -1 where none) for the hot path."""
        owners = self.owners()
        names = sorted({o for o in owners if o is not None})
        subjects = [self._seen[w][0].subject for w in names]
        index = np.array([names.index(o) if o is not None else -1 for o in owners], np.int32)
        return subjects, index

    def memory(self) -> dict[str, dict]:
        """Each live worker's last reported MLX memory counters."""
        return {w: a.memory for w, (a, _) in self._seen.items()}

    def unowned(self) -> list[int]:
        return [e for e, o in enumerate(self.owners()) if o is None]

    @property
    def covered(self) -> int:
        return sum(o is not None for o in self.owners())
