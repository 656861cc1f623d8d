"""An expert layer's round trip to N real worker processes, as the router makes it.

`cluster` starts nats-server and N workers (optionally behind the link proxy), places expert e
on worker e mod N and yields a `Caller`: it sends a layer's messages, split by owner with the
router's own `plan_trips`, from an event loop entered once per call (as a router lane runs its
loop), and gathers the replies. `layer_calls` measures, per (workers, tokens), the round trip,
the slowest worker's compute (from its reply) and the CPU every process spent per call.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from services.perfmodel.measure import bus_server, cpu_seconds, shape_of
from shared.blas import blas_threads

ROOT = Path(__file__).resolve().parents[2]


class Caller:
    """Layer calls from this thread to the placed workers."""

    def __init__(self, url: str, owners: list[list[str]], live: dict[str, str], pids: list[int]) -> None:
        import nats

        from services.router.registry import table
        from shared.bus import new_loop

        self.url, self.owners, self.live = url, owners, live
        self.loop = new_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url))
        self.routes = table(owners, live)
        self.pids = pids

    def clone(self) -> Caller:
        """Another connection and loop, for the calling thread (a second router lane)."""
        return Caller(self.url, self.owners, self.live, self.pids)

    def call(self, trips) -> list[bytes]:
        async def fan_out() -> list[bytes]:
            msgs = await asyncio.gather(*(self.nc.request(t.subject, t.payload, timeout=30) for t in trips))
            return [m.data for m in msgs]

        return self.loop.run_until_complete(fan_out())

    def close(self) -> None:
        self.loop.run_until_complete(self.nc.close())
        self.loop.close()


@contextmanager
def cluster(path: Path, workers: int, through_link: bool = False, delay_us: float = 0.0) -> Iterator[Caller]:
    """`through_link`: the workers reach the bus through the link proxy (one-way `delay_us`), in
    its own process, as under `moebus up --link-delay-us`."""
    from services.launcher import start_link
    from shared.natsd import free_port

    with bus_server() as (url, server_pid, tmp):
        proxy = None
        worker_url = url
        if through_link:
            port = free_port()
            proxy = start_link([sys.executable, "-m", "services.cli"], url.split("//", 1)[1], port, (delay_us, 0.0),
                               subprocess.DEVNULL)
            worker_url = f"nats://127.0.0.1:{port}"
        env = {**os.environ, "MOEBUS_HOME": str(tmp),
               "OPENBLAS_NUM_THREADS": str(blas_threads(os.cpu_count() or 1, workers + 1))}
        procs = [subprocess.Popen([sys.executable, "-m", "services.cli", "worker", "--nats", worker_url,
                                   "--model", str(path)], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
        caller = None
        try:
            owners, live = asyncio.run(place(url, path, workers))
            caller = Caller(url, owners, live, [server_pid, *(p.pid for p in procs), *([proxy.pid] if proxy else [])])
            yield caller
        finally:
            if caller is not None:
                caller.close()
            for p in [*procs, *([proxy] if proxy else [])]:
                p.terminate()
            for p in [*procs, *([proxy] if proxy else [])]:
                p.wait(30)


async def place(url: str, path: Path, w: int) -> tuple[list[list[str]], dict[str, str]]:
    """Waits for N workers, places expert e on worker e mod N, waits until each holds its share."""
    import nats

    from shared import cluster as kv_cluster
    from shared import subjects
    from shared.messages import WorkerAnnounce, decode

    e = shape_of(path).experts
    nc = await nats.connect(url)
    kv = await kv_cluster.bucket(nc.jetstream())
    sub = await nc.subscribe(subjects.ANNOUNCEMENTS)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 300
    while len(seen) < w:
        a = decode(WorkerAnnounce, (await sub.next_msg(timeout=max(1, deadline - time.monotonic()))).data)
        seen[a.worker] = a.subject
    names = sorted(seen)
    owners = [[names[i % w]] for i in range(e)]
    record = kv_cluster.PlacementRecord(version=1, owners=owners, subjects=seen)
    await kv_cluster.write(kv, kv_cluster.NEXT, record)
    await kv_cluster.write(kv, kv_cluster.ACTIVE, record)
    loaded: set[str] = set()
    while len(loaded) < w:
        a = decode(WorkerAnnounce, (await sub.next_msg(timeout=max(1, deadline - time.monotonic()))).data)
        if a.experts and len(a.experts) >= len(record.held_by(a.worker)):
            loaded.add(a.worker)
    await nc.close()
    return owners, seen


def layer_calls(path: Path, workers: tuple[int, ...], tokens: tuple[int, ...], n: int, through_link: bool,
                tick: Callable[[], None]) -> list[dict]:
    out = []
    for w in workers:
        with cluster(path, w, through_link) as caller:
            out += measure_calls(caller, path, w, tokens, n, tick)
    return out


def measure_calls(caller: Caller, path: Path, w: int, tokens: tuple[int, ...], n: int,
           tick: Callable[[], None]) -> list[dict]:
    from services.router.exchange import plan_trips
    from shared.wire import decode_reply

    shape = shape_of(path)
    e, k, dim, layers = shape.experts, shape.top_k, shape.hidden, shape.layers
    rng = np.random.default_rng(1)
    out = []
    for t in tokens:
        rtt, compute = [], []
        cpu0 = wall0 = 0.0
        for i in range(n + 20):
            if i == 20:
                cpu0, wall0 = cpu_seconds(caller.pids) + time.process_time(), time.perf_counter()
            x = rng.standard_normal((t, dim)).astype(np.float32)
            inds = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
            trips = plan_trips(i % layers, 0, x, inds, caller.routes, 8 << 20)  # host-side work: in `non_expert`
            t0 = time.perf_counter()
            replies = [decode_reply(d) for d in caller.call(trips)]
            if i >= 20:
                rtt.append(time.perf_counter() - t0)
                compute.append(max(r.compute_us for r in replies) * 1e-6)
        cpu = cpu_seconds(caller.pids) + time.process_time() - cpu0
        out.append({"workers": w, "tokens": t, "rtt_us": _median(rtt), "compute_us": _median(compute),
                    "rest_us": _median([a - b for a, b in zip(rtt, compute)]),
                    "cpu_us": round(1e6 * cpu / n, 1), "wall_us": round(1e6 * (time.perf_counter() - wall0) / n, 1)})
        tick()
    return out


def _median(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)
