"""Request bodies of the HTTP API, in OpenAI's and Anthropic's shapes.

Unknown fields are ignored, as OpenAI does; wrong types are a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.messages import MAX_STOP_CHARS, MAX_STOPS, MAX_TOKENS, MAX_TOP_LOGPROBS


# Bounded so that nothing a client sends overflows the bus's JSON (64-bit integers).
Count = Annotated[int, Field(ge=-(1 << 31), le=1 << 31)]
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]
Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS, description="tokens to generate at most")]
Seed = Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1)]  # OpenAI's range, a signed 64-bit integer; each its own key


def _valid_unicode(s: str) -> None:
    if not s.isascii():  # O(1) in CPython: most text never pays for the encode
        try:
            s.encode()
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode: it holds a lone surrogate (\\ud800-\\udfff)") from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _no_lone_surrogates(cls, value: Any) -> Any:
        """JSON may escape half a surrogate pair; no tokenizer or encoder downstream takes one."""
        for s in value if isinstance(value, list) else (value,):
            if isinstance(s, str):
                _valid_unicode(s)
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: str


def text_of(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: MaxTokens | None = Field(default=None, description="tokens to generate at most (default 512)")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1 << 31, description="extension: keep the k most likely tokens (0: all)")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: Seed | None = Field(default=None, description="the same seed gives the same output")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = Field(
        default=None, description=f"up to {MAX_STOPS} stop strings")
    n: Count = Field(default=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] = Field(description="text, or token ids")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="top logprobs per token")
    echo: bool = False


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[TextPart]


class MessagesRequest(_Body):
    model: str
    max_tokens: MaxTokens
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextPart] | None = None
    stop_sequences: list[Stop] | None = Field(default=None, max_length=MAX_STOPS)
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1 << 31)
    stream: bool = False
