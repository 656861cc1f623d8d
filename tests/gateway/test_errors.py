"""Validation errors read like OpenAI's: the parameter, then what is wrong in plain words, never
pydantic's type names. Bad bodies never reach the router, so the app runs here without one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway.app import create_app
from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import HttpSettings
from services.gateway.schemas import ChatCompletionRequest, CompletionRequest, MessagesRequest

# What pydantic says that a client should never read.
LEAKS = ("constrained-", "list[", "TextPart", "literal_error", "Input should be", "after validation", "Field required",
         "Value error", "[str]", "union", "dictionary or object")
MSG = [{"role": "user", "content": "w1"}]
CHAT, COMPLETE, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/messages"
CHAT_BODY, COMPLETE_BODY = {"model": "m", "messages": MSG}, {"model": "m", "prompt": "w1"}
MESSAGES_BODY = {"model": "m", "max_tokens": 4, "messages": MSG}


def _unreachable():
    raise ApiError(418, "a valid body reached the router")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(_unreachable, HttpSettings(), GatewayMetrics())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
        yield client


# (path, body, the param named, words the message must hold)
CASES = [
    (COMPLETE, {**COMPLETE_BODY, "stop": ["w"] * 17}, "stop", ("array too long", "maximum length 16", "length 17")),
    (CHAT, {**CHAT_BODY, "stop": ["w"] * 17}, "stop", ("maximum length 16",)),
    (COMPLETE, {**COMPLETE_BODY, "stop": ["x" * 300]}, "stop[0]", ("string too long", "maximum length 256", "300")),
    (COMPLETE, {**COMPLETE_BODY, "stop": 5}, "stop", ("expected a string or an array of strings", "got an integer")),
    (COMPLETE, {**COMPLETE_BODY, "stop": ["w", 5]}, "stop[1]", ("expected a string", "got an integer")),
    (COMPLETE, {**COMPLETE_BODY, "max_tokens": 10**20}, "max_tokens", ("above maximum", "<= 2147483648")),
    (COMPLETE, {**COMPLETE_BODY, "max_tokens": 0}, "max_tokens", ("below minimum", ">= 1", "got 0")),
    (COMPLETE, {**COMPLETE_BODY, "max_tokens": "many"}, "max_tokens", ("expected an integer", "got a string")),
    (COMPLETE, {**COMPLETE_BODY, "temperature": 3}, "temperature", ("above maximum", "<= 2")),
    (COMPLETE, {**COMPLETE_BODY, "top_p": 0}, "top_p", ("below minimum", "> 0")),
    (COMPLETE, {**COMPLETE_BODY, "seed": 1.5}, "seed", ("expected an integer", "got a decimal")),
    (COMPLETE, {**COMPLETE_BODY, "seed": 2**63}, "seed", ("<= 9223372036854775807",)),
    (COMPLETE, {**COMPLETE_BODY, "seed": -(2**63) - 1}, "seed", (">= -9223372036854775808",)),
    (COMPLETE, {**COMPLETE_BODY, "logprobs": 99}, "logprobs", ("<= 20",)),
    (COMPLETE, {**COMPLETE_BODY, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage",
     ("expected a boolean",)),
    (COMPLETE, {"model": "m", "prompt": [2**40]}, "prompt[0]", ("above maximum",)),
    (COMPLETE, {"model": "m", "prompt": None}, "prompt",
     ("expected a string, an array of integers or an array of strings", "got null")),
    (COMPLETE, {"model": "m"}, "prompt", ("Missing required parameter",)),
    (COMPLETE, {"prompt": "w1"}, "model", ("Missing required parameter",)),
    (CHAT, {"model": "m", "messages": []}, "messages", ("empty array",)),
    (CHAT, {"model": "m", "messages": "w1"}, "messages", ("expected an array", "got a string")),
    (CHAT, {"model": "m", "messages": ["w1"]}, "messages[0]", ("expected an object",)),
    (CHAT, {"model": "m", "messages": [{"role": "robot", "content": "w1"}]}, "messages[0].role",
     ("'robot'", "Supported values are", "'user'")),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", ("'image_url'", "'text'")),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     ("expected a string or an array of objects",)),
    (CHAT, {"model": "m", "messages": [{"content": "w1"}]}, "messages[0].role", ("Missing required parameter",)),
    (CHAT, {"model": "m", "messages": [{"role": 2**70, "content": "w1"}]}, "messages[0].role", ("'1180591620717411303424'",)),
    (CHAT, {**CHAT_BODY, "top_logprobs": 30}, "top_logprobs", ("<= 20",)),
    (CHAT, {**CHAT_BODY, "n": 2**40}, "n", ("above maximum",)),
    (MESSAGES, {"model": "m", "messages": MSG}, "max_tokens", ("Missing required parameter",)),
    (MESSAGES, {**MESSAGES_BODY, "stop_sequences": ["w"] * 17}, "stop_sequences", ("maximum length 16",)),
    (MESSAGES, {**MESSAGES_BODY, "messages": [{"role": "system", "content": "w1"}]}, "messages[0].role",
     ("'system'", "'user' or 'assistant'")),
    (MESSAGES, {**MESSAGES_BODY, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages[0].content[0].type", ("'image'",)),
    (MESSAGES, {**MESSAGES_BODY, "system": 5}, "system", ("expected a string or an array of objects",)),
    (MESSAGES, {**MESSAGES_BODY, "temperature": 1.5}, "temperature", ("above maximum", "<= 1")),
]


@pytest.mark.parametrize(("path", "body", "param", "words"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
async def test_a_bad_parameter_is_named_and_explained(http: httpx.AsyncClient, path: str, body: dict, param: str,
                                                      words: tuple[str, ...]):
    r = await http.post(path, json=body)
    assert r.status_code == 400, r.text
    if path == MESSAGES:  # Anthropic's shape has no param: the message names it
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    else:
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == param
    message = r.json()["error"]["message"]
    assert f"'{param}'" in message and all(w in message for w in words), message
    assert not [leak for leak in LEAKS if leak in message], message


@pytest.mark.parametrize(("content", "headers", "words"), [
    (b"[]", {"Content-Type": "application/json"}, "expected an object, but got an array"),
    (b"", {"Content-Type": "application/json"}, "no body"),
    (b'{"model": "m", "prompt": "w1"}', {"Content-Type": "text/plain"}, "Content-Type: application/json"),
    (b'{"model": "m",', {"Content-Type": "application/json"}, "not valid JSON"),
])
async def test_a_bad_body_as_a_whole_is_explained_without_a_param(http: httpx.AsyncClient, content: bytes,
                                                                   headers: dict, words: str):
    r = await http.post(COMPLETE, content=content, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text
    message = r.json()["error"]["message"]
    assert words in message and not [leak for leak in LEAKS if leak in message], message


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["type", "text", "role", "x"]), inner,
                                                               max_size=3),
    max_leaves=6)
# Each endpoint's valid body, and where in it a bad value may go: every field, and some nested ones.
BODIES = [(COMPLETE, COMPLETE_BODY, [*CompletionRequest.model_fields, "stream_options.include_usage"]),
          (CHAT, CHAT_BODY, [*ChatCompletionRequest.model_fields, "messages.0", "messages.0.role",
                             "messages.0.content", "messages.0.content.0", "messages.0.content.0.type"]),
          (MESSAGES, MESSAGES_BODY, [*MessagesRequest.model_fields, "messages.0.role", "messages.0.content.0.text"])]


def _put(body: dict, where: str, value: object) -> dict:
    """`body` with `value` at `where` (dots, numbers index lists), containers made on the way."""
    body = json.loads(json.dumps(body))
    *path, last = [int(p) if p.isdigit() else p for p in where.split(".")]
    at = body
    for p, nxt in zip(path, [*path[1:], last]):
        empty = [{}] if isinstance(nxt, int) else {}
        if isinstance(at, list):
            at[p] = at[p] if isinstance(at[p], (list, dict)) else empty
        else:
            at[p] = at.get(p) if isinstance(at.get(p), (list, dict)) else empty
        at = at[p]
    at[last] = value
    return body


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(BODIES), data=st.data(), value=JSON)
def test_no_bad_value_anywhere_leaks_pydantic_or_breaks_the_gateway(endpoint, data, value):
    path, body, fields = endpoint
    where = data.draw(st.sampled_from(fields))
    with TestClient(create_app(_unreachable, HttpSettings(), GatewayMetrics())) as client:
        r = client.post(path, json=_put(body, where, value))
    assert r.status_code in (400, 418), r.text  # 418: the body was valid and reached the (absent) router
    if r.status_code == 400:
        message = r.json()["error"]["message"]
        assert message.startswith(("Invalid", "Missing")) and not [x for x in LEAKS if x in message], message
