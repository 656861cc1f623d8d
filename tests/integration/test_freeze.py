"""Frozen peers, as a Mac asleep or a stalled link looks to the rest of the cluster: a process
stopped with SIGSTOP, then woken with SIGCONT. Streams go on (or resume with the bus) with the
greedy text of an undisturbed run, never waiting for the 30 s expert timeout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import tail, wait_healthy
from tests.integration.test_failures import Services

pytestmark = pytest.mark.slow
MODEL = "tiny-mixtral"
PROMPTS = [[8 + i, 9, 10 + 2 * i] for i in range(4)]


def frozen(pid: int) -> bool:
    """Whether the process is stopped (state T in /proc), as a sleeping Mac's would be."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


async def _stream(http: httpx.AsyncClient, prompt: list[int], started: asyncio.Event, gaps: list[float]) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 400, "temperature": 0, "stream": True}
    text, last = [], time.monotonic()
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.append(chunk["choices"][0]["text"])
                started.set()
                now = time.monotonic()
                gaps.append(now - last)
                last = now
    return "".join(text)


async def _texts(url: str, during: Callable[[], None] | None = None) -> tuple[list[str], float]:
    """The greedy completions of PROMPTS, streamed at once; `during()` runs once they have
    begun. Returns the texts and the longest pause between two chunks of any stream."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        started, gaps = asyncio.Event(), []
        tasks = [asyncio.ensure_future(_stream(http, p, started, gaps)) for p in PROMPTS]
        if during is not None:
            await started.wait()
            await asyncio.to_thread(during)
        texts = await asyncio.gather(*tasks)
    return texts, max(gaps)


@pytest.fixture(scope="module")
def cluster(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    c = Services(checkpoints["mixtral"], tmp_path_factory.mktemp("freeze"), router_args=())
    c.worker()
    c.worker()
    wait_healthy(c.url, c.procs, c.log)
    c.reference, _ = asyncio.run(_texts(c.url))
    yield c
    for p in c.procs:  # never leave a stopped process behind
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
    c.stop()


def _health(url: str) -> tuple[int, dict]:
    r = httpx.get(f"{url}/health", timeout=10)
    return r.status_code, r.json()


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_frozen_worker_is_routed_around_mid_stream(cluster: Services):
    sleeper = cluster.procs[-1]
    try:
        texts, pause = asyncio.run(_texts(cluster.url, during=lambda: os.kill(sleeper.pid, signal.SIGSTOP)))
        # Every stream ended, exact, while the worker was still asleep: nothing waited for it to wake.
        assert frozen(sleeper.pid)
        assert texts == cluster.reference
        print(f"longest pause in a stream around the freeze: {pause:.2f}s")
        assert "no heartbeat for" in tail(cluster.log, 200_000)  # dropped for its silence, not by chance
        # A new request is served by the survivor while the other still sleeps.
        again, _ = asyncio.run(_texts(cluster.url))
        assert again == cluster.reference and frozen(sleeper.pid)
    finally:
        os.kill(sleeper.pid, signal.SIGCONT)
    # Woken, it rejoins and serves again: the text still matches.
    _wait(lambda: _health(cluster.url)[1].get("workers", []).__len__() == 2, 30, "the woken worker did not rejoin")
    texts, _ = asyncio.run(_texts(cluster.url))
    assert texts == cluster.reference


def test_a_frozen_bus_resumes_streams_when_it_wakes(cluster: Services):
    _wait(lambda: _health(cluster.url)[0] == 200 and len(_health(cluster.url)[1]["workers"]) == 2, 60,
          "two workers before the freeze")
    seen: list[tuple[int, dict]] = []

    def stall() -> None:
        os.kill(cluster.nats.pid, signal.SIGSTOP)
        try:
            end = time.monotonic() + 8
            while time.monotonic() < end:  # /health during the stall: what does it claim?
                seen.append(_health(cluster.url))
        finally:
            os.kill(cluster.nats.pid, signal.SIGCONT)

    texts, pause = asyncio.run(_texts(cluster.url, during=stall))
    assert texts == cluster.reference
    print(f"longest pause in a stream around the bus stall: {pause:.2f}s")
    assert seen and all(code == 503 for code, _ in seen), seen  # the truth: nothing is served meanwhile
    for _, body in seen:
        assert "cannot hold every expert" not in body["error"], body
    print("/health during the stall:", sorted({body["error"] for _, body in seen}))
    _wait(lambda: _health(cluster.url)[0] == 200, 30, f"not ready after the stall: {_health(cluster.url)}")
