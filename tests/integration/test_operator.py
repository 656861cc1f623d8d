"""The operator's tools on a secured TLS cluster with a flash-cache, as `moebus up` runs it.

`moebus init-cluster` writes a `nats` CLI context for the admin user; these tests connect with
exactly what that context holds and do what the CLI's commands do (the `nats` binary is not
installed here): `micro ping|ls|info|stats` are requests on `$SRV...` answered to the admin's
inbox, `kv get|watch moebus-cluster` a stream info, a direct get and an ordered consumer. Last,
the cluster's bus restarts and Ctrl-C stops it all: asyncio must have had nothing to complain of.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import orjson
import pytest

from shared import cluster, subjects
from shared.natsd import free_port
from tests.certs import self_signed
from tests.cluster import ROOT, tail, wait_healthy

pytestmark = pytest.mark.slow
# 2 slots x 2 MoE layers x one fp32 expert of the tiny mixtral: under the experts' size, so a flash-cache
BUDGET = 2 * 2 * 3 * 64 * 128 * 4


@dataclass
class Cluster:
    proc: subprocess.Popen
    log: Path
    url: str
    nats_port: int
    context: dict


@pytest.fixture(scope="module")
def tls_cluster(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("operator")
    env = {**os.environ, "MOEBUS_HOME": str(tmp / "home"), "XDG_CONFIG_HOME": str(tmp / "xdg")}
    port, nats_port = free_port(), free_port()
    tls = self_signed(tmp / "certs")
    init = subprocess.run([sys.executable, "-m", "services.cli", "init-cluster", "--tls-cert", str(tls.cert),
                           "--tls-key", str(tls.key), "--listen", f"127.0.0.1:{nats_port}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    log = tmp / "up.log"
    with log.open("ab") as out:  # a session of its own: Ctrl-C reaches its whole process group, as in a terminal
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", str(checkpoints["mixtral"]),
                                 "--port", str(port), "--nats-port", str(nats_port), "--memory-budget", str(BUDGET),
                                 "--window", "1"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], log)
        context = json.loads((tmp / "xdg" / "nats" / "context" / "moebus.json").read_text())
        yield Cluster(proc, log, url, nats_port, context)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


async def admin(c: Cluster) -> nats.NATS:
    """Connected as `nats --context moebus` connects: the context's URL, user, password, inbox
    prefix, CA and TLS-first, nothing else."""
    ctx = c.context
    assert ctx["url"] == f"tls://127.0.0.1:{c.nats_port}"
    return await nats.connect(ctx["url"], user=ctx["user"], password=ctx["password"], inbox_prefix=ctx["inbox_prefix"],
                              tls=ssl.create_default_context(cafile=ctx["ca"]), tls_handshake_first=ctx["tls_first"],
                              allow_reconnect=False)


async def gather(nc: nats.NATS, subject: str, wait_s: float = 1.0) -> list[dict]:
    """Every answer to one request within `wait_s`, as `nats micro ls|stats|ping` collects them."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    answers = []
    try:
        while True:
            answers.append(orjson.loads((await sub.next_msg(timeout=wait_s)).data))
    except nats.errors.TimeoutError:
        return answers
    finally:
        await sub.unsubscribe()


async def test_the_admin_context_sees_every_micro_service_the_flash_cache_too(tls_cluster: Cluster):
    nc = await admin(tls_cluster)
    try:
        names = {a["name"] for a in await gather(nc, "$SRV.PING")}  # nats micro ping
        assert names == {subjects.SERVICE_GATEWAY, subjects.SERVICE_ROUTER, subjects.SERVICE_FLASH}, names
        listed = {a["name"]: a for a in await gather(nc, "$SRV.INFO")}  # nats micro ls
        assert listed.keys() == names
        # nats micro info moebus-flash-cache: its info, then that instance's stats
        info = orjson.loads((await nc.request(f"$SRV.INFO.{subjects.SERVICE_FLASH}", b"", timeout=5)).data)
        assert info["endpoints"][0]["name"] == "experts" and info["id"] == listed[subjects.SERVICE_FLASH]["id"]
        one = await nc.request(f"$SRV.STATS.{subjects.SERVICE_FLASH}.{info['id']}", b"", timeout=5)
        mine = orjson.loads(one.data)
        # nats micro stats moebus-flash-cache: its reads and slots beside the endpoint's counters
        (stats,) = await gather(nc, f"$SRV.STATS.{subjects.SERVICE_FLASH}")
        assert stats["id"] == mine["id"] == info["id"]
        assert stats["endpoints"][0]["data"]["slot_bytes"] <= BUDGET
    finally:
        await nc.close()
    assert "permissions violation" not in tls_cluster.log.read_text(), tail(tls_cluster.log)


async def test_the_admin_context_reads_and_watches_placement_but_cannot_write_it(tls_cluster: Cluster):
    errors: list[str] = []
    nc = await admin(tls_cluster)
    nc._error_cb = _keep(errors)  # nats-py takes error_cb only at connect: the same callback, set after
    try:
        kv = await nc.jetstream(timeout=5).key_value(cluster.BUCKET)  # nats kv get moebus-cluster active
        active = await kv.get(cluster.ACTIVE)
        record = orjson.loads(active.value)
        assert record["version"] >= 1 and record["owners"], record
        watcher = await kv.watch(cluster.ACTIVE)  # nats kv watch moebus-cluster active
        try:
            first = await watcher.updates(timeout=10)
            assert first is not None and first.value == active.value
        finally:
            await watcher.stop()
        # Read-only: a put is refused by the server, and placement stays the router's.
        await nc.publish(f"{subjects.CLUSTER_KEYS}.{cluster.ACTIVE}", b"{}")
        deadline = time.monotonic() + 10
        while not any("permissions violation for publish" in e.lower() for e in errors) and time.monotonic() < deadline:
            await nc.flush()
            await asyncio.sleep(0.05)
        refusal = f'publish to "{subjects.CLUSTER_KEYS}.{cluster.ACTIVE}"'.lower()
        assert any(refusal in e.lower() for e in errors), errors
        assert (await kv.get(cluster.ACTIVE)).value == active.value
    finally:
        await nc.close()


def _keep(errors: list[str]):
    async def on_error(e: Exception) -> None:
        errors.append(str(e))
    return on_error


def test_a_tls_cluster_restarted_bus_and_ctrl_c_leave_no_asyncio_complaints(tls_cluster: Cluster):
    """Every service reconnects over TLS after the bus restarts; Ctrl-C then stops all of them
    with neither "returning true from eof_received()" nor "exception was never retrieved"."""
    c = tls_cluster
    found = subprocess.run(["pgrep", "-f", f"nats-server .*-p {c.nats_port}"], capture_output=True, text=True)
    (bus,) = [int(p) for p in found.stdout.split()]
    before = len(c.log.read_text())
    os.kill(bus, signal.SIGKILL)  # `moebus up` restarts it on the same port and store

    def since() -> str:
        return c.log.read_text()[before:]

    # Every connection that dropped (each says so once) is back, the Ctrl-C of the issue: after a restart.
    deadline = time.monotonic() + 120
    while not 0 < since().count("nats disconnected") == since().count("nats reconnected"):
        assert time.monotonic() < deadline, tail(c.log)
        time.sleep(0.2)
    wait_healthy(c.url, [c.proc], c.log)
    os.killpg(c.proc.pid, signal.SIGINT)  # Ctrl-C: the launcher and every service at once
    assert c.proc.wait(60) == 0, tail(c.log)
    text = c.log.read_text()
    assert "moebus: nats-server exited" in text  # the restart did happen
    assert "eof_received" not in text, tail(c.log)
    assert "never retrieved" not in text and "Traceback" not in text, tail(c.log)
