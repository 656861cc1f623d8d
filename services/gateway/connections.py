"""Connection limits uvicorn lacks: deadlines to read a request, and a cap on open connections.

A connection is always in one phase; each reading phase has a deadline:

    headers  from opening (or the next request's first byte) to the end of its headers: header_timeout_s
    body     until the whole body is in: body_timeout_s, then a 408 if no answer was sent
    busy     the app is answering, streaming included: no deadline, never evicted
    idle     between requests: uvicorn's keep-alive timeout

At the cap a new connection evicts the longest-open one that is reading or idle, so slow
clients cannot lock out everyone else (/health included); it is refused only when all are busy.
"""

from __future__ import annotations

import asyncio
import enum
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

from services import defaults
from services.gateway.errors import error_body, is_anthropic

FD_RESERVE = 64  # descriptors kept for the bus connection, logs, pipes and the listening socket


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = defaults.HEADER_TIMEOUT_S
    body_timeout_s: float = defaults.BODY_TIMEOUT_S
    keep_alive_s: float = defaults.KEEP_ALIVE_S
    max_connections: int = defaults.MAX_CONNECTIONS


class Phase(enum.Enum):
    HEADERS = "headers"
    BODY = "body"
    BUSY = "busy"
    IDLE = "idle"


EVICTABLE = (Phase.HEADERS, Phase.BODY, Phase.IDLE)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE as far as allowed; return the soft limit now in force."""
    unlimited = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS reports an infinite hard limit but refuses more than OPEN_MAX (10240).
    for want in (hard, 10240) if hard != unlimited else (1 << 16, 10240):
        if soft == unlimited or want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            break
        except (ValueError, OSError):
            continue
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == unlimited else soft


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """Accepting past the descriptor limit fails for everyone, so the cap stays below it."""
    return max(1, min(max_connections, fd_limit - FD_RESERVE))


class Tracker:
    """The server's open connections in the order they opened, shared by all its protocols."""

    def __init__(self, limits: ConnectionLimits, cap: int, on_close: Callable[[str], None]) -> None:
        self.limits = limits
        self.cap = cap
        self.on_close = on_close  # called with why the gateway closed a connection
        self.open: dict[GuardedH11, None] = {}

    def admit(self, conn: GuardedH11) -> bool:
        self.open[conn] = None
        if len(self.open) <= self.cap:
            return True
        victim = next((c for c in self.open if c is not conn and c.phase in EVICTABLE), None)
        if victim is None:
            return False
        victim.drop("evicted")
        return True


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each reading phase and a place under the cap."""

    tracker: ClassVar[Tracker]
    phase: Phase = Phase.HEADERS
    timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enter(Phase.HEADERS)
        if not self.tracker.admit(self):
            self.drop("refused")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.tracker.open.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():  # uvicorn's own idle timer: counted with ours
            self.tracker.on_close("keep_alive")
        super().timeout_keep_alive_handler()

    def shutdown(self) -> None:
        if self.phase in (Phase.HEADERS, Phase.BODY):  # nothing to finish: a graceful stop need not wait
            self.drop("shutdown")
        else:
            super().shutdown()

    def drop(self, reason: str) -> None:
        self._cancel_timer()
        self.tracker.open.pop(self, None)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's receive() says so and its send() is dropped
            self.cycle.message_event.set()
        self.transport.close()
        self.tracker.on_close(reason)

    def _sync(self) -> None:
        """The phase h11's view of the request puts this connection in."""
        if self.transport.is_closing():
            return
        their = self.conn.their_state
        if their is h11.SEND_BODY:
            phase = Phase.BODY
        elif their is h11.IDLE:
            phase = Phase.HEADERS if self.cycle is None or self.conn.trailing_data[0] else Phase.IDLE
        else:
            phase = Phase.BUSY
        if phase is not self.phase:
            self._enter(phase)

    def _enter(self, phase: Phase) -> None:
        self._cancel_timer()
        self.phase = phase
        limits = self.tracker.limits
        # Idle connections are left to uvicorn's keep-alive timer, armed when a response completes.
        delay = {Phase.HEADERS: limits.header_timeout_s, Phase.BODY: limits.body_timeout_s}.get(phase)
        if delay is not None:
            self.timer = self.loop.call_later(delay, self._expire)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        limits = self.tracker.limits
        if self.phase is Phase.HEADERS:
            if self.conn.trailing_data[0]:  # a request was begun: say why it ends
                self._write_408(f"the request headers took over {limits.header_timeout_s:g}s", anthropic=False)
            self.drop("header_timeout")
        elif self.phase is Phase.BODY:
            if self.cycle is not None and not self.cycle.response_started:
                self._write_408(f"the request body took over {limits.body_timeout_s:g}s",
                                anthropic=is_anthropic(self.scope["path"]))
            self.drop("body_timeout")

    def _write_408(self, message: str, anthropic: bool) -> None:
        body = orjson.dumps(error_body(408, message, "request_timeout", anthropic=anthropic))
        head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(head + body)


def guarded_protocol(limits: ConnectionLimits, cap: int, on_close: Callable[[str], None]) -> type[GuardedH11]:
    """A protocol class for uvicorn.Config(http=...), bound to one server's tracker."""
    return type("GuardedH11", (GuardedH11,), {"tracker": Tracker(limits, cap, on_close)})
