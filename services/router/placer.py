"""The router's side of placement: it decides (with `shared.placement.place`), publishes the
coming placement in the cluster bucket, waits for the workers to load it, then switches.

Only the router holding the bucket's leader lease writes. A placement becomes `active` only
once every worker it gives experts to has loaded them, and the router's hot path adopts it
between decode steps (`ExpertClient.adopt`), so no step mixes two placements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
from nats.js.kv import KeyValue

from services.router.registry import Table, WorkerRegistry, table
from shared import cluster
from shared.cluster import PlacementRecord
from shared.logs import get_logger
from shared.placement import place

log = get_logger("placer")


class Placer:
    def __init__(self, kv: KeyValue, registry: WorkerRegistry, router_id: str, replicas: int,
                 set_table: Callable[[Table], None], load: Callable[[], np.ndarray | None],
                 unplaceable: Callable[[frozenset[int]], None] = lambda experts: None) -> None:
        self.unplaceable = unplaceable  # told which experts the live workers cannot hold
        self.kv = kv
        self.registry = registry
        self.router_id = router_id
        self.replicas = replicas
        self.set_table = set_table
        self.load = load
        self.active: PlacementRecord | None = None
        self.next: PlacementRecord | None = None
        self.leader = False
        self._basis: dict[str, int] | None = None  # the capacities the last plan was made for
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Carry on from the placement in the bucket (a restarted router finds its workers still
        holding it), so nothing moves unless the membership changed."""
        self.active, _ = await cluster.read(self.kv, cluster.ACTIVE)
        if self.active is not None and len(self.active.owners) != self.registry.num_experts:
            self.active = None  # another model's
        self.refresh()

    def refresh(self) -> None:
        """Route by the active placement over the workers alive now."""
        if self.active is not None:
            self.set_table(table(self.active.owners, self.registry.live()))

    async def advance(self) -> None:
        """One step toward a placement that fits the live workers; cheap when nothing changed."""
        async with self._lock:
            try:
                await self._advance()
            except Exception as e:  # noqa: BLE001 - the bus may be restarting; the next tick retries
                log.warning("placement not updated", error=repr(e))

    async def _advance(self) -> None:
        if time.monotonic() >= self._renew_at:  # the lease lasts 5 s: renew each second, not each tick
            self.leader = await cluster.lead(self.kv, self.router_id)
            self._renew_at = time.monotonic() + 1.0
        if not self.leader:
            return
        live = self.registry.live()
        if self.next is not None and any(w not in live for row in self.next.owners for w in row):
            self.next = None  # an owner of the coming placement died: plan again from the active one
        if self.next is None:
            basis = self.registry.capacities()
            if basis == self._basis and self.active is not None and not self.unowned():
                return  # same workers, same capacities: load alone never moves experts (no churn)
            owners = self._plan()
            self._basis = basis
            self.unplaceable(frozenset(e for e, row in enumerate(owners) if not row))
            if self.active is not None and owners == self.active.owners:
                return
            if self.active is None and not any(owners):
                return  # no workers yet
            # Above any version a worker has seen, even if the bucket was lost and made anew.
            version = max([self.active.version if self.active else 0, *map(self.registry.loaded, live)]) + 1
            self.next = PlacementRecord(
                version=version, owners=owners, replicas=self.replicas,
                subjects={w: live[w] for w in {w for row in owners for w in row}})
            await cluster.write(self.kv, cluster.NEXT, self.next)
            log.info("placing experts", version=self.next.version, unowned=self.next.unowned(),
                     workers=sorted(self.next.subjects))
        owners_of_next = {w for row in self.next.owners for w in row}
        if all(self.registry.loaded(w) >= self.next.version for w in owners_of_next):
            await cluster.write(self.kv, cluster.ACTIVE, self.next)
            self.active, self.next = self.next, None
            self.refresh()
            log.info("placement active", version=self.active.version, unowned=self.active.unowned())

    def _plan(self) -> list[list[str]]:
        load = self.load()
        return place(self.registry.capacities(), self.registry.num_experts,
                     self.active.owners if self.active else None,
                     None if load is None else load.tolist(), self.replicas)

    def unowned(self) -> list[int]:
        """Experts with no live owner in the active placement."""
        if self.active is None:
            return list(range(self.registry.num_experts))
        live = self.registry.live()
        return [e for e, row in enumerate(self.active.owners) if not any(w in live for w in row)]

    async def resign(self) -> None:
        """A stopping router gives up the lease, so draining workers need not wait for it."""
        if self.leader:
            await cluster.resign(self.kv, self.router_id)
