"""One process per worker identity, with real worker processes on a secured nats-server.

A second process with the same credentials is refused at start, naming the holder; a holder that
does not answer (a Mac asleep, here SIGSTOP) is taken over, and once awake it stops by itself.
The workers get no model: they claim their identity as soon as they connect, then wait for the
router's shared model (there is no router here), which is all these tests need of them.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.access import init_cluster, server_block
from shared.natsd import free_port, start_nats
from tests.cluster import cli, tail

pytestmark = pytest.mark.slow
WAITING = "waiting for the router to share its model"  # claimed its identity, then went on


class Bus:
    def __init__(self, url: str, cluster: Path, tmp: Path) -> None:
        self.url, self.cluster, self.tmp = url, cluster, tmp
        self.procs: list[subprocess.Popen] = []

    def worker(self, identity: str, name: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        proc = cli("worker", "--nats", self.url, "--creds", str(self.cluster / f"{identity}.creds"), log=log,
                   env={"MOEBUS_HOME": str(self.tmp / "home")})
        self.procs.append(proc)
        return proc, log


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    init_cluster(tmp_path / "cluster", workers=2)
    port = free_port()
    proc = start_nats(port, tmp_path / "store", extra=server_block(tmp_path / "cluster"))
    b = Bus(f"nats://127.0.0.1:{port}", tmp_path / "cluster", tmp_path)
    try:
        yield b
    finally:
        for p in b.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in b.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        proc.terminate()
        proc.wait(10)


def until(what: str, done: Callable[[], bool], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what}")
        time.sleep(0.1)


def text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def test_a_second_process_with_the_same_credentials_is_refused_naming_the_holder(bus: Bus):
    first, first_log = bus.worker("worker-1", "first")
    until("the first worker claimed worker-1", lambda: WAITING in text(first_log) or first.poll() is not None)
    assert first.poll() is None, tail(first_log)
    second, second_log = bus.worker("worker-1", "second")
    # Refused, not joined beside it (which a worker that never asks does at once).
    until("the second worker refused or joined", lambda: second.poll() is not None or WAITING in text(second_log))
    assert WAITING not in text(second_log), f"a second process took worker-1 beside pid {first.pid}"
    assert second.wait(30) == 3  # IdentityInUse: no service manager restarts into it
    errors = [line for line in text(second_log).splitlines() if "error" in line]
    assert len(errors) == 1, errors
    assert errors[0].startswith("moebus worker: error: identity worker-1 is in use by worker-1-"), errors
    assert f"(pid {first.pid} on {socket.gethostname()[:64]}, since " in errors[0]
    assert "Traceback" not in text(second_log)
    assert first.poll() is None  # the holder is untouched
    other, other_log = bus.worker("worker-2", "other")  # another identity is welcome
    until("worker-2 claimed its identity", lambda: WAITING in text(other_log) or other.poll() is not None)
    assert other.poll() is None, tail(other_log)


def test_a_holder_that_does_not_answer_is_taken_over_and_stops_once_awake(bus: Bus):
    asleep, asleep_log = bus.worker("worker-1", "asleep")
    until("the first worker claimed worker-1", lambda: WAITING in text(asleep_log) or asleep.poll() is not None)
    asleep.send_signal(signal.SIGSTOP)  # its connection stays open: the server still delivers to it
    newcomer, newcomer_log = bus.worker("worker-1", "newcomer")
    until("the newcomer took worker-1 over", lambda: WAITING in text(newcomer_log) or newcomer.poll() is not None)
    assert newcomer.poll() is None, tail(newcomer_log)
    assert "identity held by a worker that does not answer" in text(newcomer_log)
    asleep.send_signal(signal.SIGCONT)  # the lid opens: it reads that it was replaced, and goes
    until("the old holder stopped", lambda: asleep.poll() is not None, timeout_s=60)
    assert asleep.returncode == 0, tail(asleep_log)
    assert "identity taken over by another worker" in text(asleep_log)
    assert newcomer.poll() is None
    late, late_log = bus.worker("worker-1", "late")  # and the newcomer holds it now, awake
    assert late.wait(60) == 3, tail(late_log)
    assert f"identity worker-1 is in use by worker-1-" in text(late_log) and f"pid {newcomer.pid} " in text(late_log)
