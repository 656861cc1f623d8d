"""Load run: 1 stream, then C concurrent streaming clients, against `moebus up` on a model.

    python -m bench.load [--model PATH] [--workers 2] [--concurrency 16] [--tokens 64]

Prints a table and writes bench/load.json. Aggregate tokens/s at C streams over 1 stream is
what continuous batching buys: a decode step for C sequences costs about the same bus round
trips as for one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from openai import AsyncOpenAI

from bench.table import write_and_show
from services.launcher import healthy
from shared.natsd import free_port

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def cluster(model: str | None, workers: int, log: Path, extra: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> Iterator[str]:
    """`moebus up` on free ports: yields its URL once /health is 200, stops it after."""
    port, nats_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "services.cli", "up", "--workers", str(workers), "--port", str(port),
           "--nats-port", str(nats_port), *extra] + (["--model", model] if model else [])
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1500):
            if proc.poll() is not None:
                raise SystemExit(f"moebus up exited:\n{log.read_text()[-3000:]}")
            if healthy(url):
                break
            time.sleep(0.2)
        else:
            raise SystemExit("moebus up never became ready")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(60)


async def stream_one(client: AsyncOpenAI, model: str, prompt: str, tokens: int, **sampling) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    used = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens,
        stream=True, stream_options={"include_usage": True}, **{"temperature": 0, **sampling})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            used = chunk.usage.completion_tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"tokens": used, "ttft": stamps[0] - t0 if stamps else None, "gaps": gaps}


async def run(url: str, concurrency: int, tokens: int, **sampling) -> dict:
    """`sampling`: the requests' temperature, seed...; greedy by default."""
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600) as client:
        model = (await client.models.list()).data[0].id
        await stream_one(client, model, "warm up", 4, **sampling)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, model, f"the river {i}", tokens, **sampling)
                                         for i in range(concurrency)))
        wall = time.perf_counter() - t0
    gaps = sorted(g for r in results for g in r["gaps"])
    total = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "completed": sum(r["tokens"] == tokens for r in results),
        "tokens": total, "seconds": round(wall, 3), "tok_s": round(total / wall, 2),
        "ttft_ms_p50": round(1000 * statistics.median(r["ttft"] for r in results), 2),
        "itl_ms_p50": round(1000 * gaps[len(gaps) // 2], 2) if gaps else None,
        "itl_ms_p99": round(1000 * gaps[int(len(gaps) * 0.99)], 2) if gaps else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: the demo model)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "load.json")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with cluster(a.model, a.workers, a.out.with_suffix(".log")) as url:
        runs = [asyncio.run(run(url, c, a.tokens)) for c in (1, a.concurrency)]
    report = {"machine": {"cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()},
              "workers": a.workers, "max_tokens": a.tokens, "runs": runs,
              "speedup": round(runs[1]["tok_s"] / runs[0]["tok_s"], 2)}
    write_and_show(a.out, report, runs, [("streams", "concurrency", 8), ("done", "completed", 5), ("tok/s", "tok_s", 8),
                                         ("TTFT p50 ms", "ttft_ms_p50", 12), ("ITL p50 ms", "itl_ms_p50", 11),
                                         ("ITL p99 ms", "itl_ms_p99", 11)])
    print(f"aggregate tokens/s, {a.concurrency} streams vs 1: {report['speedup']}x ({a.workers} workers)")


if __name__ == "__main__":
    main()
