"""One MoE layer's trip over the bus: split the pairs by worker, fan out, gather.

Called on a lane's MLX thread from inside the model's forward pass; the requests run on that
thread too, on its own connection and event loop (LaneBus), so a layer call crosses no thread.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np
from nats.aio.client import Client

from services.router.metrics import ExchangeStats
from shared.arrays import to_mlx, to_numpy, wire_dtype
from shared.bus import close, new_loop, request
from services.router.registry import Table
from shared.errors import BusError, BusTimeout, MoebusError, NoResponders, NotReady, RemoteError, WireError
from shared.wire import ExpertReply, decode_reply, decode_request, encode_reply, encode_request

_HEADER_ROOM = 64
# What a call ended from outside does next (LaneBus.lost): fail, or ask its experts' other
# owners (its worker left), or ask the same worker again (only the connection dropped).
FAIL, ELSEWHERE, AGAIN = "fail", "elsewhere", "again"
_PUMP_AFTER_S = 1.0  # an idle lane's loop runs this often, to answer the server's PINGs
T = TypeVar("T")


@dataclass(frozen=True)
class Trip:
    """The pairs one message carries: tokens `t`, top-k slots `s`, to `subject` ("": no live
    owner yet; the call waits for the placement that gives them one)."""

    subject: str
    t: np.ndarray
    s: np.ndarray
    payload: bytes


def plan_trips(layer: int, dtype: int, x: np.ndarray, inds: np.ndarray, table: Table, max_payload: int) -> list[Trip]:
    """Split (token, slot) pairs by the worker to ask: one message per worker, more only when a
    long prefill would pass the server's maximum message size. An expert with several owners
    has its tokens spread over them."""
    n, dim = x.shape
    table = table.of(layer)
    if table.owners.shape[1] == 1:  # one owner each (-1: none live)
        holder = table.owners[inds, 0]
    else:  # (N, k) index into subjects; an expert with no live owner has -1 in column 0
        holder = table.owners[inds, np.arange(n)[:, None] % np.maximum(table.count[inds], 1)]
    per_msg = max(1, (max_payload - _HEADER_ROOM) // (dim * x.itemsize + 8))
    trips = []
    for w in sorted(set(holder.ravel().tolist())):
        mask = holder == w
        t, s = np.nonzero(mask)
        for lo in range(0, len(t), per_msg):
            tc, sc = t[lo:lo + per_msg], s[lo:lo + per_msg]
            if len(t) <= per_msg:  # the usual case: the rows this worker needs, without a sort
                used = mask.any(axis=1)
                rows, row_of_pair = np.flatnonzero(used), (np.cumsum(used) - 1)[tc]
            else:
                rows, row_of_pair = np.unique(tc, return_inverse=True)
            payload = encode_request(
                layer, dtype, x[rows], row_of_pair.astype(np.int32), inds[tc, sc].astype(np.int32)
            )
            trips.append(Trip(table.subjects[w] if w >= 0 else "", tc, sc, payload))
    return trips


class Resend(Exception):
    """A call whose worker is gone or no longer holds its experts: ask their new owners."""

    def __init__(self, why: str, experts: frozenset[int] | None = None) -> None:
        super().__init__(why)
        self.experts = experts  # those the worker does not hold; None: avoid it altogether


class LaneBus:
    """A lane thread's own NATS connection and event loop: its layer calls publish, wait and
    read their replies on that thread, never handing off to the main loop. The loop runs only
    inside a call, or in a `pump` between steps (to answer the server's PINGs)."""

    def __init__(self) -> None:
        self.loop = new_loop()
        asyncio.set_event_loop(self.loop)
        self.nc: Client | None = None
        self.ran_at = time.monotonic()
        # Calls waiting on each subject (this loop only): a worker found dead ends them at once.
        self.waiting: dict[str, dict[asyncio.Task, float]] = {}
        self.lost: dict[asyncio.Task, tuple[str, str]] = {}  # a call ended from outside: (then, why)
        self.changed = asyncio.Event()  # set when the routing table changes

    def pulse(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return self.loop.run_until_complete(coro)
        finally:
            self.ran_at = time.monotonic()

    def soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn` on this lane's loop, from any thread (when it next runs)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed: the lane has stopped
            pass


class ExpertClient:
    """The `Exchange` the router's BusExperts call; routes by the active placement's table.

    Each lane thread `attach`es a LaneBus of its own; the table, failures and readiness come
    from the main loop, which reaches the lanes' loops only through `LaneBus.soon`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float,
                 connect: Callable[[Callable[[], None]], Awaitable[Client]]) -> None:
        self.stats: ExchangeStats | None = None  # set once the model is known
        self.loop = loop  # the main loop: readiness (on_failure) is told there
        self.timeout_s = timeout_s
        self._connect = connect  # a lane's connection, given what to do when it drops
        self._lanes: dict[int, LaneBus] = {}  # thread id -> its bus
        self.table = Table.empty()  # what this decode step routes by (MLX threads read it)
        self.latest = Table.empty()  # the newest: adopted at the next step, used by re-sends now
        self.unplaceable: frozenset[int] = frozenset()
        # subject -> when its worker last (re)joined: a call that failed on it before then may
        # ask it again (a bus that stalled, a Mac that woke), one after it may not.
        self.joined: dict[str, float] = {}
        # What a lane does while it waits on the bus: the engine hands MLX to the other lane.
        self.while_waiting: Callable[[], AbstractContextManager] = nullcontext
        self._y = np.empty(0, np.float32)  # replies are gathered here, reused while big enough
        self.on_failure: Callable[[str, BusError], None] = lambda subject, error: None

    def attach(self) -> None:
        """On a lane's thread, before its first step: its own connection and loop."""
        bus = LaneBus()
        # Calls in flight when it drops are sent again, to the same workers: nats-py sends them
        # once it has reconnected (`moebus up` restarts a dead nats-server at once), within each
        # call's deadline.
        bus.nc = bus.run(self._connect(lambda: self._fail(bus, None, "its connection dropped", AGAIN)))
        self._lanes[threading.get_ident()] = bus

    def pump(self) -> None:
        """On a lane's thread between steps: let an idle lane's connection answer the server,
        and give one that lost the server time to reconnect before the next step needs it."""
        bus = self._lanes.get(threading.get_ident())
        if bus is None or bus.nc is None:
            return
        if not bus.nc.is_connected and not bus.nc.is_closed:
            bus.run(asyncio.sleep(0.2))
        elif time.monotonic() - bus.ran_at > _PUMP_AFTER_S:
            bus.run(asyncio.sleep(0.001))

    def detach(self) -> None:
        """On a lane's thread, at shutdown: close its connection and loop."""
        bus = self._lanes.pop(threading.get_ident(), None)
        if bus is None:
            return
        try:
            if bus.nc is not None:
                bus.run(close(bus.nc))
        except Exception:  # noqa: BLE001 - the server went first (Ctrl-C): nothing left to send
            pass
        finally:
            left = asyncio.all_tasks(bus.loop)  # its reconnect attempts: ended, not destroyed pending
            for task in left:
                task.cancel()
            if left:
                bus.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            bus.loop.close()

    def set_table(self, table: Table) -> None:
        """A new placement or membership (event loop). Whole objects are swapped, so a thread
        never sees half of one."""
        self.latest = table
        self._pulse()

    def set_unplaceable(self, experts: frozenset[int]) -> None:
        """Experts the live workers cannot hold: calls waiting for an owner of one end now."""
        self.unplaceable = experts
        self._pulse()

    def rejoined(self, subject: str) -> None:
        """A worker (re)joined (event loop): calls that gave up on it may ask it again."""
        self.joined[subject] = time.monotonic()
        self._pulse()

    def _pulse(self) -> None:
        for bus in list(self._lanes.values()):
            bus.soon(bus.pulse)

    def adopt(self) -> None:
        """Between decode steps (MLX thread): route by the newest table from now on."""
        self.table = self.latest

    def __call__(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        *lead, dim = x.shape
        k = indices.shape[-1]
        xf = x.reshape(-1, dim)
        idx = indices.reshape(-1, k).astype(mx.int32)
        mx.eval(xf, idx)
        code = wire_dtype(xf)
        xn, inds = to_numpy(xf), np.asarray(idx)
        bus = self._lanes[threading.get_ident()]
        trips = plan_trips(layer, code, xn, inds, self.table, bus.nc.max_payload)
        start = time.perf_counter()
        try:
            with self.while_waiting():
                # the requests time out first
                replies = bus.run(asyncio.wait_for(self._fan_out(bus, trips), self.timeout_s + 5))
                seconds = time.perf_counter() - start  # not the wait for the baton to come back
        except asyncio.TimeoutError:
            raise BusTimeout(f"layer {layer}: no expert replies within {self.timeout_s + 5:g}s") from None
        compute_us = 0  # the slowest worker's own time: the rest of the round trip is the bus's
        if len(trips) == 1:  # one worker had every pair, in (token, slot) order: its reply is y
            reply = _checked(replies[0], trips[0], code, dim)
            y, compute_us = reply.y.reshape(xn.shape[0], k, dim), reply.compute_us
        else:
            y = self._buffer(xn.shape[0] * k * dim, xn.dtype).reshape(xn.shape[0], k, dim)
            for trip, data in zip(trips, replies):
                reply = _checked(data, trip, code, dim)
                y[trip.t, trip.s] = reply.y
                compute_us = max(compute_us, reply.compute_us)
        if self.stats is not None:
            pairs: dict[str, int] = {}
            for trip in trips:
                if trip.subject:  # "": waited for an owner, counted where it went
                    pairs[trip.subject] = pairs.get(trip.subject, 0) + len(trip.t)
            self.stats.record(layer, seconds, compute_us * 1e-6, inds, pairs, sum(len(t.payload) for t in trips))
        return to_mlx(y, code).reshape(*lead, k, dim)

    def _buffer(self, size: int, dtype: np.dtype) -> np.ndarray:
        # Only the lane holding MLX gets here (shared.mlx_thread), and to_mlx copies out of it
        # before handing MLX on, so one buffer serves both micro-batches.
        if self._y.dtype != dtype or self._y.size < size:
            self._y = np.empty(size, dtype)
        return self._y[:size]

    def fail_calls(self, subject: str | None, why: str, resend: bool = True) -> None:
        """Every call waiting on `subject` (None: on any) ends now: its worker is gone (dropped,
        or the bus itself went), so no reply will come. With `resend` its pairs go to their
        experts' other or new owners. From the main loop; each lane ends its own calls."""
        for bus in list(self._lanes.values()):
            bus.soon(self._fail, bus, subject, why, ELSEWHERE if resend else FAIL)

    @staticmethod
    def _fail(bus: LaneBus, subject: str | None, why: str, then: str) -> None:
        for s in [subject] if subject is not None else list(bus.waiting):
            for task in bus.waiting.get(s, ()):
                bus.lost[task] = (then, why)
                task.cancel()

    def stuck(self, after_s: float) -> list[str]:
        """Subjects with a call waiting longer than `after_s`: is their worker still there?"""
        now = time.monotonic()
        return sorted({s for bus in list(self._lanes.values()) for s, calls in list(bus.waiting.items())
                       if any(now - t > after_s for t in list(calls.values()))})

    async def _fan_out(self, bus: LaneBus, trips: list[Trip]) -> list[bytes]:
        deadline = time.monotonic() + self.timeout_s
        tasks = [asyncio.ensure_future(self._call(bus, t, deadline)) for t in trips]
        try:
            return await asyncio.gather(*tasks)
        except (MoebusError, asyncio.CancelledError):
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)  # none is left pending on a loop that stops after this call
            raise

    async def _call(self, bus: LaneBus, trip: Trip, deadline: float, avoid: Avoid = (), cause: str = "") -> bytes:
        if not trip.subject:
            return await self._resend(bus, trip, deadline, avoid, cause)
        if trip.subject not in self.latest.subjects:
            # Its worker left (dropped, asleep, or placed out) since this step's table was taken:
            # the step's later layers ask the experts' current owners, not a silent subject.
            why = f"{trip.subject}: its worker left"
            return await self._resend(bus, trip, deadline, (*avoid, (trip.subject, None, time.monotonic())), why)
        try:
            return await self._request(bus, trip, deadline)
        except Resend as e:
            failed = (trip.subject, e.experts, time.monotonic())
            return await self._resend(bus, trip, deadline, (*avoid, failed), str(e))

    async def _request(self, bus: LaneBus, trip: Trip, deadline: float) -> bytes:
        task = asyncio.current_task()
        assert task is not None and bus.nc is not None
        waiting = bus.waiting.setdefault(trip.subject, {})
        started = waiting[task] = time.monotonic()
        try:
            return await request(bus.nc, trip.subject, trip.payload, max(0.01, deadline - started))
        except asyncio.CancelledError:
            lost = bus.lost.get(task)
            if lost is None or task.cancelling() > 1:  # cancelled by its layer call too: stop
                raise
            task.uncancel()
            then, why = lost
            if then == FAIL:
                raise BusError(f"{trip.subject}: {why}") from None
            # ELSEWHERE: to its experts' other or new owners; AGAIN: to the same worker
            raise Resend(f"{trip.subject}: {why}", None if then == ELSEWHERE else frozenset()) from None
        except (NoResponders, BusTimeout) as e:
            waiting.pop(task, None)  # not among the calls its drop ends: this one re-sends itself
            if isinstance(e, NoResponders) or deadline - started >= 0.9 * self.timeout_s:
                # readiness follows real failures, not only heartbeats (told on the main loop)
                self.loop.call_soon_threadsafe(self.on_failure, trip.subject, e)
            if time.monotonic() >= deadline:
                raise
            raise Resend(str(e)) from None
        except RemoteError as e:
            if e.status == "409":  # the placement moved on since this step began: ask the new owner
                raise Resend(str(e), not_held(e.description)) from None
            raise
        finally:
            bus.lost.pop(task, None)
            waiting.pop(task, None)
            if not waiting:
                bus.waiting.pop(trip.subject, None)

    async def _resend(self, bus: LaneBus, trip: Trip, deadline: float, avoid: Avoid, cause: str) -> bytes:
        """Ask the trip's experts of their current owners, once the placement gives every one of
        them a live owner other than those that failed; until the call's deadline."""
        req = decode_request(trip.payload)
        x, inds = req.x[req.rows], req.experts[:, None]
        while True:
            # A worker that rejoined since a call failed on it is asked again: the same worker
            # back on the same subject after a stall holds the same experts.
            avoid = tuple(a for a in avoid if self.joined.get(a[0], -1.0) < a[2])
            table = self.latest.of(req.layer).without((subject, experts) for subject, experts, _ in avoid)
            missing = sorted({int(e) for e in req.experts if table.count[e] == 0})
            if not missing:
                break
            why = f" ({cause})" if cause else ""
            if self.unplaceable.intersection(missing):
                nobody = "no expert worker is live" if not self.latest.subjects else \
                    "the workers left cannot hold every expert"
                raise NotReady(f"experts {missing} of layer {req.layer} have no live worker{why}: {nobody}")
            if time.monotonic() >= deadline:
                raise NotReady(f"experts {missing} of layer {req.layer} found no live worker within "
                               f"{self.timeout_s:g}s{why}")
            try:
                await asyncio.wait_for(bus.changed.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                pass
        trips = plan_trips(req.layer, req.dtype, x, inds, table, bus.nc.max_payload)
        replies = await asyncio.gather(*(self._call(bus, t, deadline, avoid, cause) for t in trips))
        y = np.empty((len(req.experts), x.shape[1]), x.dtype)
        compute_us = 0
        for sub, data in zip(trips, replies):
            reply = _checked(data, sub, req.dtype, x.shape[1])
            y[sub.t] = reply.y
            compute_us = max(compute_us, reply.compute_us)
        return encode_reply(req.dtype, y, compute_us)


# (subject, its experts not to ask of it (None: all), when the call on it failed)
Avoid = tuple[tuple[str, frozenset[int] | None, float], ...]


def not_held(description: str) -> frozenset[int] | None:
    """The experts a 409 says its worker does not hold (None: say nothing, avoid the worker)."""
    found = re.search(r"\[([\d, ]*)\]", description)
    return frozenset(int(e) for e in found.group(1).split(",") if e.strip()) if found else None


def _checked(data: bytes, trip: Trip, dtype: int, dim: int) -> ExpertReply:
    reply = decode_reply(data)
    if reply.dtype != dtype or reply.y.shape != (len(trip.t), dim):
        raise WireError(f"{trip.subject}: reply shape {reply.y.shape} for {len(trip.t)} pairs")
    return reply
