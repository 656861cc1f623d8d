from __future__ import annotations

import numpy as np

from services.router.registry import table
from services.router.exchange import not_held, plan_trips
from shared.wire import decode_request

TWO = table([["a"], ["b"], ["a"], ["b"]], {"a": "a", "b": "b"})  # experts 0,2 -> a; 1,3 -> b


def test_one_message_per_worker_carrying_only_its_pairs():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    inds = np.array([[0, 1], [1, 2], [3, 0]])
    trips = plan_trips(5, 0, x, inds, TWO, max_payload=1 << 20)
    assert [t.subject for t in trips] == ["a", "b"]
    for trip in trips:
        req = decode_request(trip.payload)
        assert req.layer == 5
        # each pair's row of x is its token's hidden state, its expert the gate's choice
        np.testing.assert_array_equal(req.x[req.rows], x[trip.t])
        np.testing.assert_array_equal(req.experts, inds[trip.t, trip.s])
    a, b = (decode_request(t.payload) for t in trips)
    assert sorted(a.experts.tolist()) == [0, 0, 2] and sorted(b.experts.tolist()) == [1, 1, 3]
    assert a.x.shape[0] == 3 and b.x.shape[0] == 3


def test_long_prefill_is_split_under_the_payload_limit():
    x = np.ones((100, 64), np.float32)
    inds = np.zeros((100, 2), np.int64)
    inds[:, 1] = 1
    trips = plan_trips(0, 0, x, inds, table([["a"], ["a"]], {"a": "a"}), max_payload=10_000)
    assert len(trips) > 1
    assert all(len(t.payload) <= 10_000 for t in trips)
    assert sum(len(t.t) for t in trips) == 200


def test_an_experts_tokens_are_spread_over_its_replicas():
    x = np.ones((6, 4), np.float32)
    trips = plan_trips(0, 0, x, np.zeros((6, 1), np.int64), table([["a", "b"]], {"a": "a", "b": "b"}), 1 << 20)
    assert sorted((t.subject, len(t.t)) for t in trips) == [("a", 3), ("b", 3)]


def test_pairs_of_an_expert_without_a_live_owner_wait_in_their_own_trip():
    x = np.ones((1, 4), np.float32)
    trips = plan_trips(2, 0, x, np.array([[0, 1]]), table([["a"], ["gone"]], {"a": "a"}), 1 << 20)
    assert sorted(t.subject for t in trips) == ["", "a"]
    assert decode_request(next(t for t in trips if not t.subject).payload).experts.tolist() == [1]


def test_a_409_names_the_experts_its_worker_let_go_of():
    assert not_held("experts [3, 5] are not held by this worker") == frozenset({3, 5})
    assert not_held("something else") is None
