"""Where code runs in moebus: the thread model, and the thread that runs MLX work.

Every process has one asyncio event loop on its main thread, which owns the NATS connection for
everything but the per-layer hot path: subscriptions, service handlers, heartbeats, placement.
MLX work (graph building and `mx.eval`) never runs there; it runs on one MLX owner thread:

- gateway: the event loop only; no MLX.
- worker: its MLX thread is a `LoopThread`, which runs an event loop of its own with a second
  NATS connection that serves the experts endpoint: a request is decoded, computed and answered
  on that one thread, crossing none. The main loop keeps the first connection (heartbeats,
  placement) and sends loads and releases to the MLX thread as jobs, between requests.
- router: the MLX thread loads the model and runs the engine as its `background` step. With two
  micro-batches the engine runs the second lane on a thread of its own (`MLXThread("mlx-lane1")`)
  and the lanes take turns at MLX through the engine's `Baton`: one thread builds or evaluates
  graphs at a time. Each lane thread has a NATS connection and event loop of its own
  (`services.router.exchange.LaneBus`). A MoE layer's call (`ExpertClient.__call__`) runs on
  its lane's thread: it evaluates the layer's hidden state and gate choices, plans one message
  per worker, runs the fan-out on the lane's own loop while the baton is released (so the
  other lane computes meanwhile), and places the replies into MLX arrays: no thread crossed.
  The main loop tells the lanes of placement changes and dead workers through
  `call_soon_threadsafe` on their loops, and has each idle lane's loop run every few seconds
  so its connection answers the server's PINGs.
- Blocking work that is not MLX (tokenizing a prompt, hashing a fetched file) goes to
  `asyncio.to_thread`, off the loop.

Callers submit a function and get a concurrent future, or await it with `run`. A process with
continuous work (the router's decode loop) sets a `background` step: it runs whenever no job
waits, and returns whether more work remains; with none, the thread sleeps until the next job.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from typing import Any, TypeVar

import mlx.core as mx

from shared.bus import new_loop
from shared.logs import get_logger

T = TypeVar("T")
log = get_logger("mlx")


class MLXThread:
    def __init__(self, name: str = "mlx") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self.background: Callable[[], bool] | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        fut: Future[T] = Future()
        if self._stopped:  # nothing would ever run it: fail now rather than hang the caller
            fut.set_exception(RuntimeError(f"{self._thread.name} has stopped"))
            return fut
        self._jobs.put((lambda: fn(*args), fut))
        return fut

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def owns(self) -> bool:
        """True on this thread itself: a job that waited on its own thread would never run."""
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        self._stopped = True
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def _step(self) -> bool:
        if self.background is None:
            return False
        try:
            return self.background()
        except Exception:  # noqa: BLE001 - the thread must outlive any one step
            log.exception("background step failed")
            return False

    def _loop(self) -> None:
        busy = False
        while True:
            try:
                job = self._jobs.get(block=not busy)  # idle: sleep until there is a job
            except queue.Empty:
                busy = self._step()
                continue
            if job is None:
                # MLX asks each thread to free its streams before it ends; left to process
                # exit, their teardown can abort the process ("terminate called...").
                mx.clear_streams()
                return
            fn, fut = job
            _settle(fut, fn)
            busy = self.background is not None  # a job may have added work: step next


def _settle(fut: Future, fn: Callable[[], Any]) -> None:
    """Run a submitted job into its future, unless its caller cancelled it first."""
    if fut.set_running_or_notify_cancel():
        try:
            fut.set_result(fn())
        except BaseException as e:  # the caller decides what an error means
            fut.set_exception(e)


class LoopThread:
    """An MLX owner thread that runs an event loop of its own: the worker's hot path.

    A NATS connection made on this loop (`call`) delivers each expert request on the thread
    that computes it, so the request crosses no thread on its way in or out. Jobs from other
    threads (`submit`, `run`) run between the loop's callbacks, one at a time, like MLXThread's.
    """

    def __init__(self, name: str = "mlx") -> None:
        self.loop = new_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            mx.clear_streams()  # as MLXThread's: this thread's MLX streams go with it
            self.loop.close()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        fut: Future[T] = Future()

        try:
            self.loop.call_soon_threadsafe(_settle, fut, lambda: fn(*args))
        except RuntimeError:  # the loop is closed: nothing would ever run it
            fut.set_exception(RuntimeError(f"{self._thread.name} has stopped"))
        return fut

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on this thread's loop (from another loop)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def owns(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return  # already stopped
        self._thread.join(timeout=5)


class Baton:
    """Lets two threads take turns at MLX, so that only one builds or evaluates graphs at a time.

    The router decodes two micro-batches ("lanes") on two threads: each holds the baton while it
    computes and hands it over while it waits on the bus, so one lane's attention runs during the
    other's expert round trip. Releasing is a no-op for a thread that does not hold it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: int | None = None

    def __enter__(self) -> Baton:
        self._lock.acquire()
        self._holder = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self._holder = None
        self._lock.release()

    @contextmanager
    def released(self) -> Iterator[None]:
        if self._holder != threading.get_ident():
            yield
            return
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()
