"""Generation on the router: prompts to token ids, the decode loop, events out.

The loop is mlx-lm's `generate_step`; the model inside it has its experts on the bus.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from shared.errors import BadRequest, ContextLengthExceeded, MoebusError
from shared.logs import get_logger
from shared.messages import GenerateEvent, GenerateRequest
from shared.model import ModelInfo

log = get_logger("engine")
Emit = Callable[[GenerateEvent], None]


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, info: ModelInfo) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.vocab_size = len(tokenizer.get_vocab())

    def encode_prompt(self, req: GenerateRequest) -> list[int]:
        """Token ids of the request's prompt; BadRequest for anything unservable."""
        if req.messages is not None:
            ids = self._encode_chat(req.messages)
        elif isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt)
        elif isinstance(req.prompt, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in req.prompt):
                raise BadRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
            ids = list(req.prompt)
        else:
            raise BadRequest("either prompt or messages is required", "prompt")
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        if req.max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
        if len(ids) >= self.info.max_context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.info.max_context} tokens, "
                f"but the prompt has {len(ids)} tokens.",
                "messages" if req.messages is not None else "prompt",
            )
        return ids

    def _encode_chat(self, messages: list) -> list[int]:
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise BadRequest("each message needs a string role and string content", "messages")
        if not messages:
            raise BadRequest("messages must not be empty", "messages")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        # No template in the checkpoint: a plain transcript, as most servers fall back to.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.tokenizer.encode(text)

    def generate(self, req: GenerateRequest, ids: list[int], emit: Emit) -> None:
        """Runs on the MLX thread; emits one event per token and a final one."""
        max_tokens = min(req.max_tokens, self.info.max_context - len(ids))
        sampler = make_sampler(temp=req.temperature, top_p=req.top_p if req.top_p < 1.0 else 0.0)
        stops = set(self.tokenizer.eos_token_ids) | set(req.stop_token_ids)
        detok = self.tokenizer.detokenizer
        n, index, finish = 0, 0, "length"
        try:
            for token, _ in generate_step(mx.array(ids), self.model, max_tokens=max_tokens, sampler=sampler):
                token = int(token)
                if token in stops:
                    finish = "stop"
                    break
                n += 1
                detok.add_token(token)
                emit(GenerateEvent(req.request_id, index, detok.last_segment, token))
                index += 1
        except Exception as e:  # noqa: BLE001 - the client must hear of every failure
            error = str(e) if isinstance(e, MoebusError) else f"internal error: {e!r}"
            log.warning("generation failed", request=req.request_id, error=error)
            emit(GenerateEvent(req.request_id, index, finish_reason="error", error=error,
                               prompt_tokens=len(ids), completion_tokens=n))
            return
        detok.finalize()
        emit(GenerateEvent(req.request_id, index, detok.last_segment, None, finish, len(ids), n))
