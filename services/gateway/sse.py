"""Server-sent events, and collecting a whole generation for a non-streamed answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from fastapi.responses import StreamingResponse

from services.gateway.errors import ApiError, error_body, from_moebus
from services.gateway.upstream import Generation
from shared.errors import MoebusError
from shared.messages import GenerateEvent


async def collect(gen: Generation) -> list[GenerateEvent]:
    events = []
    async for event in gen.events():
        if event.error:
            raise ApiError(502, f"generation failed: {event.error}", "upstream_error")
        events.append(event)
    return events


def sse(chunks: AsyncIterator[dict], named: bool = False, done: bool = True) -> StreamingResponse:
    """OpenAI style (`data:` lines ending in [DONE]) or, with `named`, Anthropic's `event:` lines."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                name = f"event: {chunk['type']}\n".encode() if named else b""
                yield name + b"data: " + orjson.dumps(chunk) + b"\n\n"
        except MoebusError as e:  # headers are sent: the error goes in the stream
            err = from_moebus(e)
            payload = error_body(err.status, err.message, err.code, anthropic=named)
            yield (b"event: error\n" if named else b"") + b"data: " + orjson.dumps(payload) + b"\n\n"
        if done:
            yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
