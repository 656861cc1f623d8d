"""JSON control messages: small frozen dataclasses, encoded with orjson.

Arrays never travel here; they use the binary format in `shared.wire`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

import orjson

from shared.errors import WireError

M = TypeVar("M")

_SIMPLE = {int: (int,), float: (int, float), str: (str,), bool: (bool,), list: (list,), dict: (dict,)}


def encode(msg: Any) -> bytes:
    return orjson.dumps(dataclasses.asdict(msg))


def decode(cls: type[M], data: bytes) -> M:
    """Decode `data` into `cls`, checking that each simple field has its declared type."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise WireError(f"{cls.__name__}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise WireError(f"{cls.__name__}: expected a JSON object")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(f"{cls.__name__}: missing field {f.name!r}")
            continue
        value = raw[f.name]
        if not _fits(value, hints[f.name]):
            raise WireError(f"{cls.__name__}: field {f.name!r} has the wrong type")
        kwargs[f.name] = value
    return cls(**kwargs)


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    base = origin or hint
    allowed = _SIMPLE.get(base)
    if allowed is None:
        return True
    if base in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, allowed)


@dataclasses.dataclass(frozen=True)
class WorkerAnnounce:
    """A worker says which experts it holds; sent at start, on discover, as heartbeat."""

    worker: str
    subject: str
    model: str  # fingerprint of the checkpoint, so a worker of another model is ignored
    layers: int
    experts: list  # expert ids held, the same in every MoE layer
    leaving: bool = False
    memory: dict = dataclasses.field(default_factory=dict)  # MLX's counters: active, peak, cache (bytes)


@dataclasses.dataclass(frozen=True)
class Discover:
    """The router asks every worker to announce itself now."""

    router: str = ""


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """Gateway -> router: one completion. Events stream to `stream`."""

    request_id: str
    stream: str
    max_tokens: int
    prompt: str | list | None = None  # text or token ids (completions)
    messages: list | None = None  # chat messages (chat completions)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list = dataclasses.field(default_factory=list)  # stop strings
    logprobs: bool = False
    top_logprobs: int = 0
    timeout_s: float = 600.0  # the request's deadline, from acceptance


@dataclasses.dataclass(frozen=True)
class GenerateAccepted:
    request_id: str
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Cancel:
    """Gateway -> router: the client is gone; drop the sequence and free its cache."""

    request_id: str


@dataclasses.dataclass(frozen=True)
class GenerateEvent:
    """Router -> gateway, on the request's stream subject, in order (`index` counts from 0)."""

    request_id: str
    index: int
    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    stop_sequence: str | None = None  # the stop string that ended the text
    logprob: float | None = None  # of `token`, when the request asked for logprobs
    token_text: str | None = None
    top_logprobs: list | None = None  # [[token text, logprob], ...]


@dataclasses.dataclass(frozen=True)
class RouterStatus:
    ready: bool
    model: str
    max_context: int
    workers: list
    experts_covered: int
    experts_total: int
    running: int = 0
    waiting: int = 0
