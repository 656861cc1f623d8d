"""Requests to token ids: chat templates, token-id prompts, and the limits on them."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from shared import subjects
from shared.errors import BadRequest, ContextLengthExceeded
from shared.messages import GenerateRequest

MAX_STOPS, MAX_STOP_CHARS = 16, 256


class PromptEncoder:
    def __init__(self, tokenizer: Any, max_context: int, max_prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.max_prompt_tokens = max_prompt_tokens
        self.vocab_size = len(tokenizer.get_vocab())

    def encode(self, req: GenerateRequest) -> list[int]:
        """Token ids of the request's prompt; BadRequest for anything unservable."""
        self._check(req)
        if req.messages is not None:
            ids = self._chat(req.messages)
        elif isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt)
        elif isinstance(req.prompt, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in req.prompt):
                raise BadRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
            ids = list(req.prompt)
        else:
            raise BadRequest("either prompt or messages is required", "prompt")
        param = "messages" if req.messages is not None else "prompt"
        if not ids:
            raise BadRequest("the prompt is empty", param)
        if req.max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
        if len(ids) >= self.max_context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_context} tokens, "
                f"but the prompt has {len(ids)} tokens.", param)
        if len(ids) > self.max_prompt_tokens:
            raise BadRequest(f"the prompt has {len(ids)} tokens; this server accepts at most "
                             f"{self.max_prompt_tokens}", param)
        return ids

    @staticmethod
    def _check(req: GenerateRequest) -> None:
        if not req.stream.startswith(subjects.STREAM_PREFIX + ".") or any(c.isspace() for c in req.stream):
            raise BadRequest(f"stream must be a subject under {subjects.STREAM_PREFIX}", "stream")
        if req.seed is not None and not 0 <= req.seed < 1 << 32:
            raise BadRequest("seed must be in [0, 2**32)", "seed")
        stops = req.stop
        if len(stops) > MAX_STOPS or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops):
            raise BadRequest(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
        if not (req.temperature >= 0 and 0 < req.top_p <= 1 and req.top_k >= 0 and 0 <= req.min_p <= 1
                and 0 <= req.top_logprobs <= 20 and req.timeout_s > 0):
            raise BadRequest("a sampling parameter is out of range", "temperature")

    def _chat(self, messages: list) -> list[int]:
        if not messages:
            raise BadRequest("messages must not be empty", "messages")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise BadRequest("each message needs a string role and string content", "messages")
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except TemplateError as e:  # the model's template refuses this conversation
                raise BadRequest(f"the chat template rejects these messages: {e}", "messages") from None
            return self.tokenizer.encode(text, add_special_tokens=False)
        # No template in the checkpoint: a plain transcript, as most servers fall back to.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.tokenizer.encode(text)
