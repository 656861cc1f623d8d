"""Which worker owns which expert: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def worker_ids(world: int) -> list[str]:
    """The ids of a cluster of `world` workers started by rank."""
    return [f"w{rank}" for rank in range(world)]


def place_experts(num_experts: int, workers: Sequence[str]) -> list[str]:
    """Owner of each expert: expert e of every MoE layer -> workers[e mod W]."""
    if not workers:
        raise ValueError("no workers to place experts on")
    return [workers[e % len(workers)] for e in range(num_experts)]


def experts_of(num_experts: int, workers: Sequence[str], worker: str) -> list[int]:
    return [e for e, w in enumerate(place_experts(num_experts, workers)) if w == worker]


def route_table(num_experts: int, holdings: Iterable[tuple[str, Iterable[int]]]) -> list[str | None]:
    """Expert -> the worker to ask, from what live workers hold.

    When two workers hold an expert (a restart with another world size), the smallest
    worker id wins, so every router picks the same one. None: nobody holds it.
    """
    owners: list[str | None] = [None] * num_experts
    for worker, experts in sorted(holdings, key=lambda h: h[0], reverse=True):
        for e in experts:
            if 0 <= e < num_experts:
                owners[e] = worker
    return owners


def cluster_conflict(worker: str, world: int, peers: Iterable[tuple[str, int]]) -> str | None:
    """Why a worker (`worker` of a `world`-worker cluster) must not join the live `peers`
    ((id, world) of each), or None. Two processes with one id, or workers that disagree on the
    cluster size, would each serve experts the router expects elsewhere."""
    peers = sorted(set(peers))
    ids = [w for w, _ in peers]
    if worker in ids:
        return f"worker {worker} is already running; each worker needs its own --rank"
    others = sorted({n for _, n in peers if n != world})
    if others:
        return (f"the running workers ({', '.join(ids)}) were started with --world {others[0]}, this one with "
                f"--world {world}; start it with --world {others[0]}, or restart every worker with the new world")
    return None


Placement = list[list[str]]  # expert -> the workers holding it (all MoE layers alike)


def place(capacity: Mapping[str, int], num_experts: int, current: Placement | None = None,
          load: Sequence[float] | None = None, replicas: int = 1) -> Placement:
    """Owners of each expert for the live workers (`capacity`: id -> experts it may hold).

    Every expert gets `replicas` owners where capacity allows, spread in proportion to capacity;
    then the hottest experts (by measured `load`) get extra replicas from what capacity is left.
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
    if load is not None:  # hot experts take what capacity is left, hottest first
        for e in sorted(range(num_experts), key=lambda e: (-load[e], e)):
            if load[e] > 0:
                _give(owners, e, live, capacity, {w: capacity[w] for w in live})
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


def _give(owners: Placement, e: int, live: list[str], capacity: Mapping[str, int], target: Mapping[str, int]) -> None:
    """One more owner for expert `e`: the worker furthest below its target with room."""
    count = {w: 0 for w in live}
    for o in owners:
        for w in o:
            count[w] += 1
    room = [w for w in live if w not in owners[e] and count[w] < capacity[w]]
    if room:
        owners[e].append(min(room, key=lambda w: (count[w] - target.get(w, 0), count[w] / capacity[w], w)))
