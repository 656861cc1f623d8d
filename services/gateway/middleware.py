"""Pure ASGI middleware: API keys, the body size limit, cancelling work for a client that left,
and counting requests. Pure ASGI because starlette's BaseHTTPMiddleware wraps receive(), and
the client's disconnect has to reach us through it."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services import defaults
from services.gateway.errors import ApiError, error_response
from services.gateway.metrics import GatewayMetrics

OPEN_PATHS = ("/health", "/openapi.json")  # probes and the public schema need no key
CANCEL_AGAIN_S = 0.1  # how long a cancelled app may take before it is cancelled again
CLIENT_CLOSED = 499  # nginx's status for a client that left before its answer; it is never sent


@dataclass(frozen=True)
class HttpSettings:
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = defaults.MAX_BODY_BYTES


class Limits:
    """API keys (Bearer or x-api-key; /health stays open) and the request body size limit; then
    the app runs until it answers or the client leaves, whichever comes first."""

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
                return  # the client left (or its body was too slow): nobody is left to answer
            body.append(message.get("body", b""))
            seen += len(body[-1])
            more = message.get("more_body", False)
            if seen > self.max_body:
                return await self._too_large(request, scope, receive, send)
        whole: list[Message] = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()

        await self._until_answered_or_gone(scope, replay, send, receive)

    async def _until_answered_or_gone(self, scope: Scope, replay: Receive, send: Send, receive: Receive) -> None:
        """A non-streamed answer takes as long as its generation; a client that leaves meanwhile
        has its task cancelled, which cancels its sequence on the router. Once an answer has
        started (a stream), the response itself watches for the disconnect."""
        answering = False

        async def watched_send(message: Message) -> None:
            nonlocal answering
            answering = True
            await send(message)

        app = asyncio.ensure_future(self.app(scope, replay, watched_send))
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait((app, gone), return_when=asyncio.FIRST_COMPLETED)
            if gone.done() and not app.done() and not answering:
                # Until it stops: one cancel can be lost. Python 3.11's wait_for returns a
                # result that arrives as it is cancelled (nats-py's next_msg awaits one), and
                # the generation would run on to its max_tokens with nobody to answer.
                while not app.done():
                    app.cancel()
                    await asyncio.wait((app,), timeout=CANCEL_AGAIN_S)
            await asyncio.wait((app,))
            if not app.cancelled():
                app.result()  # the app's own exception, for the server to log
        finally:
            gone.cancel()
            app.cancel()  # no-op once done; here when this request's own task is cancelled

    async def _too_large(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(request, ApiError(413, f"request body over {self.max_body} bytes"))(scope, receive, send)

    def _authorized(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return any(hmac.compare_digest(given.encode(), k) for k in self.keys)


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class CountRequests:
    """moebus_requests_total by route and status; 499 for a client that left before its answer."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: int | None = None

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except asyncio.CancelledError:
            status = status or CLIENT_CLOSED
            raise
        finally:
            if status is not None:  # the router sets scope["route"] on the way in
                route = getattr(scope.get("route"), "path", "other")
                self.metrics.requests.labels(route, str(status)).inc()
