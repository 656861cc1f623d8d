"""Request bodies of the HTTP API, in OpenAI's and Anthropic's shapes.

Unknown fields are ignored, as OpenAI does; wrong types are a 400.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator,
)

from shared.messages import MAX_STOP_CHARS, MAX_STOPS, MAX_TOKENS, MAX_TOOL_CALLS, MAX_TOOLS, MAX_TOP_LOGPROBS, ToolName


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


MAX_SCHEMA_BYTES = 64 << 10


def _encodable_schema(value: dict[str, Any]) -> dict[str, Any]:
    """A schema travels to the router as JSON: it must encode, and stay small."""
    try:
        size = len(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError):
        raise ValueError("not encodable as JSON (a lone surrogate, or a number too large)") from None
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"a schema of {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
    return value


JsonSchema = Annotated[dict[str, Any], AfterValidator(_encodable_schema), Field(description="a JSON schema")]


class FunctionCall(_Body):
    name: ToolName
    arguments: str = Field(default="{}", description="the arguments as JSON text")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value or "{}")
        except ValueError:
            raise ValueError("arguments must be JSON text of an object") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be JSON text of an object")
        return value or "{}"


class ChatToolCall(_Body):
    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: Annotated[list[ChatToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: str | None = Field(default=None, max_length=128)
    name: str | None = Field(default=None, max_length=64)
    reasoning_content: str | None = None  # a previous answer's thinking, as moebus returned it


class FunctionDef(_Body):
    name: ToolName
    description: str = ""
    parameters: JsonSchema = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # calls are always valid under the schema when forced


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: ToolName


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = Field(default="response", max_length=64)
    description: str = ""
    schema_: JsonSchema | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the answer always follows the schema


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatTemplateKwargs(_Body):
    enable_thinking: bool | None = None


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
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = Field(
        default=None, description="extension: enable_thinking switches a thinking model's reasoning on or off")


class CompletionRequest(_Sampling):
    prompt: str | list[TokenId] | list[str] = Field(description="text, or token ids")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description="top logprobs per token")
    echo: bool = False


def _json_encodable(value: dict[str, Any]) -> dict[str, Any]:
    """A tool's input travels to the router as JSON text: no lone surrogates, no integers past 64 bits."""
    try:
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        raise ValueError("not encodable as JSON (a lone surrogate, or a number too large)") from None
    return value


class ToolUseBlock(_Body):
    """A call the assistant made, as the client sends it back in the conversation."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=128)
    name: ToolName
    input: Annotated[dict[str, Any], AfterValidator(_json_encodable)] = Field(default_factory=dict)


class ThinkingBlock(_Body):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""  # moebus signs nothing; whatever comes back is ignored


class OtherBlock(_Body):
    """A block moebus does not read (images, documents, server tools' blocks): refused by name,
    or skipped (redacted_thinking)."""

    type: str = Field(max_length=64)


_BLOCK_TAGS = {"text": "TextPart", "tool_use": "ToolUseBlock", "tool_result": "ToolResultBlock",
               "thinking": "ThinkingBlock"}


def _block_tag(value: Any) -> str | None:
    """The block's class by its `type`; None (not an object) is a type error at the block itself."""
    if not isinstance(value, (dict, BaseModel)):
        return None
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _BLOCK_TAGS.get(kind, "OtherBlock") if isinstance(kind, str) else "OtherBlock"


def _result_tag(value: Any) -> str | None:
    tag = _block_tag(value)
    return tag if tag in (None, "TextPart") else "OtherBlock"


def _blocks(tag: Any) -> Discriminator:
    return Discriminator(tag, custom_error_type="dict_type")


# Tags start with a capital: the error messages leave them out of a parameter's path.
ResultBlock = Annotated[Annotated[TextPart, Tag("TextPart")] | Annotated[OtherBlock, Tag("OtherBlock")],
                        _blocks(_result_tag)]


class ToolResultBlock(_Body):
    """A tool's answer to the call `tool_use_id`, in a user turn."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=128)
    content: str | list[ResultBlock] | None = None
    is_error: bool = False

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_blocks(cls, value: Any) -> Any:
        # Checked here: the union's own error would blame the enclosing message's content.
        if value is not None and not isinstance(value, (str, list)):
            raise ValueError("expected a string or an array of content blocks")
        return value


ContentBlock = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[ToolUseBlock, Tag("ToolUseBlock")]
    | Annotated[ToolResultBlock, Tag("ToolResultBlock")] | Annotated[ThinkingBlock, Tag("ThinkingBlock")]
    | Annotated[OtherBlock, Tag("OtherBlock")],
    _blocks(_block_tag)]


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class AnthropicTool(_Body):
    """A client tool; Anthropic's server tools (web search, code execution, ...) are refused."""

    type: Literal["custom"] | None = None
    name: ToolName
    description: str = ""
    input_schema: JsonSchema

    @model_validator(mode="before")
    @classmethod
    def _client_tool(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") not in (None, "custom"):
            raise ValueError(f"tools of type {str(value['type'])[:64]!r} (Anthropic's server tools) are not "
                             "supported; give a custom tool: name, description, input_schema")
        return value

    @field_validator("input_schema")
    @classmethod
    def _object(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type") != "object":
            raise ValueError('input_schema must be a JSON schema with "type": "object" (a tool\'s input is an object)')
        return value


class AnthropicToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: ToolName | None = None  # the tool to call, for type "tool"
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> AnthropicToolChoice:
        if self.type == "tool" and self.name is None:
            raise ValueError('tool_choice of type "tool" needs the name of the tool')
        return self


class ThinkingConfig(_Body):
    # adaptive: the model decides, as a thinking model does by default
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)  # accepted; the model ends its thinking


class CountTokensRequest(_Body):
    """The prompt of a Messages request: what POST /v1/messages/count_tokens counts."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextPart] | None = None
    tools: Annotated[list[AnthropicTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: MaxTokens
    stop_sequences: list[Stop] | None = Field(default=None, max_length=MAX_STOPS)
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1 << 31)
    stream: bool = False
