"""router service: `moebus router --nats URL --model PATH [--replicas K]`."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import orjson
from nats.aio.msg import Msg
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request, ServiceError

from services import defaults
from services.router.engine import EngineLimits
from services.router.exchange import ExpertClient
from services.router.loaded import Loaded, load_router_model
from services.router.metrics import registry
from services.router.placer import Placer
from shared import cluster, modelstore, subjects
from shared.bus import close, connect, inbox_only, request, stop_event, stop_service, ticks
from shared.errors import BadRequest, BusError, MoebusError, NoResponders, WireError
from shared.hub import model_name
from shared.logs import get_logger
from shared.messages import (
    Cancel, ClusterStatus, Discover, GenerateAccepted, GenerateEvent, GenerateRequest, RouterStatus, TokenCount,
    WorkerAnnounce, WorkerStatus, decode, encode,
)
from shared.mlx_thread import MLXThread
from shared.security import Creds
from shared.wire import encode_request

VERSION = "0.2.0"
log = get_logger("router")


@dataclass(frozen=True)
class RouterConfig:
    nats_url: str
    model: Path
    creds: Creds | None = None
    share_model: bool = False  # publish the experts to the model store: workers then need no checkpoint
    expert_timeout_s: float = defaults.EXPERT_TIMEOUT_S
    heartbeat_s: float = 1.0  # workers' heartbeat: one silent for 4 of them is dropped
    tick_s: float = 0.25  # how often placement advances and stuck calls are checked
    probe_after_s: float = 0.5  # a call waiting this long asks whether its worker is still there
    replicas: int = defaults.REPLICAS
    max_prompt_tokens: int = defaults.MAX_PROMPT_TOKENS
    kv_budget: int | None = None  # bytes of running sequences' KV caches; None: derived from memory (router.kv)
    prompt_cache_bytes: int = 0  # finished prompts' KV caches kept for reuse; 0: none
    speculate: str = "lookup"  # the drafter when neither of the next two is given; "off": none
    draft_model: Path | None = None  # a small model of the same tokenizer drafts
    draft_replay: Path | None = None  # measurement: recorded continuations of a known acceptance
    limits: EngineLimits = field(default_factory=EngineLimits)


def _error(e: BadRequest) -> str:
    return orjson.dumps({"code": e.code, "message": str(e), "param": e.param}).decode()


class Router:
    def __init__(self, cfg: RouterConfig, client: ExpertClient, mlx: MLXThread) -> None:
        self.cfg = cfg
        self.client = client
        self.mlx = mlx
        self.m: Loaded | None = None
        self.placer: Placer | None = None
        self.active = 0  # accepted and not finished: what admission counts (event loop only)
        self.id = uuid.uuid4().hex[:12]  # this process: a gateway's stream outlives it only if it is still here
        client.on_failure = self.on_call_failure
        self._advancing: asyncio.Task | None = None
        self._bus_stalled = False

    def status(self) -> RouterStatus:
        if self.m is None or self.placer is None:
            return RouterStatus(ready=False, model=model_name(self.cfg.model), max_context=0, workers=[], experts_covered=0,
                                experts_total=0, router=self.id, unready_reason="the router is loading the model")
        reg, info, eng = self.m.registry, self.m.info, self.m.engine
        unowned = self.placer.unowned()
        left = "; ".join(f"{w}: {why}" for w, (why, _) in sorted(reg.left.items()))
        cannot = sorted(self.client.unplaceable.intersection(unowned))
        if not reg.workers:
            reason = f"no expert worker is live ({left})" if left else "no expert worker has joined"
        elif self.placer.active is None:
            reason = "placing experts on the workers"
        elif cannot:
            reason = f"experts {cannot} have no live worker: the workers cannot hold every expert"
        elif unowned:
            reason = f"experts {unowned} have no live worker" + (f" ({left})" if left else "") + \
                ": placing them on the workers left"
        else:
            reason = ""
        return RouterStatus(ready=not unowned, model=info.name, max_context=info.max_context, workers=reg.workers,
                            experts_covered=info.num_experts - len(unowned), experts_total=info.num_experts,
                            running=eng.running, waiting=eng.waiting, router=self.id, unready_reason=reason,
                            unowned_experts=unowned, **self.memory())

    def memory(self) -> dict[str, int]:
        """KV bytes reserved by running sequences, their budget, the prompt cache's bytes, and all
        the MLX memory the router holds (what the first three bound, beside the weights)."""
        if self.m is None:
            return {}
        eng = self.m.engine
        return {"kv_bytes_in_use": eng.kv.in_use, "kv_budget_bytes": eng.kv.budget,
                "prompt_cache_bytes": int(getattr(eng, "prompt_cache_bytes", 0)),
                "mlx_active_bytes": mx.get_active_memory()}

    def cluster(self) -> ClusterStatus:
        assert self.m is not None and self.placer is not None
        reg, placer, now = self.m.registry, self.placer, time.monotonic()
        ages = reg.heartbeats(now)
        workers = [WorkerStatus(worker=w, host=a.host, capacity=a.capacity, experts=a.experts, tokens=a.tokens,
                                last_heartbeat_s=round(ages[w], 2), loaded=a.loaded, draining=a.draining,
                                speed=a.speed, backend=a.backend)
                   for w in reg.workers if (a := reg.get(w)) is not None]
        stats = self.client.stats
        return ClusterStatus(
            model=self.m.info.name, ready=not placer.unowned(), replicas=self.cfg.replicas, workers=workers,
            placement_version=placer.active.version if placer.active else 0,
            pending_version=placer.next.version if placer.next else None, unowned_experts=placer.unowned(),
            expert_load=stats.expert_tokens.tolist() if stats is not None else [],
            pair_load=stats.pair_tokens.tolist() if stats is not None else [],
            owners=placer.active.owners if placer.active else [],
            layers=placer.active.layers if placer.active else None, **self.memory())

    def gauges(self) -> dict[str, float]:
        s = self.status()
        return {"sequences_running": s.running, "sequences_waiting": s.waiting,
                "sequences_running_max": float(self.m.engine.running_max if self.m else 0),
                "kv_bytes_in_use": float(s.kv_bytes_in_use), "kv_budget_bytes": float(s.kv_budget_bytes),
                "kv_bytes_in_use_max": float(self.m.engine.kv.in_use_max if self.m else 0),
                "mlx_active_bytes": float(s.mlx_active_bytes),
                "mlx_active_bytes_max": float(self.m.engine.memory_max if self.m else 0),
                **(self.m.engine.prompt_cache.stats() if self.m and self.m.engine.prompt_cache else {}),
                "grammar_mask_seconds": self.m.engine.mask_seconds if self.m else 0.0,
                "grammar_masks": float(self.m.engine.masks if self.m else 0),
                "workers_connected": len(s.workers),
                "experts_covered": s.experts_covered, "ready": float(s.ready),
                "placement_version": float(self.placer.active.version if self.placer and self.placer.active else 0)}

    def on_announce(self, subject: str, data: bytes) -> None:
        if self.m is None or self.placer is None:
            return
        try:
            a = decode(WorkerAnnounce, data)
        except WireError as e:
            log.warning("bad announcement", error=str(e))
            return
        if subject != subjects.announce_subject(a.worker):  # the server lets a worker user publish only its own
            log.warning("announcement for another worker ignored", worker=a.worker, subject=subject)
            return
        known = a.worker in self.m.registry.live()
        gone = self.m.registry.announce(a, time.monotonic())
        if gone is None:
            log.warning("worker of another model ignored", worker=a.worker, model=a.model)
            return
        if not known and a.worker in self.m.registry.live():  # not a goodbye, nor one superseded
            log.info("worker joined", worker=a.worker, host=a.host, capacity=a.capacity)
            self.placer.refresh()  # a restarted router routes to the workers it finds holding the placement
            self.client.rejoined(a.subject)
        self._lost(gone)
        self.advance()

    def expire(self) -> None:
        if self.m is not None:
            gone = self.m.registry.expire(time.monotonic())
            for w, _ in gone:
                log.warning("worker dropped", worker=w, error=self.m.registry.left[w][0])
            self._lost([subject for _, subject in gone])

    async def hear_bus(self, nc: Client) -> bool:
        """Whether the server answers the router now. Workers are judged by their silence only
        while it does: after a stall (the server frozen, the router's own link down) each gets a
        whole heartbeat period to be heard again, and calls in flight simply get their replies."""
        try:  # a request, not nc.flush(timeout): nats-py's reader dies on a PONG after a flush timed out
            await request(nc, subjects.BUS_PROBE, b"", self.cfg.heartbeat_s)
        except NoResponders:
            pass  # the server's own answer (nobody listens there): it hears us
        except MoebusError as e:  # a timeout, or no connection at all: the bus is not there
            if not self._bus_stalled:
                log.warning("the bus does not answer: workers are not dropped for silence until it does",
                            error=repr(e))
            self._bus_stalled = True
            return False
        if self._bus_stalled and self.m is not None:
            self._bus_stalled = False
            self.m.registry.grace(time.monotonic())
            log.info("the bus answers again")
        return True

    def on_call_failure(self, subject: str, error: BusError) -> None:
        """A worker that does not answer is out until it announces itself again (within a
        heartbeat if it is alive): readiness drops and its experts are placed elsewhere now."""
        if self.m is not None and (worker := self.m.registry.drop_subject(subject, str(error), time.monotonic())):
            log.warning("worker dropped", worker=worker, error=str(error))
            self._lost([subject])

    def _lost(self, gone: list[str]) -> None:
        if gone and self.placer is not None:
            self.placer.refresh()  # first: a call the lanes start after this routes around them
        for subject in gone:
            self.client.fail_calls(subject, "its worker left")  # re-sent to the experts' other owners
        if gone:
            self.advance()

    def advance(self) -> None:
        """Move placement on, one step at a time, without blocking the caller."""
        if self.placer is not None and (self._advancing is None or self._advancing.done()):
            self._advancing = asyncio.create_task(self.placer.advance())

    async def probe(self, nc: Client) -> None:
        """Calls waiting unusually long: ask their workers with an empty request. Nobody
        listening means the process died (a killed worker's subscription goes with it at
        once), long before its heartbeats go stale."""
        async def ask(subject: str) -> None:
            try:
                await request(nc, subject, EMPTY_REQUEST, 0.5)
            except NoResponders as e:
                self.on_call_failure(subject, e)
            except MoebusError:
                pass  # busy, not gone: its calls keep their own deadline

        await asyncio.gather(*map(ask, self.client.stuck(self.cfg.probe_after_s)))

    async def on_tokens(self, req: Request) -> None:
        """How many tokens a request's prompt is, as generate would count it (Anthropic's count_tokens)."""
        try:
            g = decode(GenerateRequest, req.data)
        except WireError as e:
            raise ServiceError("400", _error(BadRequest(str(e), e.param))) from None
        if self.m is None:
            raise ServiceError("503", "the router is loading the model")
        try:
            ids, _ = await asyncio.to_thread(self.m.prepare, g)
        except BadRequest as e:
            raise ServiceError("400", _error(e)) from None
        await req.respond(encode(TokenCount(prompt_tokens=len(ids))))

    async def on_status(self, req: Request) -> None:
        await req.respond(encode(self.status()))

    async def on_cluster(self, req: Request) -> None:
        if self.m is None or self.placer is None:
            raise ServiceError("503", "the router is loading the model")
        await req.respond(encode(self.cluster()))

    async def on_generate(self, req: Request) -> None:
        try:
            g = decode(GenerateRequest, req.data)
        except WireError as e:
            raise ServiceError("400", _error(BadRequest(str(e), e.param))) from None
        status = self.status()
        if not status.ready or self.m is None:
            raise ServiceError("503", f"not ready: {status.unready_reason}")
        limits = self.cfg.limits
        if self.active >= limits.max_running + limits.max_waiting:
            raise ServiceError("429", f"{self.active} requests are in progress, the most this server queues; "
                                      "try again shortly")
        try:
            ids, grammar = await asyncio.to_thread(self.m.prepare, g)
        except BadRequest as e:
            raise ServiceError("400", _error(e)) from None
        if (never := self.m.engine.kv.refusal(len(ids), g.max_tokens)) is not None:  # waiting would not help
            raise ServiceError("400", _error(never))
        self.active += 1
        self.mlx.submit(self.m.engine.add, g, ids, grammar)  # queued before any cancel of it can be
        await req.respond(encode(GenerateAccepted(request_id=g.request_id, prompt_tokens=len(ids), router=self.id)))

    def finished(self) -> None:
        self.active -= 1

    async def on_cancel(self, msg: Msg) -> None:
        if self.m is None:
            return
        try:
            rid = decode(Cancel, msg.data).request_id
        except WireError:
            return
        self.mlx.submit(self.m.engine.cancel, rid)


EMPTY_REQUEST = encode_request(0, 0, np.zeros((0, 1), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int32))


async def _share(nc: Client, model: Path, mlx: MLXThread) -> None:
    """Fill the model store once (a complete copy already there is kept); workers started
    without --model wait for it."""
    try:
        manifest = await modelstore.publish(nc.jetstream(), model, mlx.run)
        log.info("model shared over NATS", model=manifest.name, key=manifest.key, experts=manifest.num_experts)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - serving goes on; workers with a checkpoint still join
        log.error("model not shared", error=repr(e))


async def serve(cfg: RouterConfig) -> None:
    stop = stop_event()
    loop = asyncio.get_running_loop()
    mlx = MLXThread()
    router: Router | None = None
    try:
        async with AsyncExitStack() as stack:
            nc = await connect(cfg.nats_url, name="moebus-router", creds=cfg.creds)
            # Each lane's connection: with it gone, no reply to its calls will come; they fail now.
            client = ExpertClient(loop, cfg.expert_timeout_s, lambda on_disconnect: connect(
                cfg.nats_url, name="moebus-router-lane", creds=cfg.creds, on_disconnect=on_disconnect))
            stack.push_async_callback(close, nc)
            router = Router(cfg, client, mlx)

            async def send(events: list[tuple[str, GenerateEvent]]) -> None:
                for subject, event in events:
                    try:
                        await nc.publish(subject, encode(event))
                    except Exception as e:  # noqa: BLE001 - one lost stream must not lose the others
                        log.warning("event not published", subject=subject, error=repr(e))
                    finally:
                        if event.finish_reason is not None:
                            router.finished()

            def publish(events: list[tuple[str, GenerateEvent]]) -> None:  # called on the MLX thread
                asyncio.run_coroutine_threadsafe(send(events), loop)

            async def on_announce(msg: Msg) -> None:
                router.on_announce(msg.subject, msg.data)

            svc = await add_service(nc, name=subjects.SERVICE_ROUTER, version=VERSION,
                                    description="moebus router: attention, gates, sampling; experts over the bus",
                                    metadata={"model": model_name(cfg.model), "router": router.id})
            stack.push_async_callback(stop_service, svc)
            await svc.add_endpoint(name="status", subject=subjects.ROUTER_STATUS, handler=inbox_only(router.on_status))
            kv = await cluster.bucket(nc.jetstream())
            router.m = m = await mlx.run(load_router_model, cfg, client, publish)
            router.placer = placer = Placer(kv, m.registry, router.id, cfg.replicas, client.set_table,
                                            lambda: client.stats.pair_tokens if client.stats else None,
                                            client.set_unplaceable)
            await placer.start()
            if cfg.share_model:
                sharing = asyncio.create_task(_share(nc, cfg.model, mlx))
                stack.callback(sharing.cancel)
            stack.push_async_callback(lambda: placer.resign() if nc.is_connected else asyncio.sleep(0))
            metrics = registry(client.stats, router.gauges, m.registry.reports,
                               lambda: [lane.steps for lane in m.engine.lanes],
                               lambda: (m.engine.drafter.name, m.engine.spec_stats) if m.engine.drafter else None)

            async def on_metrics(req: Request) -> None:
                await req.respond(metrics())

            mlx.background = m.engine.step
            await nc.subscribe(subjects.ANNOUNCEMENTS, cb=on_announce)
            await nc.subscribe(subjects.ROUTER_CANCEL, cb=router.on_cancel)
            await svc.add_endpoint(name="generate", subject=subjects.ROUTER_GENERATE, handler=inbox_only(router.on_generate))
            await svc.add_endpoint(name="tokens", subject=subjects.ROUTER_TOKENS, handler=inbox_only(router.on_tokens))
            await svc.add_endpoint(name="metrics", subject=subjects.ROUTER_METRICS, handler=inbox_only(on_metrics))
            await svc.add_endpoint(name="cluster", subject=subjects.ROUTER_CLUSTER, handler=inbox_only(router.on_cluster))
            await nc.publish(subjects.WORKERS_DISCOVER, encode(Discover(router="router")))
            log.info("router loaded", model=m.info.name, moe_layers=m.info.moe_layers, experts=m.info.num_experts,
                     replicas=cfg.replicas, kv_budget_bytes=m.engine.kv.budget,
                     kv_bytes_per_token=m.engine.kv.size.per_token)
            async for _ in ticks(stop, cfg.tick_s):
                for lane in m.engine.lanes:  # an idle lane's connection answers the server's PINGs
                    (lane.thread or mlx).submit(client.pump)
                if await router.hear_bus(nc):
                    router.expire()
                    await router.probe(nc)
                    router.advance()
            await stop_service(svc)  # no new requests from here on
            # Nothing in flight ends silently: every running request hears why it stopped.
            await mlx.run(m.engine.fail_all, "the router is shutting down")
            await asyncio.sleep(0.1)
    finally:
        if router is not None and router.m is not None:
            for lane in router.m.engine.lanes:
                await asyncio.wrap_future((lane.thread or mlx).submit(router.client.detach))
            await mlx.run(router.m.engine.close)  # its lane thread frees its MLX streams
        mlx.stop()
