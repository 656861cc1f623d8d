"""Requests to token ids: chat templates, token-id prompts, and the limits on them."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from shared.errors import BadRequest, ContextLengthExceeded
from shared.messages import ChatTurn, GenerateRequest


class PromptEncoder:
    def __init__(self, tokenizer: Any, max_context: int, max_prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.max_prompt_tokens = max_prompt_tokens
        self.vocab_size = len(tokenizer.get_vocab())

    def encode(self, req: GenerateRequest) -> list[int]:
        """Token ids of the request's prompt; BadRequest for anything unservable."""
        if req.messages is not None:
            ids = self._chat(req.messages)
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

    def _chat(self, turns: list[ChatTurn]) -> list[int]:
        if not turns:
            raise BadRequest("messages must not be empty", "messages")
        messages = [t.model_dump() for t in turns]
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except TemplateError as e:  # the model's template refuses this conversation
                raise BadRequest(f"the chat template rejects these messages: {e}", "messages") from None
            return self.tokenizer.encode(text, add_special_tokens=False)
        # No template in the checkpoint: a plain transcript, as most servers fall back to.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.tokenizer.encode(text)
