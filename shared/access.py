"""A cluster's credentials on disk: made by `moebus init-cluster`, found by each service.

The cluster directory (`$MOEBUS_HOME/cluster` unless told otherwise) holds `nats.conf`, one
`<user>.creds` per user (`router`, `gateway`, `admin`, `worker-1`..`worker-N`) and `tls/` when
certificates were given. A worker takes the first worker identity no other process on this
machine holds (a lock file per identity), so `moebus worker` needs no flag for it.

`moebus init-cluster` also writes a `nats` CLI context for the admin user (`write_nats_context`),
so `nats --context moebus micro ls` works as it stands.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import home
from shared.errors import ConfigError, WireError
from shared.messages import decode, encode
from shared.security import (DEFAULT_LISTEN, DEFAULT_WORKERS, NATS_CONTEXT, Creds, Role, is_loopback, make_creds,
                             server_conf, worker_user)

_held_locks: list[int] = []  # descriptors kept open for the life of the process: the identity's lock


def read_creds(path: Path) -> Creds:
    try:
        return decode(Creds, path.read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read credentials {path}: {e.strerror}") from None
    except WireError as e:
        raise ConfigError(f"{path} is not a moebus credentials file: {e}") from None


def write_private(path: Path, data: bytes) -> None:
    """A file only its owner reads (secrets), written whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.touch(mode=0o600)
    tmp.chmod(0o600)
    tmp.write_bytes(data)
    tmp.replace(path)


def cluster_users(cluster_dir: Path) -> list[Creds]:
    return [read_creds(p) for p in sorted(cluster_dir.glob("*.creds"))]


def ca_of(cluster_dir: Path) -> str:
    ca = cluster_dir / "tls" / "ca.pem"
    return ca.read_text() if ca.is_file() else ""


def cluster_dir() -> Path:
    return home() / "cluster"


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path
    ca: Path | None = None  # the CA that signed `cert`; None: `cert` is self-signed


def init_cluster(directory: Path, workers: int = DEFAULT_WORKERS, tls: Tls | None = None,
                 store_dir: Path | None = None, listen: str = DEFAULT_LISTEN, max_payload_mb: int = 8) -> list[Path]:
    """Make (or complete) a cluster's credentials and a nats.conf for them; existing secrets
    are kept. Returns the credentials files written anew."""
    parse_listen(listen)
    made = ensure_users(directory, workers, tls)
    store = store_dir or directory / "jetstream"
    conf = (f"listen: {json.dumps(listen)}\nmax_payload: {max_payload_mb << 20}\n"
            f"jetstream {{ store_dir: {json.dumps(str(store))} }}\n" + server_block(directory))
    write_private(directory / "nats.conf", conf.encode())
    return made


def ensure_users(directory: Path, workers: int = DEFAULT_WORKERS, tls: Tls | None = None) -> list[Path]:
    """The credentials files of every role and of `workers` worker identities, made where missing."""
    if not 1 <= workers <= 1024:
        raise ConfigError(f"--workers must be 1..1024, not {workers}")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    if tls is not None:
        _install_tls(directory / "tls", tls)
    ca = ca_of(directory)
    made: list[Path] = []
    wanted: list[tuple[Role, str]] = [("router", "router"), ("gateway", "gateway"), ("admin", "admin")]
    wanted += [("worker", worker_user(n)) for n in range(1, workers + 1)]
    for role, user in wanted:
        path = directory / f"{user}.creds"
        if path.is_file():
            old = read_creds(path)
            if old.ca != ca:  # TLS added (or changed) since: same secret, new CA
                write_private(path, encode(old.model_copy(update={"ca": ca})))
            continue
        write_private(path, encode(make_creds(role, user, ca)))
        made.append(path)
    return made


def _install_tls(tls_dir: Path, tls: Tls) -> None:
    for given in (tls.cert, tls.key, *([tls.ca] if tls.ca else [])):
        if not given.is_file():
            raise ConfigError(f"TLS file {given} not found")
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(tls.cert, tls_dir / "server-cert.pem")
    write_private(tls_dir / "server-key.pem", tls.key.read_bytes())
    shutil.copyfile(tls.ca or tls.cert, tls_dir / "ca.pem")


def tls_dir(directory: Path) -> Path | None:
    """Where this cluster directory keeps the server's certificate; None: no TLS."""
    found = directory / "tls"
    return found if (found / "server-cert.pem").is_file() else None


def server_block(directory: Path) -> str:
    """The users and TLS part of nats-server's config for this cluster directory."""
    return server_conf(cluster_users(directory), tls_dir(directory))


def configured_listen(directory: Path) -> str | None:
    """The listen address of the nats.conf already in `directory`: run again (for more worker
    identities), init-cluster keeps a bus that other machines reach reachable."""
    try:
        found = re.search(r'^listen: ("[^"\n]*")$', (directory / "nats.conf").read_text(), re.M)
    except OSError:
        return None
    return json.loads(found.group(1)) if found else None


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) of a `--listen HOST:PORT`; ConfigError naming the flag when malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen {listen!r}: give HOST:PORT, such as 127.0.0.1:4222 or 0.0.0.0:4222")
    return host.strip("[]"), int(port)


def local_url(listen: str, tls: bool) -> str:
    """The URL this machine reaches a server listening on `listen` at."""
    host, port = parse_listen(listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "*") else host
    return f"{'tls' if tls else 'nats'}://{f'[{host}]' if ':' in host else host}:{port}"


def nats_context_path(name: str) -> Path:
    """Where the `nats` CLI reads context `name` (natscontext: $XDG_CONFIG_HOME, else ~/.config)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "nats" / "context" / f"{name}.json"


def write_nats_context(directory: Path, url: str, name: str = NATS_CONTEXT) -> tuple[Path, bool]:
    """A `nats` CLI context for this cluster's admin: its URL, password, inbox prefix (the only
    one admin may read), CA and TLS-first. Returns its path and whether it is this cluster's
    now: a context of that name moebus did not write for this directory is left as it is."""
    admin = read_creds(directory / "admin.creds")
    wanted = {"description": f"moebus cluster {directory.resolve()} (admin)", "url": url, "user": admin.user,
              "password": admin.password, "inbox_prefix": admin.inbox,
              "ca": str((directory / "tls" / "ca.pem").resolve()) if admin.ca else "", "tls_first": bool(admin.ca)}
    path = nats_context_path(name)
    try:
        existing = json.loads(path.read_bytes()) if path.exists() else None
    except (OSError, ValueError):
        existing = {}
    if existing is not None and (not isinstance(existing, dict) or
                                 existing.get("description") != wanted["description"]):
        return path, False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, json.dumps(wanted, indent=2).encode())
    return path, True


def has_cluster(directory: Path) -> bool:
    return (directory / "router.creds").is_file()


def _take_worker(directory: Path) -> Creds:
    """The first worker identity of `directory` no live process on this machine holds."""
    found = sorted((p for p in directory.glob("worker-*.creds") if p.stem.split("-")[-1].isdigit()),
                   key=lambda p: int(p.stem.split("-")[-1]))
    if not found:
        raise ConfigError(f"{directory} holds no worker credentials: run `moebus init-cluster`")
    locks = directory / "locks"
    locks.mkdir(exist_ok=True)
    for path in found:
        fd = os.open(locks / f"{path.stem}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _held_locks.append(fd)  # released by the kernel when this process ends, however it ends
        return read_creds(path)
    raise ConfigError(f"all {len(found)} worker credentials in {directory} are in use: "
                      f"`moebus init-cluster --workers {len(found) * 2}` adds more")


def load(path: Path, role: Role) -> Creds:
    """Credentials for `role` from a file, or from a cluster directory."""
    if path.is_dir():
        creds = _take_worker(path) if role == "worker" else read_creds(path / f"{role}.creds")
    else:
        creds = read_creds(path)
    if creds.role != role:
        raise ConfigError(f"{path} holds {creds.role} credentials; a {role} needs its own")
    return creds


def resolve(url: str, creds_path: Path | None, insecure: bool, role: Role) -> Creds | None:
    """The credentials a service connects with, or None for an open bus. Without `--creds`, the
    cluster directory of this machine is used; with neither, only a server on this machine (or
    `--insecure`) is accepted: nothing goes to a LAN without credentials by accident."""
    if creds_path is not None:
        return load(creds_path, role)
    local = cluster_dir()
    if has_cluster(local) and not insecure:
        return load(local, role)
    if insecure or is_loopback(url):
        return None
    raise ConfigError(f"refusing to use NATS at {url} without credentials: give --creds FILE (made by "
                      "`moebus init-cluster`), or --insecure for an open bus")


def connect_options(creds: Creds | None) -> dict[str, Any]:
    """nats-py connect() keywords for these credentials: the user, its inbox prefix, TLS."""
    if creds is None:
        return {}
    out: dict[str, Any] = {"user": creds.user, "password": creds.password, "inbox_prefix": creds.inbox}
    if creds.ca:
        _tls_protocol_fix()
        out["tls"] = ssl.create_default_context(cadata=creds.ca)
        out["tls_handshake_first"] = True  # see shared.security.server_conf
    return out


def _tls_protocol_fix() -> None:
    """nats-py upgrades to TLS with `loop.start_tls` and a new stream protocol that is never told
    its transport (asyncio's own `StreamWriter.start_tls` does tell it). That protocol then takes
    itself for plain TCP: its reader cannot pause a fast sender, and at the server's EOF asyncio
    logs "returning true from eof_received() has no effect when using ssl" (nats-io/nats.py#574).
    Tell it, once per TLS connection, as asyncio would."""
    from nats.aio.transport import TcpTransport

    original = TcpTransport.connect_tls
    if getattr(original, "moebus_fixed", False):
        return

    async def connect_tls(self: TcpTransport, *args: Any, **kwargs: Any) -> None:
        await original(self, *args, **kwargs)
        transport = self._io_writer.transport
        protocol = transport.get_protocol()
        if isinstance(protocol, asyncio.StreamReaderProtocol) and not protocol._over_ssl:  # not if nats-py did
            protocol.connection_made(transport)

    connect_tls.moebus_fixed = True  # type: ignore[attr-defined]
    TcpTransport.connect_tls = connect_tls  # type: ignore[method-assign]
