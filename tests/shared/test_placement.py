from __future__ import annotations

from shared.placement import place


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
