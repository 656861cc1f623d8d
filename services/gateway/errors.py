"""Every failure in the caller's error shape: OpenAI's {"error": {message, type, param, code}},
or Anthropic's {"type": "error", "error": {type, message}} under /v1/messages."""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from shared.errors import BusTimeout, MoebusError, NoResponders, NotReady, RemoteError

RETRY_AFTER_S = 1
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
          503: "overloaded_error", 504: "timeout_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None,
               anthropic: bool = False) -> dict:
    kind = _TYPES.get(status, "api_error")
    if anthropic:
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(request: Request | None, e: ApiError) -> JSONResponse:
    anthropic = request is not None and is_anthropic(request.url.path)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
    return JSONResponse(error_body(e.status, e.message, e.code, e.param, anthropic), status_code=e.status,
                        headers=headers)


def from_moebus(e: MoebusError) -> ApiError:
    """The one place the bus's errors become HTTP statuses."""
    if isinstance(e, RemoteError):
        if e.status == "400":
            try:
                d = orjson.loads(e.description)
                return ApiError(400, d["message"], d.get("code"), d.get("param"))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return ApiError(400, e.description, "invalid_request_error")
        if e.status == "429":
            return ApiError(429, e.description, "too_many_requests")
        if e.status == "503":
            return ApiError(503, e.description, "not_ready")
        return ApiError(502, f"router error {e.status}: {e.description}", "upstream_error")
    if isinstance(e, NoResponders):
        return ApiError(503, "the router is not running", "not_ready")
    if isinstance(e, NotReady):
        return ApiError(503, str(e), "not_ready")
    if isinstance(e, BusTimeout):
        return ApiError(504, str(e), "timeout")
    return ApiError(502, str(e), e.code)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(r: Request, e: ApiError) -> JSONResponse:
        return error_response(r, e)

    @app.exception_handler(MoebusError)
    async def moebus_error(r: Request, e: MoebusError) -> JSONResponse:
        return error_response(r, from_moebus(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(r: Request, e: RequestValidationError) -> JSONResponse:
        # Of a union's failed branches, the one that got deepest is most likely what the client meant.
        chosen = max(e.errors(), key=lambda err: len(err.get("loc", ())), default={})
        if chosen.get("type") == "json_invalid":  # its loc holds a character offset, not a field
            where = chosen.get("loc", ("body", "?"))[-1]
            reason = chosen.get("ctx", {}).get("error", "")
            return error_response(r, ApiError(400, f"the body is not valid JSON: {reason} at character {where}",
                                               "invalid_json"))
        loc = [str(p) for p in chosen.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {chosen.get('msg', 'invalid request')}"
        return error_response(r, ApiError(400, message, "invalid_request_error", ".".join(loc) or None))

    @app.exception_handler(Exception)
    async def unexpected(r: Request, e: Exception) -> JSONResponse:  # still a 500, but in the caller's shape
        return error_response(r, ApiError(500, f"internal error: {e!r}", "internal_error"))

    @app.exception_handler(HTTPException)
    async def http_error(r: Request, e: HTTPException) -> JSONResponse:
        return error_response(r, ApiError(e.status_code, str(e.detail)))
