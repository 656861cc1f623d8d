"""The bare bus: nats-py request/reply round trips of given sizes, echoed by another process.

The floor moebus's per-layer expert round trip is compared with, measured in the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

from shared.natsd import free_port, start_nats

_ECHO = """
import asyncio, sys, nats, uvloop
async def main():
    nc = await nats.connect(sys.argv[1])
    reply = bytes(int(sys.argv[2]))
    async def echo(msg): await msg.respond(reply)
    await nc.subscribe("bench.echo", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def raw_rtt_us(request_bytes: int, reply_bytes: int, n: int = 500) -> dict:
    """p50/p99 in µs of a request of `request_bytes` answered with `reply_bytes`."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_nats(port, Path(tmp))
        url = f"nats://127.0.0.1:{port}"
        echo = subprocess.Popen([sys.executable, "-c", _ECHO, url, str(reply_bytes)], stdout=subprocess.PIPE, text=True)
        try:
            echo.stdout.readline()  # "ready"
            samples = _run(_measure(url, request_bytes, n))
        finally:
            echo.terminate()
            echo.wait(10)
            server.terminate()
            server.wait(10)
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
