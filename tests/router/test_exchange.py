from __future__ import annotations

import numpy as np
import pytest

from services.router.exchange import plan_trips
from shared.errors import NotReady
from shared.wire import decode_request


def test_one_message_per_worker_carrying_only_its_pairs():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    inds = np.array([[0, 1], [1, 2], [3, 0]])
    owner = np.array([0, 1, 0, 1], np.int32)  # experts 0,2 -> worker 0; 1,3 -> worker 1
    trips = plan_trips(5, 0, x, inds, ["a", "b"], owner, max_payload=1 << 20)
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
    trips = plan_trips(0, 0, x, inds, ["a"], np.array([0, 0], np.int32), max_payload=10_000)
    assert len(trips) > 1
    assert all(len(t.payload) <= 10_000 for t in trips)
    assert sum(len(t.t) for t in trips) == 200


def test_an_expert_without_a_worker_is_not_ready():
    x = np.ones((1, 4), np.float32)
    with pytest.raises(NotReady) as e:
        plan_trips(2, 0, x, np.array([[0, 1]]), ["a"], np.array([0, -1], np.int32), 1 << 20)
    assert "expert 1 of layer 2" in str(e.value)
