"""A delaying TCP proxy that stands in for a network link (10 GbE, Thunderbolt, Wi-Fi) on one machine.

Services connect to the proxy instead of to nats-server; it forwards bytes both ways untouched
(TLS passes through) and adds, per direction of each connection, a one-way delay and a bandwidth
limit. A chunk of n bytes read at time t is due at

    sent = max(t, link_free) + n * 8 / (gbps * 1e9);  link_free = sent;  delivered = sent + delay

so chunks queue behind each other on the wire, keep their order, and a request/reply round trip
pays the delay twice.

A thread per connection, not asyncio: event-loop timers wake about a millisecond late, which
would swamp a 200 µs delay, while `select` sleeps to the microsecond. The thread reads both
sockets, stamps each chunk, and sends it when due; `lateness_us()` reports how late chunks
actually went out.
"""

from __future__ import annotations

import ctypes
import select
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from collections import deque
from typing import NamedTuple

_CHUNK = 64 * 1024
_QUEUE_CHUNKS = 1024  # bounded, so a sender faster than the link gets TCP backpressure
_SPIN_S = 50e-6  # the last stretch before a due time is spun, not slept
_SLICE_S = 0.05  # the longest select, so a connection notices stop() soon
_CONNECT_TIMEOUT_S = 5.0
_LATENESS_SAMPLES = 100_000


class Lateness(NamedTuple):
    """How late chunks went out versus their due time, in µs."""

    p50: float
    p99: float


def _lower_timer_slack() -> None:
    """Linux pads sleeps by 50 µs of timer slack per thread by default; ask for 1 ns instead."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already closed or never connected


def _hang_up(sock: socket.socket) -> None:
    """Wake this socket's blocked recv/sendall now, and make its close() a reset: after a plain
    close, a peer that is still sending can sit blocked on a full send buffer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _shutdown(sock, socket.SHUT_RDWR)


class _Direction:
    """One way through the link: chunks waiting for their due time, then bytes being sent."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.pending: deque[tuple[float, bytes | None]] = deque()  # (due, chunk); None: the EOF
        self.out = bytearray()  # due and not yet taken by the kernel
        self.link_free = 0.0
        self.read_done = False  # EOF read (queued as None)
        self.closed = False  # the EOF passed on

    def readable(self) -> bool:
        return not self.read_done and len(self.pending) < _QUEUE_CHUNKS and len(self.out) < _CHUNK * 16


class _Connection:
    """One client connection and its upstream, both directions driven by one thread: a chunk
    crosses no thread hand-off, which on a loaded machine costs more than the link itself."""

    def __init__(self, proxy: LinkProxy, client: socket.socket, n: int) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.aborted = threading.Event()
        self._wake = socket.socketpair()  # abort() wakes the thread's select
        # Names carry the port, so threads of different proxies never share one.
        self.name = f"link-proxy-{proxy.port}-{n}"
        self.thread = threading.Thread(target=self._run, name=f"{self.name}-conn", daemon=True)

    def _run(self) -> None:
        try:
            try:
                upstream = socket.create_connection(self.proxy.upstream, timeout=_CONNECT_TIMEOUT_S)
            except OSError:
                return  # the client sees EOF at once
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.proxy._lock:
                self.upstream = upstream
                stopping = self.proxy._stopping
            try:
                if not stopping:
                    self._pump([_Direction(self.client, upstream), _Direction(upstream, self.client)])
            except OSError:
                self.abort()  # a reset on one side ends both
            finally:
                upstream.close()
        finally:
            self.client.close()
            for s in self._wake:
                s.close()

    def _pump(self, ways: list[_Direction]) -> None:
        proxy = self.proxy
        for sock in (self.client, self.upstream):
            sock.setblocking(False)
        while not self.aborted.is_set() and not all(w.closed for w in ways):
            now = time.perf_counter()
            for w in ways:
                while w.pending and w.pending[0][0] <= now + _SPIN_S:
                    due, data = w.pending.popleft()
                    while (now := time.perf_counter()) < due:  # the last few µs: never early
                        pass
                    proxy._late(now - due)
                    if data is None:
                        w.read_done = True
                        w.pending.appendleft((due, None))  # passed on once `out` has drained
                        break
                    w.out += data
                if w.out:
                    try:
                        sent = w.dst.send(w.out)  # what the kernel takes; the rest waits for writable
                    except BlockingIOError:
                        sent = 0
                    proxy._sent(sent)
                    del w.out[:sent]
                if not w.out and w.pending and w.pending[0][1] is None and w.pending[0][0] <= now:
                    w.pending.clear()
                    w.closed = True
                    _shutdown(w.dst, socket.SHUT_WR)  # the peer sees the close, in order, after the data
            dues = [w.pending[0][0] for w in ways if w.pending and not w.out]
            timeout = min(_SLICE_S, max(0.0, min(dues) - time.perf_counter() - _SPIN_S)) if dues else _SLICE_S
            reads = [w.src for w in ways if w.readable()] + [self._wake[0]]
            writes = [w.dst for w in ways if w.out]
            readable, _, _ = select.select(reads, writes, [], timeout)
            now = time.perf_counter()
            for w in ways:
                if w.src in readable:
                    self._receive(w, now)

    def _receive(self, w: _Direction, now: float) -> None:
        proxy = self.proxy
        try:
            data = w.src.recv(_CHUNK)
        except BlockingIOError:
            return
        if proxy.gbps > 0 and data:
            w.link_free = max(now, w.link_free) + len(data) * 8 / (proxy.gbps * 1e9)
            now = w.link_free
        due = max(now, w.link_free) + proxy.delay_s
        w.pending.append((due, data or None))
        if not data:
            w.read_done = True

    def abort(self) -> None:
        """Tear the whole connection down; both peers get a reset once `_run` closes the sockets."""
        self.aborted.set()
        try:
            self._wake[1].send(b"x")
        except OSError:
            pass
        _hang_up(self.client)
        if self.upstream is not None:
            _hang_up(self.upstream)


class LinkProxy:
    """Listens on `listen`, forwards each connection to `upstream` through an emulated link.

    `delay_us` is one way, per direction; `gbps` 0 means unlimited bandwidth."""

    def __init__(self, upstream: tuple[str, int], delay_us: float = 0.0, gbps: float = 0.0,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        if delay_us < 0 or gbps < 0:
            raise ValueError(f"delay_us and gbps must be >= 0, got {delay_us} and {gbps}")
        self.upstream = upstream
        self.delay_s = delay_us * 1e-6
        self.gbps = gbps
        self.listen = listen
        self.connections = 0
        self.bytes_forwarded = 0
        self._lateness: deque[float] = deque(maxlen=_LATENESS_SAMPLES)
        self._lock = threading.Lock()
        self._stopping = False
        self._conns: list[_Connection] = []
        self._listener: socket.socket | None = None
        self._waker: tuple[socket.socket, socket.socket] | None = None
        self._acceptor: threading.Thread | None = None
        self._bound: tuple[str, int] | None = None

    @property
    def port(self) -> int:
        if self._bound is None:
            raise RuntimeError("LinkProxy is not started")
        return self._bound[1]

    def start(self) -> tuple[str, int]:
        if self._listener is not None:
            raise RuntimeError("LinkProxy already started")
        family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
        listener = socket.create_server(self.listen, family=family)
        listener.setblocking(False)  # select() said readable, but the client may be gone by accept()
        self._bound = listener.getsockname()[:2]
        self._listener = listener
        # accept() cannot be woken portably from another thread; select on a socketpair can.
        self._waker = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept, daemon=True,
                                          name=f"link-proxy-accept-{self._bound[1]}")
        self._acceptor.start()
        return self._bound

    def stop(self) -> None:
        with self._lock:
            if self._stopping or self._listener is None:
                return
            self._stopping = True
        assert self._waker is not None and self._acceptor is not None
        self._waker[1].send(b"x")
        self._acceptor.join()
        self._listener.close()
        for s in self._waker:
            s.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort()
        for conn in conns:
            conn.thread.join()

    def __enter__(self) -> LinkProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _late(self, seconds: float) -> None:
        with self._lock:
            self._lateness.append(seconds)

    def _sent(self, n: int) -> None:
        with self._lock:
            self.bytes_forwarded += n

    def lateness_us(self) -> Lateness:
        """p50 and p99 of how late chunks went out versus their due time, in µs."""
        with self._lock:
            samples = sorted(self._lateness)
        if not samples:
            return Lateness(0.0, 0.0)
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        return Lateness(statistics.median(samples) * 1e6, p99 * 1e6)

    def _accept(self) -> None:
        # Slack is per thread and inherited: every connection's threads descend from this one.
        _lower_timer_slack()
        assert self._listener is not None and self._waker is not None
        while True:
            readable, _, _ = select.select([self._listener, self._waker[0]], [], [])
            if self._waker[0] in readable:
                return
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue  # the client gave up before we accepted it
            client.setblocking(True)  # BSDs hand the listener's O_NONBLOCK down to accepted sockets
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                conn = _Connection(self, client, self.connections)
                self._conns = [c for c in self._conns if c.thread.is_alive()]
                self._conns.append(conn)
                conn.thread.start()


def parse_hostport(s: str) -> tuple[str, int]:
    """Parse "host:port" or "[v6addr]:port"."""
    host, sep, port = s.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT with a port in 0..65535, got {s!r}")
    return host, int(port)


def serve(upstream: str, listen: str, delay_us: float, gbps: float) -> None:
    """Run a proxy in the foreground until SIGTERM or SIGINT."""
    proxy = LinkProxy(parse_hostport(upstream), delay_us, gbps, parse_hostport(listen))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        host, port = proxy.start()
        bandwidth = f"{gbps:g} Gbit/s" if gbps else "unlimited"
        print(f"moebus: link proxy on {host}:{port} -> {upstream}, delay {delay_us:g} µs each way, {bandwidth}",
              flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        proxy.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        late = proxy.lateness_us()
        print(f"moebus: link proxy stopped: {proxy.bytes_forwarded} bytes forwarded, chunks late by "
              f"{late.p50:.0f} µs (p50), {late.p99:.0f} µs (p99)", flush=True)
