"""The bare bus: nats-py request/reply round trips of given sizes, echoed by another process.

The floor moebus's per-layer expert round trip is compared with, measured in the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time

import nats

from services.perfmodel.measure import ECHO, bus_server



def raw_rtt_us(request_bytes: int, reply_bytes: int, n: int = 500) -> dict:
    """p50/p99 in µs of a request of `request_bytes` answered with `reply_bytes`."""
    with bus_server() as (url, _, _):
        echo = subprocess.Popen([sys.executable, "-c", ECHO, url, str(reply_bytes), "bench.echo"],
                                stdout=subprocess.PIPE, text=True)
        try:
            echo.stdout.readline()  # "ready"
            samples = _run(_measure(url, request_bytes, n))
        finally:
            echo.terminate()
            echo.wait(10)
    samples.sort()
    return {"p50": round(statistics.median(samples), 1), "p99": round(samples[int(0.99 * len(samples))], 1)}


async def _measure(url: str, size: int, n: int) -> list[float]:
    nc = await nats.connect(url)
    payload = bytes(size)
    for _ in range(50):  # warm up
        await nc.request("bench.echo", payload, timeout=5)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await nc.request("bench.echo", payload, timeout=5)
        out.append((time.perf_counter() - t0) * 1e6)
    await nc.close()
    return out


def _run(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
