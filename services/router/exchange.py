"""One MoE layer's trip over the bus: split the pairs by worker, fan out, gather.

Called on the router's MLX thread from inside the model's forward pass; the requests
themselves run on the event loop, and the MLX thread waits for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from nats.aio.client import Client

from services.router.metrics import ExchangeStats
from shared.arrays import to_mlx, to_numpy, wire_dtype
from shared.bus import request
from shared.errors import BusError, BusTimeout, NoResponders, NotReady, WireError
from shared.mlx_thread import Baton
from shared.wire import decode_reply, encode_request

_HEADER_ROOM = 64


@dataclass(frozen=True)
class Trip:
    """The pairs one message carries: tokens `t`, top-k slots `s`, to `subject`."""

    subject: str
    t: np.ndarray
    s: np.ndarray
    payload: bytes


def plan_trips(
    layer: int, dtype: int, x: np.ndarray, inds: np.ndarray,
    subjects: list[str], owner: np.ndarray, max_payload: int,
) -> list[Trip]:
    """Split (token, slot) pairs by owning worker: one message per worker, more only when
    a long prefill would pass the server's maximum message size."""
    n, dim = x.shape
    holder = owner[inds]  # (N, k) worker index of each pair
    if (holder < 0).any():
        e = int(inds[holder < 0][0])
        raise NotReady(f"expert {e} of layer {layer} has no worker")
    per_msg = max(1, (max_payload - _HEADER_ROOM) // (dim * x.itemsize + 8))
    trips = []
    for w in np.unique(holder):
        t, s = np.nonzero(holder == w)
        for lo in range(0, len(t), per_msg):
            tc, sc = t[lo:lo + per_msg], s[lo:lo + per_msg]
            rows, row_of_pair = np.unique(tc, return_inverse=True)
            payload = encode_request(
                layer, dtype, x[rows], row_of_pair.astype(np.int32), inds[tc, sc].astype(np.int32)
            )
            trips.append(Trip(subjects[w], tc, sc, payload))
    return trips


class ExpertClient:
    """The `Exchange` the router's BusExperts call; routes with the registry's table."""

    def __init__(self, nc: Client, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.stats: ExchangeStats | None = None  # set once the model is known
        self.nc = nc
        self.loop = loop
        self.timeout_s = timeout_s
        self.table: tuple[list[str], np.ndarray] = ([], np.zeros(0, np.int32))
        self.baton = Baton()  # handed to the other micro-batch while this one waits on the bus
        self._y = np.empty(0, np.float32)  # replies are gathered here, reused while big enough
        # Calls waiting on each subject (event loop only): a worker found dead fails them at once.
        self._waiting: dict[str, set[asyncio.Task]] = {}
        self._lost: dict[asyncio.Task, str] = {}
        self.on_failure: Callable[[str, BusError], None] = lambda subject, error: None

    def set_table(self, subjects: list[str], owner: np.ndarray) -> None:
        # One attribute, swapped whole by the event loop: the MLX thread never sees half of it.
        self.table = (subjects, owner)

    def __call__(self, layer: int, x: mx.array, indices: mx.array) -> mx.array:
        *lead, dim = x.shape
        k = indices.shape[-1]
        xf = x.reshape(-1, dim)
        idx = indices.reshape(-1, k).astype(mx.int32)
        mx.eval(xf, idx)
        code = wire_dtype(xf)
        xn, inds = to_numpy(xf), np.asarray(idx)
        subjects, owner = self.table
        trips = plan_trips(layer, code, xn, inds, subjects, owner, self.nc.max_payload)
        start = time.perf_counter()
        gather = asyncio.run_coroutine_threadsafe(self._fan_out(trips), self.loop)
        try:
            with self.baton.released():
                replies = gather.result(self.timeout_s + 5)  # the requests time out first
                seconds = time.perf_counter() - start  # not the wait for the baton to come back
        except concurrent.futures.TimeoutError:
            gather.cancel()
            raise BusTimeout(f"layer {layer}: no expert replies within {self.timeout_s + 5:g}s") from None
        y = self._buffer(xn.shape[0] * k * dim, xn.dtype).reshape(xn.shape[0], k, dim)
        compute_us = 0  # the slowest worker's own time: the rest of the round trip is the bus's
        for trip, data in zip(trips, replies):
            reply = decode_reply(data)
            if reply.dtype != code or reply.y.shape != (len(trip.t), dim):
                raise WireError(f"{trip.subject}: reply shape {reply.y.shape} for {len(trip.t)} pairs")
            y[trip.t, trip.s] = reply.y
            compute_us = max(compute_us, reply.compute_us)
        if self.stats is not None:
            pairs: dict[str, int] = {}
            for trip in trips:
                pairs[trip.subject] = pairs.get(trip.subject, 0) + len(trip.t)
            self.stats.record(layer, seconds, compute_us * 1e-6, inds, pairs, sum(len(t.payload) for t in trips))
        return to_mlx(y, code).reshape(*lead, k, dim)

    def _buffer(self, size: int, dtype: np.dtype) -> np.ndarray:
        # Only the thread holding the baton gets here, and to_mlx copies out of it before
        # handing the baton on, so one buffer serves both micro-batches.
        if self._y.dtype != dtype or self._y.size < size:
            self._y = np.empty(size, dtype)
        return self._y[:size]

    def fail_calls(self, subject: str | None, why: str) -> None:
        """Every call waiting on `subject` (None: on any) ends now with `why`: its worker is gone
        (dropped, replaced, or the bus itself went), so no reply will come."""
        for s in [subject] if subject is not None else list(self._waiting):
            for task in self._waiting.get(s, ()):
                self._lost[task] = why
                task.cancel()

    async def _fan_out(self, trips: list[Trip]) -> list[bytes]:
        tasks = [asyncio.ensure_future(self._call(t)) for t in trips]
        try:
            return await asyncio.gather(*tasks)
        except BusError:
            for task in tasks:
                task.cancel()
            raise

    async def _call(self, trip: Trip) -> bytes:
        task = asyncio.current_task()
        waiting = self._waiting.setdefault(trip.subject, set())
        waiting.add(task)
        try:
            return await request(self.nc, trip.subject, trip.payload, self.timeout_s)
        except asyncio.CancelledError:
            why = self._lost.get(task)
            if why is None:
                raise
            raise BusError(f"{trip.subject}: {why}") from None
        except (NoResponders, BusTimeout) as e:
            self.on_failure(trip.subject, e)  # readiness follows real failures, not only heartbeats
            raise
        finally:
            self._lost.pop(task, None)
            waiting.discard(task)
            if not waiting:
                self._waiting.pop(trip.subject, None)
