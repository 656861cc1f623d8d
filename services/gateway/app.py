"""The HTTP API: OpenAI's and Anthropic's endpoints, health, metrics, keys and limits."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway import anthropic_api, openai_api
from services.gateway.errors import ApiError, error_response, install_handlers
from services.gateway.metrics import GatewayMetrics
from services.gateway.upstream import RouterClient
from shared.errors import MoebusError

OPEN_PATHS = ("/health", "/openapi.json")  # probes and the public schema need no key


@dataclass(frozen=True)
class HttpSettings:
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20


def create_app(router: Callable[[], RouterClient], settings: HttpSettings, metrics: GatewayMetrics,
               lifespan=None) -> FastAPI:
    app = FastAPI(title="moebus", version="0.1.0", lifespan=lifespan,
                  description="OpenAI- and Anthropic-compatible API of a Mixture-of-Experts model served over NATS")
    install_handlers(app)

    async def check_model(name: str) -> None:
        served = await router().model()
        if name != served:
            raise ApiError(404, f"The model '{name}' does not exist; this server has '{served}'",
                           "model_not_found", "model")

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            s = await router().status()
        except MoebusError as e:
            return JSONResponse({"ready": False, "error": str(e)}, status_code=503)
        body = {"ready": s.ready, "model": s.model, "workers": s.workers, "experts_covered": s.experts_covered,
                "experts_total": s.experts_total, "running": s.running, "waiting": s.waiting}
        return JSONResponse(body, status_code=200 if s.ready else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        s = await router().status()
        return {"object": "list", "data": [{"id": s.model, "object": "model", "created": 0, "owned_by": "moebus"}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        text = generate_latest(metrics.registry)
        try:
            text += await router().router_metrics()
        except MoebusError:
            pass  # the gateway's own numbers still help when the router is down
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai_api.routes(router, check_model))
    app.include_router(anthropic_api.routes(router, check_model))

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    app.add_middleware(Limits, settings=settings)
    return app


class Limits:
    """API keys (Bearer or x-api-key; /health stays open) and the request body size limit."""

    def __init__(self, app: ASGIApp, settings: HttpSettings) -> None:
        self.app = app
        self.keys = [k.encode() for k in settings.api_keys]
        self.max_body = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.keys and scope["path"] not in OPEN_PATHS and not self._authorized(request):
            return await error_response(request, ApiError(401, "missing or invalid API key", "invalid_api_key"))(
                scope, receive, send)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await self._too_large(request, scope, receive, send)
        # Read the body here, up to the limit, so a chunked upload cannot pass it either.
        body, more = [], True
        seen = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # the client left; let the app see it
            body.append(message.get("body", b""))
            seen += len(body[-1])
            more = message.get("more_body", False)
            if seen > self.max_body:
                return await self._too_large(request, scope, receive, send)
        whole: list[Message] = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(request, ApiError(413, f"request body over {self.max_body} bytes"))(scope, receive, send)

    def _authorized(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return any(hmac.compare_digest(given.encode(), k) for k in self.keys)
