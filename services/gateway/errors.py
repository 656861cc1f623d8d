"""Every failure in the caller's error shape: OpenAI's {"error": {message, type, param, code}},
or Anthropic's {"type": "error", "error": {type, message}} under /v1/messages."""

from __future__ import annotations

import json
import re
from typing import Any

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
        return error_response(r, invalid_request(list(e.errors())))

    @app.exception_handler(Exception)
    async def unexpected(r: Request, e: Exception) -> JSONResponse:  # still a 500, but in the caller's shape
        return error_response(r, ApiError(500, f"internal error: {e!r}", "internal_error"))

    @app.exception_handler(HTTPException)
    async def http_error(r: Request, e: HTTPException) -> JSONResponse:
        return error_response(r, ApiError(e.status_code, str(e.detail)))


# pydantic's validation errors, said the way OpenAI says them: the parameter, then what is wrong.
# Its own messages name its types ("stop.constrained-str: Input should be a valid string").

# A union's branches show up in `loc` by type name ("constrained-str", "list[TextPart]", "str").
_BRANCH = re.compile(r"[^A-Za-z0-9_]|^[A-Z]|^(str|int|float|bool)$")
_EXPECTED = {"string_type": "a string", "int_type": "an integer", "int_parsing": "an integer",
             "int_from_float": "an integer", "float_type": "a number", "float_parsing": "a number",
             "bool_type": "a boolean", "bool_parsing": "a boolean", "list_type": "an array", "dict_type": "an object",
             "model_type": "an object", "model_attributes_type": "an object"}
_SCALARS = {"str": ("a string", "strings"), "int": ("an integer", "integers"), "float": ("a number", "numbers"),
            "bool": ("a boolean", "booleans")}
_LIMITS = {"le": ("<=", "above maximum", "above_max"), "lt": ("<", "above maximum", "above_max"),
           "ge": (">=", "below minimum", "below_min"), "gt": (">", "below minimum", "below_min")}


def _is_branch(part: Any) -> bool:
    return isinstance(part, str) and bool(_BRANCH.search(part))


def _path(loc: tuple) -> list[Any]:
    return [p for p in loc if p != "body" and not _is_branch(p)]


def _param(loc: tuple) -> str:
    """OpenAI's spelling of a place in the body: messages[0].content."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in _path(loc)).lstrip(".")


def _branch_type(tag: str) -> str:
    """What a union's branch takes, from pydantic's name for it."""
    if tag.startswith("list[") and tag.endswith("]"):
        inner = tag[5:-1].removeprefix("constrained-")
        return f"an array of {_SCALARS.get(inner, ('', 'objects'))[1]}"
    return _SCALARS.get(tag.removeprefix("constrained-"), ("an object",))[0]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a decimal"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "something else"


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)  # orjson stops at 64-bit integers
    return f"'{text[:40]}...'" if len(text) > 40 else f"'{text}'"


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _wrong_type_at_a_branch(err: dict) -> bool:
    """A union branch that does not take this kind of value at all: not the one the client meant."""
    loc = err.get("loc", ())
    return err.get("type") in _EXPECTED and bool(loc) and _is_branch(loc[-1])


def invalid_request(errors: list[dict]) -> ApiError:
    """One 400 for a body that failed validation: its first bad parameter, in plain words."""
    if not errors:
        return ApiError(400, "invalid request body", "invalid_value")
    first = errors[0]
    if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
        where, reason = first.get("loc", ("body", "?"))[-1], first.get("ctx", {}).get("error", "")
        return ApiError(400, f"The body is not valid JSON: {reason} at character {where}.", "invalid_json")
    top = _path(first.get("loc", ()))[:1]
    same = [e for e in errors if _path(e.get("loc", ()))[:1] == top]
    meant = [e for e in same if not _wrong_type_at_a_branch(e)]
    if not meant:  # no branch takes this kind of value: name them all
        at = _path(first.get("loc", ()))
        param = _param(first.get("loc", ()))
        kinds = list(dict.fromkeys(_branch_type(e["loc"][-1]) for e in same if _path(e["loc"]) == at))
        expected = " or ".join(filter(None, (", ".join(kinds[:-1]), kinds[-1])))
        got = _json_type(first.get("input"))
        return ApiError(400, f"Invalid type for '{param}': expected {expected}, but got {got} instead.", "invalid_type",
                        param)
    # A value error (too long, too large) says more than a type error in another branch; deeper says more.
    err = max(meant, key=lambda e: (e.get("type") not in _EXPECTED, len(_path(e.get("loc", ())))))
    return _describe(err)


def _describe(err: dict) -> ApiError:
    kind, ctx, value = err.get("type", ""), err.get("ctx") or {}, err.get("input")
    param = _param(err.get("loc", ()))
    name = f"'{param}'" if param else "the request body"
    if kind == "missing":
        if not param:
            return ApiError(400, "The request has no body: send a JSON object.", "missing_required_parameter")
        return ApiError(400, f"Missing required parameter: '{param}'.", "missing_required_parameter", param)
    if kind in _EXPECTED:
        if isinstance(value, bytes):  # FastAPI parses JSON only when the request says it is JSON
            return ApiError(400, "The body must be a JSON object sent with Content-Type: application/json.",
                            "invalid_type")
        return ApiError(400, f"Invalid type for {name}: expected {_EXPECTED[kind]}, but got {_json_type(value)} "
                             "instead.", "invalid_type", param or None)
    bound = next((b for b in _LIMITS if b in ctx), None)
    if bound is not None and kind in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
        op, side, code = _LIMITS[bound]
        number = "decimal" if isinstance(value, float) or isinstance(ctx[bound], float) else "integer"
        return ApiError(400, f"Invalid {name}: {number} {side} value. Expected a value {op} {_number(ctx[bound])}, "
                             f"but got {_number(value)} instead.", f"{number}_{code}_value", param)
    if kind in ("too_long", "too_short"):
        limit, got = ctx.get("max_length" if kind == "too_long" else "min_length"), ctx.get("actual_length")
        if kind == "too_short" and got == 0:
            return ApiError(400, f"Invalid {name}: empty array. Expected an array with minimum length {limit}, but got "
                                 "an empty array instead.", "empty_array", param)
        side = ("long", "maximum", "above_max") if kind == "too_long" else ("short", "minimum", "below_min")
        return ApiError(400, f"Invalid {name}: array too {side[0]}. Expected an array with {side[1]} length {limit}, "
                             f"but got an array with length {got} instead.", f"array_{side[2]}_length", param)
    if kind in ("string_too_long", "string_too_short"):
        longer = kind == "string_too_long"
        limit = ctx.get("max_length" if longer else "min_length")
        return ApiError(400, f"Invalid {name}: string too {'long' if longer else 'short'}. Expected a string with "
                             f"{'maximum' if longer else 'minimum'} length {limit}, but got a string with length "
                             f"{len(value) if isinstance(value, str) else '?'} instead.",
                        f"string_{'above_max' if longer else 'below_min'}_length", param)
    if kind == "literal_error":
        return ApiError(400, f"Invalid value for {name}: {_show(value)}. Supported values are: {ctx.get('expected')}.",
                        "invalid_value", param)
    if kind == "finite_number":
        return ApiError(400, f"Invalid {name}: expected a finite number.", "invalid_value", param)
    if kind == "value_error":  # our own validators: their message is already plain
        return ApiError(400, f"Invalid {name}: {ctx.get('error', err.get('msg'))}.", "invalid_value", param)
    return ApiError(400, f"Invalid {name}: {err.get('msg', 'invalid value')}.", "invalid_value", param)
