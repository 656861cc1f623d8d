"""gateway service: `moebus gateway --nats URL --host H --port P`."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import orjson
import uvicorn
from nats.micro import add_service
from nats.micro.request import Request

from services.gateway.app import HttpSettings, create_app
from services.gateway.metrics import GatewayMetrics
from services.gateway.upstream import RouterClient
from shared import subjects
from shared.bus import close, connect, stop_event, stop_service
from shared.errors import MoebusError
from shared.logs import get_logger

VERSION = "0.1.0"
log = get_logger("gateway")


@dataclass(frozen=True)
class GatewayConfig:
    nats_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout_s: float = 10.0
    event_timeout_s: float = 120.0
    deadline_s: float = 600.0  # a whole request, queueing included
    http: HttpSettings = HttpSettings()


async def serve(cfg: GatewayConfig) -> None:
    stop = stop_event()
    holder: dict[str, RouterClient] = {}
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(_app):
        async with AsyncExitStack() as stack:
            nc = await connect(cfg.nats_url, name="moebus-gateway")
            stack.push_async_callback(close, nc)
            holder["router"] = RouterClient(nc, cfg.request_timeout_s, cfg.event_timeout_s, cfg.deadline_s, metrics)

            async def on_health(req: Request) -> None:
                try:
                    status = await holder["router"].status()
                    await req.respond(orjson.dumps({"gateway": "ok", "router": status.__dict__}))
                except MoebusError as e:
                    await req.respond(orjson.dumps({"gateway": "ok", "router": None, "error": str(e)}))

            svc = await add_service(nc, name=subjects.SERVICE_GATEWAY, version=VERSION,
                                    description="moebus HTTP gateway (OpenAI-compatible)",
                                    metadata={"http": f"http://{cfg.host}:{cfg.port}"})
            stack.push_async_callback(stop_service, svc)
            await svc.add_endpoint(name="health", subject=subjects.GATEWAY_HEALTH, handler=on_health)
            log.info("gateway listening", url=f"http://{cfg.host}:{cfg.port}")
            yield

    app = create_app(lambda: holder["router"], cfg.http, metrics, lifespan=lifespan)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=5))

    async def exit_on_stop() -> None:  # uvicorn handles SIGINT/SIGTERM; this covers the rest
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(exit_on_stop())
    await server.serve()
    watcher.cancel()
