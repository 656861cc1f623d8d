"""Credentials on disk, the rule for an open bus, worker identities and TLS, on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from shared import subjects
from shared.access import connect_options, init_cluster, load, read_creds, resolve, server_block
from shared.errors import ConfigError
from shared.natsd import free_port, server_binary, start_nats
from shared.security import permissions
from tests.certs import self_signed
from tests.cluster import ROOT


def test_init_cluster_keeps_secrets_and_files_are_private(tmp_path: Path):
    made = init_cluster(tmp_path / "c", workers=2)
    assert sorted(p.name for p in made) == ["admin.creds", "gateway.creds", "router.creds", "worker-1.creds",
                                           "worker-2.creds"]
    secret = read_creds(tmp_path / "c" / "router.creds").password
    assert [p.name for p in init_cluster(tmp_path / "c", workers=3)] == ["worker-3.creds"]
    assert read_creds(tmp_path / "c" / "router.creds").password == secret
    for p in (tmp_path / "c").iterdir():
        if p.is_file():
            assert p.stat().st_mode & 0o077 == 0, p  # secrets: the owner's alone
    assert "worker-3" in (tmp_path / "c" / "nats.conf").read_text()


def test_each_worker_process_takes_its_own_identity(tmp_path: Path):
    init_cluster(tmp_path, workers=2)
    assert [load(tmp_path, "worker").user for _ in range(2)] == ["worker-1", "worker-2"]
    with pytest.raises(ConfigError, match="in use"):
        load(tmp_path, "worker")
    with pytest.raises(ConfigError, match="router credentials"):
        load(tmp_path / "router.creds", "gateway")


def test_no_credentials_off_this_machine_without_insecure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MOEBUS_HOME", str(tmp_path))  # a machine with no cluster directory
    with pytest.raises(ConfigError, match="--insecure"):
        resolve("nats://192.0.2.7:4222", None, False, "worker")
    assert resolve("nats://192.0.2.7:4222", None, True, "worker") is None
    assert resolve("nats://127.0.0.1:4222", None, False, "worker") is None
    for remote in ("nats://127.0.0.1.nip.io:4222", "nats://127.0.0.1:4222,nats://192.0.2.7:4222"):
        with pytest.raises(ConfigError, match="--insecure"):  # a name that looks local, or one server that is not
            resolve(remote, None, False, "worker")
    init_cluster(tmp_path / "cluster", workers=1)  # now it has one: its services use it by themselves
    assert resolve("nats://192.0.2.7:4222", None, False, "gateway").user == "gateway"


def test_a_worker_refuses_a_lan_server_without_credentials(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "services.cli", "worker", "--nats", "nats://192.0.2.7:4222"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"MOEBUS_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "refusing to use NATS at nats://192.0.2.7:4222" in out.stderr, out.stderr


def test_permissions_give_no_peer_a_wildcard_read_or_a_consumer():
    for role, user in [("gateway", "gateway"), ("worker", "worker-3"), ("admin", "admin")]:
        p = permissions(role, user)
        subs, pubs = p["subscribe"]["allow"], p["publish"]["allow"]
        assert not {">", "_INBOX.>", f"{subjects.PREFIX}.>"} & set(subs)
        assert f"_INBOX.{user}.>" in subs
        assert not any("STREAM.CREATE" in s or "STREAM.UPDATE" in s or "PURGE" in s for s in pubs), (role, pubs)
        assert not any(s.startswith(("$KV.", "$O.")) for s in pubs), (role, pubs)  # no writes into a bucket
        # Consumers (a push consumer may name any subject): only the trusted admin, on placement only.
        consumers = [s for s in pubs if "CONSUMER" in s]
        assert consumers == ([] if role != "admin" else [f"$JS.API.CONSUMER.*.{subjects.CLUSTER_STREAM}",
                                                         f"$JS.API.CONSUMER.*.{subjects.CLUSTER_STREAM}.>"]), role
    worker = permissions("worker", "worker-3")
    assert worker["subscribe"]["allow"][0] == subjects.experts_subject_of("worker-3")
    assert subjects.announce_subject_of("worker-3") in worker["publish"]["allow"]
    # Its identity subject, and only its own: a worker asks whether another process holds it.
    assert {s for s in worker["publish"]["allow"] + worker["subscribe"]["allow"] if "identity" in s} == \
        {subjects.identity_subject("worker-3")}
    # A worker user runs a worker or a flash-cache: both answer `nats micro` (as `$SRV.*.<name>`).
    micro = {f"$SRV.*.{subjects.SERVICE_WORKER}", f"$SRV.*.{subjects.SERVICE_FLASH}"}
    assert micro <= set(worker["subscribe"]["allow"])


async def test_with_certificates_the_bus_speaks_tls_only(tmp_path: Path):
    init_cluster(tmp_path / "c", workers=1, tls=self_signed(tmp_path / "certs"))
    router, worker = read_creds(tmp_path / "c" / "router.creds"), read_creds(tmp_path / "c" / "worker-1.creds")
    assert "BEGIN CERTIFICATE" in worker.ca
    port = free_port()
    proc = start_nats(port, tmp_path / "store", extra=server_block(tmp_path / "c"))
    try:
        w = await nats.connect(f"tls://127.0.0.1:{port}", **connect_options(worker))
        r = await nats.connect(f"tls://127.0.0.1:{port}", **connect_options(router))
        subject = subjects.experts_subject("worker-1-abcdef")

        async def answer(msg) -> None:
            await msg.respond(b"pong:" + msg.data)

        await w.subscribe(subject, cb=answer)
        await w.flush()
        for _ in range(20):  # another connection's subscription is seen by the server soon, not at once
            try:
                assert (await r.request(subject, b"ping", timeout=5)).data == b"pong:ping"
                break
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the worker never answered over TLS")
        await asyncio.gather(w.close(), r.close())
        # The right password from a plain client, which waits for the server's INFO in clear: the
        # server says nothing before a TLS handshake. Sent anyway, in clear, it is refused unread.
        plain = {k: v for k, v in connect_options(router).items() if k not in ("tls", "tls_handshake_first")}
        client = nats.NATS()
        try:
            with pytest.raises(TimeoutError):
                await client.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, max_reconnect_attempts=0,
                                     connect_timeout=2, **plain)
        finally:
            await client.close()  # nats-py leaves a connection that timed out open
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        creds = json.dumps({"user": router.user, "pass": router.password, "verbose": False, "pedantic": False})
        writer.write(f"CONNECT {creds}\r\nPING\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)  # all it sends until it closes the connection
        writer.close()
    finally:
        proc.terminate()
        proc.wait(10)
    assert answer == b""  # not INFO, PONG or -ERR: a server without TLS would have sent "INFO {...}" first


def _init_cli(*args: str, xdg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "init-cluster", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "XDG_CONFIG_HOME": str(xdg)})


def test_init_cluster_listens_where_moebus_up_does_and_its_hint_names_that_bus(tmp_path: Path):
    from services import defaults
    out = _init_cli("--dir", str(tmp_path / "plain"), "--workers", "1", xdg=tmp_path / "xdg")
    assert out.returncode == 0, out.stderr
    # By default on loopback, as `moebus up`'s bus: other machines only when asked.
    assert f'listen: "{defaults.NATS_HOST}:{defaults.NATS_PORT}"' in (tmp_path / "plain" / "nats.conf").read_text()
    assert "--nats nats://THIS-HOST:4222" in out.stdout and "must listen beyond loopback" in out.stdout
    tls = self_signed(tmp_path / "certs")
    out = _init_cli("--dir", str(tmp_path / "tls"), "--workers", "1", "--tls-cert", str(tls.cert), "--tls-key",
                    str(tls.key), "--listen", "0.0.0.0:14702", "--nats-context", "", xdg=tmp_path / "xdg2")
    assert out.returncode == 0, out.stderr
    assert "--nats tls://THIS-HOST:14702 " in out.stdout and "beyond loopback" not in out.stdout, out.stdout
    assert "moebus up --nats-host 0.0.0.0 --nats-port 14702" in out.stdout
    assert not (tmp_path / "xdg2").exists()  # --nats-context '': none written
    assert f"--creds {tmp_path / 'tls'}" in out.stdout  # `moebus up` finds only the default directory itself
    # Run again for more identities: the bus other machines reach stays reachable.
    out = _init_cli("--dir", str(tmp_path / "tls"), "--workers", "3", "--nats-context", "", xdg=tmp_path / "xdg2")
    assert out.returncode == 0, out.stderr
    assert 'listen: "0.0.0.0:14702"' in (tmp_path / "tls" / "nats.conf").read_text()
    assert "--nats tls://THIS-HOST:14702 " in out.stdout
    out = _init_cli("--dir", str(tmp_path / "tls"), "--listen", "4222", xdg=tmp_path / "xdg2")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "moebus init-cluster: error: --listen '4222': give HOST:PORT, such as 127.0.0.1:4222 or 0.0.0.0:4222"]


async def test_init_cluster_writes_a_nats_context_that_reaches_its_bus_as_admin(tmp_path: Path):
    """What `nats --context moebus ...` reads: the URL of the bus nats.conf describes, the admin's
    password and inbox prefix, the CA and TLS-first; then the bus started as the hint says."""
    tls, port, xdg = self_signed(tmp_path / "certs"), free_port(), tmp_path / "xdg"
    directory = tmp_path / "cluster"
    out = _init_cli("--dir", str(directory), "--workers", "1", "--tls-cert", str(tls.cert), "--tls-key",
                    str(tls.key), "--listen", f"127.0.0.1:{port}", xdg=xdg)
    assert out.returncode == 0, out.stderr
    path = xdg / "nats" / "context" / "moebus.json"
    assert f"nats --context moebus micro ls" in out.stdout and str(path) in out.stdout
    context = json.loads(path.read_text())
    admin = read_creds(directory / "admin.creds")
    assert context["url"] == f"tls://127.0.0.1:{port}" and context["tls_first"] is True
    assert (context["user"], context["password"], context["inbox_prefix"]) == ("admin", admin.password, "_INBOX.admin")
    assert Path(context["ca"]).read_text() == admin.ca == tls.cert.read_text()
    assert path.stat().st_mode & 0o077 == 0  # a password: the owner's alone
    nats_server = subprocess.Popen([server_binary(), "-c", str(directory / "nats.conf")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    try:
        import ssl
        options = {"user": context["user"], "password": context["password"], "inbox_prefix": context["inbox_prefix"],
                   "tls": ssl.create_default_context(cafile=context["ca"]), "tls_handshake_first": context["tls_first"]}
        for _ in range(100):  # until the server listens
            try:
                nc = await nats.connect(context["url"], allow_reconnect=False, max_reconnect_attempts=0, **options)
                break
            except (OSError, nats.errors.NoServersError):
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the bus of nats.conf did not start")
        try:
            with pytest.raises(nats.errors.NoRespondersError):  # allowed, and nobody serves yet
                await nc.request("$SRV.PING", b"", timeout=2)
        finally:
            await nc.close()
    finally:
        nats_server.terminate()
        nats_server.wait(10)


def test_init_cluster_leaves_another_nats_context_of_that_name_alone(tmp_path: Path):
    xdg = tmp_path / "xdg"
    theirs = xdg / "nats" / "context" / "moebus.json"
    theirs.parent.mkdir(parents=True)
    theirs.write_text('{"description": "the user\'s own", "url": "nats://elsewhere:4222"}')
    out = _init_cli("--dir", str(tmp_path / "c"), "--workers", "1", xdg=xdg)
    assert out.returncode == 0 and "left as it is" in out.stderr, out.stderr
    assert json.loads(theirs.read_text())["url"] == "nats://elsewhere:4222"
    out = _init_cli("--dir", str(tmp_path / "c"), "--nats-context", "moebus-lab", xdg=xdg)
    assert json.loads((theirs.parent / "moebus-lab.json").read_text())["user"] == "admin"
    mine = theirs.parent / "moebus-lab.json"
    before = mine.read_text()
    out = _init_cli("--dir", str(tmp_path / "c"), "--nats-context", "moebus-lab", "--listen", "127.0.0.1:4333", xdg=xdg)
    assert out.returncode == 0 and "left as it is" not in out.stderr  # its own: brought up to date
    assert json.loads(mine.read_text())["url"] == "nats://127.0.0.1:4333" != json.loads(before)["url"]
