from __future__ import annotations

import pytest

from services.router.registry import WorkerRegistry
from shared.errors import WireError
from shared.messages import WorkerAnnounce, decode


def _a(worker: str, experts: list[int], model: str = "m", leaving: bool = False, world: int = 2,
       subject: str = "") -> WorkerAnnounce:
    return WorkerAnnounce(worker=worker, subject=subject or f"moebus.v1.experts.{worker}", model=model, layers=2,
                          experts=experts, leaving=leaving, world=world)


def test_coverage_grows_with_workers_and_shrinks_when_they_go():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    assert reg.announce(_a("w0", [0, 2]), now=0) == []
    assert reg.covered == 2
    reg.announce(_a("w1", [1, 3]), now=1)
    assert reg.covered == 4 and reg.workers == ["w0", "w1"]
    subjects, owner = reg.table()
    assert subjects == ["moebus.v1.experts.w0", "moebus.v1.experts.w1"]
    assert owner.tolist() == [0, 1, 0, 1]
    assert reg.expire(now=3.5) == ["moebus.v1.experts.w0"]
    assert reg.covered == 2
    assert reg.announce(_a("w1", [1, 3], leaving=True), now=4) == ["moebus.v1.experts.w1"]
    assert reg.covered == 0 and reg.table()[1].tolist() == [-1] * 4


def test_workers_of_another_model_are_ignored():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    assert reg.announce(_a("w0", [0, 1, 2, 3], model="other"), now=0) is None
    assert reg.covered == 0


def test_malformed_announcements_are_refused():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    assert reg.announce(_a("w0", [9]), now=0) is None
    assert reg.covered == 0 and reg.workers == []
    for bad in (b'{"worker": "w1", "subject": "moebus.v1.experts.>", "model": "m", "layers": 2, "experts": [0]}',
                b'{"worker": "w1", "subject": "a b", "model": "m", "layers": 2, "experts": [0]}',
                b'{"worker": "w1", "subject": "moebus.v1.experts.w1", "model": "m", "layers": 2, "experts": ["a"]}',
                b'{"worker": "w 1", "subject": "moebus.v1.experts.w1", "model": "m", "layers": 2, "experts": [0]}'):
        with pytest.raises(WireError):
            decode(WorkerAnnounce, bad)


def test_a_restarted_worker_replaces_its_old_subject():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    reg.announce(_a("w0", [0, 1, 2, 3], subject="moebus.v1.experts.w0-old"), now=0)
    assert reg.announce(_a("w0", [0, 1, 2, 3], subject="moebus.v1.experts.w0-new"), now=1) == [
        "moebus.v1.experts.w0-old"]
    assert reg.table()[0] == ["moebus.v1.experts.w0-new"]


def test_a_failed_worker_is_dropped_until_it_announces_again():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    reg.announce(_a("w0", [0, 2]), now=0)
    reg.announce(_a("w1", [1, 3]), now=0)
    assert reg.drop_subject("moebus.v1.experts.w1") == "w1"
    assert reg.drop_subject("moebus.v1.experts.w1") is None
    assert reg.unowned() == [1, 3] and reg.workers == ["w0"]
    reg.announce(_a("w1", [1, 3]), now=1)
    assert reg.unowned() == []


def test_a_worker_of_another_cluster_size_is_ignored():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    reg.announce(_a("w0", [0, 2], world=2), now=0)
    assert reg.announce(_a("w1", [1], world=3), now=0) is None
    assert reg.workers == ["w0"]
