"""expert-worker service: `moebus worker --nats URL [--model PATH|ORG/NAME] [--memory-budget SIZE]`.

A worker joins by announcing itself (id, host, capacity, speed); the router places experts on
it through the cluster bucket (`shared.cluster`): the worker loads what `next` gives it, says
so, and lets go of what `active` no longer gives it. SIGTERM drains: it asks to hold nothing,
waits until its experts live elsewhere, answers what it took, then exits.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.micro import add_service
from nats.micro.request import Request, ServiceError

from services.expert_compute import Experts, NotHeld
from services.expert_worker.experts import LocalExperts, expert_bytes, load_experts, load_fetched
from services.expert_worker.identity import Holder, claim, claim_of
from services.flash_cache.bundle import open_bundle
from services.flash_cache.store import FlashConfig, FlashExperts
from shared import cluster, modelstore, subjects
from shared.bus import Throttled, close, connect, inbox_only, stop_event, stop_service, wait
from shared.cluster import PlacementRecord
from shared.config import home
from shared.errors import ConfigError, ModelError, WireError
from shared.logs import get_logger
from shared.messages import WorkerAnnounce, encode
from shared.mlx_thread import LoopThread
from shared.model import ModelInfo
from shared.modelstore import ModelManifest
from shared.placement import Pairs, experts_in
from shared.security import Creds
from shared.shards import fetch_experts
from shared.wire import DTYPES, decode_request, reply_size

VERSION = "0.2.0"
log = get_logger("worker")


@dataclass(frozen=True)
class WorkerConfig:
    nats_url: str
    # None: fetch the experts it holds from the router's copy (shared.modelstore). A snapshot of
    # the Hugging Face cache without weights: fetch their shards from the Hub (shared.shards).
    model: Path | None
    memory_budget: int | None = None  # bytes for experts; None: what the machine can spare
    creds: Creds | None = None
    identity: str = ""  # the first part of the worker's id: its NATS user, or this host's name
    heartbeat_s: float = 1.0
    # Placement is read by polling: a worker may not create JetStream consumers (shared.security).
    poll_s: float = 0.25
    drain_timeout_s: float = 60.0  # a leaving worker waits this long for its experts to move
    release_after_s: float = 1.0  # keeps experts it lost this long, for calls already on their way
    flash: FlashConfig | None = None  # a flash-cache: the experts stay in a bundle on SSD (services.flash_cache)
    # How long the holder of this identity has to answer before it counts as asleep and is taken
    # over: as long as the router waits before it drops a silent worker (4 heartbeats).
    claim_timeout_s: float = 4.0


def worker_id(identity: str) -> str:
    """`<identity>-<suffix>`: the suffix tells a restarted worker from the one it replaced."""
    return f"{identity}-{uuid.uuid4().hex[:6]}"


def host_identity() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40] or "worker"


def spare_memory() -> int:
    """Bytes this machine can give experts: most of what is free now (Metal: of the GPU's
    recommended working set)."""
    if mx.metal.is_available():
        return int(0.8 * mx.device_info().get("max_recommended_working_set_size", 0))
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(0.8 * int(fields["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        import os
        return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def measure_speed() -> float:
    """GFLOP/s of one fp32 matmul the size of a small expert's: a speed figure for status."""
    a, b = mx.ones((256, 1024)), mx.ones((1024, 1024))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(4):
        mx.eval(a @ b)
    return round(4 * 2 * 256 * 1024 * 1024 / (time.perf_counter() - start) / 1e9, 1)


class Worker:
    def __init__(self, cfg: WorkerConfig, me: str, info: ModelInfo, capacity: int, mlx: LoopThread,
                 max_payload: int) -> None:
        self.cfg, self.me, self.info, self.capacity, self.mlx = cfg, me, info, capacity, mlx
        self.max_payload = max_payload
        self.source: tuple[JetStreamContext, ModelManifest] | None = None  # the model store, without --model
        self.flash: FlashExperts | None = None  # a flash-cache's experts: read when used
        # Unique to this process: the router tells a restarted worker from the one it replaced.
        self.subject = subjects.experts_subject(me)
        self.announce_subject = subjects.announce_subject(me)
        self.experts: Experts = LocalExperts([], [], info.num_experts, info.moe_layers)  # or a flash-cache's
        self.loaded = 0  # the version of the last coming placement whose share it holds
        self.active: PlacementRecord | None = None
        self.upcoming: PlacementRecord | None = None  # the newest `next` whose share is loaded
        self.draining = False
        self.tokens = 0
        self.speed = 0.0
        self.pending: set[asyncio.Task] = set()
        self._loading = asyncio.Lock()
        self._refused = Throttled(30.0)
        self.changed = asyncio.Event()  # announce now: something the router waits on happened

    async def handle(self, req: Request) -> None:
        """On the MLX thread's own loop (shared.mlx_thread.LoopThread): decode, check and
        compute right here, then answer; a bad message is refused before any compute."""
        try:
            expert_req = decode_request(req.data)
            size = reply_size(len(expert_req.experts), expert_req.x.shape[1], DTYPES[expert_req.dtype].itemsize)
            if size > self.max_payload:  # refused before any compute: the reply could not be sent
                raise ServiceError("413", f"the reply would be {size} bytes, over the server's maximum message "
                                          f"of {self.max_payload}: send fewer pairs per request")
            reply = self.experts.compute(expert_req)
        except NotHeld as e:  # placement moved on: the router asks the new owner
            raise ServiceError("409", str(e)) from None
        except WireError as e:
            raise ServiceError("400", str(e)) from None
        except ServiceError:
            raise
        except Exception as e:  # noqa: BLE001 - a bad request must never kill the worker
            log.exception("expert compute failed")
            raise ServiceError("500", f"expert compute failed: {e!r}") from None
        await req.respond(reply)
        self.tokens += len(expert_req.experts)

    def announcement(self, leaving: bool = False) -> bytes:
        return encode(WorkerAnnounce(
            worker=self.me, host=socket.gethostname()[:64], subject=self.subject, model=self.info.fingerprint,
            layers=self.info.moe_layers, experts=self.experts.held, capacity=self.capacity, speed=self.speed,
            loaded=self.loaded, draining=self.draining, leaving=leaving, tokens=self.tokens,
            memory=mlx_memory(), flash=self.experts.stats(), backend="flash" if self.flash is not None else "dram",
        ))

    async def on_next(self, rec: PlacementRecord) -> None:
        """Load this worker's share of a coming placement, keeping what it holds now."""
        # Any record it has not applied, not only a higher version: a bucket made anew starts at 1.
        if rec == self.upcoming or not rec.fits(self.info.num_experts, self.info.moe_layers):
            return
        async with self._loading:
            want = rec.pairs_of(self.me, self.info.moe_layers)
            have = self.experts.pairs
            if sum(map(len, want)) > self.capacity * self.info.moe_layers:  # not the router's doing: forged
                # throttled: a forged record stays in the bucket and is read again every few seconds
                self._refused.warning("placement ignored: over this worker's capacity", version=rec.version,
                                      pairs=sum(map(len, want)))
                return
            new = [sorted(set(w) - set(h)) for w, h in zip(want, have)]
            if any(new):
                log.info("loading experts", version=rec.version, experts=experts_in(new),
                         pairs=sum(map(len, new)))
                try:
                    await self.load([sorted(set(w) | set(h)) for w, h in zip(want, have)])
                except ModelError as e:  # a bad object in the model store: say so; the next read retries
                    self._refused.warning("experts not loaded", version=rec.version, error=str(e))
                    return
            self.loaded = rec.version
            self.upcoming = rec
        self.changed.set()

    async def load(self, held: Pairs) -> None:
        """Hold `held` (per MoE layer) from now on: read what it does not hold yet."""
        ids = experts_in(held)
        if self.flash is not None:  # nothing is read until a request needs it
            await self.mlx.run(self._swap, lambda: self.flash.hold(held))
        elif self.source is not None:  # no checkpoint here: fetch (and check) these experts first
            js, manifest = self.source
            dest = await modelstore.fetch(js, manifest, held, home() / "experts")  # only the pairs held
            await self.mlx.run(self._swap, lambda: load_fetched(dest, manifest, held))
        else:  # a repo id's snapshot downloads the shards of these experts here, not on the MLX thread
            await asyncio.to_thread(fetch_experts, self.cfg.model, ids)
            await self.mlx.run(self._swap, lambda: load_experts(self.cfg.model, held)[0])

    def _swap(self, make: Callable[[], Experts]) -> None:
        # On the MLX thread: no request computes with half of the swap.
        self.experts = make()

    async def on_active(self, rec: PlacementRecord) -> None:
        """Let go of experts the active placement (and any coming one) no longer gives us."""
        if rec == self.active or not rec.fits(self.info.num_experts, self.info.moe_layers):
            return
        self.active = rec
        await asyncio.sleep(self.cfg.release_after_s)  # calls routed by the old placement still arrive
        async with self._loading:
            if self.active is not rec or self.draining:
                return
            layers = self.info.moe_layers
            keep = [set(row) for row in rec.pairs_of(self.me, layers)]
            if self.upcoming is not None and self.upcoming != rec:  # a coming placement: read now, under the lock
                keep = [k | set(row) for k, row in zip(keep, self.upcoming.pairs_of(self.me, layers))]
            gone = [set(h) - k for h, k in zip(self.experts.pairs, keep)]
            if any(gone):
                log.info("releasing experts", version=rec.version, pairs=sum(map(len, gone)),
                         experts=sorted(set(self.experts.held) - set().union(*keep)))
                await self.mlx.run(self.experts.keep, [sorted(k) for k in keep])
                self.changed.set()

    async def sync(self, kv: cluster.DirectKV) -> None:
        """Read both placements and act on them (the watch's safety net, and the first look)."""
        nxt, _ = await cluster.read(kv, cluster.NEXT)
        active, _ = await cluster.read(kv, cluster.ACTIVE)
        if nxt is not None:
            await self.on_next(nxt)
        if active is not None and active != self.active:
            task = asyncio.create_task(self.on_active(active))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    def released(self) -> bool:
        """Draining and no longer in the active placement: safe to leave."""
        return (self.active is not None and not self.active.held_by(self.me)
                and (self.upcoming is None or self.upcoming == self.active))


def mlx_memory() -> dict[str, int]:
    """MLX's allocator counters (plain reads, no MLX work): flat in steady state because the
    allocator reuses its buffers for requests of sizes it has seen."""
    return {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(), "cache": mx.get_cache_memory()}


async def _shared_model(js: JetStreamContext, stop: asyncio.Event) -> ModelManifest | None:
    """The model the router shares, once it has shared it all (None: stopped before)."""
    refused = Throttled(30.0)
    while not stop.is_set():
        try:
            manifest = await modelstore.current(js)
        except ModelError as e:  # the store holds something it cannot use: say what, keep waiting
            refused.warning("shared model refused", error=str(e))
            manifest = None
        except Exception as e:  # noqa: BLE001 - the bus may be restarting
            log.debug("model store not read", error=repr(e))
            manifest = None
        if manifest is not None:
            return manifest
        await wait(stop, 1.0)
    return None


async def _heartbeat(nc: Client, worker: Worker, period_s: float, leaving: asyncio.Event) -> None:
    """Its own task, so a long load never silences the worker (the router drops one silent
    for 4 s); at once when something the router waits on happened."""
    while not leaving.is_set():
        worker.changed.clear()
        try:
            await nc.publish(worker.announce_subject, worker.announcement())
        except Exception as e:  # noqa: BLE001 - the bus may be restarting: the next beat retries
            log.debug("heartbeat not sent", error=repr(e))
        await wait(worker.changed, period_s)


async def _may_leave(worker: Worker, kv: cluster.DirectKV, connected: bool, left_at: float) -> bool:
    """A draining worker leaves once its experts live elsewhere; or at once when it holds
    nothing, the bus is gone, or no router is there to move them; or at its drain timeout."""
    if worker.released() or not worker.experts.held or not connected or time.monotonic() > left_at:
        return True
    try:
        return not await asyncio.wait_for(cluster.leader_alive(kv), 1.0)
    except Exception:  # noqa: BLE001 - cannot tell: the drain timeout still bounds the wait
        return False


async def serve(cfg: WorkerConfig) -> None:
    stop = stop_event()
    mlx = LoopThread()
    me = worker_id(cfg.identity or host_identity())
    leaving = asyncio.Event()  # no announcement after this: leaving, or another process took the identity
    replaced = asyncio.Event()  # another process took the identity: stop at once, say nothing more
    holder: Holder | None = None
    checks: set[asyncio.Task] = set()

    def on_reconnect() -> None:  # the server may have dropped us (asleep) and let another take the identity
        if holder is not None:
            task = asyncio.create_task(holder.check(cfg.claim_timeout_s))
            checks.add(task)
            task.add_done_callback(checks.discard)

    def on_replaced(_: object) -> None:
        replaced.set()
        leaving.set()
        stop.set()

    try:
        async with AsyncExitStack() as stack:
            nc = await connect(cfg.nats_url, name="moebus-worker", creds=cfg.creds, on_reconnect=on_reconnect)
            stack.push_async_callback(close, nc)
            if cfg.creds is not None:  # a NATS user: one process per identity (an open bus names hosts)
                mine = claim_of(me)
                await claim(nc, cfg.identity, mine, cfg.claim_timeout_s)  # before any loading: refused fast
                holder = Holder(nc, cfg.identity, mine, on_replaced)
                await holder.start()
            # Expert requests arrive on a connection of the MLX thread's own loop (no hand-off);
            # this loop keeps heartbeats and placement, so a long load never silences them.
            hot = await mlx.call(connect(cfg.nats_url, name="moebus-worker-experts", creds=cfg.creds))
            stack.push_async_callback(lambda: mlx.call(close(hot)))
            js = nc.jetstream()
            kv = cluster.DirectKV(js)  # until the router made the bucket, reads fail and are retried
            if cfg.flash is not None:
                bundle = open_bundle(cfg.flash.bundle)
                per_expert, info = bundle.expert_bytes, bundle.info()
            elif cfg.model is None:
                log.info("no --model: waiting for the router to share its model over NATS (router --share-model)")
                manifest = await _shared_model(js, stop)
                if manifest is None:
                    return
                per_expert, info = manifest.expert_bytes, manifest.info()
            else:
                per_expert, info = await mlx.run(expert_bytes, cfg.model)
            budget = cfg.memory_budget if cfg.memory_budget is not None else spare_memory()
            # A flash-cache's budget is its DRAM slots; the experts it can serve are all on SSD.
            capacity = info.num_experts if cfg.flash else min(info.num_experts, budget // max(1, per_expert))
            if capacity < 1:
                raise ConfigError(f"--memory-budget {budget} bytes holds no expert of {info.name} "
                                  f"({per_expert} bytes each)")
            worker = Worker(cfg, me, info, capacity, mlx, nc.max_payload)
            worker.source = (js, manifest) if cfg.model is None and cfg.flash is None else None
            if cfg.flash is not None:
                worker.flash = worker.experts = await mlx.run(FlashExperts, bundle, cfg.flash)
                stack.push_async_callback(lambda: mlx.run(worker.flash.close))
            worker.speed = await mlx.run(measure_speed)

            async def start_service():  # on the MLX thread's loop
                svc = await add_service(
                    hot, name=subjects.SERVICE_FLASH if cfg.flash else subjects.SERVICE_WORKER, version=VERSION,
                    description="moebus flash-cache: experts read from SSD into a fixed DRAM budget" if cfg.flash
                    else "moebus expert worker: the experts the placement gives it, in every MoE layer",
                    metadata={"worker": me, "model": info.name, "capacity": str(capacity)},
                    # `nats micro stats`: a flash-cache's reads, hits and memory next to the endpoint's
                    stats_handler=(lambda _: worker.experts.stats()) if cfg.flash else None,
                )
                await svc.add_endpoint(name="experts", subject=worker.subject, handler=inbox_only(worker.handle))
                return svc

            svc = await mlx.call(start_service())

            async def on_discover(_: Msg) -> None:
                if not leaving.is_set():
                    await nc.publish(worker.announce_subject, worker.announcement())

            await nc.subscribe(subjects.WORKERS_DISCOVER, cb=on_discover)
            tasks = [asyncio.create_task(_heartbeat(nc, worker, cfg.heartbeat_s, leaving))]
            log.info("worker joined", worker=me, capacity=capacity, expert_bytes=per_expert, speed_gflops=worker.speed)
            left_at = float("inf")
            while not (worker.draining and await _may_leave(worker, kv, nc.is_connected, left_at)):
                try:  # a draining worker loads nothing: its reads need not wait out a dead bus
                    await asyncio.wait_for(worker.sync(kv), cfg.heartbeat_s) if worker.draining else await worker.sync(kv)
                except Exception as e:  # noqa: BLE001 - the bus may be restarting
                    log.debug("placement not read", error=repr(e))
                if not worker.draining:
                    await wait(stop, cfg.poll_s)
                else:
                    await asyncio.sleep(cfg.poll_s)
                if replaced.is_set():  # its experts are the newcomer's now: no drain
                    break
                if stop.is_set() and not worker.draining:
                    worker.draining = True  # ask to hold nothing; leave once the experts moved
                    worker.changed.set()
                    left_at = time.monotonic() + cfg.drain_timeout_s
                    log.info("draining", worker=me, experts=worker.experts.held)
            leaving.set()
            for task in tasks:
                task.cancel()
            try:  # every step bounded (Ctrl-C may have stopped nats-server first); close() flushes
                if not replaced.is_set():  # the router took the newcomer for this identity: not a word more
                    await nc.publish(worker.announce_subject, worker.announcement(leaving=True))
                await mlx.call(stop_service(svc))  # no new requests; answer those already taken
                if worker.pending and nc.is_connected:
                    await asyncio.wait(list(worker.pending), timeout=10)
            except Exception as e:  # noqa: BLE001 - the server may have gone first
                log.warning("stopping without the bus", error=repr(e))
    finally:
        mlx.stop()
