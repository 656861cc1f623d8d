"""router service: `moebus router --nats URL --model PATH`."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import orjson
from mlx_lm.utils import load_tokenizer
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request

from services.router.bus_experts import install
from services.router.engine import Engine, EngineLimits, Publish
from services.router.exchange import ExpertClient
from services.router.metrics import ExchangeStats, registry
from services.router.prompts import PromptEncoder
from services.router.registry import WorkerRegistry
from shared import subjects
from shared.bus import close, connect, stop_event, stop_service, ticks
from shared.errors import BadRequest, BusError, WireError
from shared.logs import get_logger
from shared.messages import (
    Cancel, Discover, GenerateAccepted, GenerateEvent, GenerateRequest, RouterStatus, WorkerAnnounce, decode, encode,
)
from shared.mlx_thread import MLXThread
from shared.model import ModelInfo, describe, find_experts, load_lazy

VERSION = "0.1.0"
log = get_logger("router")


@dataclass(frozen=True)
class RouterConfig:
    nats_url: str
    model: Path
    expert_timeout_s: float = 30.0
    heartbeat_s: float = 1.0
    max_prompt_tokens: int = 1 << 30
    limits: EngineLimits = field(default_factory=EngineLimits)


@dataclass
class Loaded:
    engine: Engine
    prompts: PromptEncoder
    info: ModelInfo
    registry: WorkerRegistry


def load_router_model(cfg: RouterConfig, client: ExpertClient, publish: Publish) -> Loaded:
    """Everything but the experts: their modules are swapped before any weight is read."""
    model, config = load_lazy(cfg.model)
    slots = find_experts(model)
    info = describe(cfg.model, config, slots)
    install(model, slots, client)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(cfg.model)
    client.stats = ExchangeStats(info.moe_layers, info.num_experts)
    return Loaded(
        Engine(model, tokenizer, cfg.limits, publish, client.baton, info.max_context),
        PromptEncoder(tokenizer, info.max_context, cfg.max_prompt_tokens),
        info,
        WorkerRegistry(info.num_experts, info.moe_layers, info.fingerprint, 4 * cfg.heartbeat_s),
    )


def _error(e: BadRequest) -> str:
    return orjson.dumps({"code": e.code, "message": str(e), "param": e.param}).decode()


class Router:
    def __init__(self, cfg: RouterConfig, client: ExpertClient, mlx: MLXThread) -> None:
        self.cfg = cfg
        self.client = client
        self.mlx = mlx
        self.m: Loaded | None = None
        self.active = 0  # accepted and not finished: what admission counts (event loop only)
        self.id = uuid.uuid4().hex[:12]  # this process: a gateway's stream outlives it only if it is still here
        client.on_failure = self.on_call_failure

    def status(self) -> RouterStatus:
        if self.m is None:
            return RouterStatus(ready=False, model=self.cfg.model.name, max_context=0, workers=[], experts_covered=0,
                                experts_total=0, router=self.id, unready_reason="the router is loading the model")
        reg, info, eng = self.m.registry, self.m.info, self.m.engine
        unowned = reg.unowned()
        return RouterStatus(ready=not unowned, model=info.name, max_context=info.max_context, workers=reg.workers,
                            experts_covered=info.num_experts - len(unowned), experts_total=info.num_experts,
                            running=eng.running, waiting=eng.waiting, router=self.id,
                            unready_reason=f"experts {unowned} have no live worker" if unowned else "")

    def gauges(self) -> dict[str, float]:
        s = self.status()
        return {"sequences_running": s.running, "sequences_waiting": s.waiting, "workers_connected": len(s.workers),
                "experts_covered": s.experts_covered, "ready": float(s.ready)}

    def on_announce(self, data: bytes) -> None:
        if self.m is None:
            return
        try:
            a = decode(WorkerAnnounce, data)
        except WireError as e:
            log.warning("bad announcement", error=str(e))
            return
        gone = self.m.registry.announce(a, time.monotonic())
        if gone is None:
            log.warning("worker ignored: another model or cluster size", worker=a.worker, model=a.model, world=a.world)
            return
        self._lost(gone, f"worker {a.worker} left" if a.leaving else f"worker {a.worker} was replaced")
        self.client.set_table(*self.m.registry.table())

    def expire(self) -> None:
        if self.m is not None:
            self._lost(self.m.registry.expire(time.monotonic()), "its worker stopped sending heartbeats")

    def on_call_failure(self, subject: str, error: BusError) -> None:
        """A worker that does not answer is out until it announces itself again (within a
        heartbeat if it is alive): readiness drops now, not when its heartbeats go stale."""
        if self.m is not None and (worker := self.m.registry.drop_subject(subject)) is not None:
            log.warning("worker dropped", worker=worker, error=str(error))
            self._lost([subject], f"worker {worker} failed: {error}")

    def _lost(self, gone: list[str], why: str) -> None:
        for subject in gone:
            self.client.fail_calls(subject, why)  # their calls end now, not at the expert timeout
        if gone:
            self.client.set_table(*self.m.registry.table())

    async def on_status(self, req: Request) -> None:
        await req.respond(encode(self.status()))

    async def on_generate(self, req: Request) -> None:
        try:
            g = decode(GenerateRequest, req.data)
        except WireError as e:
            await req.respond_error("400", _error(BadRequest(str(e), e.param)))
            return
        status = self.status()
        if not status.ready or self.m is None:
            await req.respond_error("503", f"not ready: {status.unready_reason}")
            return
        limits = self.cfg.limits
        if self.active >= limits.max_running + limits.max_waiting:
            await req.respond_error("429", f"{self.active} requests are in progress, the most this server "
                                           "queues; try again shortly")
            return
        try:
            ids = await asyncio.to_thread(self.m.prompts.encode, g)
        except BadRequest as e:
            await req.respond_error("400", _error(e))
            return
        self.active += 1
        self.mlx.submit(self.m.engine.add, g, ids)  # queued before any cancel of it can be
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


async def serve(cfg: RouterConfig) -> None:
    stop = stop_event()
    loop = asyncio.get_running_loop()
    mlx = MLXThread()
    router: Router | None = None
    try:
        async with AsyncExitStack() as stack:
            # With the bus gone, no reply to a call in flight will come: fail them now.
            nc = await connect(cfg.nats_url, name="moebus-router",
                               on_disconnect=lambda: client.fail_calls(None, "the bus connection was lost"))
            client = ExpertClient(nc, loop, cfg.expert_timeout_s)
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
                router.on_announce(msg.data)

            svc = await add_service(nc, name=subjects.SERVICE_ROUTER, version=VERSION,
                                    description="moebus router: attention, gates, sampling; experts over the bus",
                                    metadata={"model": cfg.model.name})
            stack.push_async_callback(stop_service, svc)
            await svc.add_endpoint(name="status", subject=subjects.ROUTER_STATUS, handler=router.on_status)
            router.m = await mlx.run(load_router_model, cfg, client, publish)
            metrics = registry(client.stats, router.gauges, router.m.registry.memory)

            async def on_metrics(req: Request) -> None:
                await req.respond(metrics())

            mlx.background = router.m.engine.step
            await nc.subscribe(subjects.WORKERS_ANNOUNCE, cb=on_announce)
            await nc.subscribe(subjects.ROUTER_CANCEL, cb=router.on_cancel)
            await svc.add_endpoint(name="generate", subject=subjects.ROUTER_GENERATE, handler=router.on_generate)
            await svc.add_endpoint(name="metrics", subject=subjects.ROUTER_METRICS, handler=on_metrics)
            await nc.publish(subjects.WORKERS_DISCOVER, encode(Discover(router="router")))
            info = router.m.info
            log.info("router loaded", model=info.name, moe_layers=info.moe_layers, experts=info.num_experts)
            async for _ in ticks(stop, cfg.heartbeat_s):
                router.expire()
            await stop_service(svc)  # no new requests from here on
            # Nothing in flight ends silently: every running request hears why it stopped.
            await mlx.run(router.m.engine.fail_all, "the router is shutting down")
            await asyncio.sleep(0.1)
    finally:
        if router is not None and router.m is not None:
            await mlx.run(router.m.engine.close)  # its lane thread frees its MLX streams
        mlx.stop()
