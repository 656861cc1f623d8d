"""Two clustered nats-servers, secured: the router and gateway on one, workers with no checkpoint
on the other. Greedy tokens equal transformers': the experts came over NATS, checked, and every
expert call crossed the route between the servers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest
from openai import OpenAI

from shared.access import connect_options, init_cluster, server_block
from shared.natsd import free_port, start_nats
from shared.access import read_creds
from tests.checkpoints import LAYERS, NUM_EXPERTS, reference_greedy, vocab
from tests.cluster import cli, tail, wait_healthy

pytestmark = pytest.mark.slow
PROMPTS = [[8, 30, 51, 77, 12], [100, 9, 250, 4, 5, 6, 7, 300, 41]]
NEW_TOKENS = 10


def _node(name: str, port: int, route_port: int, peer_route_port: int, home: Path, store: Path):
    cluster = (f'server_name: "{name}"\ncluster {{ name: "moebus", listen: "127.0.0.1:{route_port}", '
               f'routes: ["nats://127.0.0.1:{peer_route_port}"] }}\n')
    return start_nats(port, store, extra=server_block(home / "cluster") + cluster)


async def _jetstream_ready(url: str, home: Path, timeout_s: float = 60) -> None:
    """A clustered JetStream answers once its servers have elected a leader."""
    nc = await nats.connect(url, **connect_options(read_creds(home / "cluster" / "router.creds")))
    deadline, last = time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < deadline:
            try:
                await nc.jetstream(timeout=1).account_info()
                return
            except Exception as e:  # noqa: BLE001 - not yet
                last = e
                await asyncio.sleep(0.5)
        raise AssertionError(f"JetStream not ready in {timeout_s:g}s: {last!r}")
    finally:
        await nc.close()


async def test_workers_without_a_checkpoint_on_another_server_of_the_cluster(checkpoints, tmp_path: Path):
    model = checkpoints["mixtral"]
    home = tmp_path / "home"
    init_cluster(home / "cluster", workers=4)
    ports = [free_port() for _ in range(4)]
    a = _node("a", ports[0], ports[2], ports[3], home, tmp_path / "a")
    b = _node("b", ports[1], ports[3], ports[2], home, tmp_path / "b")
    url_a, url_b = f"nats://127.0.0.1:{ports[0]}", f"nats://127.0.0.1:{ports[1]}"
    http_port, log = free_port(), tmp_path / "services.log"
    env = {"MOEBUS_HOME": str(home)}  # the cluster directory (and the fetched experts' cache) of this "machine"
    procs = []
    try:
        await _jetstream_ready(url_a, home)
        procs.append(cli("router", "--nats", url_a, "--model", str(model), "--share-model", log=log, env=env))
        procs.append(cli("gateway", "--nats", url_a, "--port", str(http_port), log=log, env=env))
        # No --model; each its own cache of fetched experts (its "machine"), one cluster directory.
        procs += [cli("worker", "--nats", url_b, "--creds", str(home / "cluster"), log=log,
                      env={"MOEBUS_HOME": str(tmp_path / f"mac{i}")}) for i in range(2)]
        url = f"http://127.0.0.1:{http_port}"
        wait_healthy(url, procs, log, timeout_s=180)
        words = {w: i for i, w in enumerate(vocab())}
        with OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
            got = []
            for prompt in PROMPTS:
                r = client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=NEW_TOKENS,
                                              temperature=0)
                got.append([words[w] for w in r.choices[0].text.split()])
        assert got == [reference_greedy(model, p, NEW_TOKENS) for p in PROMPTS], tail(log)
        assert "model shared over NATS" in log.read_text()
        # Each worker fetched its own experts (the config too), none of the other's, no other weights.
        caches = [{f.name for f in (tmp_path / f"mac{i}" / "experts").rglob("*") if f.is_file()} for i in range(2)]
        experts = [{n for n in c if n.startswith("layer")} for c in caches]
        assert all(c - e == {"config.json"} for c, e in zip(caches, experts)), caches
        assert not experts[0] & experts[1] and len(experts[0] | experts[1]) == LAYERS * NUM_EXPERTS["mixtral"]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        for server in (a, b):
            server.terminate()
            server.wait(10)
