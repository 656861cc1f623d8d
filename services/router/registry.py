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

    def announce(self, a: WorkerAnnounce, now: float) -> bool:
        """Record an announcement; False when it is for another model (ignored)."""
        if a.model != self.fingerprint or a.layers != self.moe_layers or not self._valid(a):
            return False
        if a.leaving:
            self._seen.pop(a.worker, None)
        else:
            self._seen[a.worker] = (a, now)
        return True

    def _valid(self, a: WorkerAnnounce) -> bool:
        experts_ok = all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < self.num_experts
                         for e in a.experts)
        return experts_ok and bool(a.subject) and not any(c.isspace() or c in "*>" for c in a.subject)

    def expire(self, now: float) -> list[str]:
        gone = [w for w, (_, t) in self._seen.items() if now - t > self.stale_after_s]
        for w in gone:
            del self._seen[w]
        return gone

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

    @property
    def covered(self) -> int:
        return sum(o is not None for o in self.owners())
