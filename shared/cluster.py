"""Cluster state in NATS: the placement of experts, in a JetStream key-value bucket.

Two keys, both `PlacementRecord`s written only by the router that holds the `leader` key:
- `next`: a placement being prepared; each worker loads what it gives it, then says so in its
  heartbeat (`WorkerAnnounce.loaded`).
- `active`: the placement the router routes by; it switches between decode steps, once every
  worker of `next` has loaded its share. Workers then let go of what they no longer own.
"""

from __future__ import annotations

import time

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import Field

from shared import subjects
from shared.errors import WireError
from shared.messages import Big, Message, Name, Subject, decode, encode

BUCKET = subjects.CLUSTER_BUCKET
ACTIVE, NEXT, LEADER = "active", "next", "leader"
LEADER_LEASE_S = 5.0  # a leader that stops renewing is replaced after this long


class PlacementRecord(Message):
    """Expert -> owners, and where each owner answers. The same in every MoE layer, unless
    `layers` gives each layer's own (a tiered cluster places (layer, expert) pairs: the hottest
    experts differ from layer to layer); `owners` is then every owner of the expert in any layer."""

    version: Big
    owners: list[list[Name]] = Field(max_length=1 << 16)
    subjects: dict[Name, Subject]
    replicas: int = Field(default=1, ge=1, le=16)
    layers: list[list[list[Name]]] | None = Field(default=None, max_length=1 << 12)

    def held_by(self, worker: str) -> list[int]:
        """The experts `worker` holds in some layer."""
        return [e for e, owners in enumerate(self.owners) if worker in owners]

    def pairs_of(self, worker: str, moe_layers: int) -> list[list[int]]:
        """Per MoE layer, the experts `worker` holds there."""
        if self.layers is None:
            return [self.held_by(worker)] * moe_layers
        return [[e for e, owners in enumerate(row) if worker in owners] for row in self.layers]

    def fits(self, num_experts: int, moe_layers: int) -> bool:
        """Whether this record is for a model of this shape (another model's, or a forged one, is not)."""
        return len(self.owners) == num_experts and (self.layers is None or (
            len(self.layers) == moe_layers and all(len(row) == num_experts for row in self.layers)))

    def unowned(self) -> list[int]:
        return [e for e, owners in enumerate(self.owners) if not owners]


class Lease(Message):
    router: Name
    until: float  # wall-clock seconds


async def bucket(js: JetStreamContext) -> KeyValue:
    """The cluster bucket, made on first use (file storage: it outlives a nats-server restart)."""
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:  # direct: workers read by direct gets alone (see DirectKV)
        return await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1, direct=True,
                                                        description="moebus cluster state: expert placement"))


class DirectKV:
    """The bucket read by direct gets only: what a worker's permissions allow. A stream info
    or message get answers on whatever reply subject the asker names, and the server stores
    such an answer when that subject is a stream's: a worker could overwrite placement with
    one. A direct get's answer is not stored. Answers `get` as nats-py's KeyValue does."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def get(self, key: str) -> KeyValue.Entry:
        try:
            msg = await self._js.get_last_msg(subjects.CLUSTER_STREAM, f"{subjects.CLUSTER_KEYS}.{key}", direct=True)
        except NotFoundError:
            raise KeyNotFoundError from None
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            raise KeyNotFoundError
        return KeyValue.Entry(bucket=BUCKET, key=key, value=msg.data, revision=msg.seq, delta=None, created=None,
                              operation=None)


async def read(kv: KeyValue | DirectKV, key: str) -> tuple[PlacementRecord | None, int]:
    """The record under `key` and its revision; (None, 0) when there is none or it is unreadable."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None, 0
    if not entry.value:
        return None, entry.revision or 0
    try:
        return decode(PlacementRecord, entry.value), entry.revision or 0
    except WireError:
        return None, entry.revision or 0


async def write(kv: KeyValue, key: str, record: PlacementRecord) -> int:
    return await kv.put(key, encode(record))


async def _lease(kv: KeyValue | DirectKV) -> tuple[Lease | None, int | None]:
    """The current lease (None if absent, expired-looking garbage included) and its revision."""
    try:
        entry = await kv.get(LEADER)
    except KeyNotFoundError:
        return None, None
    try:
        return (decode(Lease, entry.value) if entry.value else None), entry.revision
    except WireError:
        return None, entry.revision


async def lead(kv: KeyValue, router: str, now: float | None = None) -> bool:
    """Take or renew the writer's lease; False while another live router holds it."""
    now = time.time() if now is None else now
    held, revision = await _lease(kv)
    if held is not None and held.router != router and held.until > now:
        return False
    lease = encode(Lease(router=router, until=now + LEADER_LEASE_S))
    try:
        if revision is None:
            await kv.create(LEADER, lease)
        else:
            await kv.update(LEADER, lease, revision)
        return True
    except KeyWrongLastSequenceError:  # another router got there first
        return False


async def leader_alive(kv: KeyValue | DirectKV) -> bool:
    held, _ = await _lease(kv)
    return held is not None and held.until > time.time()


async def resign(kv: KeyValue, router: str) -> None:
    held, revision = await _lease(kv)
    if held is not None and held.router == router and revision is not None:
        await kv.update(LEADER, b"", revision)
