"""Which worker owns which expert: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Placement = list[list[str]]  # expert -> the workers holding it (all MoE layers alike)
Pairs = list[list[int]]  # per MoE layer, the experts held there


def as_pairs(held: list[int] | Pairs, moe_layers: int) -> Pairs:
    """Per MoE layer, the experts of `held`: given per layer, or one list for every layer."""
    if held and isinstance(held[0], list):
        if len(held) != moe_layers:
            raise ValueError(f"experts given for {len(held)} MoE layers, the model has {moe_layers}")
        return [sorted(set(row)) for row in held]  # type: ignore[arg-type]
    return [sorted(set(held))] * moe_layers  # type: ignore[arg-type]


def experts_in(held: list[int] | Pairs) -> list[int]:
    """The experts of `held` (see `as_pairs`) in any layer."""
    if held and isinstance(held[0], list):
        return sorted({e for row in held for e in row})  # type: ignore[union-attr]
    return sorted(set(held))  # type: ignore[arg-type]


def narrowed(held: list[int] | Pairs, have: Pairs) -> Pairs:
    """Per layer, the experts of `held` among those of `have` (what letting go keeps)."""
    return [sorted(set(want) & set(row)) for want, row in zip(as_pairs(held, len(have)), have)]


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
    count = {w: 0 for w in live}  # experts each holds, kept up to date as owners are given
    for o in owners:
        for w in o:
            count[w] += 1
    for rank in range(max(1, replicas)):  # every expert's first owner, then its second, ...
        for e in range(num_experts):
            if len(owners[e]) <= rank:
                _give(owners, e, live, capacity, target, count)
    if load is not None and sum(load) > 0:  # hot experts: one more owner each, from what is left
        hot_at = HOT * sum(load) / num_experts
        carried = {w: 0.0 for w in live}  # each worker's share of the load, kept up to date
        for x, row in enumerate(owners):
            for w in row:
                carried[w] += load[x] / len(row)
        for e in sorted(range(num_experts), key=lambda e: (-load[e], e)):
            if load[e] > hot_at:
                _give_least_loaded(owners, e, live, capacity, load, count, carried)
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
                       load: Sequence[float], count: dict[str, int], carried: dict[str, float]) -> None:
    """One more owner for hot expert `e`: the worker with room that carries the least load
    (a replicated expert's tokens are spread evenly over its owners). `count` and `carried`
    are updated."""
    room = [w for w in live if w not in owners[e] and count[w] < capacity[w]]
    if not room:
        return
    w = min(room, key=lambda w: (carried[w], w))
    before = len(owners[e])
    for o in owners[e]:
        carried[o] -= load[e] / before - load[e] / (before + 1)
    owners[e].append(w)
    carried[w] += load[e] / (before + 1)
    count[w] += 1


def _give(owners: Placement, e: int, live: list[str], capacity: Mapping[str, int], target: Mapping[str, int],
          count: dict[str, int]) -> None:
    """One more owner for expert `e`: the worker furthest below its target with room (`count`:
    what each holds now, updated)."""
    room = [w for w in live if w not in owners[e] and count[w] < capacity[w]]
    if room:
        w = min(room, key=lambda w: (count[w] - target.get(w, 0), count[w] / capacity[w], w))
        owners[e].append(w)
        count[w] += 1


# A tiered cluster moves experts into DRAM for load only when the experts it would bring in carry
# this share of all routed tokens more than those it holds: short bursts of another topic, and
# the noise of a few hundred tokens, do not reload a worker's experts.
MOVE_MARGIN = 0.1


def hot_set(load: Sequence[float] | None, room: int, held: Sequence[int], num_experts: int,
            margin: float = MOVE_MARGIN) -> list[int]:
    """The `room` experts DRAM should hold: those it `held` (the hottest of them if too many,
    topped up with the hottest others), or the hottest `room` by `load` when they carry more
    than `margin` of all load beyond that. Without load, lowest ids fill the room."""
    load = list(load) if load is not None and sum(load) > 0 else [0.0] * num_experts
    by_heat = sorted(range(num_experts), key=lambda e: (-load[e], e))
    kept = sorted(held, key=lambda e: (-load[e], e))[:room]
    taken = set(kept)
    kept += [e for e in by_heat if e not in taken][: room - len(kept)]
    best = by_heat[:room]
    total = sum(load)
    if total > 0 and sum(load[e] for e in best) - sum(load[e] for e in kept) > margin * total:
        return sorted(best)
    return sorted(kept)


def place_tiered(capacity: Mapping[str, int], flash: set[str], num_experts: int, current: Placement | None = None,
                 load: Sequence[float] | None = None, margin: float = MOVE_MARGIN) -> Placement:
    """Owners for a cluster of DRAM workers and flash-caches (`flash`: those that serve every
    expert from SSD). The DRAM workers hold the hottest experts their capacity allows (see
    `hot_set`, which keeps what they hold unless moving pays by `margin`); the flash-caches own
    every other expert, so each expert has one kind of owner and its tokens never go to SSD
    while DRAM holds it. Without flash-caches: `place`."""
    caches = sorted(w for w in flash if capacity.get(w, 0) > 0)
    if not caches:
        return place(capacity, num_experts, current, load)
    dram = {w: c for w, c in capacity.items() if c > 0 and w not in flash}
    held = [e for e in range(num_experts) if current and e < len(current) and any(w in dram for w in current[e])]
    hot = hot_set(load, min(num_experts, sum(dram.values())), held, num_experts, margin)
    hot_ids = set(hot)
    cold = [e for e in range(num_experts) if e not in hot_ids]
    owners: Placement = [[] for _ in range(num_experts)]
    for group, workers, weigh in ((hot, dram, True), (cold, {w: len(cold) for w in caches}, False)):
        if not group:
            continue
        mine = [[w for w in current[e] if w in workers] for e in group] if current and len(current) == num_experts else None
        # Flash-caches each serve every cold expert already: no replicas by load among them
        # (they would follow the noise of a few tokens, and move nothing between tiers).
        weights = [load[e] for e in group] if load is not None and weigh else None
        for e, row in zip(group, place(workers, len(group), mine, weights)):
            owners[e] = row
    return owners


def place_tiered_pairs(capacity: Mapping[str, int], flash: set[str], num_experts: int, moe_layers: int,
                       current: list[Placement] | None = None, load: Sequence[float] | None = None,
                       margin: float = MOVE_MARGIN) -> list[Placement]:
    """`place_tiered` over (layer, expert) pairs: per MoE layer, the owners of each expert.
    A DRAM worker that may hold c experts holds c * moe_layers pairs, the hottest wherever they
    are (a trained router's popular experts differ from layer to layer, so holding the same ids
    in every layer would leave much of its memory to cold pairs). `load`: tokens per pair,
    layer after layer."""
    # Units expert after expert (expert e of layer l is e * moe_layers + l): without load, DRAM
    # takes the lowest expert ids in every layer, so a worker fetching them from the model
    # store reads whole experts, as by id.
    units = num_experts * moe_layers
    per_pair = {w: c if w in flash else c * moe_layers for w, c in capacity.items()}
    flat = None if current is None else [current[u % moe_layers][u // moe_layers] for u in range(units)]
    by_unit = None if load is None else [load[(u % moe_layers) * num_experts + u // moe_layers] for u in range(units)]
    owners = place_tiered(per_pair, flash, units, flat, by_unit, margin)
    return [[owners[e * moe_layers + layer] for e in range(num_experts)] for layer in range(moe_layers)]


def union(layers: list[Placement]) -> Placement:
    """Every owner of each expert in any layer."""
    return [sorted({w for layer in layers for w in layer[e]}) for e in range(len(layers[0]) if layers else 0)]
