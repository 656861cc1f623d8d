"""A forged or careless peer on the bus, and workers that vanish: against real services on a
real nats-server, with the default 30 s expert timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import numpy as np
import orjson
import pytest

from shared import subjects
from shared.bus import request
from shared.errors import RemoteError
from shared.messages import GenerateRequest
from shared.wire import encode_request
from tests.checkpoints import HIDDEN, MAX_POS
from tests.cluster import wait_healthy, worker_subject
from tests.integration.test_failures import BODY, Rogue, Services, _until

pytestmark = pytest.mark.slow


class Cluster(Services):
    """Router (default expert timeout and --max-running 16), gateway, one worker."""

    def __init__(self, model: Path, tmp: Path) -> None:
        super().__init__(model, tmp, router_args=("--max-waiting", "200"))
        self.first = self.worker()
        wait_healthy(self.url, self.procs, self.log)


@pytest.fixture(scope="module")
def cluster(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(checkpoints["mixtral"], tmp_path_factory.mktemp("bus-hardening"))
    yield c
    c.stop()


def _generate(**fields) -> bytes:
    """A GenerateRequest as a forger writes it: valid JSON, any values."""
    base = GenerateRequest(request_id="forged", stream="moebus.v1.stream.forged", max_tokens=3, prompt=[8, 9])
    return orjson.dumps({**base.model_dump(), **fields})


@pytest.mark.parametrize("fields, param", [
    ({"stream": "moebus.v1.stream.>"}, "stream"),
    ({"stream": "moebus.v1.stream.*"}, "stream"),
    ({"stream": "moebus.v1.router.generate"}, "stream"),
    ({"timeout_s": 1e308}, "timeout_s"),
    ({"max_tokens": 2 ** 62}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
])
async def test_a_forged_generate_request_is_refused(cluster: Cluster, fields: dict, param: str):
    nc = await nats.connect(cluster.nats_url)
    try:
        with pytest.raises(RemoteError) as e:
            await request(nc, subjects.ROUTER_GENERATE, _generate(**fields), 5)
    finally:
        await nc.close()
    assert e.value.status == "400" and f'"param":"{param}"' in e.value.description


async def test_an_expert_request_whose_reply_is_too_large_is_refused_before_compute(cluster: Cluster):
    nc = await nats.connect(cluster.nats_url)
    try:
        pairs = nc.max_payload // (HIDDEN * 4) + 1  # one row, used by every pair: a small request
        payload = encode_request(0, 0, np.ones((1, HIDDEN), np.float32), np.zeros(pairs, np.int32),
                                 np.zeros(pairs, np.int32))
        assert len(payload) < nc.max_payload
        worker = await worker_subject(nc)
        with pytest.raises(RemoteError) as e:
            await request(nc, worker, payload, 30)
    finally:
        await nc.close()
    assert e.value.status == "413" and "maximum message" in e.value.description


def test_the_context_bounds_max_tokens(cluster: Cluster):
    prompt = [8 + i % 50 for i in range(MAX_POS - 3)]
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=60,
                   json={**BODY, "prompt": prompt, "max_tokens": 300})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"


async def test_running_never_exceeds_max_running(cluster: Cluster):
    """A burst of chat requests of many lengths (200 gave 18 running of 16 before the fix). The
    router's high-water mark sees every step, where sampling /health could miss a short peak."""
    limits = httpx.Limits(max_connections=300)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=300, limits=limits) as http:
        def body(i: int) -> dict:
            words = " ".join(f"w{j}" for j in range(1 + i % 7))
            return {"model": BODY["model"], "messages": [{"role": "user", "content": words}], "max_tokens": 8 + i % 9,
                    "temperature": 0}

        replies = await asyncio.gather(*(http.post("/v1/chat/completions", json=body(i)) for i in range(200)))
        assert all(r.status_code == 200 for r in replies)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as fresh:
        # a new connection: the burst's pooled ones may be closed by the server's keep-alive timer
        health = (await fresh.get("/health")).json()
        metrics = (await fresh.get("/metrics")).text
    high = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("moebus_sequences_running_max "))
    assert 8 <= high <= 16 and health["running"] == health["waiting"] == 0


async def test_a_worker_gone_silent_fails_its_calls_when_dropped_not_at_the_timeout(cluster: Cluster):
    """The only worker is a peer that takes calls and never answers, then stops sending
    heartbeats: the request fails when it is dropped (~4 s) and nobody is left to take its
    experts, not after the 30 s expert timeout (the client gives up at 25 s)."""
    cluster.first.terminate()
    cluster.first.wait(20)
    nc = await nats.connect(cluster.nats_url)
    rogue = Rogue(nc, cluster.model)
    rogue.reply = None
    called = asyncio.Event()

    async def take_call(msg) -> None:
        called.set()
        await rogue.handle(msg)

    await nc.subscribe(rogue.announce.subject, cb=take_call)
    beat = asyncio.create_task(rogue.heartbeat())
    try:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=25) as http:
            await _until(http, 200)
            req = asyncio.create_task(http.post("/v1/completions", json=BODY))
            await asyncio.wait_for(called.wait(), 20)  # the request now waits on the silent worker
            beat.cancel()
            r = await req
            assert r.status_code == 502, r.text
            # Why: the drop ended the call and nobody can take its experts ("have no live worker
            # (...: its worker left)"), not the timeout ("found no live worker within 30s").
            message = r.json()["error"]["message"]
            assert "have no live worker" in message and "its worker left" in message, message
            assert (await http.get("/health")).status_code == 503
    finally:
        beat.cancel()
        await nc.close()
