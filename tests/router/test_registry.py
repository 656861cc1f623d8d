from __future__ import annotations

import numpy as np
import pytest

from services.router.registry import Table, WorkerRegistry, table
from shared.errors import WireError
from shared.messages import WorkerAnnounce, decode
from shared.subjects import experts_subject


def _a(worker: str, capacity: int = 4, model: str = "m", leaving: bool = False, draining: bool = False,
       loaded: int = 0) -> WorkerAnnounce:
    return WorkerAnnounce(worker=worker, subject=experts_subject(worker), model=model, layers=2, experts=[],
                          capacity=capacity, leaving=leaving, draining=draining, loaded=loaded)


def test_workers_come_and_go_with_their_heartbeats():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    assert reg.announce(_a("w0"), now=0) == []
    reg.announce(_a("w1", capacity=2), now=1)
    assert reg.workers == ["w0", "w1"] and reg.capacities() == {"w0": 4, "w1": 2}
    assert reg.expire(now=3.5) == [("w0", experts_subject("w0"))]
    assert reg.announce(_a("w1", leaving=True), now=4) == [experts_subject("w1")]
    assert reg.workers == []


def test_a_draining_worker_is_live_but_holds_nothing_in_the_next_placement():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    reg.announce(_a("w0", draining=True, loaded=3), now=0)
    assert reg.capacities() == {"w0": 0} and reg.live() == {"w0": experts_subject("w0")} and reg.loaded("w0") == 3


def test_workers_of_another_model_are_ignored():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    assert reg.announce(_a("w0", model="other"), now=0) is None
    assert reg.workers == []


def test_a_failed_worker_is_dropped_until_it_announces_again():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    reg.announce(_a("w0"), now=0)
    assert reg.drop_subject(experts_subject("w0"), "no responders", now=0.5) == "w0"
    assert reg.drop_subject(experts_subject("w0"), "no responders", now=0.6) is None
    assert reg.left == {"w0": ("no responders", 0.5)}  # readiness can say why it is out
    reg.announce(_a("w0"), now=1)
    assert reg.workers == ["w0"] and reg.left == {}


def test_a_silent_worker_is_remembered_as_silent_until_it_returns_or_is_forgotten():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3, forget_after_s=60)
    reg.announce(_a("w0"), now=0)
    reg.announce(_a("w1"), now=0)
    reg.announce(_a("w1", leaving=True), now=1)  # a goodbye is not a loss
    assert reg.expire(now=4) == [("w0", experts_subject("w0"))]
    assert list(reg.left) == ["w0"] and "no heartbeat for 4s" in reg.left["w0"][0]
    reg.expire(now=70)
    assert reg.left == {}


def test_an_announcement_naming_another_subject_is_ignored():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    forged = _a("w0").model_copy(update={"subject": "moebus.v1.router.generate"})
    assert reg.announce(forged, now=0) is None and reg.workers == []


def test_malformed_announcements_are_refused():
    for bad in (b'{"worker": "w1", "subject": "moebus.v1.experts.>", "model": "m", "layers": 2, "experts": [0]}',
                b'{"worker": "w1", "subject": "a b", "model": "m", "layers": 2, "experts": [0]}',
                b'{"worker": "w1", "subject": experts_subject("w1"), "model": "m", "layers": 2, "experts": ["a"]}',
                b'{"worker": "w 1", "subject": experts_subject("w1"), "model": "m", "layers": 2, "experts": [0]}',
                b'{"worker": "w1", "subject": experts_subject("w1"), "model": "m", "layers": 2, "experts": [0],'
                b' "capacity": -1}'):
        with pytest.raises(WireError):
            decode(WorkerAnnounce, bad)


def test_the_table_routes_to_live_owners_only():
    t = table([["a"], ["a", "b"], ["b"], []], {"a": "s.a", "b": "s.b"})
    assert t.subjects == ["s.a", "s.b"] and t.count.tolist() == [1, 2, 1, 0]
    assert t.owners[1, :2].tolist() == [0, 1]
    gone = table([["a"], ["a", "b"], ["b"], []], {"a": "s.a"})
    assert gone.count.tolist() == [1, 1, 0, 0]
    assert t.without([("s.a", None)]).count.tolist() == [0, 1, 1, 0]
    assert t.without([("s.a", frozenset({1}))]).count.tolist() == [1, 1, 1, 0]  # a 409 for expert 1 only
    assert t.without([]) is t
    assert Table.empty(3).count.tolist() == [0, 0, 0] and np.all(Table.empty(3).owners == -1)


def test_on_a_secured_bus_an_identity_has_one_live_worker_the_newest():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3, one_per_identity=True)
    reg.announce(_a("worker-1-aaaaaa"), now=0)
    reg.announce(_a("worker-2-bbbbbb"), now=0)
    assert reg.announce(_a("worker-1-cccccc"), now=1) == [experts_subject("worker-1-aaaaaa")]  # a restart
    assert reg.announce(_a("worker-1-cccccc"), now=2) == []  # its own heartbeat replaces nobody
    assert reg.workers == ["worker-1-cccccc", "worker-2-bbbbbb"]
    # The replaced process wakes and beats once more before it stops: it takes nothing back.
    assert reg.announce(_a("worker-1-aaaaaa"), now=3) == []
    assert reg.workers == ["worker-1-cccccc", "worker-2-bbbbbb"]
    # ... even after a night asleep, while the identity's newer process lives
    reg.announce(_a("worker-1-cccccc"), now=36_000)
    reg.announce(_a("worker-2-bbbbbb"), now=36_000)
    reg.expire(now=36_000)
    assert reg.announce(_a("worker-1-aaaaaa"), now=36_001) == []
    assert reg.workers == ["worker-1-cccccc", "worker-2-bbbbbb"]
    open_bus = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    open_bus.announce(_a("vm-aaaaaa"), now=0)
    assert open_bus.announce(_a("vm-bbbbbb"), now=0) == [] and len(open_bus.workers) == 2  # one host, two workers
