from __future__ import annotations

from shared.placement import MOVE_MARGIN, hot_set, place, place_tiered, place_tiered_pairs, union


def _moved(before: list[list[str]], after: list[list[str]]) -> int:
    return sum(len(set(a) - set(b)) for b, a in zip(before, after))


def _counts(p: list[list[str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for owners in p:
        for w in owners:
            out[w] = out.get(w, 0) + 1
    return out


def test_place_spreads_experts_in_proportion_to_capacity():
    p = place({"a": 16, "b": 16}, 16)
    assert all(len(o) == 1 for o in p) and _counts(p) == {"a": 8, "b": 8}
    p = place({"a": 12, "b": 4, "c": 8}, 12)
    assert all(len(o) == 1 for o in p) and _counts(p) == {"a": 6, "b": 2, "c": 4}


def test_a_join_moves_only_the_newcomers_share():
    before = place({"a": 16, "b": 16}, 16)
    after = place({"a": 16, "b": 16, "c": 16}, 16, before)
    assert all(len(o) == 1 for o in after)
    assert _counts(after)["c"] in (5, 6) and _moved(before, after) == _counts(after)["c"]


def test_a_leave_moves_only_the_leavers_experts():
    before = place({"a": 16, "b": 16, "c": 16}, 16)
    after = place({"a": 16, "b": 16}, 16, before)
    assert all(len(o) == 1 and "c" not in o for o in after)
    assert _moved(before, after) == sum("c" in o for o in before)
    assert place({"a": 16, "b": 16}, 16, after) == after  # nothing changed: nothing moves


def test_too_little_capacity_leaves_experts_unowned():
    p = place({"a": 3, "b": 2}, 8)
    assert sum(not o for o in p) == 3 and _counts(p) == {"a": 3, "b": 2}
    assert place({"a": 0}, 4) == [[], [], [], []]
    assert place({}, 2) == [[], []]


def test_replicas_give_each_expert_k_owners_where_capacity_allows():
    p = place({"a": 8, "b": 8, "c": 8}, 8, replicas=2)
    assert all(len(set(o)) == 2 for o in p)
    lost = place({"a": 8, "b": 8}, 8, p, replicas=2)  # c crashed: its replicas are re-made
    assert all(sorted(o) == ["a", "b"] for o in lost)


def test_hot_experts_get_extra_replicas_from_spare_capacity():
    load = [100.0, 1, 1, 1, 50.0, 1, 1, 1]
    p = place({"a": 6, "b": 6}, 8, load=load)
    assert len(p[0]) == 2 and len(p[4]) == 2  # over twice the mean: one more owner each
    assert all(len(o) == 1 for e, o in enumerate(p) if e not in (0, 4))
    assert place({"a": 6, "b": 6}, 8, load=[1.0] * 8) == place({"a": 6, "b": 6}, 8)  # even load: none is hot


# Tiered: DRAM workers beside a flash-cache that can serve every expert from SSD.
FLASH = {"flash"}


def _kinds(owners: list[list[str]]) -> list[str]:
    return ["flash" if row == ["flash"] else "dram" if row and "flash" not in row else "?" for row in owners]


def test_dram_workers_hold_the_hottest_experts_and_the_flash_cache_the_rest():
    # catches: the flash-cache sharing hot experts (its reads would serve their tokens), experts
    # with no owner, DRAM holding more than its capacity
    load = [1, 1, 9, 1, 7, 1, 1, 1]
    owners = place_tiered({"flash": 8, "w1": 2}, FLASH, 8, None, load)
    assert owners == [["flash"], ["flash"], ["w1"], ["flash"], ["w1"], ["flash"], ["flash"], ["flash"]]
    # a second DRAM worker takes the next hottest, the first keeps its own
    load2 = [1, 1, 9, 1, 7, 6, 1, 1]
    owners2 = place_tiered({"flash": 8, "w1": 2, "w2": 2}, FLASH, 8, owners, load2)
    assert {e for e, row in enumerate(owners2) if "w1" in row} == {2, 4}
    assert {e for e, row in enumerate(owners2) if "w2" in row} == {0, 5}  # 6, then the lowest id of the rest
    assert "?" not in _kinds(owners2) and sum(row != ["flash"] for row in owners2) == 4


def test_load_moves_experts_into_dram_only_when_it_pays_by_the_margin():
    # catches: churn on every small shift of load, or never following a change of topic
    current = [["w1"], ["w1"], ["flash"], ["flash"]]
    total = 100.0
    small = [24, 24, 26, 26]  # the other two carry 4% more: not worth a reload
    assert 26 + 26 - 48 < MOVE_MARGIN * total
    assert place_tiered({"flash": 4, "w1": 2}, FLASH, 4, current, small) == current
    big = [10, 10, 40, 40]  # 60% more: the topic changed
    assert place_tiered({"flash": 4, "w1": 2}, FLASH, 4, current, big) == [["flash"], ["flash"], ["w1"], ["w1"]]
    assert hot_set(big, 2, [0, 1], 4, margin=0.7) == [0, 1]  # a margin above the gain keeps them


def test_a_dram_worker_gone_leaves_every_expert_to_the_flash_cache():
    # catches: experts left unowned when the DRAM worker holding them dies (kill -9)
    current = [["w1"], ["w1"], ["flash"], ["flash"]]
    assert place_tiered({"flash": 4}, FLASH, 4, current, [5, 5, 1, 1]) == [["flash"]] * 4
    # no flash-cache: the plain placement, which cannot hold what capacity does not allow
    assert place_tiered({"w1": 2, "w2": 2}, set(), 4, None, None) == place({"w1": 2, "w2": 2}, 4)


def test_dram_holds_each_layers_own_hottest_pairs():
    """2 layers x 4 experts; a DRAM worker that may hold 1 expert holds 2 pairs: the hottest of
    all 8, wherever they are (layer 0's expert 1 and layer 1's expert 3 here, though expert 1
    is hottest summed over layers). Catches placing by expert id for every layer alike."""
    load = [1, 9, 1, 1,   # layer 0
            1, 5, 1, 8]   # layer 1
    layers = place_tiered_pairs({"flash": 4, "w1": 1}, FLASH, 4, 2, None, load)
    assert layers == [[["flash"], ["w1"], ["flash"], ["flash"]],
                      [["flash"], ["flash"], ["flash"], ["w1"]]]
    assert union(layers) == [["flash"], ["flash", "w1"], ["flash"], ["flash", "w1"]]
    # the margin holds per pair: layer 1's expert 1 warming up a little moves nothing
    warmer = [1, 9, 1, 1, 1, 8.5, 1, 8]
    assert place_tiered_pairs({"flash": 4, "w1": 1}, FLASH, 4, 2, layers, warmer) == layers
    # a second worker takes the next hottest pairs; the first keeps its own
    more = place_tiered_pairs({"flash": 4, "w1": 1, "w2": 1}, FLASH, 4, 2, layers, warmer)
    assert [(l, e) for l, row in enumerate(more) for e, o in enumerate(row) if o == ["w1"]] == [(0, 1), (1, 3)]
    assert {(l, e) for l, row in enumerate(more) for e, o in enumerate(row) if o == ["w2"]} == {(1, 1), (0, 0)}
    # the DRAM worker gone: every pair back on the flash-cache
    assert place_tiered_pairs({"flash": 4}, FLASH, 4, 2, more, warmer) == [[["flash"]] * 4] * 2


def test_without_load_dram_takes_the_lowest_expert_ids_in_every_layer():
    """No load measured yet: the same experts in every layer (a worker fetching them from the
    model store then reads whole experts, not a scatter of pairs)."""
    layers = place_tiered_pairs({"flash": 4, "w1": 2}, FLASH, 4, 3, None, None)
    assert layers == [[["w1"], ["w1"], ["flash"], ["flash"]]] * 3


def test_the_placement_record_gives_each_worker_its_pairs():
    from shared.cluster import PlacementRecord

    same = PlacementRecord(version=1, owners=[["a"], ["b"], ["a", "b"]], subjects={})
    assert same.pairs_of("a", 2) == [[0, 2], [0, 2]] and same.fits(3, 2)
    layers = [[["a"], ["b"], ["b"]], [["b"], ["b"], ["a"]]]
    tiered = PlacementRecord(version=2, owners=union(layers), layers=layers, subjects={})
    assert tiered.pairs_of("a", 2) == [[0], [2]] and tiered.held_by("a") == [0, 2]
    assert tiered.fits(3, 2) and not tiered.fits(3, 3) and not tiered.fits(4, 2)
