"""The gateway's side of the router: start a generation, read its events in order, cancel it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeout

from shared import subjects
from shared.bus import request
from shared.errors import BusError, BusTimeout, NoResponders
from shared.messages import (
    Cancel, GenerateAccepted, GenerateEvent, GenerateRequest, RouterStatus, TokenCount, decode, encode,
)


@dataclass
class Generation:
    request_id: str
    accepted: GenerateAccepted
    sub: Subscription
    client: RouterClient
    started: float
    connection: int  # the client's connection count when it started
    done: bool = False

    async def events(self) -> AsyncIterator[GenerateEvent]:
        """Events up to the one with a finish_reason. Leaving early (the client went away)
        cancels the sequence on the router, so its cache is freed at once."""
        m = self.client.metrics
        last = None
        heard = time.monotonic()  # the last event
        try:
            while True:
                try:
                    msg = await self.sub.next_msg(timeout=self.client.check_every_s)
                except NatsTimeout:
                    if time.monotonic() - heard >= self.client.event_timeout_s:
                        raise BusTimeout(f"no token from the router within {self.client.event_timeout_s:g}s") from None
                    await self.client.check_alive(self)
                    continue
                heard = time.monotonic()
                event = decode(GenerateEvent, msg.data)
                now = time.perf_counter()
                if event.token is not None and m is not None:
                    (m.ttft if last is None else m.itl).observe(now - (last or self.started))
                    last = now
                if event.finish_reason is not None:
                    self.done = True
                    if m is not None:
                        m.count_tokens(event.prompt_tokens, event.completion_tokens)
                yield event
                if self.done:
                    return
        finally:
            # The cancel first, and shielded: a second cancellation of this task (the client
            # and the server both giving up) must not skip it and leave the sequence running.
            if not self.done:
                await asyncio.shield(self.client.cancel(self.request_id))
            await self.sub.unsubscribe()


class RouterClient:
    def __init__(self, nc: Client, request_timeout_s: float, event_timeout_s: float, deadline_s: float,
                 metrics=None) -> None:
        self.nc = nc
        self.request_timeout_s = request_timeout_s
        self.event_timeout_s = event_timeout_s
        self.deadline_s = deadline_s
        self.metrics = metrics
        self.check_every_s = 1.0  # a stream quiet this long asks whether its router is still there
        self.connections = 0  # bumped when the bus connection drops: events sent meanwhile are lost
        self._generate_failed: tuple[str, float] | None = None  # why the last generate got no answer, when
        self._model: tuple[str, float] = ("", 0.0)

    def generate_failing(self, within_s: float = 5.0) -> str | None:
        """Why generate requests fail, if the last one failed within `within_s` and none has
        succeeded since (a router that answers its status but not generate is not serving)."""
        if self._generate_failed is None or time.monotonic() - self._generate_failed[1] > within_s:
            return None
        return self._generate_failed[0]

    def on_disconnect(self) -> None:
        self.connections += 1

    async def check_alive(self, gen: Generation) -> None:
        """BusError when `gen` can no longer finish: the bus dropped (its events are lost), or
        the router that accepted it is gone or was restarted. A busy router still answers."""
        if self.connections != gen.connection:
            raise BusError("the bus connection was lost during generation; its tokens cannot be recovered")
        try:
            router = (await self.status()).router
        except NoResponders:
            raise BusError("the router went away during generation") from None
        except BusError:
            return  # no answer in time: maybe only slow; the event timeout still bounds the wait
        if router != gen.accepted.router:
            raise BusError("the router restarted during generation; this request was lost")

    async def model(self, max_age_s: float = 5.0) -> str:
        """The served model's name, asked of the router at most every few seconds, not per request."""
        name, at = self._model
        if not name or time.monotonic() - at > max_age_s:
            name = (await self.status()).model
            self._model = (name, time.monotonic())
        return name

    async def status(self, timeout_s: float = 2.0) -> RouterStatus:
        return decode(RouterStatus, await request(self.nc, subjects.ROUTER_STATUS, b"{}", timeout_s))

    async def router_metrics(self, timeout_s: float = 2.0) -> bytes:
        return await request(self.nc, subjects.ROUTER_METRICS, b"{}", timeout_s)

    async def cancel(self, request_id: str) -> None:
        await self.nc.publish(subjects.ROUTER_CANCEL, encode(Cancel(request_id=request_id)))

    async def count_tokens(self, **fields) -> int:
        """The prompt's length in tokens, as the router would count it for a generation of `fields`."""
        g = GenerateRequest(request_id=uuid.uuid4().hex, stream=subjects.stream_subject("count"), max_tokens=1,
                            **fields)
        reply = await request(self.nc, subjects.ROUTER_TOKENS, encode(g), self.request_timeout_s)
        return decode(TokenCount, reply).prompt_tokens

    async def start(self, **fields) -> Generation:
        request_id = uuid.uuid4().hex
        stream = subjects.stream_subject(request_id)
        started = time.perf_counter()
        # Subscribe before asking, so not even the first event can be missed.
        sub = await self.nc.subscribe(stream)
        try:
            g = GenerateRequest(request_id=request_id, stream=stream, timeout_s=self.deadline_s, **fields)
            connection = self.connections
            try:
                reply = await request(self.nc, subjects.ROUTER_GENERATE, encode(g), self.request_timeout_s)
            except (NoResponders, BusTimeout) as e:
                self._generate_failed = (str(e), time.monotonic())  # /health says so for a while
                raise
            self._generate_failed = None
            return Generation(request_id, decode(GenerateAccepted, reply), sub, self, started, connection)
        except BaseException as e:
            await sub.unsubscribe()
            # The router may have taken it (or still take it up) though we gave up: it need not.
            if isinstance(e, (BusTimeout, asyncio.CancelledError)):
                await self.cancel(request_id)
            raise
