"""gateway service: `moebus gateway --nats URL --host H --port P`."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import orjson
import uvicorn
from nats.micro import add_service
from nats.micro.request import Request

from services import defaults
from services.gateway.app import create_app
from services.gateway.connections import ConnectionLimits, connection_cap, guarded_protocol, raise_fd_limit
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import HttpSettings
from services.gateway.upstream import RouterClient
from shared import subjects
from shared.bus import close, connect, inbox_only, stop_event, stop_service
from shared.errors import MoebusError
from shared.logs import get_logger
from shared.security import Creds

VERSION = "0.2.0"
log = get_logger("gateway")


@dataclass(frozen=True)
class GatewayConfig:
    nats_url: str
    creds: Creds | None = None
    host: str = defaults.HOST
    port: int = defaults.PORT
    request_timeout_s: float = 10.0
    event_timeout_s: float = 120.0
    deadline_s: float = defaults.REQUEST_TIMEOUT_S  # a whole request, queueing included
    http: HttpSettings = HttpSettings()
    connections: ConnectionLimits = ConnectionLimits()


async def serve(cfg: GatewayConfig) -> None:
    stop = stop_event()
    holder: dict[str, RouterClient] = {}
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(_app):
        async with AsyncExitStack() as stack:
            # A dropped connection loses the events sent meanwhile: open streams end with an error.
            nc = await connect(cfg.nats_url, name="moebus-gateway", creds=cfg.creds,
                               on_disconnect=lambda: holder["router"].on_disconnect())
            stack.push_async_callback(close, nc)
            holder["router"] = RouterClient(nc, cfg.request_timeout_s, cfg.event_timeout_s, cfg.deadline_s, metrics)

            async def on_health(req: Request) -> None:
                try:
                    status = await holder["router"].status()
                    await req.respond(orjson.dumps({"gateway": "ok", "router": status.model_dump()}))
                except MoebusError as e:
                    await req.respond(orjson.dumps({"gateway": "ok", "router": None, "error": str(e)}))

            svc = await add_service(nc, name=subjects.SERVICE_GATEWAY, version=VERSION,
                                    description="moebus HTTP gateway (OpenAI-compatible)",
                                    metadata={"http": f"http://{cfg.host}:{cfg.port}"})
            stack.push_async_callback(stop_service, svc)
            await svc.add_endpoint(name="health", subject=subjects.GATEWAY_HEALTH, handler=inbox_only(on_health))
            log.info("gateway listening", url=f"http://{cfg.host}:{cfg.port}")
            yield

    app = create_app(lambda: holder["router"], cfg.http, metrics, lifespan=lifespan)
    limits = cfg.connections
    cap = connection_cap(limits.max_connections, raise_fd_limit())
    protocol = guarded_protocol(limits, cap, lambda reason: metrics.connections_closed.labels(reason).inc())
    log.info("gateway connection limits", max_connections=cap, header_timeout_s=limits.header_timeout_s,
             body_timeout_s=limits.body_timeout_s, keep_alive_s=limits.keep_alive_s)
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
        http=protocol, timeout_keep_alive=limits.keep_alive_s))  # type: ignore[arg-type]  # a float works

    async def exit_on_stop() -> None:  # uvicorn handles SIGINT/SIGTERM; this covers the rest
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(exit_on_stop())
    await server.serve()
    watcher.cancel()
