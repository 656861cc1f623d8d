"""Constrained decoding: JSON output and forced tool calls as llguidance grammars, applied to
one sequence as an mlx-lm logits processor, so constrained and free sequences share a batch.

Grammars are built here (pure functions of the request and the model's tool-call format) and
compiled on a worker thread when the request arrives: a schema the engine cannot compile is a
400 then, never a failure mid-stream.
"""

from __future__ import annotations

import json
import time
from typing import Any

import llguidance as llg
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from shared.errors import BadRequest
from shared.messages import GenerateRequest, Tool

# Compact JSON with one space after ',' and ':' (json.dumps's style, what models mostly write):
# no free whitespace, so a model cannot pad its answer until max_tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_PARALLEL_CALLS = 8  # calls in one constrained answer, when parallel calls are allowed
# Tool-call formats (mlx-lm's parser names) that moebus can force: how one call is written.
FORCEABLE = ("json_tools", "mistral")


class Markers:
    """How the model's tool-call and thinking markers are written in a grammar: a marker that
    is one token of the vocabulary is that token (llguidance treats added tokens as tokens, not
    text); otherwise its text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text)


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}


def _call_object(tool: Tool) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.schema_()},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_grammar(fmt: str, tools: list[Tool], parallel: bool, marker: Markers,
                      start: str, end: str) -> str:
    """A Lark grammar for one or more calls of `tools`, in the model's own syntax `fmt`."""
    most = MAX_PARALLEL_CALLS if parallel else 1
    if fmt == "json_tools":  # <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
        body = _schema({"anyOf": [_call_object(t) for t in tools]})
        more = f' ("\\n" call){{0,{most - 1}}}' if most > 1 else ""
        return (f"start: call{more}\n"
                f'call: {marker(start)} "\\n" body "\\n" {marker(end)}\n'
                f"body: %json {json.dumps(body)}\n")
    if fmt == "mistral":  # [TOOL_CALLS]name[ARGS]{...}name[ARGS]{...}
        alts = "\n    | ".join(f'{json.dumps(t.name)} {marker("[ARGS]")} %json {json.dumps(_schema(t.schema_()))}'
                                for t in tools)
        return f"start: {marker(start)} call{{1,{most}}}\ncall: {alts}\n"
    raise BadRequest(f"moebus cannot force a call in this model's tool-call format ({fmt}); "
                     f"it can for {', '.join(FORCEABLE)}. Use tool_choice \"auto\"", "tool_choice")


def grammar_for(req: GenerateRequest, fmt: str | None, marker: Markers, start: str | None,
                end: str | None) -> str | None:
    """The grammar a request's answer must follow, or None when it is free."""
    if req.tool_choice in ("required", "function") and req.tools:
        tools = [t for t in req.tools if req.tool_choice == "required" or t.name == req.tool_name]
        if not tools:
            raise BadRequest(f"tool_choice names {req.tool_name!r}, which is not among the tools", "tool_choice")
        if fmt is None or start is None:
            raise BadRequest("this model's chat template has no tool-call format", "tools")
        return tool_call_grammar(fmt, tools, req.parallel_tool_calls and req.tool_choice == "required",
                                 marker, start, end or "")
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return llg.LLMatcher.grammar_from_json_schema(_schema({"type": "object"}))
    if rf.json_schema is None:
        raise BadRequest("response_format json_schema needs a schema", "response_format")
    return llg.LLMatcher.grammar_from_json_schema(_schema(rf.json_schema))


class Grammars:
    """The router's grammar compiler, for its tokenizer and its model's logits."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        backend = tokenizer.backend_tokenizer  # the Rust tokenizer llguidance reads (fast tokenizers have one)
        probe = '{"a": [0, -1.5e3, true, null], "b": "x\\"y"}'
        if tokenizer.decode(tokenizer.encode(probe, add_special_tokens=False)).strip() != probe:
            raise ValueError("its tokens cannot spell JSON (a word-level vocabulary)")
        self.eos = sorted(tokenizer.eos_token_ids)
        self.vocab_size = vocab_size  # the logits' width, which may exceed the tokenizer's
        self.lltok = llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=self.eos)
        self.marker = Markers(tokenizer)
        self.format = tokenizer.init_kwargs.get("tool_parser_type") if tokenizer.has_tool_calling else None
        self.start, self.end = tokenizer.tool_call_start, tokenizer.tool_call_end

    def check_tools(self, tools: list[Tool]) -> None:
        """Every tool's parameters must be a schema the engine reads, whatever tool_choice is."""
        for i, t in enumerate(tools):
            if t.schema_().get("type", "object") != "object":
                raise BadRequest(f"tool {t.name!r}: parameters must be a JSON schema of type object",
                                 f"tools.{i}.parameters")
            error = llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_json_schema(t.schema_()), self.lltok)
            if error and not error.startswith("WARNING"):
                raise BadRequest(f"tool {t.name!r}: its parameters schema is not usable: {_first_line(error)}",
                                 f"tools.{i}.parameters")

    def compile(self, req: GenerateRequest) -> GrammarProcessor | None:
        """The request's logits processor; BadRequest naming why a grammar cannot be built."""
        if req.tools:
            self.check_tools(req.tools)
        try:
            grammar = grammar_for(req, self.format, self.marker, self.start, self.end)
        except ValueError as e:  # llguidance: not a JSON object
            raise BadRequest(f"the schema is not valid JSON schema: {e}", "response_format") from None
        if grammar is None:
            return None
        matcher = llg.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            param = "tools" if req.tool_choice in ("required", "function") else "response_format"
            raise BadRequest(f"the schema cannot be used for constrained output: {_first_line(matcher.get_error())}",
                             param)
        return GrammarProcessor(matcher, self.vocab_size, self.eos)


def _first_line(error: str) -> str:
    return error.strip().splitlines()[0][:500] if error.strip() else "unknown error"


class GrammarProcessor:
    """An mlx-lm logits processor for one sequence: tokens its grammar forbids get -inf.

    BatchGenerator calls it once per step with the tokens so far; the first call's last token
    is the prompt's, every later one's is the token just sampled, which the grammar consumes.
    """

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, eos: list[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos = set(eos)
        self.bitmask = allocate_token_bitmask(1, vocab_size)
        self.started = False
        self.error: str | None = None  # the grammar gave up (a limit hit): the sequence ends
        self.mask_s = 0.0  # time spent computing masks, and how many: the metrics' mask time per token
        self.masks = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            last = tokens[-1].item()
            # After the grammar's end only EOS can come; BatchGenerator may still step once.
            if not (last in self.eos and self.matcher.is_accepting()) and not self.matcher.consume_token(last):
                self.error = _first_line(self.matcher.get_error())
        self.started = True
        if self.error is None and self.matcher.is_error():
            self.error = _first_line(self.matcher.get_error())
        if self.error is not None:  # only EOS: the engine reports why the sequence ended
            self.bitmask[:] = 0
            for e in self.eos:
                self.bitmask.view(np.uint32)[0, e >> 5] |= np.uint32(1 << (e & 31))
        else:
            started = time.perf_counter()
            fill_next_token_bitmask(self.matcher, self.bitmask)
            self.mask_s += time.perf_counter() - started
            self.masks += 1
        # The packed mask (one bit per token) unpacked by MLX, beside the logits: no vocabulary-wide
        # array crosses from numpy. Tokens past the mask's end (lm_head rows the tokenizer lacks) stay off.
        words = mx.array(self.bitmask[0])
        # (An array made at import would belong to another thread's stream: the lanes have their own.)
        allowed = ((words[:, None] >> mx.arange(32, dtype=mx.int32)) & 1).reshape(-1)
        width = logits.shape[-1]
        allowed = allowed[:width] if allowed.size >= width else mx.pad(allowed, (0, width - allowed.size))
        return mx.where(allowed.astype(mx.bool_), logits, -mx.inf)
