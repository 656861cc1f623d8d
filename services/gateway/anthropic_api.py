"""POST /v1/messages and /v1/messages/count_tokens, as Anthropic's Messages API serves them.

The conversation's blocks become the router's chat turns: a `tool_use` block is an assistant's
tool call, each `tool_result` block a turn of role "tool", a `thinking` block the turn's
reasoning. The answer's thinking, text and calls come back as blocks in that order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from services.gateway.errors import ApiError
from services.gateway.schemas import (
    AnthropicMessage, ContentBlock, CountTokensRequest, MessagesRequest, TextPart, ThinkingBlock, ToolResultBlock,
    ToolUseBlock,
)
from services.gateway.sse import collect, sse
from services.gateway.upstream import Generation, RouterClient
from shared.messages import MAX_TOOL_CALLS, GenerateEvent, ToolCall

_CHOICES = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}
_THINKING = {"enabled": True, "disabled": False, "adaptive": None}  # adaptive: the model's own default
_SEPARATOR = "\n\n"  # between text blocks: each is its own paragraph (an agent's reminders, then the question)


def prompt_fields(body: CountTokensRequest) -> dict:
    """What the router builds the prompt from: the conversation, the tools and how they may be
    used, the thinking switch. The same for a generation and for counting its tokens."""
    names = [t.name for t in body.tools or []]
    if len(set(names)) != len(names):
        raise invalid("tools", "two tools have the same name")
    choice = body.tool_choice
    kind, name = (_CHOICES[choice.type], choice.name) if choice else ("auto", None)
    if kind in ("required", "function") and not names:
        raise invalid("tool_choice", f'type "{choice.type if choice else kind}" needs tools')
    if kind == "function" and name not in names:
        raise invalid("tool_choice.name", f"{name!r}, which is not among the tools ({', '.join(names)})")
    fields: dict = {"messages": chat_turns(body.system, body.messages), "tool_choice": kind,
                    "tool_name": name if kind == "function" else None,
                    "parallel_tool_calls": not (choice and choice.disable_parallel_tool_use)}
    if body.tools:
        fields["tools"] = [{"name": t.name, "description": t.description, "parameters": t.input_schema}
                           for t in body.tools]
    if body.thinking is not None:
        fields["thinking"] = _THINKING[body.thinking.type]
    return fields


def chat_turns(system: str | list[TextPart] | None, messages: list[AnthropicMessage]) -> list[dict]:
    """The router's ChatTurns for a Messages conversation."""
    system_text = system if isinstance(system, str) else _SEPARATOR.join(p.text for p in system or [])
    turns = [{"role": "system", "content": system_text}] if system_text else []
    names: dict[str, str] = {}  # tool_use id -> its tool: a result's turn names the function it answers
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            turns.append({"role": m.role, "content": m.content})
        elif m.role == "assistant":
            turns.append(_assistant(m.content, i, names))
        else:
            turns += _user(m.content, i, names)
    return turns


def _assistant(blocks: list[ContentBlock], i: int, names: dict[str, str]) -> dict:
    text, reasoning, calls = [], [], []
    for j, b in enumerate(blocks):
        if isinstance(b, TextPart):
            text.append(b.text)
        elif isinstance(b, ThinkingBlock):
            reasoning.append(b.thinking)
        elif isinstance(b, ToolUseBlock):
            calls.append({"id": b.id, "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)})
            names[b.id] = b.name
        elif b.type != "redacted_thinking":  # encrypted by Anthropic: nothing a local model can read
            raise _misplaced(b, "assistant", i, j)
    if len(calls) > MAX_TOOL_CALLS:
        raise invalid(f"messages[{i}].content", f"{len(calls)} tool_use blocks; at most {MAX_TOOL_CALLS} are "
                                                "accepted in one turn")
    turn: dict = {"role": "assistant", "content": _SEPARATOR.join(text)}
    if calls:
        turn["tool_calls"] = calls
    if reasoning:
        turn["reasoning"] = "".join(reasoning)
    return turn


def _user(blocks: list[ContentBlock], i: int, names: dict[str, str]) -> list[dict]:
    """One "tool" turn per tool_result, in order, then the turn's text (Anthropic puts the
    results first; chat templates expect them right after the calls)."""
    results, text = [], []
    for j, b in enumerate(blocks):
        if isinstance(b, TextPart):
            text.append(b.text)
        elif isinstance(b, ToolResultBlock):
            if b.tool_use_id not in names:
                raise invalid(f"messages[{i}].content[{j}].tool_use_id",
                              f"{b.tool_use_id!r} is the id of no earlier tool_use block")
            content = ("Error: " if b.is_error else "") + _result_text(b, i, j)
            results.append({"role": "tool", "tool_call_id": b.tool_use_id, "name": names[b.tool_use_id],
                            "content": content})
        else:
            raise _misplaced(b, "user", i, j)
    return results + ([{"role": "user", "content": _SEPARATOR.join(text)}] if text or not results else [])


def _result_text(b: ToolResultBlock, i: int, j: int) -> str:
    if b.content is None or isinstance(b.content, str):
        return b.content or ""
    for k, part in enumerate(b.content):
        if not isinstance(part, TextPart):
            raise invalid(f"messages[{i}].content[{j}].content[{k}].type",
                          f"{part.type!r} blocks are not supported in a tool_result: this server reads text only")
    return _SEPARATOR.join(p.text for p in b.content if isinstance(p, TextPart))


def _misplaced(b: ContentBlock, role: str, i: int, j: int) -> ApiError:
    home = {"tool_use": "assistant", "thinking": "assistant", "tool_result": "user"}.get(b.type)
    if home is not None:
        why = f"{b.type!r} blocks belong in {home} turns, not in a {role} turn"
    elif b.type in ("image", "document"):
        why = f"{b.type!r} blocks are not supported: this server reads text only"
    else:
        why = f"content blocks of type {b.type!r} are not supported"
    return invalid(f"messages[{i}].content[{j}].type", why)


def invalid(param: str, why: str) -> ApiError:
    """A 400 that names its place in the message: Anthropic's error shape has no `param`."""
    return ApiError(400, f"Invalid '{param}': {why}.", "invalid_value", param)


def stop_reason(e: GenerateEvent) -> str:
    if e.finish_reason == "tool_calls":
        return "tool_use"
    if e.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if e.stop_sequence else "end_turn"


def tool_use(c: ToolCall) -> dict:
    # The router's id as it is: the client sends it back in tool_result, and the template shows it.
    try:
        arguments = json.loads(c.arguments or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ApiError(502, f"the router sent arguments of {c.name!r} that are not a JSON object: "
                            f"{c.arguments[:80]!r}", "upstream_error")
    return {"type": "tool_use", "id": c.id, "name": c.name, "input": arguments}


def content(events: list[GenerateEvent]) -> list[dict]:
    """Thinking, then text, then one tool_use block per call. Whitespace beside calls is no
    answer; an empty answer is still one (empty) text block, as clients read content[0]."""
    text, reasoning = "".join(e.text for e in events), "".join(e.reasoning for e in events)
    calls = [c for e in events for c in e.tool_calls or []]
    blocks = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
    if text.strip() or not calls and (text or not reasoning):
        blocks.append({"type": "text", "text": text})
    return blocks + [tool_use(c) for c in calls]


def routes(router: Callable[[], RouterClient], check_model: Callable[[str], Awaitable[None]]) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/messages")
    async def messages(body: MessagesRequest) -> Response:
        fields = prompt_fields(body)  # a bad conversation is a 400 whatever the model
        await check_model(body.model)
        gen = await router().start(**fields, max_tokens=body.max_tokens, temperature=body.temperature,
                                   top_p=body.top_p, top_k=body.top_k, stop=body.stop_sequences or [])
        message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": body.model}
        if body.stream:
            return sse(_events(gen, message), named=True, done=False)
        events = await collect(gen)
        last = events[-1]
        return JSONResponse({**message, "content": content(events), "stop_reason": stop_reason(last),
                             "stop_sequence": last.stop_sequence,
                             "usage": {"input_tokens": last.prompt_tokens, "output_tokens": last.completion_tokens,
                                       "cache_read_input_tokens": last.cached_tokens}})

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> dict:
        fields = prompt_fields(body)
        await check_model(body.model)
        return {"input_tokens": await router().count_tokens(**fields)}

    return api


class StreamedBlocks:
    """The content_block_* events of a streamed answer: a block opens when the kind of content
    changes, so the blocks come out as `content()` builds them."""

    def __init__(self) -> None:
        self.index = -1  # of the open block, or of the last one
        self.kind: str | None = None  # of the open block
        self.pending = ""  # whitespace not yet in a text block: no answer if a call follows
        self.calls = 0

    def _open(self, kind: str, block: dict) -> list[dict]:
        out = self.close()
        self.index, self.kind = self.index + 1, kind
        return [*out, {"type": "content_block_start", "index": self.index, "content_block": block}]

    def close(self) -> list[dict]:
        if self.kind is None:
            return []
        out = [self._delta({"type": "signature_delta", "signature": ""})] if self.kind == "thinking" else []
        self.kind = None
        return [*out, {"type": "content_block_stop", "index": self.index}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def thinking(self, text: str) -> list[dict]:
        out = [] if self.kind == "thinking" else self._open("thinking", {"type": "thinking", "thinking": "",
                                                                           "signature": ""})
        return [*out, self._delta({"type": "thinking_delta", "thinking": text})]

    def text(self, text: str) -> list[dict]:
        if self.kind == "text":
            return [self._delta({"type": "text_delta", "text": text})]
        self.pending += text
        if not self.pending.strip():
            return []
        text, self.pending = self.pending, ""
        return [*self._open("text", {"type": "text", "text": ""}), self._delta({"type": "text_delta", "text": text})]

    def tool_call(self, c: ToolCall) -> list[dict]:
        self.pending, self.calls = "", self.calls + 1
        out = self._open("tool_use", {"type": "tool_use", "id": c.id, "name": c.name, "input": {}})
        return [*out, self._delta({"type": "input_json_delta", "partial_json": c.arguments})]

    def event(self, e: GenerateEvent) -> list[dict]:
        out = self.thinking(e.reasoning) if e.reasoning else []
        out += self.text(e.text) if e.text else []
        for c in e.tool_calls or []:
            out += self.tool_call(c)
        return out

    def finish(self) -> list[dict]:
        """Whitespace held back is the answer if no call came; no block at all: an empty text block."""
        if self.kind != "text" and (self.pending and not self.calls or self.index < 0):
            text, self.pending = self.pending, ""
            out = self._open("text", {"type": "text", "text": ""})
            return [*out, *([self._delta({"type": "text_delta", "text": text})] if text else []), *self.close()]
        return self.close()


async def _events(gen: Generation, message: dict) -> AsyncIterator[dict]:
    """message_start, ping, the content blocks (start, deltas, stop), message_delta,
    message_stop: the sequence Anthropic's clients expect."""
    yield {"type": "message_start", "message": {
        **message, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": gen.accepted.prompt_tokens, "output_tokens": 0}}}
    yield {"type": "ping"}
    blocks = StreamedBlocks()
    async for e in gen.events():
        if e.error:
            yield {"type": "error", "error": {"type": "api_error", "message": f"generation failed: {e.error}"}}
            return
        for out in blocks.event(e):
            yield out
        if e.finish_reason:
            for out in blocks.finish():
                yield out
            yield {"type": "message_delta", "delta": {"stop_reason": stop_reason(e), "stop_sequence": e.stop_sequence},
                   "usage": {"output_tokens": e.completion_tokens, "cache_read_input_tokens": e.cached_tokens}}
            yield {"type": "message_stop"}
