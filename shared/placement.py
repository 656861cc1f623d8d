"""Which worker owns which expert: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Placement = list[list[str]]  # expert -> the workers holding it (all MoE layers alike)
HOT = 2.0  # an expert with this many times the mean load is hot: it gets an extra replica


def place(capacity: Mapping[str, int], num_experts: int, current: Placement | None = None,
          load: Sequence[float] | None = None, replicas: int = 1) -> Placement:
    """Owners of each expert for the live workers (`capacity`: id -> experts it may hold).

    Every expert gets `replicas` owners where capacity allows, spread in proportion to capacity;
    then hot experts (measured `load` over HOT x the mean) get one more owner from what is left.
    Starting from `current`, an expert moves only when its owner left or holds more than its
    share: a join takes a share from the fullest workers, a leave moves only the leaver's.
    An expert no one can hold has no owners (the caller reports it unowned)."""
    live = sorted(w for w, c in capacity.items() if c > 0)
    owners: Placement = [[w for w in (current[e] if current and e < len(current) else []) if w in live]
                         for e in range(num_experts)]
    total = sum(capacity[w] for w in live)
    need = min(num_experts * max(1, replicas), total)
    target = _shares(need, {w: capacity[w] for w in live})
    held = {w: [e for e in range(num_experts) if w in owners[e]] for w in live}
    for w in live:  # over its share: shed the most replicated experts first
        for e in sorted(held[w], key=lambda e: (-len(owners[e]), e))[: max(0, len(held[w]) - target[w])]:
            owners[e].remove(w)
    for rank in range(max(1, replicas)):  # every expert's first owner, then its second, ...
        for e in range(num_experts):
            if len(owners[e]) <= rank:
                _give(owners, e, live, capacity, target)
    if load is not None and sum(load) > 0:  # hot experts: one more owner each, from what is left
        hot_at = HOT * sum(load) / num_experts
        for e in sorted(range(num_experts), key=lambda e: (-load[e], e)):
            if load[e] > hot_at:
                _give_least_loaded(owners, e, live, capacity, load)
    return [sorted(o) for o in owners]


def _shares(need: int, capacity: Mapping[str, int]) -> dict[str, int]:
    """`need` slots split in proportion to capacity (largest remainders), none over capacity."""
    total = sum(capacity.values())
    if not total:
        return {w: 0 for w in capacity}
    exact = {w: need * c / total for w, c in capacity.items()}
    share = {w: min(capacity[w], int(x)) for w, x in exact.items()}
    for w in sorted(capacity, key=lambda w: (-(exact[w] - int(exact[w])), w)):
        if sum(share.values()) >= need:
            break
        if share[w] < capacity[w]:
            share[w] += 1
    return share


def _give_least_loaded(owners: Placement, e: int, live: list[str], capacity: Mapping[str, int],
                       load: Sequence[float]) -> None:
    """One more owner for hot expert `e`: the worker with room that carries the least load
    (a replicated expert's tokens are spread evenly over its owners)."""
    carried = {w: 0.0 for w in live}
    count = {w: 0 for w in live}
    for x, row in enumerate(owners):
        for w in row:
            carried[w] += load[x] / len(row)
            count[w] += 1
    room = [w for w in live if w not in owners[e] and count[w] < capacity[w]]
    if room:
        owners[e].append(min(room, key=lambda w: (carried[w], w)))


def _give(owners: Placement, e: int, live: list[str], capacity: Mapping[str, int], target: Mapping[str, int]) -> None:
    """One more owner for expert `e`: the worker furthest below its target with room."""
    count = {w: 0 for w in live}
    for o in owners:
        for w in o:
            count[w] += 1
    room = [w for w in live if w not in owners[e] and count[w] < capacity[w]]
    if room:
        owners[e].append(min(room, key=lambda w: (count[w] - target.get(w, 0), count[w] / capacity[w], w)))
