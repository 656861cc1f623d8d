"""router service: `moebus router --nats URL --model PATH`."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import orjson
from mlx_lm.utils import load_tokenizer
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request

from services.router.bus_experts import install
from services.router.engine import Engine
from services.router.exchange import ExpertClient
from services.router.registry import WorkerRegistry
from shared import subjects
from shared.bus import close, connect, stop_event
from shared.errors import BadRequest, WireError
from shared.logs import get_logger
from shared.messages import (
    Discover, GenerateAccepted, GenerateRequest, RouterStatus, WorkerAnnounce, decode, encode,
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


def load_router_model(path: Path, client: ExpertClient) -> tuple[Engine, ModelInfo]:
    """Everything but the experts: their modules are swapped before any weight is read."""
    model, config = load_lazy(path)
    slots = find_experts(model)
    info = describe(path, config, slots)
    install(model, slots, client)
    mx.eval(model.parameters())
    return Engine(model, load_tokenizer(path), info), info


def _error(e: BadRequest) -> str:
    return orjson.dumps({"code": e.code, "message": str(e), "param": e.param}).decode()


class Router:
    def __init__(self, cfg: RouterConfig, client: ExpertClient, mlx: MLXThread) -> None:
        self.cfg = cfg
        self.client = client
        self.mlx = mlx
        self.engine: Engine | None = None
        self.registry: WorkerRegistry | None = None

    def loaded(self, engine: Engine, info: ModelInfo) -> None:
        self.engine = engine
        self.registry = WorkerRegistry(info.num_experts, info.moe_layers, info.fingerprint, 4 * self.cfg.heartbeat_s)

    def status(self) -> RouterStatus:
        reg, info = self.registry, self.engine.info if self.engine else None
        if reg is None or info is None:
            return RouterStatus(False, self.cfg.model.name, 0, [], 0, 0)
        return RouterStatus(reg.covered == info.num_experts, info.name, info.max_context,
                            reg.workers, reg.covered, info.num_experts)

    def on_announce(self, data: bytes) -> None:
        if self.registry is None:
            return
        try:
            a = decode(WorkerAnnounce, data)
        except WireError as e:
            log.warning("bad announcement", error=str(e))
            return
        if not self.registry.announce(a, time.monotonic()):
            log.warning("worker of another model ignored", worker=a.worker, model=a.model)
        self.client.set_table(*self.registry.table())

    def expire(self) -> None:
        if self.registry and self.registry.expire(time.monotonic()):
            self.client.set_table(*self.registry.table())

    async def on_status(self, req: Request) -> None:
        await req.respond(encode(self.status()))

    async def on_generate(self, req: Request, emit_to) -> None:
        try:
            g = decode(GenerateRequest, req.data)
        except WireError as e:
            await req.respond_error("400", _error(BadRequest(str(e))))
            return
        status = self.status()
        if not status.ready or self.engine is None:
            await req.respond_error("503", f"not ready: {status.experts_covered}/{status.experts_total} experts have a worker")
            return
        try:
            ids = await asyncio.to_thread(self.engine.encode_prompt, g)
        except BadRequest as e:
            await req.respond_error("400", _error(e))
            return
        await req.respond(encode(GenerateAccepted(g.request_id, len(ids))))
        self.mlx.submit(self.engine.generate, g, ids, emit_to(g.stream))


async def serve(cfg: RouterConfig) -> None:
    stop = stop_event()
    loop = asyncio.get_running_loop()
    mlx = MLXThread()
    async with AsyncExitStack() as stack:
        nc = await connect(cfg.nats_url, name="moebus-router")
        stack.push_async_callback(close, nc)
        client = ExpertClient(nc, loop, cfg.expert_timeout_s)
        router = Router(cfg, client, mlx)

        def emit_to(subject: str):
            def emit(event) -> None:  # called on the MLX thread
                asyncio.run_coroutine_threadsafe(nc.publish(subject, encode(event)), loop)
            return emit

        async def on_generate(req: Request) -> None:
            await router.on_generate(req, emit_to)

        async def on_announce(msg: Msg) -> None:
            router.on_announce(msg.data)

        svc = await add_service(nc, name=subjects.SERVICE_ROUTER, version=VERSION,
                                description="moebus router: attention, gates, sampling; experts over the bus",
                                metadata={"model": cfg.model.name})
        stack.push_async_callback(svc.stop)
        await svc.add_endpoint(name="status", subject=subjects.ROUTER_STATUS, handler=router.on_status)
        engine, info = await mlx.run(load_router_model, cfg.model, client)
        router.loaded(engine, info)
        await nc.subscribe(subjects.WORKERS_ANNOUNCE, cb=on_announce)
        await svc.add_endpoint(name="generate", subject=subjects.ROUTER_GENERATE, handler=on_generate)
        await nc.publish(subjects.WORKERS_DISCOVER, encode(Discover("router")))
        log.info("router loaded", model=info.name, moe_layers=info.moe_layers, experts=info.num_experts)
        while not stop.is_set():
            router.expire()
            try:
                await asyncio.wait_for(stop.wait(), cfg.heartbeat_s)
            except asyncio.TimeoutError:
                pass
    mlx.stop()
