"""Requests to token ids: chat templates, token-id prompts, and the limits on them."""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError

from shared.errors import BadRequest, ContextLengthExceeded
from shared.messages import ChatTurn, GenerateRequest, ToolCall


class PromptEncoder:
    def __init__(self, tokenizer: Any, max_context: int, max_prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.max_prompt_tokens = max_prompt_tokens
        self.vocab_size = len(tokenizer.get_vocab())

    def encode(self, req: GenerateRequest) -> list[int]:
        """Token ids of the request's prompt; BadRequest for anything unservable."""
        if req.messages is not None:
            ids = self._chat(req)
        elif isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt)
        elif isinstance(req.prompt, list):
            if not all(t < self.vocab_size for t in req.prompt):
                raise BadRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
            ids = list(req.prompt)
        else:
            raise BadRequest("either prompt or messages is required", "prompt")
        param = "messages" if req.messages is not None else "prompt"
        if not ids:
            raise BadRequest("the prompt is empty", param)
        if len(ids) >= self.max_context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_context} tokens, "
                f"but the prompt has {len(ids)} tokens.", param)
        if len(ids) > self.max_prompt_tokens:
            raise BadRequest(f"the prompt has {len(ids)} tokens; this server accepts at most "
                             f"{self.max_prompt_tokens}", param)
        return ids

    def _chat(self, req: GenerateRequest) -> list[int]:
        turns = req.messages or []
        if not turns:
            raise BadRequest("messages must not be empty", "messages")
        tools = req.tools if req.tool_choice != "none" else None  # "none": the model is not told of them
        uses_tools = bool(tools) or any(t.tool_calls or t.role == "tool" for t in turns)
        if uses_tools and not getattr(self.tokenizer, "has_tool_calling", False):
            raise BadRequest("this model's chat template has no tool calling (mlx-lm finds no tool-call "
                             "format for it): tools and tool messages cannot be used with it", "tools")
        messages = [_turn(t) for t in turns]
        if getattr(self.tokenizer, "chat_template", None):
            extra: dict[str, Any] = {}
            if tools:
                extra["tools"] = [t.rendered() for t in tools]
            if req.thinking is not None:
                extra["enable_thinking"] = req.thinking
            elif req.response_format is not None and req.response_format.type != "text" or \
                    req.tool_choice in ("required", "function"):
                extra["enable_thinking"] = False  # a constrained answer starts at once
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                          **extra)
            except TemplateError as e:  # the model's template refuses this conversation
                raise BadRequest(f"the chat template rejects these messages: {e}", "messages") from None
            return self.tokenizer.encode(text, add_special_tokens=False)
        # No template in the checkpoint: a plain transcript, as most servers fall back to.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.tokenizer.encode(text)


def _turn(t: ChatTurn) -> dict[str, Any]:
    """A message as Hugging Face chat templates read it."""
    out: dict[str, Any] = {"role": t.role, "content": t.content}
    if t.tool_calls:
        out["tool_calls"] = [_call(c) for c in t.tool_calls]
    if t.tool_call_id is not None:
        out["tool_call_id"] = t.tool_call_id
    if t.name is not None:
        out["name"] = t.name
    if t.reasoning:
        out["reasoning_content"] = t.reasoning
    return out


def _call(c: ToolCall) -> dict[str, Any]:
    # Templates write arguments with `tojson`: a dict, not the JSON text OpenAI carries.
    try:
        arguments: Any = json.loads(c.arguments)
    except ValueError:
        arguments = c.arguments
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}}
