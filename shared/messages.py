"""JSON control messages: frozen pydantic models, validated on decode, encoded with orjson.

Arrays never travel here; they use the binary format in `shared.wire`. Every message from the
bus is untrusted: the models bound every field (subjects without wildcards, finite numbers,
limits the HTTP API also applies), so a forged message is refused with a clear error.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import subjects
from shared.errors import WireError

M = TypeVar("M", bound=BaseModel)

MAX_STOPS, MAX_STOP_CHARS = 16, 256
MAX_TOKENS = 1 << 31
MAX_TIMEOUT_S = 24 * 3600.0  # the longest request deadline the router accepts
MAX_TOP_LOGPROBS = 20
DEFAULT_DEADLINE_S = 600.0  # a request's deadline unless the gateway says otherwise

_ID = r"[A-Za-z0-9_-]{1,64}"
Name = Annotated[str, Field(pattern=rf"^{_ID}$")]
# A subject a peer may give us to publish to: plain tokens, no wildcards, no spaces.
Subject = Annotated[str, Field(pattern=rf"^{_ID}(\.{_ID}){{1,15}}$")]
StreamSubject = Annotated[str, Field(pattern=rf"^{re.escape(subjects.STREAM_PREFIX)}\.{_ID}$")]
Count = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
Big = Annotated[int, Field(ge=0, le=1 << 53)]  # counters and versions: JSON-safe, never past 64 bits
TokenId = Annotated[int, Field(ge=0, lt=MAX_TOKENS)]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="ignore", allow_inf_nan=False)


def encode(msg: BaseModel) -> bytes:
    return orjson.dumps(msg.model_dump())


def decode(cls: type[M], data: bytes) -> M:
    """Decode and validate `data` as `cls`; WireError names the first bad field."""
    try:
        return cls.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WireError(f"{cls.__name__}: {where + ': ' if where else ''}{first['msg']}",
                        param=str(first["loc"][0]) if first["loc"] else None) from None


class WorkerAnnounce(Message):
    """A worker's heartbeat: who it is, what it can hold, what it holds; sent every second, at
    once when it has loaded a placement's share, and on discover."""

    worker: Name  # unique to the process (host and a random suffix)
    subject: Subject  # where it answers expert requests
    model: str = Field(max_length=64)  # fingerprint of the checkpoint: a worker of another model is ignored
    layers: Count
    experts: list[Annotated[int, Field(ge=0, lt=1 << 16)]] = Field(max_length=1 << 16)  # held in every MoE layer
    host: str = Field(default="", max_length=64)
    capacity: int = Field(default=0, ge=0, le=1 << 16)  # experts it may hold (its memory budget)
    speed: float = Field(default=0.0, ge=0.0, le=1e9)  # measured GFLOP/s
    loaded: Big = 0  # the newest placement version whose share it holds
    draining: bool = False  # leaving: place its experts elsewhere
    leaving: bool = False  # gone now
    tokens: Big = 0  # (token, expert) pairs served
    memory: dict[str, Big] = Field(default_factory=dict, max_length=16)  # MLX's counters (bytes)
    flash: dict[str, Big] = Field(default_factory=dict, max_length=16)  # a flash-cache's counters
    # flash: a flash-cache, which serves any expert from SSD (placed what DRAM workers do not hold)
    backend: str = Field(default="dram", pattern=r"^(dram|flash)$")


class Discover(Message):
    """Anyone asks every worker to announce itself now."""

    router: str = Field(default="", max_length=64)


MAX_TOOLS = 128
MAX_TOOL_CALLS = 64  # in one assistant turn, and generated in one answer
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]  # OpenAI's and Anthropic's rule


class ToolCall(Message):
    """A call of one function: what the model generated, or what a client sends back in an
    assistant turn. `arguments` is JSON text, as OpenAI carries it."""

    id: str = Field(max_length=128)
    name: ToolName
    arguments: str


class Tool(Message):
    """A function the model may call; `parameters` is its arguments' JSON schema."""

    name: ToolName
    description: str | None = None  # None: not given (templates render what the client sent, no more)
    parameters: dict[str, Any] | None = None

    def schema_(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}

    def rendered(self) -> dict[str, Any]:
        """As chat templates read a tool (OpenAI's shape)."""
        return {"type": "function", "function": self.model_dump(exclude_none=True)}


class ResponseFormat(Message):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # the schema itself (type json_schema)


class ChatTurn(Message):
    role: str = Field(max_length=64)
    content: str
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)  # an assistant's calls
    tool_call_id: str | None = Field(default=None, max_length=128)  # a tool result: the call it answers
    name: str | None = Field(default=None, max_length=64)  # a tool result: the function's name
    reasoning: str | None = None  # an assistant's thinking, where the template renders it


class GenerateRequest(Message):
    """Gateway -> router: one completion. Events stream to `stream`."""

    request_id: Name
    stream: StreamSubject
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)  # the context bounds it further
    prompt: str | list[TokenId] | None = None  # text or token ids (completions)
    messages: list[ChatTurn] | None = None  # chat messages (chat completions)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # as the HTTP API: 0 is greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOKENS)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 63) - 1)  # OpenAI's range: a signed 64-bit integer
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] = Field(default_factory=list, max_length=MAX_STOPS)
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    timeout_s: float = Field(default=DEFAULT_DEADLINE_S, gt=0.0, le=MAX_TIMEOUT_S)  # the deadline, from acceptance
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)  # rendered by the chat template
    # auto: the model decides; none: tools hidden; required: at least one call; function: a call of `tool_name`
    tool_choice: Literal["auto", "none", "required", "function"] = "auto"
    tool_name: ToolName | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    thinking: bool | None = None  # the template's thinking switch (enable_thinking); None: the model's default


class GenerateAccepted(Message):
    request_id: str
    prompt_tokens: int
    router: str = ""  # the accepting router process: a stream outlives it only if it is still there


class Cancel(Message):
    """Gateway -> router: the client is gone; drop the sequence and free its cache."""

    request_id: Name


class GenerateEvent(Message):
    """Router -> gateway, on the request's stream subject, in order (`index` counts from 0)."""

    request_id: str
    index: int
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those taken from the prompt cache (not prefilled)
    error: str | None = None
    stop_sequence: str | None = None  # the stop string that ended the text
    logprob: float | None = None  # of `token`, when the request asked for logprobs
    token_text: str | None = None
    top_logprobs: list[tuple[str, float | None]] | None = None  # [[token text, logprob], ...]
    reasoning: str = ""  # thinking text, apart from the answer's `text`
    tool_calls: list[ToolCall] | None = None  # calls completed with this event, in order


class TokenCount(Message):
    """Router -> gateway: the prompt's length in tokens, as a GenerateRequest would have it."""

    prompt_tokens: int


class RouterStatus(Message):
    ready: bool
    model: str
    max_context: int
    workers: list[str]
    experts_covered: int
    experts_total: int
    running: int = 0
    waiting: int = 0
    router: str = ""  # this router process's id (GenerateAccepted.router)
    unready_reason: str = ""
    unowned_experts: list[int] = Field(default_factory=list)
    kv_bytes_in_use: int = 0  # reserved by running sequences' KV caches (prompt + max_tokens each)
    kv_budget_bytes: int = 0  # --kv-budget: sequences wait to start beyond it
    prompt_cache_bytes: int = 0  # finished prompts' KV caches kept for reuse
    mlx_active_bytes: int = 0  # the router's MLX memory now: weights, KV caches, prompt cache


class WorkerStatus(Message):
    worker: str
    host: str
    capacity: int
    experts: list[int]  # held now
    tokens: int  # (token, expert) pairs served
    last_heartbeat_s: float  # seconds ago
    loaded: int
    draining: bool
    speed: float
    backend: str = "dram"  # or flash: a flash-cache, serving from SSD


class ClusterStatus(Message):
    """Router -> `moebus status`: the workers, the placement and where the load goes."""

    model: str
    ready: bool
    placement_version: int
    pending_version: int | None
    replicas: int
    workers: list[WorkerStatus]
    unowned_experts: list[int]
    expert_load: list[int]  # tokens routed to each expert so far
    owners: list[list[str]]  # the active placement: expert -> workers (in any layer)
    pair_load: list[list[int]] = Field(default_factory=list)  # per MoE layer, tokens routed to each expert
    layers: list[list[list[str]]] | None = None  # a tiered cluster's placement: per MoE layer, expert -> workers
    kv_bytes_in_use: int = 0  # as in RouterStatus
    kv_budget_bytes: int = 0
    prompt_cache_bytes: int = 0
    mlx_active_bytes: int = 0
