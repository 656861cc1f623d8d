"""The router's side of placement: it decides (with `shared.placement.place`), publishes the
coming placement in the cluster bucket, waits for the workers to load it, then switches.

Only the router holding the bucket's leader lease writes. A placement becomes `active` only
once every worker it gives experts to has loaded them, and the router's hot path adopts it
between decode steps (`ExpertClient.adopt`), so no step mixes two placements.

Load alone moves experts only in a tiered cluster (DRAM workers beside a flash-cache): every
LOAD_CHECK_S the recent load is weighed (`shared.placement.place_tiered`), and the hottest
experts move into DRAM when that pays by the placement's margin.
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
from shared.placement import place, place_tiered_pairs, union

log = get_logger("placer")
LOAD_CHECK_S = 5.0  # a tiered cluster weighs its load this often
LOAD_DECAY = 0.5 ** (LOAD_CHECK_S / 30.0)  # the recent load: tokens of the last half minute count half


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
        self.settle_s = 1.5  # about a heartbeat and a half
        self.load_timeout_s = 120.0  # a worker loading its share longer is placed around
        self._basis: dict[str, int] | None = None  # the capacities the last plan was made for
        self._renew_at = 0.0
        self._written = 0  # the highest version ever written: a new one goes above it
        self._next_since = 0.0
        self._slow: set[str] = set()  # workers that did not load their share in time
        self._settled_at = 0.0  # no plan before the workers have had a heartbeat to announce
        self._load_check_at = 0.0
        self._seen_load: np.ndarray | None = None  # the router's running totals at the last check
        self._recent: np.ndarray | None = None  # decayed tokens per expert since

    async def start(self) -> None:
        """Carry on from the placement in the bucket (a restarted router finds its workers still
        holding it), so nothing moves unless the membership changed."""
        await self._reload()
        self._settled_at = time.monotonic() + self.settle_s
        self.refresh()

    async def _reload(self) -> None:
        self.active, _ = await cluster.read(self.kv, cluster.ACTIVE)
        pending, _ = await cluster.read(self.kv, cluster.NEXT)
        self._written = max([self._written, *(r.version for r in (self.active, pending) if r is not None)])
        if self.active is not None and not self.active.fits(self.registry.num_experts, self.registry.moe_layers):
            self.active = None  # another model's
        self.next, self._basis = None, None

    def refresh(self) -> None:
        """Route by the active placement over the workers alive now."""
        if self.active is not None:
            self.set_table(table(self.active.owners, self.registry.live(), self.active.layers))

    async def advance(self) -> None:
        """One step toward a placement that fits the live workers; cheap when nothing changed."""
        try:
            await self._advance()
        except Exception as e:  # noqa: BLE001 - the bus may be restarting; the next tick retries
            log.warning("placement not updated", error=repr(e))

    async def _advance(self) -> None:
        now = time.monotonic()
        if now >= self._renew_at:  # the lease lasts 5 s: renew each second, not each tick
            was = self.leader
            self.leader = await cluster.lead(self.kv, self.router_id)
            self._renew_at = now + 1.0
            if self.leader and not was:
                await self._reload()  # another router may have written since we last led
        if not self.leader or now < self._settled_at:
            return
        live = self.registry.live()
        if not live:
            # Nobody to place on: calls fail now, not at their deadline, and the placement is
            # kept for the workers to come back to (a Mac that wakes holds its experts still).
            if self._basis != {}:
                self._basis = {}
                self.unplaceable(frozenset(range(self.registry.num_experts)))
            return
        if self._slow and not self._slow <= set(live):
            self._slow.clear()  # membership changed: give everyone a new chance
        if self.next is not None and any(w not in live for row in self.next.owners for w in row):
            self.next = None  # an owner of the coming placement died: plan again from the active one
        elif self.next is not None and now - self._next_since > self.load_timeout_s:
            self._slow = {w for row in self.next.owners for w in row if self.registry.loaded(w) != self.next.version}
            log.warning("workers did not load their experts in time; placing without them",
                        version=self.next.version, workers=sorted(self._slow), timeout_s=self.load_timeout_s)
            self.next = None
        if self.next is None:
            basis = {w: 0 if w in self._slow else c for w, c in self.registry.capacities().items()}
            weigh = bool(self.registry.flash()) and now >= self._load_check_at
            if basis == self._basis and self.active is not None and not self.unowned() and not weigh:
                return  # same workers, same capacities: load alone moves experts only between tiers
            if weigh:
                self._load_check_at = now + LOAD_CHECK_S
            owners, layers = self._plan(basis)
            self._basis = basis
            # An expert nobody can hold in some layer: calls needing it fail now, not at their deadline.
            self.unplaceable(frozenset(e for layer in (layers or [owners]) for e, row in enumerate(layer) if not row))
            if self.active is not None and (owners, layers) == (self.active.owners, self.active.layers):
                return
            if self.active is None and not any(owners):
                return  # no workers yet
            # Above any version this router wrote or found: workers report the one they loaded.
            version = max(self._written, self.active.version if self.active else 0) + 1
            coming = PlacementRecord(version=version, owners=owners, replicas=self.replicas, layers=layers,
                                     subjects={w: live[w] for w in {w for row in owners for w in row}})
            await cluster.write(self.kv, cluster.NEXT, coming)
            self.next, self._written, self._next_since = coming, version, now
            log.info("placing experts", version=version, unowned=coming.unowned(), workers=sorted(coming.subjects))
        owners_of_next = {w for row in self.next.owners for w in row}
        if all(self.registry.loaded(w) == self.next.version for w in owners_of_next):
            await cluster.write(self.kv, cluster.ACTIVE, self.next)
            self.active, self.next = self.next, None
            self.refresh()
            log.info("placement active", version=self.active.version, unowned=self.active.unowned())

    def _plan(self, capacities: dict[str, int]) -> tuple[list[list[str]], list[list[list[str]]] | None]:
        """Owners of each expert, and in a tiered cluster each layer's own (else None)."""
        load = self._recent_load()  # (layers, experts)
        flash = self.registry.flash()
        if flash:
            a, layers = self.active, self.registry.moe_layers
            current = None if a is None else a.layers or [a.owners] * layers
            per_layer = place_tiered_pairs(capacities, flash, self.registry.num_experts, layers, current,
                                           None if load is None else load.ravel().tolist())
            return union(per_layer), per_layer
        return place(capacities, self.registry.num_experts, self.active.owners if self.active else None,
                     None if load is None else load.sum(axis=0).tolist(), self.replicas), None

    def _recent_load(self) -> np.ndarray | None:
        """Tokens per (layer, expert), the older ones decayed: what the experts carry now."""
        total = self.load()
        if total is None:
            return None
        total = np.asarray(total, np.float64)
        if self._seen_load is None or self._seen_load.shape != total.shape:
            self._recent = total.copy()
        else:
            self._recent = self._recent * LOAD_DECAY + np.maximum(total - self._seen_load, 0)
        self._seen_load = total
        return self._recent

    def unowned(self) -> list[int]:
        """Experts with no live owner in the active placement (in some layer)."""
        if self.active is None:
            return list(range(self.registry.num_experts))
        live = self.registry.live()
        layers = self.active.layers or [self.active.owners]
        return [e for e in range(len(self.active.owners))
                if any(not any(w in live for w in layer[e]) for layer in layers)]

    async def resign(self) -> None:
        """A stopping router gives up the lease, so draining workers need not wait for it."""
        if self.leader:
            try:  # bounded: with the bus gone (Ctrl-C reaches nats-server too) there is nobody to tell
                await asyncio.wait_for(cluster.resign(self.kv, self.router_id), 1.0)
            except Exception as e:  # noqa: BLE001 - the lease then lapses by itself in 5 s
                log.debug("lease not given up", error=repr(e))
