"""POST /v1/chat/completions and /v1/completions, as OpenAI serves them."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from services.gateway.errors import ApiError, error_body
from services.gateway.schemas import (
    ChatCompletionRequest, ChatMessage, CompletionRequest, NamedToolChoice, _Sampling, text_of,
)
from services.gateway.sse import collect, sse
from services.gateway.upstream import Generation, RouterClient
from shared.messages import GenerateEvent, ToolCall

DEFAULT_MAX_TOKENS = 512


def sampling(body: _Sampling, max_tokens: int | None, top_logprobs: int | None, logprobs: bool) -> dict:
    """The fields every completion sends the router (the schemas have checked their ranges)."""
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported; send n=1 (or several requests)", "unsupported", "n")
    stops = body.stops()
    return dict(max_tokens=max_tokens or DEFAULT_MAX_TOKENS, temperature=body.temperature, top_p=body.top_p,
                top_k=body.top_k, min_p=body.min_p, seed=body.seed, stop=stops, logprobs=logprobs,
                top_logprobs=top_logprobs or 0)


def chat_fields(body: ChatCompletionRequest) -> dict:
    """What a chat completion asks of the router besides sampling: the conversation, the tools,
    and the shape the answer must take."""
    choice, name = body.tool_choice or "auto", None
    if isinstance(choice, NamedToolChoice):
        choice, name = "function", choice.function.name
    names = [t.function.name for t in body.tools or []]
    if choice in ("required", "function") and not names:
        raise ApiError(400, f"tool_choice {choice!r} needs tools", "invalid_tool_choice", "tool_choice")
    if name is not None and name not in names:
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                            f"({', '.join(names)})", "invalid_tool_choice", "tool_choice")
    if len(set(names)) != len(names):
        raise ApiError(400, "two tools have the same name", "invalid_tools", "tools")
    fields: dict = {"messages": [_turn(m) for m in body.messages], "tool_choice": choice, "tool_name": name,
                    "parallel_tool_calls": body.parallel_tool_calls}
    if body.tools:
        fields["tools"] = [t.function.model_dump(exclude={"strict"}, exclude_unset=True) for t in body.tools]
    rf = body.response_format
    if rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema", "invalid_response_format",
                           "response_format")
        fields["response_format"] = {"type": "json_schema", "json_schema": rf.json_schema.schema_}
    elif rf is not None:
        fields["response_format"] = {"type": rf.type}
    if body.chat_template_kwargs is not None:
        fields["thinking"] = body.chat_template_kwargs.enable_thinking
    return fields


def _turn(m: ChatMessage) -> dict:
    turn: dict = {"role": m.role, "content": text_of(m.content)}
    if m.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                              for c in m.tool_calls]
    if m.tool_call_id is not None:
        turn["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        turn["name"] = m.name
    if m.reasoning_content:
        turn["reasoning"] = m.reasoning_content
    return turn


def _calls(calls: list[ToolCall], first: int) -> list[dict]:
    return [{"index": first + i, "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]


def _message(events: list[GenerateEvent]) -> dict:
    text, reasoning = "".join(e.text for e in events), "".join(e.reasoning for e in events)
    calls = [c for e in events for c in e.tool_calls or []]
    message: dict = {"role": "assistant", "content": text if text.strip() or not calls else None}
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in _calls(calls, 0)]
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def _usage(last: GenerateEvent) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}


def _chat_logprobs(events: list[GenerateEvent]) -> dict:
    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**entry(e.token_text or "", e.logprob or 0.0),
                         "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs or []]}
                        for e in events if e.logprob is not None]}


def _completion_logprobs(events: list[GenerateEvent]) -> dict:
    scored = [e for e in events if e.logprob is not None]
    offsets, at = [], 0
    for e in scored:
        offsets.append(at)
        at += len(e.text)
    return {"tokens": [e.token_text for e in scored], "token_logprobs": [e.logprob for e in scored],
            "top_logprobs": [dict(e.top_logprobs or []) for e in scored], "text_offset": offsets}


def routes(router: Callable[[], RouterClient], check_model: Callable[[str], Awaitable[None]]) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Response:
        await check_model(body.model)
        fields = sampling(body, body.max_completion_tokens or body.max_tokens,
                          body.top_logprobs if body.logprobs else 0, body.logprobs)
        gen = await router().start(**chat_fields(body), **fields)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(_chat_chunks(gen, head, body.logprobs, usage))
        events = await collect(gen)
        last = events[-1]
        return JSONResponse({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": _message(events),
            "logprobs": _chat_logprobs(events) if body.logprobs else None, "finish_reason": last.finish_reason,
        }], "usage": _usage(last)})

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        await check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request is supported", "unsupported", "prompt")
            prompt = prompt[0]
        if body.echo:
            raise ApiError(400, "echo is not supported", "unsupported", "echo")
        want_logprobs = body.logprobs is not None
        fields = sampling(body, body.max_tokens, body.logprobs, want_logprobs)
        gen = await router().start(prompt=prompt, **fields)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(_completion_chunks(gen, head, want_logprobs, usage))
        events = await collect(gen)
        last = events[-1]
        return JSONResponse({**head, "object": "text_completion", "choices": [{
            "index": 0, "text": "".join(e.text for e in events),
            "logprobs": _completion_logprobs(events) if want_logprobs else None, "finish_reason": last.finish_reason,
        }], "usage": _usage(last)})

    return api


async def _chat_chunks(gen: Generation, head: dict, logprobs: bool, usage: bool) -> AsyncIterator[dict]:
    base = {**head, "object": "chat.completion.chunk"}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    calls = 0  # tool calls streamed so far: each new one takes the next index

    def choice(e: GenerateEvent) -> dict:
        nonlocal calls
        delta: dict = {}
        if e.reasoning:
            delta["reasoning_content"] = e.reasoning
        if e.text:
            delta["content"] = e.text
        if e.tool_calls:
            delta["tool_calls"] = _calls(e.tool_calls, calls)
            calls += len(e.tool_calls)
        out = {"index": 0, "delta": delta, "finish_reason": e.finish_reason}
        if logprobs:
            out["logprobs"] = _chat_logprobs([e])
        return out

    async for chunk in _chunks(gen, base, usage, choice):
        yield chunk


async def _completion_chunks(gen: Generation, head: dict, logprobs: bool, usage: bool) -> AsyncIterator[dict]:
    def choice(e: GenerateEvent) -> dict:
        return {"index": 0, "text": e.text, "finish_reason": e.finish_reason,
                "logprobs": _completion_logprobs([e]) if logprobs else None}

    async for chunk in _chunks(gen, {**head, "object": "text_completion"}, usage, choice):
        yield chunk


async def _chunks(gen: Generation, base: dict, usage: bool,
                  choice: Callable[[GenerateEvent], dict]) -> AsyncIterator[dict]:
    """The streamed chunks both endpoints share: one per event with something in it, the usage
    chunk after the last when asked for, an error chunk if generation fails."""
    async for e in gen.events():
        if e.error:
            yield error_body(502, f"generation failed: {e.error}", "upstream_error")
            return
        if e.text or e.reasoning or e.tool_calls or e.finish_reason or e.logprob is not None:
            yield {**base, "choices": [choice(e)]}
        if e.finish_reason and usage:
            yield {**base, "choices": [], "usage": _usage(e)}
