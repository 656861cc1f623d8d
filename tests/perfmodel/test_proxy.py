from __future__ import annotations

import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.perfmodel.proxy import _SLICE_S, LinkProxy, parse_hostport

ROOT = Path(__file__).resolve().parents[2]


class EchoServer:
    """Echoes every connection; reports each EOF it sees and hands out its accepted sockets."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # so close() can end the accept loop
        self.address = self.listener.getsockname()[:2]
        self.accepted: queue.Queue[socket.socket] = queue.Queue()
        self.eofs: queue.Queue[bool] = queue.Queue()
        self.conns: list[socket.socket] = []
        self.closing = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.conns.append(conn)
            self.accepted.put(conn)
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            self.eofs.put(True)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.closing = True
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join()
        for conn in self.conns:
            conn.close()
        self.listener.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def connect(proxy: LinkProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def echo_through(sock: socket.socket, payload: bytes) -> bytes:
    """Send while receiving, so neither side's socket buffers can deadlock the transfer."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    got = recv_exactly(sock, len(payload))
    sender.join()
    return got


def round_trip_s(sock: socket.socket, message: bytes = b"x" * 100) -> float:
    t = time.perf_counter()
    sock.sendall(message)
    recv_exactly(sock, len(message))
    return time.perf_counter() - t


def test_large_payload_arrives_intact_and_is_counted(echo):
    payload = os.urandom(3 << 20)
    with LinkProxy(echo.address, delay_us=100, gbps=10) as proxy:
        with connect(proxy) as sock:
            assert echo_through(sock, payload) == payload
    # Counters are final once stop() has joined the writers.
    assert proxy.bytes_forwarded == 2 * len(payload)
    assert proxy.connections == 1


def test_many_small_messages_keep_their_order(echo):
    # Messages of different sizes queue up behind the delay at the same time.
    messages = [struct.pack("<I", i) + bytes(i % 300) for i in range(2000)]
    with LinkProxy(echo.address, delay_us=300) as proxy, connect(proxy) as sock:
        sender = threading.Thread(target=lambda: [sock.sendall(m) for m in messages])
        sender.start()
        got = recv_exactly(sock, sum(map(len, messages)))
        sender.join()
    assert got == b"".join(messages)


def test_round_trip_pays_the_delay_in_each_direction(echo):
    with LinkProxy(echo.address, delay_us=2000) as proxy, connect(proxy) as sock:
        samples = [round_trip_s(sock) for _ in range(20)]
        p50, p99 = proxy.lateness_us()
    assert min(samples) >= 4e-3  # never early, on any sample
    # No stall: the proxy wakes for each chunk's due time, not at its next periodic wake-up
    # (one slice later); lateness is timed inside the proxy's thread, whatever the client's.
    assert 0 <= p50 <= p99 and p50 < _SLICE_S * 1e6 / 2


def test_a_held_chunk_costs_no_cpu(echo):
    """The writers sleep through the delay: a busy-waiting proxy burns whatever CPU it gets
    while it holds a chunk, here for a second each way with nothing else to do."""
    with LinkProxy(echo.address, delay_us=1e6) as proxy, connect(proxy) as sock:
        cpu = time.process_time()
        assert echo_through(sock, b"held") == b"held"
        cpu = time.process_time() - cpu
    assert cpu < 0.2, cpu  # of the 2 s held: wake-ups every slice, then the last 50 µs spun


def test_zero_delay_adds_no_large_constant(echo):
    with LinkProxy(echo.address) as proxy, connect(proxy) as sock:
        for _ in range(20):
            round_trip_s(sock)
        # Nagle's algorithm against the peer's delayed ACK would add ~40 ms to small messages.
        conn = proxy._conns[0]
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in (conn.client, conn.upstream))
        p50, _ = proxy.lateness_us()
    assert p50 < _SLICE_S * 1e6 / 2  # a chunk due at once leaves in the pass that read it


def test_bandwidth_limits_a_bulk_transfer(echo):
    payload = bytes(1 << 20)  # 8.4e6 bits at 0.1 Gbit/s: 84 ms on the wire
    with LinkProxy(echo.address, gbps=0.1) as proxy, connect(proxy) as sock:
        t = time.perf_counter()
        assert echo_through(sock, payload) == payload
        elapsed = time.perf_counter() - t
    assert elapsed >= 0.08  # never faster than the link
    assert proxy.bytes_forwarded == 2 * len(payload)


def test_client_close_reaches_upstream(echo):
    with LinkProxy(echo.address, delay_us=500) as proxy:
        with connect(proxy) as sock:
            round_trip_s(sock)
        assert echo.eofs.get(timeout=2)


def test_upstream_close_reaches_client(echo):
    with LinkProxy(echo.address, delay_us=500) as proxy, connect(proxy) as sock:
        round_trip_s(sock)
        upstream_side = echo.accepted.get(timeout=2)
        upstream_side.shutdown(socket.SHUT_RDWR)
        assert sock.recv(100) == b""


def test_half_close_delivers_the_reply_before_the_eof(echo):
    # A proxy that passed the EOF ahead of the delayed data, or closed both ways on the
    # first EOF, would lose the echo.
    with LinkProxy(echo.address, delay_us=1000) as proxy, connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, 10) == b"last words"
        assert sock.recv(100) == b""


def test_a_vanished_client_frees_its_upstream():
    # The upstream keeps talking after the client has gone; the proxy must hang up on it.
    with socket.create_server(("127.0.0.1", 0)) as server, LinkProxy(server.getsockname()[:2]) as proxy:
        connect(proxy).close()
        upstream_side, _ = server.accept()
        upstream_side.settimeout(2)
        deadline = time.monotonic() + 2
        with upstream_side, pytest.raises((BrokenPipeError, ConnectionResetError)):
            while time.monotonic() < deadline:
                upstream_side.sendall(bytes(65536))


def test_refused_upstream_closes_the_client_at_once():
    with socket.create_server(("127.0.0.1", 0)) as s:
        dead = s.getsockname()[:2]  # nothing listens here once closed
    with LinkProxy(dead) as proxy, connect(proxy) as sock:
        sock.settimeout(2)  # a proxy that leaves the client hanging fails with TimeoutError
        try:
            got = sock.recv(100)
        except ConnectionResetError:
            got = b""
    assert got == b""


def test_a_reset_connection_leaves_the_others_working(echo):
    with LinkProxy(echo.address, delay_us=200) as proxy, connect(proxy) as steady:
        doomed = connect(proxy)
        round_trip_s(doomed)
        doomed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        doomed.close()  # linger 0: a reset, not a clean close
        assert echo_through(steady, b"still here") == b"still here"
        with connect(proxy) as fresh:
            assert echo_through(fresh, b"new") == b"new"
        assert proxy.connections == 3


def test_stop_ends_every_thread_and_frees_the_port(echo):
    def proxy_threads() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith("link-proxy")}

    before = proxy_threads()
    proxy = LinkProxy(echo.address, delay_us=600e6)  # chunks held for 10 minutes
    _, port = proxy.start()
    socks = [connect(proxy) for _ in range(3)]
    for sock in socks:
        sock.sendall(b"in flight")
    idle = connect(proxy)
    deadline = time.monotonic() + 10
    while len(proxy_threads() - before) < 1 + 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(proxy_threads() - before) == 1 + 4  # the acceptor, then one thread per connection

    stopping = threading.Thread(target=proxy.stop, daemon=True)
    stopping.start()
    stopping.join(60)  # a stop that waited for the held chunks would take the 10 minutes
    assert not stopping.is_alive(), "stop() waited for the held chunks"
    for sock in socks:  # their chunks were dropped, not delivered: the connections were reset
        try:
            got = sock.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b""
    proxy.stop()
    assert proxy_threads() == before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    for sock in [*socks, idle]:
        sock.close()


def test_serve_prints_its_address_and_stops_on_sigterm(echo):
    code = ("import sys; from services.perfmodel.proxy import serve; "
            "serve(sys.argv[1], '127.0.0.1:0', 200, 0)")
    upstream = "%s:%d" % echo.address
    proc = subprocess.Popen([sys.executable, "-c", code, upstream], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(10, proc.kill)  # a serve() that never prints must not hang the suite
    watchdog.start()
    try:
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(5)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.stdout.close()
    assert line.startswith("moebus: link proxy on 127.0.0.1:")
    assert f"-> {upstream}, delay 200 µs each way, unlimited" in line
    assert rc == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:4222", ("127.0.0.1", 4222)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:65535", ("::1", 65535)),
])
def test_parse_hostport_accepts(text, expected):
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", "4222", "host:", ":4222", "host:abc", "host:-1", "host:65536", "[::1]"])
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError) as info:
        parse_hostport(text)
    assert "HOST:PORT" in str(info.value)
