"""One process per worker identity: a worker asks before it joins whether its identity is held.

On a secured bus a worker's identity is its NATS user, and the router keeps one live worker per
identity, the newest. Two processes with the same credentials would replace each other at every
heartbeat (placement flapping version after version), so the live holder answers on the
identity's subject (`subjects.identity_subject`), and a newcomer it answers refuses to start.

A holder that does not answer within the claim timeout is asleep or frozen (a Mac with its lid
closed): the newcomer takes the identity over and says so on the subject. The old holder, once
awake, reads that (or, if the server dropped it meanwhile, asks again when it reconnects) and
stops without another announcement, so an identity is never locked by a process that is gone.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import Field

from shared import subjects
from shared.bus import request
from shared.errors import BusTimeout, ConfigError, IdentityInUse, NoResponders, WireError
from shared.logs import get_logger
from shared.messages import Message, Name, decode, encode

log = get_logger("identity")


class IdentityClaim(Message):
    """Who claims (as a request) or holds (as the answer) a worker identity."""

    worker: Name  # the worker id, `<identity>-<suffix>`
    host: str = Field(max_length=64)
    pid: int = Field(ge=0, le=1 << 31)
    since: float = Field(ge=0.0)  # Unix time the holder started
    takeover: bool = False  # published, not asked: the holder did not answer, this one took over

    def who(self) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"{self.worker} (pid {self.pid} on {self.host}, since {since})"


def claim_of(worker: str) -> IdentityClaim:
    return IdentityClaim(worker=worker, host=socket.gethostname()[:64], pid=os.getpid(), since=time.time())


async def claim(nc: Client, identity: str, me: IdentityClaim, timeout_s: float) -> None:
    """Take `identity` before joining: ConfigError if a live process holds it. A holder that
    does not answer in `timeout_s` (asleep) is told it was taken over."""
    subject = subjects.identity_subject(identity)
    try:
        holder = decode(IdentityClaim, await request(nc, subject, encode(me), timeout_s))
    except NoResponders:
        return
    except BusTimeout:
        log.warning("identity held by a worker that does not answer (asleep or frozen?): taking it over",
                    identity=identity, waited_s=timeout_s)
        await nc.publish(subject, encode(me.model_copy(update={"takeover": True})))
        return
    except WireError as e:
        raise ConfigError(f"identity {identity}: its holder answered something else ({e})") from None
    raise IdentityInUse(f"identity {identity} is in use by {holder.who()}: stop that worker first, or give this "
                      "one credentials of its own (`moebus init-cluster --workers N` makes more)")


class Holder:
    """Answers claims on the identity's subject while this worker runs; `on_replaced` when
    another process took the identity over."""

    def __init__(self, nc: Client, identity: str, me: IdentityClaim,
                 on_replaced: Callable[[IdentityClaim], None]) -> None:
        self.nc, self.identity, self.me, self.on_replaced = nc, identity, me, on_replaced
        self.replaced_by: IdentityClaim | None = None

    async def start(self) -> None:
        await self.nc.subscribe(subjects.identity_subject(self.identity), cb=self._on_claim)

    async def _on_claim(self, msg: Msg) -> None:
        try:
            other = decode(IdentityClaim, msg.data)
        except WireError:
            return
        if other.worker == self.me.worker:  # our own question, asked again after a reconnect
            return
        if other.takeover:
            self._replaced(other)
        elif msg.reply:
            await msg.respond(encode(self.me))

    async def check(self, timeout_s: float) -> None:
        """After a reconnect: did another process take the identity while this one was away?"""
        try:
            other = decode(IdentityClaim, await request(self.nc, subjects.identity_subject(self.identity),
                                                        encode(self.me), timeout_s))
        except Exception:  # noqa: BLE001 - no answer but our own: still ours
            return
        self._replaced(other)

    def _replaced(self, other: IdentityClaim) -> None:
        if self.replaced_by is None:
            self.replaced_by = other
            log.error("identity taken over by another worker: stopping without another announcement",
                      identity=self.identity, by=other.who())
            self.on_replaced(other)
