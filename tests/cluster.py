"""Start moebus the way a user does, as real processes, for integration tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from services.launcher import healthy
from shared.natsd import free_port

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def wait_healthy(url: str, procs: list[subprocess.Popen], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"exited with {p.returncode}:\n{tail(log)}")
        if healthy(url):
            return
        time.sleep(0.2)
    raise RuntimeError(f"not healthy after {timeout_s}s:\n{tail(log)}")


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


class Up:
    """`moebus up` in a subprocess, on free ports."""

    def __init__(self, model: Path, workers: int, tmp: Path, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.port, self.nats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        self.log = tmp / f"up-{self.port}.log"
        self.proc = cli("up", "--model", str(model), "--workers", str(workers), "--port", str(self.port),
                        "--nats-port", str(self.nats_port), *extra, log=self.log, env=env)

    def __enter__(self) -> Up:
        try:
            wait_healthy(self.url, [self.proc], self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)

    def children(self) -> list[int]:
        """Processes still running that were started for this cluster's bus."""
        return processes(rf"127\.0\.0\.1:{self.nats_port}\b")


def processes(pattern: str, parent: int | None = None) -> list[int]:
    """Pids of the live processes (children of `parent`, if given) whose command line, its
    arguments joined by spaces, matches the regular expression `pattern`, as `pgrep -f` does."""
    found = psutil.Process(parent).children() if parent is not None else psutil.process_iter()
    pids = []
    for proc in found:
        try:
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE \
                    and re.search(pattern, " ".join(proc.cmdline())):
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # gone meanwhile, or another user's
    return sorted(pids)


async def worker_subject(nc, worker: str | None = None) -> str:
    """Where a worker (the first to announce itself, or `worker`) answers: its subject is
    unique to its process, so tests learn it from the worker's heartbeat."""
    import orjson

    from shared import subjects
    sub = await nc.subscribe(subjects.ANNOUNCEMENTS)
    try:
        while True:
            a = orjson.loads((await sub.next_msg(timeout=10)).data)
            if worker is None or a["worker"] == worker:
                return a["subject"]
    finally:
        await sub.unsubscribe()


async def place_all(nc, worker, num_experts: int, version: int = 1) -> None:
    """Act as the router: place every expert on `worker` (a WorkerAnnounce) in the bucket."""
    from shared import cluster
    record = cluster.PlacementRecord(version=version, owners=[[worker.worker]] * num_experts,
                                     subjects={worker.worker: worker.subject})
    kv = await cluster.bucket(nc.jetstream())
    await cluster.write(kv, cluster.NEXT, record)
    await cluster.write(kv, cluster.ACTIVE, record)
