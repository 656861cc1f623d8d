"""Connecting to NATS, requests with a timeout, and mapping nats-py's errors to ours."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request

from shared.access import connect_options
from shared.errors import BusError, BusTimeout, NoResponders, RemoteError
from shared.logs import get_logger
from shared.security import Creds

log = get_logger("bus")


class Throttled:
    """A warning logged at most once per `period_s`, with how many were held back: a service
    reconnecting to a dead server must not write several lines a second."""

    def __init__(self, period_s: float = 10.0) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, event: str, **kw: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(event, -self.period_s) < self.period_s:
            self._held[event] = self._held.get(event, 0) + 1
            return
        self._last[event] = now
        held = self._held.pop(event, 0)
        log.warning(event, **kw, **({"repeats_held_back": held} if held else {}))


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop for a service's thread: uvloop's where installed."""
    try:
        import uvloop  # ~1.5x faster bus round trips than the default loop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    loop.set_exception_handler(_quiet_closed_writes)
    return loop


def _quiet_closed_writes(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's last word on an error no task awaited. uvloop's TLS layer can finish a
    handshake on a socket that closed meanwhile (the bus restarting under a reconnect) and its
    write then fails with "unable to perform operation on <... closed=True ...>"; nats-py has
    already seen the connection drop and reconnects, so that one is not an operator's concern.
    Everything else goes to the default handler, traceback and all."""
    error = context.get("exception")
    if isinstance(error, RuntimeError) and str(error).startswith("unable to perform operation on") \
            and "closed=True" in str(error):
        log.debug("a write on a closed connection dropped", error=str(error))
        return
    loop.default_exception_handler(context)


async def connect(url: str, name: str, on_disconnect: Callable[[], None] | None = None,
                  creds: Creds | None = None, on_reconnect: Callable[[], None] | None = None) -> Client:
    throttled = Throttled()

    async def error_cb(e: Exception) -> None:
        throttled.warning("nats error", error=repr(e))

    async def disconnected_cb() -> None:
        if nc.is_closed or nc.is_draining:
            return  # our own shutdown
        throttled.warning("nats disconnected, reconnecting", url=url)
        if on_disconnect is not None:
            on_disconnect()

    async def reconnected_cb() -> None:
        log.info("nats reconnected", url=url)
        if on_reconnect is not None:
            on_reconnect()

    nc = await nats.connect(
        url,
        name=name,
        connect_timeout=5,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        **connect_options(creds),
    )
    return nc


async def request(nc: Client, subject: str, payload: bytes, timeout: float) -> bytes:
    """A request that always ends: a reply, or BusTimeout / NoResponders / RemoteError."""
    try:
        msg = await nc.request(subject, payload, timeout=timeout)
    except NoRespondersError:
        raise NoResponders(f"nobody answers on {subject}") from None
    except (NatsTimeout, asyncio.TimeoutError):
        raise BusTimeout(f"no reply on {subject} within {timeout:.3g}s") from None
    except NatsError as e:  # closed, draining, buffer full: the bus failed, say how
        raise BusError(f"{subject}: {e!r}") from None
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise RemoteError(subject, headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""))
    return msg.data


def inbox_only(handler: Callable[[Request], Awaitable[None]]) -> Callable[[Request], Awaitable[None]]:
    """A request handler that answers only on a requester's inbox. The requester names the
    reply subject, and the answer goes out with the service's own rights (the server lets a
    user answer what it received): the router answering onto `$JS.API.STREAM.PURGE.<stream>`
    would purge that stream. Every moebus requester (nats-py's `request`) replies to
    `_INBOX...`; a request naming anything else is dropped unanswered."""

    async def guarded(req: Request) -> None:
        if (req._msg.reply or "").startswith("_INBOX."):  # nats-py's Request has no public reply
            await handler(req)

    return guarded


async def close(nc: Client, timeout_s: float = 5.0) -> None:
    """Drain (finish in-flight handlers, flush), but never hang when the server is gone."""
    # nats-py's own drain timeout first: it gathers every subscription's drain and, timing out,
    # collects that gather's outcome. Ours cancelling it mid-gather instead left asyncio to log
    # "_GatheringFuture exception was never retrieved ... CancelledError" at exit.
    nc.options["drain_timeout"] = 0.8 * timeout_s
    try:
        await asyncio.wait_for(nc.drain(), timeout_s)
    except (Exception, asyncio.CancelledError):  # noqa: BLE001 - shutting down either way
        _reraise_if_cancelled()
        try:
            await asyncio.wait_for(nc.close(), 2.0)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the server went first
            _reraise_if_cancelled()


def _reraise_if_cancelled() -> None:
    """With the server gone, nats-py's drain and close can raise CancelledError from their own
    reconnect task; only a cancellation of the caller itself goes on up."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


_stopping: weakref.WeakSet = weakref.WeakSet()


async def stop_service(svc: Any, timeout_s: float = 2.0) -> None:
    """Stop a NATS micro service (unsubscribe, drain), within `timeout_s`: with the server gone
    (Ctrl-C reaches nats-server too) its drain would wait for a reconnect that never comes.
    Only the first call stops it; later ones (an exit stack's) return at once."""
    if svc in _stopping:
        return
    _stopping.add(svc)
    try:
        await asyncio.wait_for(svc.stop(), timeout_s)
    except Exception as e:  # noqa: BLE001 - shutting down either way
        log.warning("stopping without the bus", error=repr(e))


async def ticks(stop: asyncio.Event, period_s: float) -> AsyncIterator[None]:
    """Yields at once, then every `period_s`, until `stop` is set (a heartbeat loop)."""
    while not stop.is_set():
        yield
        await wait(stop, period_s)


async def wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` has passed, whichever is first."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except asyncio.TimeoutError:
        pass


def stop_event() -> asyncio.Event:
    """An event set by SIGINT/SIGTERM, or when the launching `moebus up` dies."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parent = os.environ.get("MOEBUS_PARENT_PID")
    if parent:
        loop.create_task(_watch_parent(int(parent), stop))
    return stop


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    # No orphans: a child of `moebus up` exits when its parent is gone, even after SIGKILL.
    while not stop.is_set():
        if os.getppid() != pid:
            log.warning("launcher is gone, stopping", parent=pid)
            stop.set()
            return
        await asyncio.sleep(0.5)
