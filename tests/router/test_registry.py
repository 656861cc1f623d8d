from __future__ import annotations

from services.router.registry import WorkerRegistry
from shared.messages import WorkerAnnounce


def _a(worker: str, experts: list[int], model: str = "m", leaving: bool = False) -> WorkerAnnounce:
    return WorkerAnnounce(worker, f"moebus.v1.experts.{worker}", model, 2, experts, leaving)


def test_coverage_grows_with_workers_and_shrinks_when_they_go():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    assert reg.announce(_a("w0", [0, 2]), now=0)
    assert reg.covered == 2
    reg.announce(_a("w1", [1, 3]), now=1)
    assert reg.covered == 4 and reg.workers == ["w0", "w1"]
    subjects, owner = reg.table()
    assert subjects == ["moebus.v1.experts.w0", "moebus.v1.experts.w1"]
    assert owner.tolist() == [0, 1, 0, 1]
    assert reg.expire(now=3.5) == ["w0"]
    assert reg.covered == 2
    reg.announce(_a("w1", [1, 3], leaving=True), now=4)
    assert reg.covered == 0 and reg.table()[1].tolist() == [-1] * 4


def test_workers_of_another_model_are_ignored():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    assert not reg.announce(_a("w0", [0, 1, 2, 3], model="other"), now=0)
    assert reg.covered == 0


def test_malformed_announcements_are_refused():
    reg = WorkerRegistry(num_experts=4, moe_layers=2, fingerprint="m", stale_after_s=3)
    assert not reg.announce(_a("w0", ["a"]), now=0)
    assert not reg.announce(_a("w0", [9]), now=0)
    bad_subject = WorkerAnnounce("w1", "moebus.v1.experts.>", "m", 2, [0])
    assert not reg.announce(bad_subject, now=0)
    assert reg.covered == 0 and reg.workers == []
