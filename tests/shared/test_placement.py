from __future__ import annotations

import pytest

from shared.placement import cluster_conflict, experts_of, place_experts, route_table, worker_ids


def test_expert_e_goes_to_worker_e_mod_w():
    assert place_experts(5, ["a", "b"]) == ["a", "b", "a", "b", "a"]
    assert experts_of(8, worker_ids(3), "w1") == [1, 4, 7]


def test_every_expert_has_exactly_one_owner():
    for w in range(1, 6):
        ids = worker_ids(w)
        held = [e for i in ids for e in experts_of(16, ids, i)]
        assert sorted(held) == list(range(16))


def test_no_workers_is_an_error():
    with pytest.raises(ValueError):
        place_experts(4, [])


def test_route_table_marks_gaps_and_breaks_ties_by_id():
    table = route_table(4, [("w1", [1, 3]), ("w0", [1])])
    assert table == [None, "w0", None, "w1"]


def test_a_worker_that_disagrees_with_the_cluster_is_refused():
    assert cluster_conflict("w1", 2, []) is None
    assert cluster_conflict("w1", 2, [("w0", 2)]) is None
    assert "already running" in cluster_conflict("w0", 2, [("w0", 2), ("w1", 2)])
    why = cluster_conflict("w2", 3, [("w0", 2), ("w1", 2)])
    assert "--world 2" in why and "--world 3" in why
