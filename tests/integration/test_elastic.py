"""The elastic cluster with real processes on a real nats-server: workers join, leave and crash
during streams, and every stream still gives the greedy text of an undisturbed run."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.status import fetch
from shared import cluster as bucket
from shared.messages import encode
from shared.natsd import start_nats
from tests.checkpoints import NUM_EXPERTS
from tests.cluster import ROOT, tail, wait_healthy
from tests.integration.test_failures import Services

pytestmark = pytest.mark.slow
MODEL = "tiny-mixtral"
PROMPTS = [[8 + i, 9, 10 + 2 * i] for i in range(8)]
ONE_EXPERT = 196_608  # bytes of one tiny-mixtral expert over both MoE layers


def _body(prompt: list[int], stream: bool = False, max_tokens: int = 480) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def status(nats_url: str) -> dict:
    """`moebus status --json`, as a user runs it."""
    out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json", "--nats", nats_url], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def _texts(url: str, during=None) -> list[str]:
    """The 8 greedy completions, streamed at once; `during()` runs once they have begun."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        async def one(prompt: list[int]) -> str:
            text, first = [], True
            async with http.stream("POST", "/v1/completions", json=_body(prompt, True)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        text.append(chunk["choices"][0]["text"])
                        if first:
                            started.set_result(None) if not started.done() else None
                            first = False
            return "".join(text)

        started: asyncio.Future = asyncio.get_running_loop().create_future()
        tasks = [asyncio.ensure_future(one(p)) for p in PROMPTS]
        if during is not None:
            await started
            await asyncio.to_thread(during)
        return await asyncio.gather(*tasks)


def _status_until(nats_url: str, ok: Callable[[dict], bool], timeout_s: float = 60) -> dict:
    """Poll the router's cluster endpoint (what `moebus status --json` prints, without starting a
    process each time) until `ok`."""
    deadline = time.monotonic() + timeout_s
    while not ok(s := asyncio.run(fetch(nats_url)).model_dump()):
        assert time.monotonic() < deadline, s
        time.sleep(0.3)
    return s


def _workers_holding(nats_url: str, n: int, timeout_s: float = 60) -> dict:
    return _status_until(nats_url, lambda s: len([w for w in s["workers"] if w["experts"]]) == n
                         and not s["unowned_experts"] and s["pending_version"] is None, timeout_s)


def _scrape(text: str) -> tuple[int, dict[str, float]]:
    """From /metrics: the router's active placement version, and the (token, expert) pairs it
    has sent each worker (counted as each call is made, not at a heartbeat)."""
    version, pairs = 0, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "moebus_placement_version":
                version = int(sample.value)
            elif sample.name == "moebus_worker_tokens_total":
                pairs[sample.labels["worker"]] = sample.value
    return version, pairs


@dataclass
class Stream:
    prompt: int
    tokens: int
    chunks: list[tuple[float, str]] = field(default_factory=list)  # (received at, text)


@dataclass
class Scrape:
    sent: float
    answered: float
    version: int
    newcomer_pairs: float  # sent to any worker but the one there before the join


async def _streams_across_a_join(c: Services, old: str, version: int, timeout_s: float = 120,
                                 ) -> tuple[list[Stream], list[Scrape]]:
    """Each prompt streamed again and again, from before a worker is started until the router
    has moved experts to it and sent it pairs; then the streams in flight run to their end.
    Each prompt's streams have a length of their own, so they never all end at once: the
    router is never idle, and the move cannot fall between streams."""
    streams: list[Stream] = []
    scrapes: list[Scrape] = []
    started, moved = asyncio.Event(), asyncio.Event()
    async with httpx.AsyncClient(base_url=c.url, timeout=120) as http:
        async def keep_streaming(i: int) -> None:
            while not moved.is_set():
                s = Stream(i, 240 - 20 * i)
                streams.append(s)
                async with http.stream("POST", "/v1/completions", json=_body(PROMPTS[i], True, s.tokens)) as r:
                    assert r.status_code == 200, await r.aread()
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            assert "error" not in chunk, chunk
                            s.chunks.append((time.monotonic(), chunk["choices"][0]["text"]))
                            started.set()

        slots = [asyncio.ensure_future(keep_streaming(i)) for i in range(len(PROMPTS))]
        try:
            await started.wait()
            await asyncio.to_thread(c.worker)
            deadline = time.monotonic() + timeout_s
            while not moved.is_set():
                for slot in slots:
                    if slot.done():
                        slot.result()  # a stream that failed: its error, now
                sent = time.monotonic()
                v, pairs = _scrape((await http.get("/metrics")).text)
                scrapes.append(Scrape(sent, time.monotonic(), v, sum(n for w, n in pairs.items() if w != old)))
                if v > version and scrapes[-1].newcomer_pairs > 0:
                    moved.set()
                else:
                    assert time.monotonic() < deadline, f"no move to the newcomer in {timeout_s}s: v{v}, {pairs}"
                    await asyncio.sleep(0.1)
            await asyncio.gather(*slots)
        finally:
            for slot in slots:
                slot.cancel()
    return streams, scrapes


@pytest.fixture(scope="module")
def cluster(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    c = Services(checkpoints["mixtral"], tmp_path_factory.mktemp("elastic"), router_args=())
    c.worker()
    wait_healthy(c.url, c.procs, c.log)
    c.reference = asyncio.run(_texts(c.url))  # undisturbed: one worker holds every expert
    yield c
    c.stop()


def test_a_worker_joins_during_streams(cluster: Services):
    before = _workers_holding(cluster.nats_url, 1)
    (old_id,) = [w["worker"] for w in before["workers"]]
    streams, scrapes = asyncio.run(_streams_across_a_join(cluster, old_id, before["placement_version"]))
    for s in streams:  # the first `s.tokens` of the undisturbed greedy tokens
        text = "".join(text for _, text in s.chunks)
        assert cluster.reference[s.prompt].startswith(text) and len(text.split()) == s.tokens, (s.prompt, text)
    # The move happened mid-stream: a stream that had begun before the router sent the newcomer
    # anything went on, for many tokens, after it had.
    served_at = next(sc.answered for sc in scrapes if sc.newcomer_pairs > 0)
    across = [s for s in streams
              if any(sc.newcomer_pairs == 0 and sc.sent > s.chunks[0][0] for sc in scrapes)
              and sum(t > served_at for t, _ in s.chunks) >= 10]
    t0 = streams[0].chunks[0][0]  # the timeline, should none have
    assert across, ([(round(sc.sent - t0, 2), sc.version, sc.newcomer_pairs) for sc in scrapes],
                    [(s.prompt, round(s.chunks[0][0] - t0, 2), round(s.chunks[-1][0] - t0, 2)) for s in streams])
    # The newcomer's own count of what it served comes with its next heartbeat.
    after = _status_until(cluster.nats_url, lambda s: len(s["workers"]) == 2 and not s["unowned_experts"]
                          and all(w["tokens"] > 0 for w in s["workers"]) and s["pending_version"] is None)
    (new,) = [w for w in after["workers"] if w["worker"] != old_id]
    assert new["experts"] and after["placement_version"] > before["placement_version"]
    lost = [e for e, row in enumerate(after["owners"]) if old_id not in row]
    # Only the newcomer's share moved, and only to the newcomer (hot experts may gain a replica).
    assert lost and all(new["worker"] in after["owners"][e] for e in lost)
    assert len(lost) <= NUM_EXPERTS["mixtral"] // 2


def test_a_worker_leaves_on_sigterm_without_failing_a_request(cluster: Services):
    _workers_holding(cluster.nats_url, 2)
    leaver = cluster.procs[-1]
    texts = asyncio.run(_texts(cluster.url, during=lambda: leaver.send_signal(signal.SIGTERM)))
    assert texts == cluster.reference
    assert leaver.wait(30) == 0
    assert "draining" in tail(cluster.log, 20000)
    assert len(_workers_holding(cluster.nats_url, 1)["workers"]) == 1


def test_a_crashed_worker_is_replaced_during_streams(cluster: Services):
    cluster.worker()
    _workers_holding(cluster.nats_url, 2)
    victim = cluster.procs[-1]
    texts = asyncio.run(_texts(cluster.url, during=lambda: victim.send_signal(signal.SIGKILL)))
    assert texts == cluster.reference
    s = _workers_holding(cluster.nats_url, 1, timeout_s=10)  # re-placed on the survivor within seconds
    assert len(s["workers"][0]["experts"]) == NUM_EXPERTS["mixtral"]


async def _hold_placement(nats_url: str, hold: bool) -> None:
    """Take the placement writer's lease from the router, as a standby router would (`hold`),
    or give it back: while it is held no router writes a new placement."""
    nc = await nats.connect(nats_url)
    try:
        kv = await bucket.bucket(nc.jetstream())
        lease = bucket.Lease(router="standby", until=time.time() + 600)
        await kv.put(bucket.LEADER, encode(lease) if hold else b"")
    finally:
        await nc.close()


def test_with_two_replicas_a_crash_fails_over_at_once(checkpoints: dict[str, Path], tmp_path: Path):
    """The calls a crash fails go to the expert's other replica at once: no new placement is
    needed (none can be made: the lease is held elsewhere), so the streams go on without a pause."""
    c = Services(checkpoints["mixtral"], tmp_path, router_args=("--replicas", "2"))
    try:
        c.worker()
        c.worker()
        wait_healthy(c.url, c.procs, c.log)
        before = _workers_holding(c.nats_url, 2)
        assert all(len(row) == 2 for row in before["owners"]) and before["replicas"] == 2
        asyncio.run(_hold_placement(c.nats_url, True))
        pairs = [_scrape(httpx.get(f"{c.url}/metrics").text)[1]]
        # The router renews its lease each second: by the end of these streams it knows it lost it.
        reference = asyncio.run(_texts(c.url))
        pairs.append(_scrape(httpx.get(f"{c.url}/metrics").text)[1])
        victim = c.procs[-1]
        texts = asyncio.run(_texts(c.url, during=lambda: victim.send_signal(signal.SIGKILL)))
        assert texts == reference
        pairs.append(_scrape(httpx.get(f"{c.url}/metrics").text)[1])
        after = status(c.nats_url)
        assert (after["placement_version"], after["pending_version"]) == (before["placement_version"], None)
        (survivor,) = [w["worker"] for w in after["workers"]]
        (dead,) = [w["worker"] for w in before["workers"] if w["worker"] != survivor]
        # Dropped when a call to it found nobody, not seconds later when its heartbeats went stale.
        assert re.search(rf"worker dropped .*nobody answers on .*worker={dead}", tail(c.log, 100_000)), tail(c.log)
        # The router's count of pairs sent each worker: the survivor, which had its share of the
        # streams before the crash, had more than that share of the same streams after it.
        undisturbed, crashed = ({w: now[w] - then.get(w, 0) for w in now} for then, now in zip(pairs, pairs[1:]))
        assert crashed[survivor] > undisturbed[survivor], (undisturbed, crashed)
        asyncio.run(_hold_placement(c.nats_url, False))
        # The new placement the crash called for comes only now: one replica each, on the survivor.
        s = _status_until(c.nats_url, lambda s: s["placement_version"] > before["placement_version"]
                          and s["pending_version"] is None)
        assert s["owners"] == [[survivor]] * NUM_EXPERTS["mixtral"]
    finally:
        try:
            asyncio.run(_hold_placement(c.nats_url, False))  # or the survivor's drain waits on the standby
        finally:
            c.stop()


def test_too_little_capacity_is_a_clear_503_and_health_names_the_unowned_experts(
        checkpoints: dict[str, Path], tmp_path: Path):
    c = Services(checkpoints["mixtral"], tmp_path, router_args=())
    try:
        for _ in range(2):  # 5 experts each: 8 fit on two, not on one
            c.worker("--memory-budget", str(5 * ONE_EXPERT))
        wait_healthy(c.url, c.procs, c.log)
        _workers_holding(c.nats_url, 2)
        victim = c.procs[-1]
        errors: list[str] = []

        async def stream() -> None:
            async with httpx.AsyncClient(base_url=c.url, timeout=60) as http:
                async with http.stream("POST", "/v1/completions", json=_body(PROMPTS[0], True)) as r:
                    lines = r.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: {"):
                            break
                    victim.send_signal(signal.SIGKILL)
                    errors.extend([line async for line in lines if '"error"' in line])

        asyncio.run(stream())
        assert errors and "no live worker" in errors[0]
        r = httpx.post(f"{c.url}/v1/completions", json=_body(PROMPTS[0]), timeout=30)
        assert r.status_code == 503 and "cannot hold every expert" in r.json()["error"]["message"], r.text
        deadline = time.monotonic() + 20  # the survivor takes all it can hold: 5 of the 8
        while len((health := httpx.get(f"{c.url}/health").json())["unowned_experts"]) != 3:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        assert health["ready"] is False and health["experts_covered"] == 5
        assert status(c.nats_url)["unowned_experts"] == health["unowned_experts"]
    finally:
        c.stop()


def test_after_a_bus_restart_every_service_reconnects(checkpoints: dict[str, Path], tmp_path: Path):
    c = Services(checkpoints["mixtral"], tmp_path, router_args=())
    try:
        c.worker()
        wait_healthy(c.url, c.procs, c.log)
        port = int(c.nats_url.rsplit(":", 1)[1])
        c.nats.kill()
        c.nats.wait(10)
        c.nats = start_nats(port, tmp_path / "nats")  # same port, same store
        wait_healthy(c.url, c.procs, c.log, timeout_s=60)
        r = httpx.post(f"{c.url}/v1/completions", json={**_body(PROMPTS[0]), "max_tokens": 8}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
    finally:
        c.stop()
