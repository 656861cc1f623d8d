"""Credentials on disk, the rule for an open bus, worker identities and TLS, on a real nats-server."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from shared import subjects
from shared.access import Tls, connect_options, init_cluster, load, resolve, server_block
from shared.errors import ConfigError
from shared.natsd import free_port, start_nats
from shared.access import read_creds
from shared.security import permissions
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
        assert not any("CONSUMER" in s or "STREAM.CREATE" in s for s in pubs), (role, pubs)
    worker = permissions("worker", "worker-3")
    assert worker["subscribe"]["allow"][0] == subjects.experts_subject_of("worker-3")
    assert subjects.announce_subject_of("worker-3") in worker["publish"]["allow"]


def _self_signed(tmp: Path) -> Tls:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(tmp / "key.pem"),
                    "-out", str(tmp / "cert.pem")], check=True, capture_output=True)
    return Tls(tmp / "cert.pem", tmp / "key.pem")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_with_certificates_the_bus_speaks_tls_only(tmp_path: Path):
    init_cluster(tmp_path / "c", workers=1, tls=_self_signed(tmp_path))
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
        plain = {k: v for k, v in connect_options(router).items() if k != "tls"}
        with pytest.raises(Exception):  # the right password over plain TCP: refused
            await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=3, **plain)
        gc.collect()
    finally:
        proc.terminate()
        proc.wait(10)
