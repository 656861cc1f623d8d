"""Which worker owns which expert: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


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
