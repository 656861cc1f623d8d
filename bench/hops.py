"""What stands between a layer's round trip and the bare bus: measured piece by piece.

    python -m bench.hops [--model bench/models/thin] [--n 500]

1. A thread hand-off: a no-op run on an event loop from another thread and waited for
   (what the router paid twice per layer before its lanes had loops of their own), against the
   same no-op on the calling thread's own loop.
2. One worker answering a single token's request straight from a nats-py client, with nothing
   else running: the round trip less the worker's own compute, against a bare echo of the
   same sizes. This is the worker's and the bus's share with no router and no other process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nats
import numpy as np

from bench import bus, models
from services.perfmodel.calls import place
from shared.natsd import free_port, start_nats
from shared.wire import decode_reply, encode_request, reply_size

ROOT = Path(__file__).resolve().parents[1]


def _p50(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)


def hand_off_us(n: int = 3000) -> dict:
    from shared.mlx_thread import new_loop

    async def noop() -> None:
        return None

    def timed(f) -> float:
        for _ in range(100):
            f()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
        return _p50(out)

    other = new_loop()
    threading.Thread(target=other.run_forever, daemon=True).start()
    own = new_loop()
    return {"other_thread_loop_us": timed(lambda: asyncio.run_coroutine_threadsafe(noop(), other).result()),
            "own_loop_us": timed(lambda: own.run_until_complete(noop()))}


async def _worker_direct(url: str, model: Path, n: int) -> dict:
    shape = models.describe(model)["shape"]
    dim, k, experts = shape["hidden_size"], shape["num_experts_per_tok"], shape["num_local_experts"]
    _, live = await place(url, model, 1)  # every expert on the one worker, loaded
    (subject,) = live.values()
    nc = await nats.connect(url)
    rng = np.random.default_rng(0)
    rtt, compute = [], []
    for i in range(n + 50):
        x = rng.standard_normal((1, dim)).astype(np.float32)
        pairs = rng.choice(experts, k, replace=False).astype(np.int32)
        payload = encode_request(int(rng.integers(0, shape["num_hidden_layers"])), 0, x, np.zeros(k, np.int32), pairs)
        t0 = time.perf_counter()
        reply = decode_reply((await nc.request(subject, payload, timeout=10)).data)
        if i >= 50:
            rtt.append(time.perf_counter() - t0)
            compute.append(reply.compute_us * 1e-6)
    await nc.close()
    return {"request_bytes": len(payload), "reply_bytes": reply_size(k, dim, 4), "rtt_us_p50": _p50(rtt),
            "compute_us_p50": _p50(compute), "rest_us_p50": _p50([r - c for r, c in zip(rtt, compute)])}


def worker_direct(model: Path, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_nats(port, Path(tmp))
        url = f"nats://127.0.0.1:{port}"
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MOEBUS_HOME": tmp}  # as under `moebus up` on 2 cores
        worker = subprocess.Popen([sys.executable, "-m", "services.cli", "worker", "--nats", url, "--model", str(model)],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            out = bus._run(_worker_direct(url, model, n))
        finally:
            worker.terminate()
            worker.wait(30)
            server.terminate()
            server.wait(10)
    out["bare_nats_us_p50"] = bus.raw_rtt_us(out["request_bytes"], out["reply_bytes"], n)["p50"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "bench" / "models" / "thin")
    ap.add_argument("--n", type=int, default=500)
    a = ap.parse_args()
    print(json.dumps({"hand_off": hand_off_us(), "worker_direct": worker_direct(a.model, a.n)}, indent=2))


if __name__ == "__main__":
    main()
