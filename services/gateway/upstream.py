"""The gateway's side of the router: start a generation, then read its events in order."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeout

from shared import subjects
from shared.bus import request
from shared.errors import BusTimeout, MoebusError
from shared.messages import GenerateAccepted, GenerateEvent, GenerateRequest, RouterStatus, decode, encode


@dataclass
class Generation:
    accepted: GenerateAccepted
    sub: Subscription
    event_timeout_s: float

    async def events(self) -> AsyncIterator[GenerateEvent]:
        """Events up to and including the one with a finish_reason; always unsubscribes."""
        try:
            while True:
                try:
                    msg = await self.sub.next_msg(timeout=self.event_timeout_s)
                except NatsTimeout:
                    raise BusTimeout(f"no token from the router within {self.event_timeout_s:g}s") from None
                event = decode(GenerateEvent, msg.data)
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            await self.sub.unsubscribe()


class RouterClient:
    def __init__(self, nc: Client, request_timeout_s: float, event_timeout_s: float) -> None:
        self.nc = nc
        self.request_timeout_s = request_timeout_s
        self.event_timeout_s = event_timeout_s

    async def status(self, timeout_s: float = 2.0) -> RouterStatus:
        return decode(RouterStatus, await request(self.nc, subjects.ROUTER_STATUS, b"{}", timeout_s))

    async def start(self, **fields) -> Generation:
        request_id = uuid.uuid4().hex
        stream = subjects.stream_subject(request_id)
        # Subscribe before asking, so not even the first event can be missed.
        sub = await self.nc.subscribe(stream)
        try:
            g = GenerateRequest(request_id=request_id, stream=stream, **fields)
            reply = await request(self.nc, subjects.ROUTER_GENERATE, encode(g), self.request_timeout_s)
            return Generation(decode(GenerateAccepted, reply), sub, self.event_timeout_s)
        except MoebusError:
            await sub.unsubscribe()
            raise
