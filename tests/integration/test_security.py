"""A secured `moebus up` (the default) against the attacks an open bus allowed: each one must fail.

The attacker holds a worker's credentials (a worker machine taken over), or none at all. Every
test checks two things: the server refused (a permissions violation reached the attacker), and
nothing happened (the cluster serves on, the victim's answer is whole).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import orjson
import pytest
from nats.js.api import ConsumerConfig
from openai import OpenAI

from shared import cluster, subjects
from shared.access import connect_options
from shared.messages import Cancel, GenerateEvent, GenerateRequest, WorkerAnnounce, encode
from shared.model import fingerprint
from shared.access import read_creds
from tests.checkpoints import LAYERS, NUM_EXPERTS
from tests.cluster import ROOT, Up

pytestmark = pytest.mark.slow
KEY = "sk-secret"
MODEL = "tiny-mixtral"


class Secured(Up):
    secrets: Path
    model: Path


@pytest.fixture(scope="module")
def up(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    # A machine of its own, whose credentials are where `--creds` says (made there by `moebus up`).
    home = tmp_path_factory.mktemp("secured-home")
    with Up(checkpoints["mixtral"], 2, tmp_path_factory.mktemp("secured"),
            extra=("--api-key", KEY, "--creds", str(home / "secrets")), env={"MOEBUS_HOME": str(home)}) as cluster_:
        cluster_.secrets, cluster_.model = home / "secrets", checkpoints["mixtral"]
        yield cluster_


class Peer:
    """A NATS client with some user's credentials, keeping every error the server sent it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def connect(self, up: Secured, user: str) -> Peer:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))

        creds = read_creds(up.secrets / f"{user}.creds")
        self.nc = await nats.connect(up.nats_url, error_cb=on_error, allow_reconnect=False, **connect_options(creds))
        return self

    async def refused(self, verb: str, subject: str, timeout_s: float = 10.0) -> bool:
        """Whether the server's -ERR for this operation came (it follows the operation: waited for)."""
        wanted = f"permissions violation for {verb} to \"{subject.lower()}"
        deadline = time.monotonic() + timeout_s
        while not any(wanted in e.lower() for e in self.errors):
            if time.monotonic() > deadline:
                return False
            await self.nc.flush()
            await asyncio.sleep(0.02)
        return True

    async def close(self) -> None:
        await self.nc.close()


def status(up: Secured) -> dict:
    """`moebus status --json`, with the cluster's directory: it takes the admin credentials."""
    out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--json", "--nats", up.nats_url,
                          "--creds", str(up.secrets)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def serves(up: Secured) -> None:
    """The cluster still answers: health ready, both workers in, a completion of 4 tokens."""
    assert httpx.get(f"{up.url}/health").status_code == 200
    s = status(up)
    assert len(s["workers"]) == 2 and not any(w["draining"] for w in s["workers"]), s
    with OpenAI(base_url=f"{up.url}/v1", api_key=KEY, max_retries=0) as client:
        r = client.completions.create(model=MODEL, prompt="w1 w2", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


async def test_a_stranger_cannot_connect(up: Secured):
    for guess in ({}, {"user": "worker-1", "password": "guessed-guessed-guessed"}):
        stranger = nats.NATS()
        try:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await stranger.connect(up.nats_url, allow_reconnect=False, max_reconnect_attempts=0, **guess)
        finally:
            await stranger.close()  # nats-py leaves a refused connection's socket open


async def test_a_worker_reads_no_prompt_hidden_state_or_token(up: Secured):
    spy = await Peer().connect(up, "worker-16")
    seen: list[str] = []
    targets = [subjects.ROUTER_GENERATE, f"{subjects.STREAM_PREFIX}.>", f"{subjects.PREFIX}.experts.>",
               subjects.experts_subject_of("worker-1"), "_INBOX.>", "_INBOX.router.>", ">"]
    async def on_msg(msg) -> None:
        seen.append(msg.subject)

    try:
        for subject in targets:
            await spy.nc.subscribe(subject, cb=on_msg)
        with OpenAI(base_url=f"{up.url}/v1", api_key=KEY, max_retries=0) as client:
            r = client.completions.create(model=MODEL, prompt="w5 w6 w7", max_tokens=6, temperature=0)
        assert r.usage.completion_tokens == 6
        for subject in targets:
            assert await spy.refused("subscription", subject), (subject, spy.errors)
        assert seen == []
    finally:
        await spy.close()


async def test_a_worker_cannot_call_another_worker_or_the_router(up: Secured):
    victim = status(up)["workers"][0]
    attacker = await Peer().connect(up, "worker-16")
    forged = GenerateRequest(request_id="forged", stream=f"{subjects.STREAM_PREFIX}.forged", max_tokens=3, prompt=[8, 9])
    try:
        for subject, payload in [(subjects.experts_subject(victim["worker"]), b"MBQ1"),
                                 (subjects.ROUTER_GENERATE, encode(forged))]:  # no API key asked
            with pytest.raises(nats.errors.TimeoutError):
                await attacker.nc.request(subject, payload, timeout=1)
            assert await attacker.refused("publish", subject), attacker.errors
    finally:
        await attacker.close()
    serves(up)


async def test_a_worker_cannot_announce_itself_as_another(up: Secured):
    before = status(up)
    victim = before["workers"][0]["worker"]
    leave = WorkerAnnounce(worker=victim, subject=subjects.experts_subject(victim), model=fingerprint(up.model),
                           layers=LAYERS, experts=[], capacity=NUM_EXPERTS["mixtral"], leaving=True)
    attacker = await Peer().connect(up, "worker-16")
    try:
        await attacker.nc.publish(subjects.announce_subject(victim), encode(leave))  # as the victim
        assert await attacker.refused("publish", subjects.announce_subject(victim)), attacker.errors
        # On its own subject the server lets it through; the router sees whose subject it came on.
        await attacker.nc.publish(subjects.announce_subject("worker-16-abcdef"), encode(leave))
        # Then one the router says it ignored: once it says so, it has read the leave before it.
        marker = WorkerAnnounce(worker="worker-16-marker", subject=subjects.experts_subject("worker-16-marker"),
                                model="another-model", layers=LAYERS, experts=[], capacity=1)
        await attacker.nc.publish(subjects.announce_subject(marker.worker), encode(marker))
        await attacker.nc.flush()
        deadline = time.monotonic() + 30
        while f"worker={marker.worker}" not in up.log.read_text():
            assert time.monotonic() < deadline, "the router never read the announcements"
            await asyncio.sleep(0.05)
        assert "worker of another model ignored" in up.log.read_text()
    finally:
        await attacker.close()
    after = status(up)
    assert victim in {w["worker"] for w in after["workers"]}
    # A worker that left is placed around at once (a new version): not one went.
    assert after["placement_version"] == before["placement_version"], (before, after)
    serves(up)


async def test_a_worker_cannot_cancel_or_write_into_another_users_response(up: Secured):
    observer = await Peer().connect(up, "gateway")  # only to learn the victim's request id
    attacker = await Peer().connect(up, "worker-16")
    events = await observer.nc.subscribe(f"{subjects.STREAM_PREFIX}.>")
    try:
        async with httpx.AsyncClient(base_url=up.url, timeout=60) as http:
            body = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 150, "temperature": 0, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"}) as r:
                first = await events.next_msg(timeout=30)
                request_id = orjson.loads(first.data)["request_id"]
                await attacker.nc.publish(subjects.ROUTER_CANCEL, encode(Cancel(request_id=request_id)))
                forged = GenerateEvent(request_id=request_id, index=1, text=" HACKED", finish_reason="stop")
                await attacker.nc.publish(first.subject, encode(forged))
                assert await attacker.refused("publish", subjects.ROUTER_CANCEL), attacker.errors
                assert await attacker.refused("publish", first.subject), attacker.errors
                chunks = [orjson.loads(line[6:]) async for line in r.aiter_lines()
                          if line.startswith("data: {")]
    finally:
        await observer.close()
        await attacker.close()
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert "HACKED" not in text and len(text.split()) == 150
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_no_peer_can_make_streams_consumers_or_placement(up: Secured):
    for user in ("worker-16", "gateway"):
        peer = await Peer().connect(up, user)
        js = peer.nc.jetstream(timeout=1)
        try:
            with pytest.raises(nats.errors.TimeoutError):  # a stream that swallows every generate request
                await js.add_stream(name="evil", subjects=[subjects.ROUTER_GENERATE])
            assert await peer.refused("publish", "$JS.API.STREAM.CREATE.evil"), peer.errors
            # A push consumer would make the server deliver a stream onto any subject it names.
            with pytest.raises(nats.errors.TimeoutError):
                await js._jsm.add_consumer("KV_moebus-cluster", ConsumerConfig(deliver_subject=subjects.ROUTER_GENERATE))
            assert await peer.refused("publish", "$JS.API.CONSUMER.CREATE.KV_moebus-cluster"), peer.errors
            await peer.nc.publish(f"$KV.{cluster.BUCKET}.{cluster.NEXT}", b"{}")  # placement is the router's
            assert await peer.refused("publish", f"$KV.{cluster.BUCKET}.{cluster.NEXT}"), peer.errors
        finally:
            await peer.close()
    serves(up)


async def test_the_operator_sees_every_service(up: Secured):
    """What `nats micro ls --user admin ... --inbox-prefix _INBOX.admin` shows."""
    admin = await Peer().connect(up, "admin")
    try:
        inbox = admin.nc.new_inbox()
        sub = await admin.nc.subscribe(inbox)
        await admin.nc.publish("$SRV.PING", b"", reply=inbox)
        names: Counter[str] = Counter()
        try:
            while True:
                names[orjson.loads((await sub.next_msg(timeout=1.0)).data)["name"]] += 1
        except nats.errors.TimeoutError:
            pass
    finally:
        await admin.close()
    assert names == {subjects.SERVICE_GATEWAY: 1, subjects.SERVICE_ROUTER: 1, subjects.SERVICE_WORKER: 2}


async def _placement(up: Secured) -> bytes:
    """The active placement as stored (read with the router's credentials)."""
    router = await Peer().connect(up, "router")
    try:
        return (await (await router.nc.jetstream().key_value(cluster.BUCKET)).get(cluster.ACTIVE)).value
    finally:
        await router.close()


async def test_no_peer_can_have_an_answer_sent_onto_the_buckets(up: Secured):
    """A requester names the reply subject: the router must not answer the gateway onto a
    JetStream subject (its answer would purge or overwrite with the router's rights), and
    JetStream must not answer a worker there (its answer would be stored)."""
    before = await _placement(up)
    gateway = await Peer().connect(up, "gateway")
    try:
        for reply in ("$JS.API.STREAM.PURGE.KV_moebus-cluster", f"$KV.{cluster.BUCKET}.{cluster.ACTIVE}"):
            await gateway.nc.publish(subjects.ROUTER_STATUS, b"{}", reply=reply)
            await gateway.nc.publish(subjects.ROUTER_GENERATE, b"not json", reply=reply)  # an error answer too
        # The same requests with an inbox are answered: the router has handled those before them.
        assert (await gateway.nc.request(subjects.ROUTER_STATUS, b"{}", timeout=10)).data
        bad = await gateway.nc.request(subjects.ROUTER_GENERATE, b"not json", timeout=10)
        assert bad.headers and bad.headers["Nats-Service-Error-Code"] == "400"
    finally:
        await gateway.close()
    worker = await Peer().connect(up, "worker-16")
    try:
        key = f"$KV.{cluster.BUCKET}.{cluster.NEXT}"
        await worker.nc.publish(f"$JS.API.DIRECT.GET.KV_moebus-cluster.{key}", b"",
                                reply=f"$KV.{cluster.BUCKET}.{cluster.ACTIVE}")
        await worker.nc.publish("$JS.API.STREAM.MSG.GET.KV_moebus-cluster", orjson.dumps({"last_by_subj": key}),
                                reply=f"$KV.{cluster.BUCKET}.{cluster.ACTIVE}")
        assert await worker.refused("publish", "$JS.API.STREAM.MSG.GET.KV_moebus-cluster"), worker.errors
        # The same direct get to its inbox is answered: JetStream has handled the one before it.
        assert (await worker.nc.request(f"$JS.API.DIRECT.GET.KV_moebus-cluster.{key}", b"", timeout=10)).data
    finally:
        await worker.close()
    assert await _placement(up) == before
    serves(up)


async def test_one_stolen_worker_credential_is_one_worker(up: Secured):
    """Announcing many ids of its identity gets it one place in the cluster, not many."""
    attacker = await Peer().connect(up, "worker-16")
    fakes = [f"worker-16-{i:06x}" for i in range(5)]

    async def announce() -> None:
        while True:
            for fake in fakes:
                a = WorkerAnnounce(worker=fake, subject=subjects.experts_subject(fake), model=fingerprint(up.model),
                                   layers=LAYERS, experts=[], capacity=NUM_EXPERTS["mixtral"])
                await attacker.nc.publish(subjects.announce_subject(fake), encode(a))
            await asyncio.sleep(0.2)

    def fakes_seen(s: dict) -> list[str]:
        return [w["worker"] for w in s["workers"] if w["worker"].startswith("worker-16-")]

    beats = asyncio.create_task(announce())
    try:
        deadline = time.monotonic() + 30  # until the router has taken in all five (it logs each newcomer)
        while not all(f"worker={fake}" in up.log.read_text() for fake in fakes):
            assert time.monotonic() < deadline, "the router never read the five announcements"
            await asyncio.sleep(0.05)
        seen = await asyncio.to_thread(status, up)
    finally:
        beats.cancel()
        await attacker.close()
    assert len(fakes_seen(seen)) == 1, seen["workers"]
    deadline = time.monotonic() + 60  # the silent fake is dropped; placement settles on the two real workers
    while not (len((s := status(up))["workers"]) == 2 and s["pending_version"] is None and not s["unowned_experts"]):
        assert time.monotonic() < deadline, s
        await asyncio.sleep(0.2)
    serves(up)
