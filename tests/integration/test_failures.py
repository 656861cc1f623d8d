"""Services started one by one on a bus, with a misbehaving peer: failures are clear, never hangs."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import nats
import pytest

from shared import cluster, subjects
from shared.messages import WorkerAnnounce, encode
from shared.model import fingerprint
from shared.natsd import free_port, start_nats
from tests.checkpoints import LAYERS, NUM_EXPERTS
from tests.cluster import cli, tail, wait_healthy

MODEL = "tiny-mixtral"
BODY = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 3, "temperature": 0}


class Services:
    def __init__(self, model: Path, tmp: Path, router_args: tuple[str, ...] = ("--expert-timeout", "2"),
                 nats_conf: str = "") -> None:
        self.model, self.tmp = model, tmp
        port = free_port()
        self.nats = start_nats(port, tmp / "nats", extra=nats_conf)
        self.nats_url = f"nats://127.0.0.1:{port}"
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = tmp / "services.log"
        self.procs = [
            cli("router", "--nats", self.nats_url, "--model", str(model), *router_args, log=self.log),
            cli("gateway", "--nats", self.nats_url, "--port", str(self.http_port), log=self.log),
        ]

    def worker(self, *args: str) -> object:
        p = cli("worker", "--nats", self.nats_url, "--model", str(self.model), *args, log=self.log)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for group in (self.procs, [self.nats]):  # the services first, while they can still drain
            for p in group:
                if p.poll() is None:
                    p.terminate()
            for p in group:
                p.wait(20)


@pytest.fixture(scope="module")
def services(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    s = Services(checkpoints["mixtral"], tmp_path_factory.mktemp("services"))
    yield s
    s.stop()


class Rogue:
    """A peer that joins as a worker, claims to load whatever it is given, and answers with
    `reply` (bytes, an error, or silence)."""

    def __init__(self, nc: nats.NATS, model: Path) -> None:
        self.nc = nc
        self.reply: bytes | tuple[str, str] | None = b""
        self.announce = WorkerAnnounce(worker="rogue", subject=subjects.experts_subject("rogue"),
                                       model=fingerprint(model), layers=LAYERS, experts=[],
                                       capacity=NUM_EXPERTS["mixtral"])

    async def handle(self, msg) -> None:
        if isinstance(self.reply, bytes):
            await msg.respond(self.reply)
        elif isinstance(self.reply, tuple):
            code, text = self.reply
            await self.nc.publish(msg.reply, b"", headers={"Nats-Service-Error-Code": code, "Nats-Service-Error": text})

    async def heartbeat(self) -> None:
        kv = await cluster.bucket(self.nc.jetstream())
        while True:
            coming, _ = await cluster.read(kv, cluster.NEXT)  # "loaded" whatever it is given
            self.announce = self.announce.model_copy(update={"loaded": coming.version if coming else 0})
            await self.nc.publish(subjects.announce_subject("rogue"), encode(self.announce))
            await asyncio.sleep(0.3)


@pytest.fixture
async def rogue(services: Services) -> AsyncIterator[Rogue]:
    nc = await nats.connect(services.nats_url)
    r = Rogue(nc, services.model)
    await nc.subscribe(r.announce.subject, cb=r.handle)
    beat = asyncio.create_task(r.heartbeat())
    async with httpx.AsyncClient(base_url=services.url, timeout=30) as http:
        await _until(http, 200)
        yield r
        beat.cancel()
        leave = r.announce.model_copy(update={"leaving": True})
        await nc.publish(subjects.announce_subject("rogue"), encode(leave))
        await nc.drain()
        await _until(http, 503)


async def _until(http: httpx.AsyncClient, status: int, timeout_s: float = 60) -> dict:
    deadline, last = time.monotonic() + timeout_s, "nothing"
    while time.monotonic() < deadline:
        try:
            r = await http.get("/health")
            if r.status_code == status:
                return r.json()
            last = f"{r.status_code} {r.text}"
        except httpx.TransportError as e:
            last = repr(e)
        await asyncio.sleep(0.2)
    raise AssertionError(f"/health never answered {status} in {timeout_s:g}s; the last answer: {last}")


@pytest.mark.parametrize("reply, status, needle", [
    (b"nonsense", 502, "expert reply"),
    (("500", "the GPU caught fire"), 502, "the GPU caught fire"),
    (None, 502, f"no reply on {subjects.experts_subject('rogue')} within 2s"),
])
async def test_a_bad_expert_reply_fails_the_request_clearly(services: Services, rogue: Rogue, reply, status, needle):
    rogue.reply = reply
    async with httpx.AsyncClient(base_url=services.url, timeout=30) as http:
        r = await http.post("/v1/completions", json=BODY)
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]["message"]
        await _until(http, 200)  # a silent worker is out until its next heartbeat
        stream = await http.post("/v1/completions", json={**BODY, "stream": True})
        assert needle in stream.text and stream.text.endswith("data: [DONE]\n\n")
        await _until(http, 200)  # the router is still serving


async def test_a_killed_worker_fails_requests_fast_and_readiness_drops(services: Services):
    async with httpx.AsyncClient(base_url=services.url, timeout=30) as http:
        assert (await _until(http, 503))["experts_covered"] == 0
        r = await http.post("/v1/completions", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        worker = services.worker()
        try:
            wait_healthy(services.url, [worker], services.log)
        except RuntimeError:
            pytest.fail(tail(services.log))
        assert (await http.post("/v1/completions", json=BODY)).status_code == 200
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        r = await http.post("/v1/completions", json=BODY)
        assert r.status_code in (502, 503)
        assert "no live worker" in r.json()["error"]["message"], r.text
        # Readiness follows the failure at once, not when the worker's heartbeats go stale (4 s).
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["experts_covered"] == 0
        assert health.json()["workers"] == []
