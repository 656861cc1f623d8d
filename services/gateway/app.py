"""The OpenAI-compatible HTTP API."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

import orjson
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.gateway.errors import ApiError, error_body, from_moebus, install_handlers
from services.gateway.schemas import ChatCompletionRequest, CompletionRequest
from services.gateway.upstream import Generation, RouterClient
from shared.errors import MoebusError
from shared.messages import GenerateEvent

DEFAULT_MAX_TOKENS = 512


def create_app(router: Callable[[], RouterClient], lifespan=None) -> FastAPI:
    app = FastAPI(title="moebus", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of a Mixture-of-Experts model served over NATS")
    install_handlers(app)

    async def check_model(name: str) -> None:
        status = await router().status()
        if name != status.model:
            raise ApiError(404, f"The model '{name}' does not exist; this server has '{status.model}'",
                           "model_not_found", "model")

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            s = await router().status()
        except MoebusError as e:
            return JSONResponse({"ready": False, "error": str(e)}, status_code=503)
        body = {"ready": s.ready, "model": s.model, "workers": s.workers,
                "experts_covered": s.experts_covered, "experts_total": s.experts_total}
        return JSONResponse(body, status_code=200 if s.ready else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        s = await router().status()
        return {"object": "list", "data": [{"id": s.model, "object": "model", "created": 0, "owned_by": "moebus"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        await check_model(body.model)
        max_tokens = _max_tokens(body.max_completion_tokens or body.max_tokens)
        gen = await router().start(messages=[m.model_dump() for m in body.messages], max_tokens=max_tokens,
                                   temperature=body.temperature, top_p=body.top_p)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return _sse(_chat_chunks(gen, head))
        text, last = await _collect(gen)
        return JSONResponse({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": last.finish_reason}
        ], "usage": _usage(last)})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        await check_model(body.model)
        gen = await router().start(prompt=body.prompt, max_tokens=_max_tokens(body.max_tokens),
                                   temperature=body.temperature, top_p=body.top_p)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return _sse(_completion_chunks(gen, head))
        text, last = await _collect(gen)
        return JSONResponse({**head, "object": "text_completion", "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        ], "usage": _usage(last)})

    return app


def _max_tokens(value: int | None) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    if value < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {value}", "invalid_request_error", "max_tokens")
    return value


def _usage(last: GenerateEvent) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


async def _collect(gen: Generation) -> tuple[str, GenerateEvent]:
    parts = []
    async for event in gen.events():
        if event.error:
            raise ApiError(502, f"generation failed: {event.error}", "upstream_error")
        parts.append(event.text)
    return "".join(parts), event


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        except MoebusError as e:  # headers are sent: the error goes in the stream
            err = from_moebus(e)
            yield b"data: " + orjson.dumps(error_body(err.status, err.message, err.code)) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_chunks(gen: Generation, head: dict) -> AsyncIterator[dict]:
    base = {**head, "object": "chat.completion.chunk"}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for event in gen.events():
        if event.error:
            yield error_body(502, f"generation failed: {event.error}", "upstream_error")
            return
        if event.text:
            yield {**base, "choices": [{"index": 0, "delta": {"content": event.text}, "finish_reason": None}]}
        if event.finish_reason:
            yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": event.finish_reason}]}


async def _completion_chunks(gen: Generation, head: dict) -> AsyncIterator[dict]:
    base = {**head, "object": "text_completion"}
    async for event in gen.events():
        if event.error:
            yield error_body(502, f"generation failed: {event.error}", "upstream_error")
            return
        if event.text or event.finish_reason:
            yield {**base, "choices": [{"index": 0, "text": event.text, "logprobs": None,
                                        "finish_reason": event.finish_reason}]}
