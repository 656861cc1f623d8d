"""The micro-benchmarks `moebus perfmodel calibrate` runs, one function per part of a token.

In-process: the router's time outside the experts (the model with its experts answering zeros
after the same per-layer sync the router does), the worker's expert compute, and the machine's
roofline peaks. Across processes: an expert layer's round trip from a client to N real worker
processes (fan out, gather), directly and through the link proxy at delay 0, with the CPU time
every process spent on it, and the bare bus (echo subscribers) for its cost per byte.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

ECHO = """  # python -c ECHO URL REPLY_BYTES SUBJECT: answers every request with that many bytes
import asyncio, sys, nats, uvloop
async def main():
    nc = await nats.connect(sys.argv[1])
    reply = bytes(int(sys.argv[2]))
    async def echo(msg): await msg.respond(reply)
    await nc.subscribe(sys.argv[3], cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)


def peaks() -> dict:
    """The roofline's two peaks for one BLAS thread's numpy (the worker's CPU compute):
    a large matmul's FLOP/s and a gemv's bytes/s from DRAM."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 1024), np.float32), rng.standard_normal((1024, 1024), np.float32)
    w, v = rng.standard_normal((8192, 2048), np.float32), rng.standard_normal(2048, np.float32)  # 64 MiB
    a @ b, w @ v
    mm = min(_timed(lambda: a @ b) for _ in range(5))
    mv = min(_timed(lambda: w @ v) for _ in range(5))
    return {"gflops": round(2 * 256 * 1024 * 1024 / mm / 1e9, 2), "mem_gbps": round(w.nbytes / mv / 1e9, 2)}


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def non_expert(path: Path, batches: tuple[int, ...], contexts: tuple[int, ...], steps: int,
               tick: Callable[[], None], caller=None) -> list[dict]:
    """ms per decode step outside the experts, per (layers, batch, context): the router's own
    engine (one micro-batch) and exchange, less the time its round trips to `caller`'s workers
    took (the router measures itself the same way). On one machine the workers' reads take the
    caches and memory bandwidth the router's weights need: measured with them, not without.
    Full depth and half depth, so the per-layer and per-step costs come apart."""
    from mlx_lm import load

    from services.router.bus_experts import install
    from services.router.engine import Engine, EngineLimits
    from shared.messages import GenerateRequest
    from shared.model import find_experts

    model, tokenizer = load(str(path))
    exchange = _Exchange(shape_of(path).experts, caller)
    install(model, find_experts(model), exchange)
    layers = model.model.layers
    out = []
    for depth in (len(layers), max(1, len(layers) // 2)):
        model.model.layers = layers[:depth]
        for context in contexts:
            for b in batches:
                # the router's own limits and lanes: one micro-batch, two from 8 sequences on
                engine = Engine(model, tokenizer, EngineLimits(), lambda events: None)
                exchange.baton = engine.baton
                for i in range(b):
                    req = GenerateRequest(request_id=f"r{i}", stream=f"moebus.v1.stream.calibrate-{i}",
                                          max_tokens=steps + 8, temperature=0.0)
                    engine.add(req, [8 + (i + j) % 200 for j in range(context)])
                times, cpu = [], []
                for i in range(steps + 4):
                    if i == 4:
                        exchange.rests.clear()  # past the prefill
                    t0, c0, waited = time.perf_counter(), time.process_time(), exchange.waited
                    engine.step()
                    times.append(time.perf_counter() - t0 - (exchange.waited - waited))
                    cpu.append(time.process_time() - c0)
                engine.close()
                row = {"layers": depth, "batch": b, "context": context,
                       "lanes": len([x for x in engine.lanes if x.steps]),
                       "ms": round(1e3 * statistics.median(times[-steps:]), 3),  # one lane: its time outside the trips
                       "cpu_ms": round(1e3 * statistics.median(cpu[-steps:]), 3)}  # every lane's CPU
                if exchange.rests:  # each trip less its slowest worker's compute, in place
                    row["trip_rest_us"] = _median_us(exchange.rests)
                out.append(row)
                tick()
    model.model.layers = layers
    exchange.close()
    return out


class _Exchange:
    """The router's exchange as the router runs it (the sync that routes from host memory, the
    plan, the replies' placement, back to MLX), its round trips going to real workers through
    `caller`; the time spent waiting on them is counted apart. With no caller the experts answer
    zeros at once."""

    def __init__(self, num_experts: int, caller=None) -> None:
        from services.router.registry import table

        self.routes = caller.routes if caller else table([["w"]] * num_experts, {"w": "w"})
        self.caller = caller
        self.waited = 0.0
        self.rests: list[float] = []
        self.baton = None  # a lane waiting on its trip lets the other compute, as in the router
        self._local = threading.local()  # each lane thread its own connection, as a router lane
        self._clones: list = []

    def _caller(self):
        if threading.current_thread() is threading.main_thread():
            return self.caller
        if not hasattr(self._local, "caller"):
            self._local.caller = self.caller.clone()
            self._clones.append(self._local.caller)
        return self._local.caller

    def close(self) -> None:
        for c in self._clones:
            c.close()

    def __call__(self, layer: int, x, indices):
        import mlx.core as mx

        from services.router.exchange import plan_trips
        from shared.arrays import to_mlx, to_numpy, wire_dtype
        from shared.wire import decode_reply

        *lead, dim = x.shape
        k = indices.shape[-1]
        xf, idx = x.reshape(-1, dim), indices.reshape(-1, k).astype(mx.int32)
        mx.eval(xf, idx)
        code = wire_dtype(xf)
        xn, inds = to_numpy(xf), np.asarray(idx)
        trips = plan_trips(layer, code, xn, inds, self.routes, 8 << 20)
        y = np.zeros((xn.shape[0], k, dim), xn.dtype)
        if self.caller is not None:
            caller = self._caller()
            t0 = time.perf_counter()
            with self.baton.released() if self.baton else nullcontext():
                data = caller.call(trips)
            replies = [decode_reply(d) for d in data]
            took = time.perf_counter() - t0
            self.waited += took
            self.rests.append(took - max(r.compute_us for r in replies) * 1e-6)
            for trip, reply in zip(trips, replies):
                y[trip.t, trip.s] = reply.y
        return to_mlx(y, code).reshape(*lead, k, dim)


def expert_compute(path: Path, tokens: tuple[int, ...], reps: int, tick: Callable[[], None]) -> list[dict]:
    """The worker's own compute (its class, its code path) for t tokens routed at random."""
    from services.expert_worker.experts import load_experts
    from shared.wire import decode_reply, decode_request, encode_request

    shape = shape_of(path)
    experts, info = load_experts(path, list(range(shape.experts)))
    e, k, dim = shape.experts, shape.top_k, shape.hidden
    rng = np.random.default_rng(0)
    out = []
    for t in tokens:
        samples, distinct = [], []
        for i in range(reps + 3):
            x = rng.standard_normal((t, dim)).astype(np.float32)
            pairs = np.concatenate([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
            req = decode_request(encode_request(i % info.moe_layers, 0, x, np.repeat(np.arange(t), k).astype(np.int32),
                                                pairs))
            t0 = time.perf_counter()
            decode_reply(experts.compute(req))
            if i >= 3:
                samples.append(time.perf_counter() - t0)
                distinct.append(len(set(pairs.tolist())))
        out.append({"tokens": t, "pairs": t * k, "distinct": round(float(np.mean(distinct)), 2),
                    "us": _median_us(samples)})
        tick()
    return out


def shape_of(path: Path):
    """The checkpoint's shape (layers, experts, top-k, hidden...) as the performance model reads it."""
    from services.perfmodel.shapes import from_config
    from shared.model import read_config
    return from_config(read_config(path))


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU of these processes so far (Linux /proc; 0 where it cannot be read)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


@contextmanager
def bus_server():
    """An open nats-server on a free loopback port: (url, pid)."""
    from shared.natsd import free_port, start_nats

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_nats(port, Path(tmp))
        try:
            yield f"nats://127.0.0.1:{port}", server.pid, Path(tmp)
        finally:
            server.terminate()
            server.wait(10)


def bare_bus(sizes: tuple[int, ...], workers: tuple[int, ...], n: int, tick: Callable[[], None]) -> list[dict]:
    """Round trips of a request of each size fanned out to N echo processes and gathered."""
    out = []
    with bus_server() as (url, _, _):
        for w in workers:
            echoes = [subprocess.Popen([sys.executable, "-c", ECHO, url, "64", f"echo.{i}"], stdout=subprocess.PIPE,
                                       text=True) for i in range(w)]
            try:
                for p in echoes:
                    p.stdout.readline()
                for size in sizes:
                    out.append({"workers": w, "bytes": size, "us": _run(_fan_out_echo(url, w, size, n))})
                    tick()
            finally:
                for p in echoes:
                    p.terminate()
                    p.wait(10)
    return out


async def _fan_out_echo(url: str, w: int, size: int, n: int) -> float:
    import nats

    nc = await nats.connect(url)
    payload = bytes(size)
    samples = []
    for i in range(n + 30):
        t0 = time.perf_counter()
        await asyncio.gather(*(nc.request(f"echo.{j}", payload, timeout=10) for j in range(w)))
        if i >= 30:
            samples.append(time.perf_counter() - t0)
    await nc.close()
    return _median_us(samples)


def _run(coro):
    import uvloop
    return uvloop.run(coro)
