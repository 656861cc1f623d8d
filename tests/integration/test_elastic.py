"""The elastic cluster with real processes on a real nats-server: workers join, leave and crash
during streams, and every stream still gives the greedy text of an undisturbed run."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.natsd import start_nats
from tests.checkpoints import NUM_EXPERTS
from tests.cluster import ROOT, tail, wait_healthy
from tests.integration.test_failures import Services

pytestmark = pytest.mark.slow
MODEL = "tiny-mixtral"
PROMPTS = [[8 + i, 9, 10 + 2 * i] for i in range(8)]
ONE_EXPERT = 196_608  # bytes of one tiny-mixtral expert over both MoE layers


def _body(prompt: list[int], stream: bool = False) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 480, "temperature": 0, "stream": stream}


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


def _workers_holding(nats_url: str, n: int, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = status(nats_url)
        if len([w for w in s["workers"] if w["experts"]]) == n and not s["unowned_experts"] \
                and s["pending_version"] is None:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.3)


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
    joined = []
    texts = asyncio.run(_texts(cluster.url, during=lambda: joined.append(cluster.worker())))
    assert texts == cluster.reference
    after = _workers_holding(cluster.nats_url, 2)
    new = [w for w in after["workers"] if w["worker"] not in {v["worker"] for v in before["workers"]}]
    for _ in range(3):  # a slow start may place the newcomer only as those streams end: streams go on
        if not new or new[0]["tokens"] > 0:
            break
        assert asyncio.run(_texts(cluster.url)) == cluster.reference
        time.sleep(1.5)  # its next heartbeat carries the tokens it served
        after = _workers_holding(cluster.nats_url, 2)
        new = [w for w in after["workers"] if w["worker"] not in {v["worker"] for v in before["workers"]}]
    assert len(new) == 1 and new[0]["experts"] and new[0]["tokens"] > 0  # it served these very streams
    assert after["placement_version"] > before["placement_version"]
    (old_id,), new_id = [w["worker"] for w in before["workers"]], new[0]["worker"]
    lost = [e for e, row in enumerate(after["owners"]) if old_id not in row]
    # Only the newcomer's share moved, and only to the newcomer (hot experts may gain a replica).
    assert lost and all(new_id in after["owners"][e] for e in lost)
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


def test_with_two_replicas_a_crash_fails_over_at_once(checkpoints: dict[str, Path], tmp_path: Path):
    c = Services(checkpoints["mixtral"], tmp_path, router_args=("--replicas", "2"))
    try:
        c.worker()
        c.worker()
        wait_healthy(c.url, c.procs, c.log)
        s = _workers_holding(c.nats_url, 2)
        assert all(len(row) == 2 for row in s["owners"]) and s["replicas"] == 2
        reference = asyncio.run(_texts(c.url))
        victim = c.procs[-1]
        texts = asyncio.run(_texts(c.url, during=lambda: victim.send_signal(signal.SIGKILL)))
        assert texts == reference
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
