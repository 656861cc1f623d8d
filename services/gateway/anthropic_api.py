"""POST /v1/messages, as Anthropic's Messages API serves it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from services.gateway.schemas import MessagesRequest, text_of
from services.gateway.sse import collect, sse
from services.gateway.upstream import Generation, RouterClient
from shared.messages import GenerateEvent


def stop_reason(e: GenerateEvent) -> str:
    if e.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if e.stop_sequence else "end_turn"


def routes(router: Callable[[], RouterClient], check_model: Callable[[str], Awaitable[None]]) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/messages")
    async def messages(body: MessagesRequest) -> Response:
        await check_model(body.model)
        chat = [{"role": "system", "content": text_of(body.system)}] if body.system else []
        chat += [{"role": m.role, "content": text_of(m.content)} for m in body.messages]
        gen = await router().start(messages=chat, max_tokens=body.max_tokens, temperature=body.temperature,
                                   top_p=body.top_p, top_k=body.top_k, stop=body.stop_sequences or [])
        message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": body.model}
        if body.stream:
            return sse(_events(gen, message), named=True, done=False)
        events = await collect(gen)
        last = events[-1]
        return JSONResponse({**message, "content": [{"type": "text", "text": "".join(e.text for e in events)}],
                             "stop_reason": stop_reason(last), "stop_sequence": last.stop_sequence,
                             "usage": {"input_tokens": last.prompt_tokens, "output_tokens": last.completion_tokens}})

    return api


async def _events(gen: Generation, message: dict) -> AsyncIterator[dict]:
    """message_start, content_block_start, ping, content_block_delta*, content_block_stop,
    message_delta, message_stop: the sequence Anthropic's clients expect."""
    yield {"type": "message_start", "message": {
        **message, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": gen.accepted.prompt_tokens, "output_tokens": 0}}}
    yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    yield {"type": "ping"}
    async for e in gen.events():
        if e.error:
            yield {"type": "error", "error": {"type": "api_error", "message": f"generation failed: {e.error}"}}
            return
        if e.text:
            yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": e.text}}
        if e.finish_reason:
            yield {"type": "content_block_stop", "index": 0}
            yield {"type": "message_delta", "delta": {"stop_reason": stop_reason(e), "stop_sequence": e.stop_sequence},
                   "usage": {"output_tokens": e.completion_tokens}}
            yield {"type": "message_stop"}
