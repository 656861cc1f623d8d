"""The HTTP API: OpenAI's and Anthropic's endpoints, health, metrics, keys and limits."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway import anthropic_api, openai_api
from services.gateway.errors import ApiError, install_handlers
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import CountRequests, HttpSettings, Limits
from services.gateway.upstream import RouterClient
from shared.errors import BusTimeout, MoebusError, NoResponders


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
        client = router()
        try:
            s = await client.status()
        except (NoResponders, BusTimeout) as e:  # the bus stalled or the router is gone: nothing is served now
            return JSONResponse({"ready": False, "error": f"the router does not answer over NATS: {e}"},
                                status_code=503)
        except MoebusError as e:
            return JSONResponse({"ready": False, "error": str(e)}, status_code=503)
        # Ready only if requests get through too: a router that answers its status but not
        # generate requests (stuck, or a forged status) is not serving.
        failing = client.generate_failing()
        ready = s.ready and failing is None
        body = {"ready": ready, "model": s.model, "workers": s.workers, "experts_covered": s.experts_covered,
                "experts_total": s.experts_total, "unowned_experts": s.unowned_experts,
                "running": s.running, "waiting": s.waiting, "kv_bytes_in_use": s.kv_bytes_in_use,
                "kv_budget_bytes": s.kv_budget_bytes, "prompt_cache_bytes": s.prompt_cache_bytes,
                "mlx_active_bytes": s.mlx_active_bytes}
        if not ready:
            body["error"] = s.unready_reason or f"generate requests fail: {failing}"
        return JSONResponse(body, status_code=200 if ready else 503)

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

    app.add_middleware(CountRequests, metrics=metrics)
    app.add_middleware(Limits, settings=settings)  # outermost: keys and body before anything runs
    return app
